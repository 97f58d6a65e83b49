"""One logical reader's training stream, resumable in constant time.

A reader's raw stream is its shards read one after another, in an order reshuffled
every epoch by a stateless hash of (seed, reader, epoch). The shuffle is by windows:
consecutive windows of ``window`` raw records, each permuted by a hash of (seed, reader,
window index). Record ``j`` of window ``k``'s permutation has position ``k * window + j``,
one increasing int; a record that is skipped keeps its position, so gaps count it.

Everything is a pure function of where window ``k`` starts in the raw stream: the epoch,
the shard's index in that epoch's order and the byte offset in that shard. A reader's
state (``FIELDS``) is that cursor for the window of its next position, the position, and
the skip counts so far. A resume opens that shard, seeks to the byte, reads one window
(the records before the position in it are dropped) and goes on: the same records in
the same order as the uninterrupted run, whatever the position.

Records are read in Python by the shards' record format (``data.formats``: TFRecord,
or a plugin's, e.g. webdataset tar; each record with its byte offset) and handed to
tf.data, which parses, decodes and resizes them in a parallel, order-keeping map.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from clip_jax.data.formats import TFRECORD, RecordFormat, ShardError
from clip_jax.data.naflex import as_images
from clip_jax.data.tf_setup import import_tf
from clip_jax.errors import UserError
from clip_jax.schemas import PreprocessOptions

# A reader's resume state, one int64 each: its next position; where that position's
# window starts (epoch, shard index in the epoch's order, byte offset, and the shards
# found unreadable before it); the other skip counts; and the window size and shard
# count it was made with, so that a spec that changes them is refused on resume.
FIELDS = (
    "position",
    "epoch",
    "file",
    "offset",
    "unreadable_shard",
    "undecodable",
    "missing_key",
    "empty_caption",
    "window",
    "shards",
)
STATE_FIELDS = len(FIELDS)
REASONS = ("undecodable", "missing_key", "empty_caption", "unreadable_shard")
_OK, _MISSING, _EMPTY = 0, 1, 2
_FILE_ORDER, _WINDOW_ORDER = 1, 2  # hash domains: shard order per epoch, window permutation
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc malloc.h)

log = logging.getLogger("clip_jax.data")
_open_streams: weakref.WeakSet[ReaderStream] = weakref.WeakSet()
CLOSE_WAIT_S = 5.0  # the longest a close waits for tf.data to finish with the generator
PARKED_S = 0.2  # a generator tf.data has not run for this long is parked: safe to drop
Cursor = tuple[int, int, int, int]  # epoch, shard index in the epoch's order, byte, unreadable


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64, the same on every platform."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) that depends only on ``key``.

    Our own hash, not numpy's generators, whose streams may change between versions: a
    checkpoint must resume to the same order after an upgrade.
    """
    h = np.zeros(1, np.uint64)
    for part in key:
        h = _mix(h ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    return np.argsort(_mix(h ^ np.arange(n, dtype=np.uint64)), kind="stable")


class RawStream:
    """A reader's shards, one after another and forever, in a new order every epoch."""

    def __init__(
        self, files: Sequence[str], seed: int, reader: int, record_format: RecordFormat = TFRECORD
    ):
        self.files = list(files)
        self.seed, self.reader = seed, reader
        self.format = record_format
        self.records_read = 0  # records whose payload was read: the cost of a resume
        self.warned: set[str] = set()
        self._order: tuple[int, np.ndarray] | None = None

    def path(self, epoch: int, index: int) -> str:
        if self._order is None or self._order[0] != epoch:
            key = (self.seed, self.reader, epoch, _FILE_ORDER)
            self._order = (epoch, permutation(len(self.files), *key))
        return self.files[self._order[1][index]]

    def read(self, cursor: Cursor, data: bool = True) -> Iterator[tuple[bytes, Cursor]]:
        """(record, cursor just after it) from ``cursor`` on, forever.

        Raises UserError when 2 x shards in a row give no record: they covered a whole
        epoch, so no shard holds one and the stream would spin forever.
        """
        epoch, index, offset, unreadable = cursor
        barren = 0
        while True:
            path = self.path(epoch, index)
            found = False
            try:
                for record, after in self.format.records(path, offset, data):
                    found = True
                    self.records_read += data
                    yield record, (epoch, index, after, unreadable)
            except ShardError as exc:
                unreadable += 1
                self._warn(path, exc)
            barren = 0 if found else barren + 1
            if barren >= 2 * len(self.files):
                raise self._no_records()
            index, offset = index + 1, 0
            if index == len(self.files):
                epoch, index = epoch + 1, 0

    def _warn(self, path: str, exc: Exception) -> None:
        """Names a bad shard once, not once per pass over it."""
        if path not in self.warned:
            self.warned.add(path)
            log.warning("%s; skipping the rest of that shard", exc)

    def _no_records(self) -> UserError:
        return UserError(
            f"the {len(self.files)} shards of reader {self.reader} hold no readable record "
            f"(each is empty, unreadable or not a {self.format.name} file; the warnings name "
            "them): fix or remove them, or lower data.readers",
            key="data.train",
        )


def windows(
    raw: RawStream, window: int, position: int, cursor: Cursor
) -> Iterator[tuple[np.ndarray, list[bytes], np.ndarray]]:
    """Window by window from ``position`` on (``cursor``: where its window starts), each
    record with its position and the cursor of the window holding position + 1. Whole
    windows, so that tf.data calls into Python once per window, not once per record."""
    k = position // window
    records = raw.read(cursor)
    while True:
        held = list(islice(records, window))  # the stream never ends: always full
        end = held[-1][1]
        order = permutation(window, raw.seed, raw.reader, k, _WINDOW_ORDER)
        first = max(position - k * window, 0)
        cursors = np.tile(np.asarray(cursor, np.int64), (window - first, 1))
        cursors[-1] = end  # the last position's successor starts the next window
        picked = [held[i][0] for i in order[first:]]
        yield np.arange(k * window + first, (k + 1) * window, dtype=np.int64), picked, cursors
        cursor, k = end, k + 1


def seek(raw: RawStream, window: int, position: int) -> Cursor:
    """The cursor of ``position``'s window, found by reading record headers from the start:
    the slow way, for checkpoints that only stored a position."""
    before = (position // window) * window
    headers = islice(raw.read((0, 0, 0, 0), data=False), before)
    return deque(headers, maxlen=1)[0][1] if before else (0, 0, 0, 0)


def fresh_state(window: int, shards: int) -> np.ndarray:
    state = np.zeros(STATE_FIELDS, np.int64)
    state[FIELDS.index("window")], state[FIELDS.index("shards")] = window, shards
    return state


def _first(tf, sparse):
    """A VarLen feature's first value (b"" if none), and whether it had one."""
    values = sparse.values
    return tf.concat([values, tf.constant([b""])], 0)[0], tf.size(values) > 0


def _decoder(
    tf, image_size: int, image_key: str, caption_key: str, label_key: str | None, pre, patch_size
) -> Callable:
    from clip_jax.data.pipeline import _preprocess

    features = {image_key: tf.io.VarLenFeature(tf.string)}
    features[caption_key] = tf.io.VarLenFeature(tf.string)
    if label_key:
        features[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)

    placeholder = tf.constant(tf.io.encode_png(tf.zeros((1, 1, 3), tf.uint8)).numpy())

    def decode(position, record, cursor):
        # A record that fails to parse, or whose image fails to decode, raises here and
        # is dropped by ignore_errors: its gap in the positions counts it as undecodable.
        example = tf.io.parse_single_example(record, features)
        image, has_image = _first(tf, example[image_key])
        caption, has_caption = _first(tf, example[caption_key])
        empty = tf.strings.length(tf.strings.strip(caption)) == 0
        reason = tf.where(has_image & has_caption, tf.where(empty, _EMPTY, _OK), _MISSING)
        # A record to be dropped decodes a 1-pixel stand-in rather than its own image
        # (which may be missing): cheap, and one graph path for all records.
        image = tf.where(reason == _OK, image, placeholder)
        out = {
            "position": position,
            "cursor": cursor,
            "reason": reason,
            "image": _preprocess(tf, image, image_size, pre, patch_size),  # fixed shapes
            "caption": caption,
        }
        if label_key:
            out["label"] = example[label_key]
        return out

    return decode


def _counter(tf) -> Callable:
    """Running counts (records decoded, missing key, empty caption) on every record, so
    that a batch's last record carries the counts up to it, before the bad ones go."""

    def count(state, item):
        reason = item["reason"]
        flags = [reason >= _OK, reason == _MISSING, reason == _EMPTY]
        state += tf.cast(tf.stack(flags), tf.int64)
        return state, {**item, "counts": state}

    return count


@dataclass
class ReaderBatch:
    images: np.ndarray  # B x H x W x 3, or a NaflexImages (preprocess.resize = "naflex")
    captions: list[str]
    labels: np.ndarray | None
    state: np.ndarray  # FIELDS after this batch

    @property
    def skipped(self) -> dict[str, int]:
        return {reason: int(self.state[FIELDS.index(reason)]) for reason in REASONS}


class ReaderStream:
    """One reader's batches from a state on (``fresh_state`` to start)."""

    def __init__(
        self,
        files: Sequence[str],
        *,
        reader: int,
        seed: int,
        window: int,
        state: np.ndarray,
        image_size: int,
        batch_size: int,
        image_key: str = "jpg",
        caption_key: str = "txt",
        label_key: str | None = None,
        preprocess: PreprocessOptions | None = None,
        threads: int = 2,
        record_format: RecordFormat = TFRECORD,
        patch_size: int | None = None,
    ):
        self.raw = RawStream(files, seed, reader, record_format)
        self.window = window
        self.start = np.asarray(state, np.int64).copy()
        self.failure: BaseException | None = None
        self.resume_reads: int | None = None  # records read before the first one is used
        self.patch_size = patch_size  # the model's: NaFlex cuts images into such patches
        self.dataset = self._dataset(
            image_size, batch_size, image_key, caption_key, label_key, preprocess, threads
        )
        self._batches = None
        self._stopping = False  # close(): the generator ends at its next call
        self._generator_touched = 0.0  # monotonic time tf.data last ran the generator
        _open_streams.add(self)

    def close(self) -> None:
        """Ends the generator, then drops the tf.data iterator.

        Dropping the iterator waits (holding the GIL) for tf.data's threads, and one of
        them may be waiting for the GIL to run the generator: a deadlock, seen as a
        process that never exits. So the generator is told to end at its next call, and
        this thread sleeps (GIL released) until tf.data has left the generator alone for
        ``PARKED_S``: its buffers are full, or the generator has ended and tf.data has
        finalized it; either way no thread of it wants the GIL any more.
        """
        if self._batches is None:
            return
        self._stopping = True
        deadline = time.monotonic() + CLOSE_WAIT_S
        # Past its end too: tf.data then runs the generator's finalizer, under the GIL.
        while time.monotonic() - self._generator_touched <= PARKED_S:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self._batches = None

    def _elements(self) -> Iterator[tuple[np.ndarray, list[bytes], np.ndarray]]:
        """The windows, with any failure kept for the consumer: tf.data would turn it into
        an end of stream (ignore_errors) or a TensorFlow error without its message."""
        _undo_malloc_patch()  # applied as tf.data made the generator's iterator: now
        position = int(self.start[0])
        cursor = tuple(int(v) for v in self.start[1:5])
        self._generator_touched = time.monotonic()
        try:
            for item in windows(self.raw, self.window, position, cursor):
                if self.resume_reads is None:
                    self.resume_reads = self.raw.records_read
                yield item
                self._generator_touched = time.monotonic()
                if self._stopping:  # before reading another window
                    return
        except Exception as exc:
            self.failure = exc
        finally:
            self._generator_touched = time.monotonic()

    def _dataset(self, image_size, batch_size, image_key, caption_key, label_key, pre, threads):
        tf = import_tf()
        pre = pre or PreprocessOptions()
        signature = (
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.string),
            tf.TensorSpec((None, 4), tf.int64),
        )
        ds = tf.data.Dataset.from_generator(self._elements, output_signature=signature)
        ds = ds.unbatch()
        decode = _decoder(tf, image_size, image_key, caption_key, label_key, pre, self.patch_size)
        ds = ds.map(decode, num_parallel_calls=threads, deterministic=True)
        ds = ds.ignore_errors().scan(tf.zeros(3, tf.int64), _counter(tf))
        ds = ds.filter(lambda item: item["reason"] == _OK)
        ds = ds.batch(batch_size, drop_remainder=True)
        from clip_jax.data.pipeline import finish

        return finish(tf, ds, threads)

    def __iter__(self) -> Iterator[ReaderBatch]:
        return self

    def __next__(self) -> ReaderBatch:
        if self._batches is None:
            self._batches = self.dataset.as_numpy_iterator()
        try:
            item = next(self._batches)
        except StopIteration:
            raise self.failure or RuntimeError("a training stream ended") from None

        return ReaderBatch(
            images=as_images(item["image"]),
            captions=[c.decode("utf-8", "replace") for c in item["caption"]],
            labels=item.get("label"),
            state=self._state_after(item),
        )

    def _state_after(self, item: dict) -> np.ndarray:
        state = self.start.copy()
        position = int(item["position"][-1]) + 1
        decoded, missing, empty = (int(v) for v in item["counts"][-1])
        state[0] = position
        state[1:5] = item["cursor"][-1]  # includes the unreadable shards so far
        state[5] += position - int(self.start[0]) - decoded  # gaps: dropped by tf.data
        state[6] += missing
        state[7] += empty
        return state


def _undo_malloc_patch() -> None:
    """Gives glibc's malloc back large-block thresholds after tf.data's generator op
    fixed them at 128 KiB (its "Memory patch applied" log line, TF 2.21). With them every
    decoded 224 px image (600 KB) is a fresh mmap, and its page faults cost a fifth of
    the pipeline's CPU (bench/data_throughput.py: 260 -> 320 images per CPU-second).
    32 MiB is glibc's own ceiling for its adaptive threshold."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: the patch did not apply either


@atexit.register
def _close_all() -> None:
    """Ends every stream's generator while Python is still whole: a tf.data generator
    finalised during interpreter shutdown can hang the process on its way out."""
    for stream in list(_open_streams):
        stream.close()
