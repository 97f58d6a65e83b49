"""Logical readers: the global batch does not depend on how many processes read it.

The training shards are split among a fixed number of readers (``data.readers``), each
with its own files, shuffle seed and position in its own record stream. A global batch
is the readers' sub-batches in reader order, and each process owns a contiguous block
of readers. So a 2-process run sees exactly the batches a 1-process run sees, and a
checkpoint's positions (one per reader) mean the same on any topology.

With ``labels``, batches carry the records' ``label_key`` feature (int64, -1 where a
record has none), for heads that train on labels; otherwise the feature is not parsed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from clip_jax.data import pipeline
from clip_jax.errors import UserError
from clip_jax.schemas import PreprocessOptions, RecordKeys


@dataclass
class LocalBatch:
    images: np.ndarray
    captions: list[str]
    skipped: int  # records dropped so far by this process's readers
    # This process's readers' positions after this batch: a checkpoint saved after the
    # step that used it resumes here, however far a prefetcher has read ahead.
    positions: np.ndarray
    labels: np.ndarray | None = None  # B int64 (-1: no label), when the readers read labels


class Readers:
    def __init__(
        self,
        files: Sequence[str],
        keys: RecordKeys,
        *,
        image_size: int,
        global_batch: int,
        seed: int,
        positions: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        preprocess: PreprocessOptions | None = None,
        labels: bool = False,
    ):
        count = keys.readers
        if count % process_count:
            raise UserError(
                f"data.readers ({count}) must be a multiple of the {process_count} processes"
            )
        if global_batch % count:
            raise UserError(
                f"train.batch_size ({global_batch}) must divide by data.readers ({count})"
            )
        if len(files) < count:
            raise UserError(
                f"{len(files)} training shards cannot feed data.readers = {count}: "
                "lower data.readers or write more, smaller shards"
            )
        if len(positions) != count:
            raise UserError(
                f"the checkpoint has {len(positions)} reader positions but data.readers is "
                f"{count}: resume with the data.readers it was written with"
            )
        per_process = count // process_count
        self.owned = range(process_index * per_process, (process_index + 1) * per_process)
        self.all_positions = list(positions)
        self.labels = labels
        self.streams = []
        for reader in self.owned:
            dataset = pipeline.make_dataset(
                list(files)[reader::count],
                image_size=image_size,
                batch_size=global_batch // count,
                image_key=keys.image_key,
                caption_key=keys.caption_key,
                label_key=keys.label_key if labels else None,
                train=True,
                seed=seed + 7919 * reader,
                shuffle_buffer=max(keys.shuffle_buffer // count, 1),
                start_position=positions[reader],
                preprocess=preprocess,
            )
            self.streams.append(pipeline.iterate(dataset, start_position=positions[reader]))
        self.skipped = [0] * len(self.streams)

    def __iter__(self) -> Iterator[LocalBatch]:
        return self

    def __next__(self) -> LocalBatch:
        batches = [next(stream) for stream in self.streams]
        for i, (reader, batch) in enumerate(zip(self.owned, batches, strict=True)):
            self.all_positions[reader] = batch.next_position
            self.skipped[i] = batch.skipped
        return LocalBatch(
            images=np.concatenate([b.images for b in batches]),
            captions=[c for b in batches for c in b.captions],
            skipped=self.skipped_total,
            positions=self.local_positions(),
            labels=np.concatenate([b.labels for b in batches]) if self.labels else None,
        )

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped)

    def local_positions(self) -> np.ndarray:
        return np.asarray([self.all_positions[r] for r in self.owned], dtype=np.int64)
