"""Webdataset tar shards read from any byte offset, one example (a group of members) at
a time.

A webdataset shard is a plain tar file whose consecutive members share a key: the
member's path up to the first dot of its file name (``00000/000000123.jpg``,
``00000/000000123.txt``, ``00000/000000123.json`` make example ``00000/000000123``).
An example starts at the 512-byte header of its first member (or of the GNU long-name /
pax header before it), so that offset is all a resume needs: seek there and read on.

Headers are parsed by ``tarfile.TarInfo.frombuf`` (it checks each header's checksum,
which is what tells a tar file from any other); members are read here, over a plain
file object, so that ``gs://`` works through tf.io.gfile and a damaged shard stops
where the damage is, after the examples before it.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

from clip_jax.data.formats import ShardError, shard_at

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split
# header offset, path (None: the end), data (None: announced, data not read yet),
# offset after the member's data
Member = tuple[int, str | None, bytes | None, int]


def split_name(path: str) -> tuple[str, str] | None:
    """Member path -> (example key, lower-case extension); None for a name without one."""
    found = _KEY_AND_EXTENSION.match(path)
    return (found.group(1), found.group(2).lower()) if found else None


def examples(
    path: str, offset: int = 0, data: bool = True
) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """(key, {extension: data}, byte offset after the example) from ``offset`` on;
    ``data=False`` seeks past member data (b"" values), to count examples cheaply.

    Raises ShardError where the file stops being a tar file; the examples before it have
    been yielded. An example whose own member is cut short is not; one whose members
    were all read when a header turns out corrupt or cut is, with what it has (the next
    member was perhaps its own: then the reader skips it as a missing key, if it is).
    """
    with shard_at(path, offset, measure=not data) as (file, size):
        yield from _grouped(_members(file, path, offset, size, data))


def _grouped(members: Iterator[Member]) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Members -> examples: one is complete when a member of another key is announced,
    or, at damage, when none of its members was being read (see ``examples``)."""
    key, fields, after, reading = None, {}, 0, False
    try:
        for start, name, payload, end in members:
            split = split_name(name) if name is not None else None
            if name is not None and split is None:
                continue  # no extension: not part of any example (webdataset skips it too)
            if key is not None and (split is None or split[0] != key):
                yield key, fields, start
                key, fields = None, {}
            if split is None:  # the end of the archive
                return
            key, reading = split[0], payload is None
            if payload is not None:
                fields[split[1]] = payload
                after = end
    except ShardError:
        if key is not None and not reading:  # the damage is past its last member
            yield key, fields, after
        raise


def _members(file, path: str, offset: int, size: int | None, data: bool) -> Iterator[Member]:
    """Regular members with the offset of their first header, then (end offset, None).
    Each is announced (data None) before its data is read: the example before it is
    complete then, even if this member turns out to be cut short."""
    start, long_name, pax = offset, None, {}
    while True:
        header = file.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            yield start, None, b"", start
            return
        if len(header) < BLOCK:
            raise ShardError(f"{path}: {_cut_or_foreign(offset)} at byte {offset}")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise ShardError(f"{path}: not a tar file, or corrupt at byte {offset}") from None
        length = int(pax.get("size", info.size))
        extended = info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE)
        end = offset + BLOCK + -(-length // BLOCK) * BLOCK
        regular = info.type in tarfile.REGULAR_TYPES
        name = pax.get("path") or long_name or info.name
        if regular:
            yield start, name, None, end
        if data or extended:
            padded = file.read(end - offset - BLOCK)  # tar pads every member to a block
            if len(padded) < end - offset - BLOCK:
                raise ShardError(f"{path}: truncated at byte {offset}")
            payload = padded[:length]
        else:
            if size is not None and end > size:
                raise ShardError(f"{path}: truncated at byte {offset}")
            file.seek(end)
            payload = b""
        offset = end
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XHDTYPE:
            pax = _pax_fields(payload)
            continue
        if regular:
            yield start, name, payload, offset
        start, long_name, pax = offset, None, {}


def _cut_or_foreign(offset: int) -> str:
    return "not a tar file" if offset == 0 else "truncated"


def _pax_fields(payload: bytes) -> dict[str, str]:
    """A pax extended header's "LEN key=value\\n" records (path and size are used)."""
    fields, at = {}, 0
    while at < len(payload):
        space = payload.find(b" ", at)
        if space < 0 or not payload[at:space].isdigit():
            break
        length = int(payload[at:space])
        if length <= 0:
            break
        key, _, value = payload[space + 1 : at + length - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at += length
    return fields
