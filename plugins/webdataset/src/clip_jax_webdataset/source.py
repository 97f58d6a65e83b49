"""The ``webdataset`` data source: the tfrecord source's options and files, read as tar."""

from __future__ import annotations

from clip_jax.data.sources import DataSource, tfrecord_source
from clip_jax_webdataset.format import WebdatasetFormat
from clip_jax_webdataset.options import WebdatasetDataOptions


def webdataset_source(options: WebdatasetDataOptions) -> DataSource:
    """Factory registered as data source ``webdataset``."""
    source = tfrecord_source(options)  # the same globs, checks and classes file
    source.record_format = WebdatasetFormat(label_key=options.label_key)
    return source
