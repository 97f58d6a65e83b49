"""Record formats: how a kind of shard file becomes records, each with its byte offset.

The training streams (``data.stream``: logical readers, windowed shuffle, exact resume,
skip counts) never look inside a shard; they ask its format for records from a byte
offset on, and for the offset just after each one, which is all a resume needs. Every
format hands over the same kind of record, a serialized ``tf.train.Example`` with one
feature per field (``jpg``, ``txt``, ...), so parsing, decoding and the reasons a record
is skipped are the same whatever the files are. TFRecord is built in; a data source
plugin brings another (webdataset tar shards) by giving its ``DataSource`` one, and
names it in ``register(..., formats={"NAME": "module:attr"})`` so that ``clipctl data
synth --format NAME`` can write the embedded dataset in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from clip_jax.errors import UserError

if TYPE_CHECKING:
    from clip_jax.plugins import Component

# One example to write: key, image bytes, caption, integer label (None: no label).
Example = tuple[str, bytes, str, int | None]


class ShardError(Exception):
    """A shard that stops being readable: truncated, corrupt, or not of its format."""


@runtime_checkable
class RecordFormat(Protocol):
    """A shard file format, read from any byte offset and (optionally) written."""

    name: str  # the word used in messages and in ``data synth --format``
    suffix: str  # file name ending of its shards (".tfrecord", ".tar")

    def records(self, path: str, offset: int = 0, data: bool = True) -> Iterator[tuple[bytes, int]]:
        """(serialized tf.train.Example, byte offset after it) from ``offset`` on;
        ``data=False`` may give b"" records (counting them cheaply). Raises ShardError
        where the file stops being readable, after the records before it."""
        ...

    def write_shard(self, path: str, examples: Iterable[Example]) -> int:
        """Writes ``examples`` as one shard at ``path``; returns how many."""
        ...


def open_shard(path: str, mode: str = "rb"):
    """A binary file object (``mode`` "rb" or "wb") for a local path (buffered) or any
    tf.io.gfile URL (gs://): how every format reads and writes its shards."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_shard: mode {mode!r} is neither 'rb' nor 'wb'")
    if "://" in path:
        from clip_jax.data.tf_setup import import_tf

        return import_tf().io.gfile.GFile(path, mode)
    return open(path, mode, buffering=1 << 20)  # noqa: SIM115 (closed by the caller)


@contextmanager
def shard_at(path: str, offset: int, measure: bool) -> Iterator[tuple[Any, int | None]]:
    """(the shard open at byte ``offset``, its size when ``measure``: a reader seeking
    past payloads needs it to tell a truncated last one). Any failure to read it, other
    than the format's own ShardError, becomes one ShardError naming the file; read the
    records inside the ``with`` so that their failures are translated too."""
    try:
        with open_shard(path) as file:
            size = None
            if measure:
                file.seek(0, 2)
                size = file.tell()
            file.seek(offset)
            yield file, size
    except ShardError:
        raise
    except Exception as exc:  # OSError, tf.errors.OpError from gfile: unreadable
        raise ShardError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def example_bytes(features: dict[str, bytes | int]) -> bytes:
    """A serialized tf.train.Example: bytes values as bytes features, ints as int64."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    proto = {}
    for name, value in features.items():
        if isinstance(value, int):
            proto[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
            proto[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=proto)).SerializeToString()


class TfrecordFormat:
    """TFRecord shards (img2dataset's and DataComp's tfrecord output)."""

    name = "tfrecord"
    suffix = ".tfrecord"

    def records(self, path: str, offset: int = 0, data: bool = True) -> Iterator[tuple[bytes, int]]:
        from clip_jax.data import tfrecord

        return tfrecord.records(path, offset, data)

    def write_shard(self, path: str, examples: Iterable[Example]) -> int:
        from clip_jax.data.shards import serialize, write_shard

        return write_shard(path, (serialize(*example) for example in examples))


TFRECORD = TfrecordFormat()


def record_format(name: str) -> RecordFormat:
    """The format ``name`` as some data source registers it (``--format NAME``)."""
    from clip_jax.plugins import get_registry

    registry = get_registry()
    known: dict[str, Component] = {}
    for component in registry.components.get("data_source", {}).values():
        for format_name in component.formats:
            known.setdefault(format_name, component)
    if name not in known:
        raise UserError(
            f"unknown record format {name!r} (available: {', '.join(sorted(known))}); "
            "a data source plugin that is not installed may provide it",
            key="--format",
        )
    found = known[name].load_format(name)
    if not isinstance(found, RecordFormat):
        raise UserError(f"{known[name].formats[name]} is not a record format", key="--format")
    return found
