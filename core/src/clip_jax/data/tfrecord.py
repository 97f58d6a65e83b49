"""TFRecord shards read in Python, record by record, from any byte offset.

tf.data's reader can only start a file at its first record, so a resumed run would
re-read everything before its position. Reading the format ourselves (per record: a
uint64 length, its masked CRC32C, the data, the data's masked CRC32C) gives each record's
byte offset, and a resume seeks straight to it. Local paths use Python's buffered files;
``gs://`` and other schemes go through ``tf.io.gfile``.

Only the length's CRC is checked: it is what tells a TFRecord from any other file, and a
wrong length would send the reader into garbage. Checking the data's CRC in pure Python
would cost more than decoding the image; a damaged payload fails to parse or decode
instead, and is counted as an undecodable record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from clip_jax.data.formats import ShardError, shard_at

__all__ = ["ShardError", "crc32c", "masked_crc", "records"]

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), the checksum TFRecord uses; meant for the 8-byte lengths."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def records(path: str, offset: int = 0, data: bool = True) -> Iterator[tuple[bytes, int]]:
    """(record, byte offset after it) from ``offset`` on; ``data=False`` seeks past the
    payloads (b"" instead), to count records cheaply.

    Raises ShardError where the file stops being a TFRecord; the records before it have
    been yielded.
    """
    with shard_at(path, offset, measure=not data) as (file, size):
        yield from _read(file, path, offset, size)


def _read(file, path: str, offset: int, size: int | None) -> Iterator[tuple[bytes, int]]:
    while True:
        header = file.read(_HEADER.size)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise ShardError(f"{path}: truncated at byte {offset}")
        length, crc = _HEADER.unpack(header)
        if masked_crc(header[:8]) != crc:
            raise ShardError(f"{path}: not a TFRecord file, or corrupt at byte {offset}")
        end = offset + _HEADER.size + length + 4
        if size is None:
            payload = file.read(length)
            footer = file.read(4)
            if len(payload) < length or len(footer) < 4:
                raise ShardError(f"{path}: truncated at byte {offset}")
        else:
            if end > size:
                raise ShardError(f"{path}: truncated at byte {offset}")
            payload = b""
            file.seek(end)
        offset = end
        yield payload, offset
