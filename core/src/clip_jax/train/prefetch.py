"""Batches prepared ahead: one thread reads, tokenizes and puts the next batches on devices.

The training loop then only dispatches steps. A batch is whatever ``prepare`` makes of
the source's next item, in the source's order; the trainer's batches carry the reader
positions after them, so a checkpoint records where the consumed data ends, not how far
this thread has read ahead. Putting arrays on devices needs no collective
(``jax.make_array_from_process_local_data`` only copies to this process's devices), so a
background thread is safe in multi-process runs too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jax
import numpy as np

from clip_jax.data.readers import LocalBatch

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")


@dataclass
class StepBatch:
    """A train step's batch arguments on devices, and where the readers stand after them."""

    # images_BxHxWxC (or a NaflexImages), tokens_BxL[, labels_B]: global arrays
    inputs: tuple[Any, ...]
    positions: np.ndarray  # this process's readers' rows (opaque) after this batch
    skipped: dict[str, int]  # records dropped by this process's readers, by reason


def device_batches(
    layout: Any, tokenizer: Callable, labels: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[LocalBatch], StepBatch]:
    """What turns a process's batch into global arrays: captions tokenized, labels (when
    the head trains on them) passed through ``labels``, which may refuse them."""

    def put(array: np.ndarray) -> jax.Array:  # rows split over the batch axes
        return jax.make_array_from_process_local_data(layout.batch_sharding(array.ndim), array)

    def prepare(batch: LocalBatch) -> StepBatch:
        arrays = [batch.images, tokenizer(batch.captions)]
        if labels is not None:
            arrays.append(labels(batch.labels))
        # Images may be a pytree (NaFlex: patches, grids, masks): each leaf goes its way.
        inputs = tuple(jax.tree.map(put, a) for a in arrays)
        return StepBatch(inputs, batch.positions, batch.skipped)

    return prepare


class Prefetch(Generic[Item, Prepared]):
    """``prepare(item)`` for each item of ``source``, made up to ``depth`` items ahead.

    An exception in the thread (the source's or ``prepare``'s, StopIteration included) is
    raised by ``next`` where its batch would have been, with its own type. Use it as a
    context manager: leaving the block stops the thread, whatever the exit.
    """

    def __init__(
        self,
        source: Iterator[Item],
        prepare: Callable[[Item], Prepared],
        depth: int = 2,
        join_timeout_s: float = 60.0,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._join_timeout_s = join_timeout_s
        # A daemon, so that a source stuck in I/O can never keep the process alive.
        self._thread = threading.Thread(
            target=self._produce, args=(source, prepare), name="prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, source: Iterator[Item], prepare: Callable[[Item], Prepared]) -> None:
        while not self._stop.is_set():
            try:
                entry = (prepare(next(source)), None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                entry = (None, exc)
            while not self._stop.is_set():  # a bounded wait, to notice close()
                try:
                    self._queue.put(entry, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if entry[1] is not None:
                return

    def ready(self) -> bool:
        """Whether ``next`` would return (or raise) at once."""
        return self._error is not None or not self._queue.empty()

    def __iter__(self) -> Prefetch[Item, Prepared]:
        return self

    def __next__(self) -> Prepared:
        if self._error is None:
            prepared, self._error = self._queue.get()
            if self._error is None:
                return prepared
        raise self._error  # again on every later call: the thread has ended

    def close(self) -> None:
        """Stop the thread (it finishes the item in hand) and drop what it prepared."""
        self._stop.set()
        self._thread.join(self._join_timeout_s)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> Prefetch[Item, Prepared]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
