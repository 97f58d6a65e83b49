"""Logical readers: the global batch does not depend on how many processes read it.

The training shards are split among a fixed number of readers (``data.readers``), each
with its own files, shuffle and position in its own record stream (``data.stream``). A
global batch is the readers' sub-batches in reader order, and each process owns a
contiguous block of readers. So a 2-process run sees exactly the batches a 1-process run
sees, and a checkpoint's reader states (one row each) mean the same on any topology.

A reader's state is a few ints (``STATE_FIELDS``): its position, where that position's
shuffle window starts in its shards, and its skip counts. Resuming from it costs one
window of reading, wherever the position is.

With ``labels``, batches carry the records' ``label_key`` feature (int64, -1 where a
record has none), for heads that train on labels; otherwise the feature is not parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip_jax.data.formats import TFRECORD, RecordFormat
from clip_jax.data.naflex import concat_rows
from clip_jax.data.stream import (
    FIELDS,
    REASONS,
    STATE_FIELDS,
    RawStream,
    ReaderStream,
    fresh_state,
    seek,
)
from clip_jax.errors import UserError
from clip_jax.schemas import PreprocessOptions, RecordKeys

__all__ = ["FIELDS", "REASONS", "STATE_FIELDS", "LocalBatch", "Readers", "data_checkpoint"]

FORMAT = "clip_jax.readers/2"
log = logging.getLogger("clip_jax.data")


@dataclass
class LocalBatch:
    """One process's share of a global batch."""

    images: Any  # B x H x W x 3, or a NaflexImages (preprocess.resize = "naflex")
    captions: list[str]
    labels: np.ndarray | None
    # Each owned reader's state after this batch, (owned readers, STATE_FIELDS) int64: a
    # checkpoint saved after the step that used it resumes here, however far a
    # prefetcher has read ahead. Opaque outside clip_jax.data.
    positions: np.ndarray
    # Records skipped so far by this process's readers, by reason (REASONS), since the
    # run started (the counts restored from the checkpoint included).
    skipped: dict[str, int] = field(default_factory=dict)


def data_checkpoint(rows: np.ndarray) -> dict[str, Any]:
    """All readers' states (rows in reader order) -> the JSON a checkpoint keeps."""
    rows = np.asarray(rows, np.int64)
    if rows.ndim < 2 or rows.shape[-1] != STATE_FIELDS:
        raise ValueError(f"reader states must be (readers, {STATE_FIELDS}), got {rows.shape}")
    rows = rows.reshape(-1, STATE_FIELDS)  # (processes, owned, fields) stacks: reader order
    return {
        "format": FORMAT,
        "fields": list(FIELDS),
        "readers": [[int(v) for v in row] for row in rows],
        "skipped": {r: int(rows[:, FIELDS.index(r)].sum()) for r in REASONS},
    }


