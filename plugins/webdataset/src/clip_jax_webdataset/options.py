"""The ``webdataset`` source's spec keys: the tfrecord source's, keys naming members."""

from pydantic import Field

from clip_jax.schemas import TfrecordDataOptions


class WebdatasetDataOptions(TfrecordDataOptions):
    """img2dataset webdataset shards (``NNNNN.tar``, members ``KEY.jpg``/``KEY.txt``/
    ``KEY.json``); globs or lists, gs:// works. ``image_key``/``caption_key``/
    ``label_key`` name member extensions."""

    label_key: str | None = Field(
        None, description="member extension holding an integer class id as text (e.g. cls)"
    )
