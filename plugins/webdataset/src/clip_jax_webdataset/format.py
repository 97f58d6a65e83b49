"""The webdataset record format: each tar example as the serialized tf.train.Example
that clip-jax's streams parse, one feature per member (``jpg``, ``txt``, ``json``...).

Turning a group of members into an Example is what lets webdataset shards use the
tfrecord source's whole machinery unchanged: windowed shuffle, exact resume (an
example's offset is its first header's), per-host sharding, and the same reasons for a
skipped record (a missing ``.txt`` is a missing key, a broken ``.jpg`` undecodable).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator

from clip_jax.data.formats import Example, example_bytes, open_shard
from clip_jax_webdataset import tar_records

LABEL_EXTENSION = "cls"  # webdataset's convention for an integer class id, as text


class WebdatasetFormat:
    """webdataset tar shards (img2dataset's default output format)."""

    name = "webdataset"
    suffix = ".tar"

    def __init__(self, label_key: str | None = LABEL_EXTENSION):
        # The member whose text is an integer label: an int64 feature, as in tfrecords.
        self.label_key = label_key

    def records(self, path: str, offset: int = 0, data: bool = True) -> Iterator[tuple[bytes, int]]:
        for key, members, after in tar_records.examples(path, offset, data):
            yield (self.example(key, members) if data else b""), after

    def example(self, key: str, members: dict[str, bytes]) -> bytes:
        """One example's members -> serialized tf.train.Example (key as ``__key__``)."""
        features: dict[str, bytes | int] = {"__key__": key.encode(), **members}
        if self.label_key in members:
            label = _integer(members[self.label_key])
            if label is None:  # not a number: read as no label (-1), like a tfrecord's
                del features[self.label_key]
            else:
                features[self.label_key] = label
        return example_bytes(features)

    def write_shard(self, path: str, examples: Iterable[Example]) -> int:
        """Writes the members img2dataset writes (``.jpg``, ``.txt``, ``.json``), plus
        ``.cls`` for a label."""
        count = 0
        buffer = io.BytesIO()  # gfile's writers cannot tell() their offset, as tarfile asks
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key, image, caption, label in examples:
                meta = {"key": key, "caption": caption}
                members = {"jpg": image, "txt": caption.encode()}
                if label is not None:
                    meta["label"] = label
                    members[LABEL_EXTENSION] = str(label).encode()
                members["json"] = json.dumps(meta).encode()
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mode = len(payload), 0o644
                    tar.addfile(info, io.BytesIO(payload))
                count += 1
        with open_shard(path, "wb") as file:
            file.write(buffer.getvalue())
        return count


def _integer(text: bytes) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


WEBDATASET = WebdatasetFormat()