class Readers:
    def __init__(
        self,
        files: Sequence[str],
        keys: RecordKeys,
        *,
        image_size: int,
        global_batch: int,
        seed: int,
        resume: dict[str, Any] | None = None,
        process_index: int = 0,
        process_count: int = 1,
        preprocess: PreprocessOptions | None = None,
        labels: bool = False,
        record_format: RecordFormat = TFRECORD,
        patch_size: int | None = None,
    ):
        count = keys.readers
        check_layout(len(files), count, global_batch, process_count)
        per_process = count // process_count
        self.owned = range(process_index * per_process, (process_index + 1) * per_process)
        self.labels = labels
        self.window = max(keys.shuffle_buffer // count, 1)
        shards = [list(files)[reader::count] for reader in range(count)]
        states = _states(resume, shards, count, self.window, seed, record_format)
        self.streams = [
            ReaderStream(
                shards[reader],
                reader=reader,
                seed=seed,
                window=self.window,
                state=states[reader],
                image_size=image_size,
                batch_size=global_batch // count,
                image_key=keys.image_key,
                caption_key=keys.caption_key,
                label_key=keys.label_key if labels else None,
                preprocess=preprocess,
                record_format=record_format,
                patch_size=patch_size,
            )
            for reader in self.owned
        ]

    def __iter__(self) -> Iterator[LocalBatch]:
        return self

    def __next__(self) -> LocalBatch:
        batches = [next(stream) for stream in self.streams]
        skipped = dict.fromkeys(REASONS, 0)
        for batch in batches:
            for reason, n in batch.skipped.items():
                skipped[reason] += n
        return LocalBatch(
            images=concat_rows([b.images for b in batches]),
            captions=[c for b in batches for c in b.captions],
            labels=np.concatenate([b.labels for b in batches]) if self.labels else None,
            positions=np.stack([b.state for b in batches]),
            skipped=skipped,
        )

    def close(self) -> None:
        """Ends the readers' streams now rather than when garbage-collected."""
        for stream in self.streams:
            stream.close()

    @property
    def records_read(self) -> int:
        """Records read from the shards so far by this process's readers."""
        return sum(stream.raw.records_read for stream in self.streams)

    @property
    def resume_reads(self) -> int:
        """Records read before each reader's first record was used: what a resume costs
        (None until every reader has started)."""
        return sum(stream.resume_reads or 0 for stream in self.streams)


def check_layout(shards: int, count: int, global_batch: int, process_count: int) -> None:
    """The readers a spec asks for fit its processes, batch and shards (the trainer
    checks it before the run folder is written; the readers again when they start)."""
    if count % process_count:
        raise UserError(
            f"{count} must be a multiple of the {process_count} processes", key="data.readers"
        )
    if global_batch % count:
        raise UserError(
            f"{global_batch} must divide by data.readers ({count})", key="train.batch_size"
        )
    if shards < count:
        raise UserError(
            f"{shards} training shards cannot feed {count} readers: "
            "lower data.readers or write more, smaller shards",
            key="data.readers",
        )


def _states(
    resume: dict[str, Any] | None,
    shards: list[list[str]],
    count: int,
    window: int,
    seed: int,
    record_format: RecordFormat,
) -> list[np.ndarray]:
    """Each reader's starting state: fresh, from a checkpoint, or from an older
    checkpoint's bare positions (found again by reading record headers)."""
    if resume is None:
        return [fresh_state(window, len(files)) for files in shards]
    if resume.get("format") == FORMAT:
        return _checked(resume, shards, count, window)
    if "positions" in resume or "position" in resume:
        positions = resume.get("positions", [resume.get("position", 0)])
        _check_count(len(positions), count)
        if not any(positions):  # the start, written the old way: nothing to find
            return [fresh_state(window, len(files)) for files in shards]
        log.warning(
            "the checkpoint stores bare data positions (an older clip-jax): finding them "
            "again by reading record headers; the record order differs from the run before"
        )
        return [
            _from_position(files, reader, window, seed, int(position), record_format)
            for reader, (files, position) in enumerate(zip(shards, positions, strict=True))
        ]
    raise UserError(
        f"the checkpoint's data state has an unknown format ({resume.get('format')!r}): "
        "resume it with the clip-jax that wrote it",
        key="data",
    )


def _check_count(saved: int, count: int) -> None:
    if saved != count:
        raise UserError(
            f"the checkpoint has {saved} reader positions but data.readers is {count}: "
            "resume with the data.readers it was written with",
            key="data.readers",
        )


def _checked(
    resume: dict[str, Any], shards: list[list[str]], count: int, window: int
) -> list[np.ndarray]:
    if list(resume.get("fields", [])) != list(FIELDS):
        raise UserError(f"the checkpoint's reader states have other fields: {resume['fields']}")
    rows = np.asarray(resume["readers"], np.int64).reshape(-1, STATE_FIELDS)
    _check_count(len(rows), count)
    saved_window = set(rows[:, FIELDS.index("window")].tolist())
    if saved_window != {window}:
        raise UserError(
            f"the checkpoint was written with {sorted(saved_window)[0] * count} "
            f"(a window of {sorted(saved_window)[0]} records per reader), this spec gives "
            f"{window} per reader: resume with the shuffle_buffer it was written with",
            key="data.shuffle_buffer",
        )
    saved_shards = rows[:, FIELDS.index("shards")].tolist()
    if saved_shards != [len(files) for files in shards]:
        raise UserError(
            f"the checkpoint's readers had {sum(saved_shards)} shards, this spec matches "
            f"{sum(len(f) for f in shards)}: resume with the shards it was written with",
            key="data.train",
        )
    return list(rows)


def _from_position(
    files: list[str],
    reader: int,
    window: int,
    seed: int,
    position: int,
    record_format: RecordFormat,
) -> np.ndarray:
    state = fresh_state(window, len(files))
    state[0] = position
    state[1:5] = seek(RawStream(files, seed, reader, record_format), window, position)
    return state
