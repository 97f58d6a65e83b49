"""Reductions over a batch's (rows, K) logits formed a chunk of rows at a time.

A head that scores every row against K classes (a captioning decoder's vocabulary, a
self-distillation head's prototypes) would otherwise hold the whole batch's logits, and
their softmax and gradient, at once: gigabytes per device at pod batch sizes, the largest
temporaries of a step. Chunks cut along each example's rows (caption positions, masked
patches, views), never across examples: the batch is the axis split over devices, so each
device works on its own examples in every chunk, with no communication, whatever the mesh.

XLA's cost analysis counts a loop's body once, not once per trip: code that counts FLOPs
lowers under ``unchunked()``, which makes every reduction a single chunk (same products)
and drops the chunks' ``jax.checkpoint`` (recomputation is not model work).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp

# Logits a chunk forms at once (16 MiB in float32, over the global batch): a reduction's
# memory is a few such chunks, not copies of the whole batch's (rows, K) logits.
CHUNK_LOGITS = 2**22

_UNCHUNKED = contextvars.ContextVar("unchunked", default=False)


@contextlib.contextmanager
def unchunked() -> Iterator[None]:
    """Trace every reduction as one chunk (no loop): for counting FLOPs with XLA's cost
    analysis, which would count a chunked loop's body once."""
    token = _UNCHUNKED.set(True)
    try:
        yield
    finally:
        _UNCHUNKED.reset(token)


def checkpointed(fn: Callable) -> Callable:
    """``jax.checkpoint(fn)``: a chunk's backward pass forms its logits again instead of
    keeping them; ``fn`` itself under ``unchunked()``."""
    return fn if _UNCHUNKED.get() else jax.checkpoint(fn)


def chunk_rows(batch: int, width: int) -> int:
    """Rows of each example a chunk holds: ``CHUNK_LOGITS`` logits of ``width`` over the
    (global) ``batch``, at least one row; every row under ``unchunked()``."""
    if _UNCHUNKED.get():
        return 2**31 - 1
    return max(1, CHUNK_LOGITS // (batch * width))


def over_rows(fn: Callable, arrays: tuple, size: int, total: Callable = jnp.sum) -> tuple:
    """``fn(*chunks) -> (per_row, totals)`` over slices of ``size`` along axis 1 of every
    array (a sequential ``lax.map``, then the shorter rest): ``per_row`` outputs put back
    along axis 1, ``totals`` reduced with ``total`` (``jnp.sum``, ``jnp.max``)."""
    count = arrays[0].shape[1]
    whole = count - count % size
    parts = []
    if whole:

        def split(x):  # (B, whole, ...) -> (chunks, B, size, ...)
            x = x[:, :whole]
            return jnp.moveaxis(x.reshape(x.shape[0], whole // size, size, *x.shape[2:]), 1, 0)

        def merge(y):  # the inverse of split
            return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], whole, *y.shape[3:])

        if whole == size:  # one chunk: no loop
            per_row, totals = fn(*(x[:, :whole] for x in arrays))
            parts.append((per_row, totals))
        else:
            per_row, totals = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in arrays))
            parts.append(
                (jax.tree.map(merge, per_row), jax.tree.map(partial(total, axis=0), totals))
            )
    if whole < count:
        parts.append(fn(*(x[:, whole:] for x in arrays)))
    per_rows, totals = zip(*parts, strict=True)
    per_row = jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *per_rows)
    return per_row, jax.tree.map(lambda *ts: total(jnp.stack(ts), axis=0), *totals)
