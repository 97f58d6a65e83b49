"""Optimizers: an optax transformation and its learning-rate schedule, from the spec."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from clip_jax.schemas import AdamWOptions


def learning_rate_schedule(o: AdamWOptions, total_steps: int) -> optax.Schedule:
    peak, end = o.learning_rate, o.learning_rate * o.end_learning_rate_ratio
    warmup = min(o.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_learning_rate_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


NO_DECAY_NAMES = ("bias", "scale")  # biases, norms' scales (any shape: (heads, dim), scanned)


def _decay_mask(params) -> object:
    """Weight decay on matrices only, as open_clip: not on biases, norm scales or 1-D
    parameters. Names decide as well as shapes: attention's biases are (heads, head_dim),
    and scanned layers give every bias and scale a leading layers axis."""

    def decays(path, p) -> bool:
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", "")))
        return p.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(
    options: AdamWOptions, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """Factory registered as optimizer ``adamw``: returns (transformation, schedule)."""
    schedule = learning_rate_schedule(options, total_steps)
    parts = []
    if options.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(options.clip_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=options.b1,
            b2=options.b2,
            eps=options.eps,
            weight_decay=options.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
