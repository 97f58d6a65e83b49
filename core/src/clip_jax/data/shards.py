"""Writing tfrecord shards in the img2dataset layout (features ``key``, ``jpg``, ``txt``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from clip_jax.data.tf_setup import import_tf


def serialize(
    key: str,
    image: bytes,
    caption: str,
    label: int | None = None,
    image_key: str = "jpg",
    caption_key: str = "txt",
    label_key: str = "label",
) -> bytes:
    tf = import_tf()

    def as_bytes(value: bytes) -> object:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    feature = {
        "key": as_bytes(key.encode()),
        image_key: as_bytes(image),
        caption_key: as_bytes(caption.encode()),
    }
    if label is not None:
        feature[label_key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shard(path: str | Path, records: Iterable[bytes]) -> int:
    tf = import_tf()
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
            count += 1
    return count
