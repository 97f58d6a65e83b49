"""Guards against non-finite values and loss spikes, judged on the device inside the step.

Why on the device: the step that produced a NaN or a spike is the one whose update must
not land, and the host only learns of a step's values after launching the next one.
Judging inside the jitted step drops exactly that update with no host sync, gives every
process the same verdict (the loss and the gradient norm are global values), and keeps
the spike statistics (a window of the last good steps' values) in the train state, so a
checkpoint holds them and a resumed run judges bit-identically to an unbroken one.

The host reads the per-step verdict (``guard/event``) one step late, when it waits for
that step anyway, to log each event, stop (``train.on_nonfinite = "stop"``) or roll back
(``train.spike.action = "rollback"``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax.errors import UserError

WATCHED = ("loss", "grad_norm")
EVENTS = {0: None, 1: "nonfinite", 2: "spike"}
COUNTERS = ("skipped_updates", "nonfinite", "spikes")
MAD_TO_STD = 1.4826  # a normal distribution's standard deviation is 1.4826 MADs


class NonFiniteStop(UserError):
    """The run met a non-finite loss or gradient and ``train.on_nonfinite`` is "stop"."""


def init_guard(window: int) -> dict[str, jax.Array]:
    """No history (NaN marks an empty slot), no events."""
    history = jnp.full((len(WATCHED), window), jnp.nan, jnp.float32)
    return {"history": history, **{name: jnp.zeros((), jnp.int32) for name in COUNTERS}}


def guard_shardings(mesh) -> Any:
    """Replicated: a few hundred bytes, read by every device's copy of the step."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: replicated, jax.eval_shape(lambda: init_guard(4)))


def create_guard(window: int, shardings: Any) -> dict[str, jax.Array]:
    return jax.jit(lambda: init_guard(window), out_shardings=shardings)()


def abstract_guard(window: int, shardings: Any) -> Any:
    shapes = jax.eval_shape(lambda: init_guard(window))
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def is_spike(history: jax.Array, values: jax.Array, options) -> jax.Array:
    """Whether a watched value is more than ``k`` robust standard deviations above the
    median of its history (NaN slots ignored), once ``min_history`` values are known.

    The median and the MAD ignore the outliers they are meant to find, unlike a mean and
    a standard deviation, which one huge value inflates enough to hide the next.
    """
    if options.action == "off":
        return jnp.zeros((), bool)
    known = jnp.sum(jnp.isfinite(history[0]))  # both rows fill together
    median = _median(history, known)
    mad = _median(jnp.abs(history - median[:, None]), known)
    # A flat history has no spread: a floor relative to the median keeps noise no spike.
    scale = jnp.maximum(MAD_TO_STD * mad, 1e-3 * jnp.abs(median) + 1e-6)
    watched = jnp.asarray([name in options.watch for name in WATCHED])
    enough = known >= options.min_history
    return enough & jnp.any(watched & (values > median + options.k * scale))


def _median(rows: jax.Array, known: jax.Array) -> jax.Array:
    """Each row's median over its ``known`` finite values (NaN slots sort last):
    jnp.nanmedian's answer at a fraction of its cost on CPU."""
    ordered = jnp.sort(rows, axis=1)
    low = jnp.maximum(known - 1, 0) // 2
    return (ordered[:, low] + ordered[:, known // 2]) / 2


def judge(guard: dict, loss: jax.Array, grad_norm: jax.Array, spike_options) -> tuple:
    """(whether the update may land, the event code, the guard after this step)."""
    values = jnp.stack([loss, grad_norm]).astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(values))
    spike = finite & is_spike(guard["history"], values, spike_options)
    ok = finite & ~spike
    shifted = jnp.concatenate([guard["history"][:, 1:], values[:, None]], axis=1)
    new = {
        "history": jnp.where(ok, shifted, guard["history"]),  # good steps only
        "skipped_updates": guard["skipped_updates"] + (~ok).astype(jnp.int32),
        "nonfinite": guard["nonfinite"] + (~finite).astype(jnp.int32),
        "spikes": guard["spikes"] + spike.astype(jnp.int32),
    }
    event = jnp.where(~finite, 1, jnp.where(spike, 2, 0)).astype(jnp.int32)
    return ok, event, new


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf (optax.apply_if_finite's masking)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def guard_metrics(guard: dict, event: jax.Array) -> dict[str, jax.Array]:
    return {"guard/event": event, **{f"guard/{name}": guard[name] for name in COUNTERS}}


def event_line(step: int, event: str, metrics: dict[str, float], options) -> str:
    """The run.log line of a guarded step."""
    values = f"loss {metrics.get('loss', float('nan')):.4g}, grad_norm {metrics.get('grad_norm', float('nan')):.4g}"
    if event == "nonfinite":
        return f"guard: step {step} had a non-finite loss or gradient ({values}); update skipped"
    return (
        f"guard: step {step} is a spike ({values}, more than {options.k:g} robust standard "
        f"deviations above the median of the last {options.window} steps); update skipped"
    )
