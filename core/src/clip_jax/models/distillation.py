"""Distillation targets and loss over a whole batch, without its (rows, K) logits.

The teacher terms' heads compare features with K prototypes; their targets come from
Sinkhorn-Knopp, which couples every row of the batch, so the naive reduction holds the
batch's (rows, K) logits several times over (teacher logits, exponentials, targets, the
student's log-softmax and its gradient): at siglip2-b16's 2,048 pairs per device and 98
masked patches, gigabytes per copy. Here the logits stay factored (``Projected``) and
are formed a chunk of rows at a time: Sinkhorn-Knopp in scaling-vector form as passes
over the chunks, the student's cross-entropy under ``jax.checkpoint``. Values and
gradients equal the dense formulas' to float32 rounding.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clip_jax.models.chunks import checkpointed, chunk_rows, over_rows


class Projected(NamedTuple):
    """A projection head's output kept factored: its logits are ``features @
    prototypes.T`` (cosines), formed a chunk of rows at a time (``distillation_values``)
    and never for the whole batch."""

    features_BxRxE: jax.Array  # unit vectors, R rows per example (views, masked patches, 1)
    prototypes_KxE: jax.Array  # unit vectors


TINY = 1e-30  # Sinkhorn-Knopp's guard against dividing by a sum that underflowed


def _cosines(features_BxRxE: jax.Array, prototypes_KxE: jax.Array) -> jax.Array:
    """(B, R, K) logits of a chunk of rows: what the head's output stands for."""
    return features_BxRxE @ prototypes_KxE.T


class Sinkhorn(NamedTuple):
    """Sinkhorn-Knopp targets in scaling-vector form: ``q_ij = u_i * exp(l_ij / t - top)
    * v_j`` (l: the teacher's logits) before the last row normalisation, which
    ``targets`` does where a chunk of rows is formed: the (rows, K) matrix never is."""

    top: jax.Array  # the largest l / t of the batch: exp never overflows
    u_BxR: jax.Array  # the rows' scalings
    v_K: jax.Array  # the prototypes' scalings

    def targets(self, logits_BxrxK: jax.Array, u_Bxr: jax.Array, temperature: float) -> jax.Array:
        """(B, r, K) target distributions of a chunk of rows, from their logits and
        ``u_BxR``'s entries for them: each row of q normalised to sum 1."""
        q_BxrxK = u_Bxr[..., None] * jnp.exp(logits_BxrxK / temperature - self.top) * self.v_K
        return q_BxrxK / jnp.maximum(jnp.sum(q_BxrxK, axis=-1, keepdims=True), TINY)


def sinkhorn(
    teacher: Projected, temperature: float, iterations: int = 3, chunk: int | None = None
) -> Sinkhorn:
    """The teacher's logits turned into targets: sharpened by ``temperature`` and
    balanced by Sinkhorn-Knopp so that every prototype gets an equal share of the batch
    (DINOv2's centering; no state carried between steps). Normalising q = exp(l/t - max)
    to sum 1, then ``iterations`` times its columns to sum 1/K and its rows to 1/rows, is
    done on the scaling vectors, in passes over ``chunk`` rows of each example
    (``chunk_rows``): one for the max (one for the whole batch, as the dense formula's:
    a max per chunk would scale rows differently before the first column normalisation),
    one for the column sums, and one per row normalisation but the last (``targets``)."""
    if iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one iteration (got {iterations})")
    features_BxRxE, prototypes_KxE = jax.lax.stop_gradient(teacher)
    batch, per_example, _ = features_BxRxE.shape
    rows, count = batch * per_example, prototypes_KxE.shape[0]
    size = chunk or chunk_rows(batch, count)

    def scaled(f_BxrxE):
        return _cosines(f_BxrxE, prototypes_KxE) / temperature

    _, top = over_rows(lambda f: (None, jnp.max(scaled(f))), (features_BxRxE,), size, jnp.max)

    def exps(f_BxrxE):
        return jnp.exp(scaled(f_BxrxE) - top)

    _, sums_K = over_rows(lambda f: (None, jnp.sum(exps(f), axis=(0, 1))), (features_BxRxE,), size)
    total = jnp.sum(sums_K)
    u_BxR = jnp.full((batch, per_example), 1 / total)  # q sums to 1
    sums_K = sums_K / total  # the column sums of q are v_j * sums_K[j]
    v_K = jnp.ones((count,), jnp.float32)

    def rows_pass(v_K, f_BxrxE, u_Bxr):
        """Each row to sum 1/rows, and the next column sums."""
        exp = exps(f_BxrxE)
        u_Bxr = u_Bxr / jnp.maximum(u_Bxr * jnp.sum(exp * v_K, axis=-1), TINY) / rows
        return u_Bxr, jnp.sum(u_Bxr[..., None] * exp, axis=(0, 1))

    for step in range(iterations):
        v_K = v_K / jnp.maximum(v_K * sums_K, TINY) / count  # each column to sum 1/K
        if step < iterations - 1:
            u_BxR, sums_K = over_rows(partial(rows_pass, v_K), (features_BxRxE, u_BxR), size)
    return Sinkhorn(top, u_BxR, v_K)


def distillation_values(
    student: Projected,
    teacher: Projected,
    student_t: float,
    teacher_t: float,
    chunk: int | None = None,
) -> dict[str, jax.Array]:
    """Cross-entropy of each student row against its teacher row's Sinkhorn-Knopp
    target, averaged; and how often their argmaxes agree. The student has V rows per
    teacher row, side by side (R = 1 pooled teacher row and V local views, or one row per
    masked patch). Each chunk of rows forms its logits under ``jax.checkpoint``: the
    backward pass forms them again instead of keeping (rows, K). ``chunk``: rows of each
    example per chunk (None: ``chunk_rows``'s)."""
    batch, per_example, _ = student.features_BxRxE.shape
    views = per_example // teacher.features_BxRxE.shape[1]
    size = chunk or chunk_rows(batch, student.prototypes_KxE.shape[0])
    plan = sinkhorn(teacher, teacher_t, chunk=chunk)
    teacher_features, teacher_prototypes_KxE = jax.lax.stop_gradient(teacher)
    # Each student row side by side with its teacher row's features and scaling.
    teacher_BxSxE = jnp.repeat(teacher_features, views, axis=1)
    u_BxS = jnp.repeat(plan.u_BxR, views, axis=1)

    @checkpointed
    def chunk_values(student_BxrxE, teacher_BxrxE, u_Bxr):
        teacher_BxrxK = _cosines(teacher_BxrxE, teacher_prototypes_KxE)
        student_BxrxK = _cosines(student_BxrxE, student.prototypes_KxE)
        targets_BxrxK = plan.targets(teacher_BxrxK, u_Bxr, teacher_t)
        log_p = jax.nn.log_softmax(student_BxrxK / student_t, axis=-1)
        agree = jnp.argmax(student_BxrxK, -1) == jnp.argmax(teacher_BxrxK, -1)
        sums = (-jnp.sum(targets_BxrxK * log_p), jnp.sum(agree.astype(jnp.float32)))
        return None, jnp.stack(sums)

    arrays = (student.features_BxRxE, teacher_BxSxE, u_BxS)
    _, (cross_entropy, agree) = over_rows(chunk_values, arrays, size)
    rows = batch * per_example
    return {"loss": cross_entropy / rows, "agreement": agree / rows}
