"""clip-jax plugin: data source ``webdataset``, img2dataset's default tar shards.

Registered through the same hook as the built-in ``tfrecord`` source, with its record
format (``formats``), which ``clipctl data synth --format webdataset`` writes. The
factory is ``lazy`` so that ``clipctl validate`` and ``clipctl plugins`` never import
TensorFlow.
"""

from clip_jax.plugins import hookimpl, lazy
from clip_jax_webdataset.options import WebdatasetDataOptions


@hookimpl
def register_data_sources(register):
    register(
        "webdataset",
        lazy("clip_jax_webdataset.source:webdataset_source"),
        options=WebdatasetDataOptions,
        description="img2dataset webdataset tar shards (.jpg/.txt/.json members; gs:// works)",
        formats={"webdataset": "clip_jax_webdataset.format:WEBDATASET"},
    )
