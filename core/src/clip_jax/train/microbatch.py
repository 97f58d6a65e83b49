"""Micro-batches without losing negatives: gradient caching (Gao et al. 2021, GradCache).

A contrastive loss couples every example with every other one, so plain gradient
accumulation over micro-batches would shrink the set of negatives to a micro-batch.
Instead, for an objective split as ``score(forward(params, batch))``:

1. run ``forward`` on each micro-batch without keeping activations (only its outputs,
   e.g. the two embeddings, are kept);
2. score the whole batch's outputs, and differentiate the score with respect to them;
3. run each micro-batch forward again and back-propagate its share of that gradient.

The loss and gradients equal the full batch's (up to summation order), while only one
micro-batch's activations are alive at a time. Micro-batch ``i`` takes rows
``i, i + k, i + 2k...``, so that with the batch split over devices every micro-batch
is split over all of them too, and the whole-batch outputs are put back in the
original row order before scoring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from clip_jax.models.layers import constrain


def _split(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...), micro-batch i holding rows i, i+k, ..."""
    micro = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return constrain(micro, (None, "batch") + (None,) * (x.ndim - 1))


def _merge(x: jax.Array) -> jax.Array:
    """The inverse of ``_split``: back to (B, ...) in the original row order."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _split_tree(tree: Any, k: int) -> Any:
    """``_split`` on every array of a pytree (NaFlex images are a tuple of arrays)."""
    return jax.tree.map(lambda x: _split(x, k), tree)


def cached_value_and_grad(objective, k: int) -> Callable:
    """``(params, images, tokens, labels, dropout_rng, **extras) -> ((loss, metrics),
    grads)`` over ``k`` micro-batches; ``extras`` (the EMA teacher) reach every
    micro-batch's ``forward`` whole, except the objective's ``example_inputs`` (a key per
    example), split like the batch. An objective without a ``forward``/``score`` split (a plugin
    head's plain function) gets plain accumulation: the mean of the micro-batches' losses,
    metrics and gradients, exact only for losses that are a mean over examples."""
    if not (hasattr(objective, "forward") and hasattr(objective, "score")):
        return _accumulated_value_and_grad(objective, k)

    per_example_inputs = getattr(objective, "example_inputs", ())

    def value_and_grad(params, images, tokens, labels, dropout_rng, **extras):
        rows = {name: _split_tree(extras.pop(name), k) for name in per_example_inputs}
        micro = (_split_tree(images, k), _split(tokens, k), jnp.arange(k), rows)

        def forward(p, images_b, tokens_b, i, rows_b):
            rng = jax.random.fold_in(dropout_rng, i)
            return objective.forward(p, images_b, tokens_b, rng, **extras, **rows_b)

        def embed(carry, xs):
            return carry, forward(params, *xs)

        _, (per_example, shared) = jax.lax.scan(embed, None, micro)
        per_example = jax.tree.map(_merge, per_example)
        shared = jax.tree.map(lambda x: x[0], shared)  # the same in every micro-batch

        def score(per_example, shared):
            return objective.score(per_example, shared, labels)

        (loss, metrics), (d_per_example, d_shared) = jax.value_and_grad(
            score, argnums=(0, 1), has_aux=True
        )(per_example, shared)
        d_per_example = jax.tree.map(lambda g: _split(g, k), d_per_example)

        def backprop(grads, xs):
            images_b, tokens_b, i, rows_b, d_micro = xs
            _, pullback = jax.vjp(lambda p: forward(p, images_b, tokens_b, i, rows_b), params)
            # Shared outputs (logit scale, bias) are counted once, with the first micro-batch.
            d_once = jax.tree.map(lambda g: jnp.where(i == 0, g, jnp.zeros_like(g)), d_shared)
            (micro_grads,) = pullback((d_micro, d_once))
            return jax.tree.map(jnp.add, grads, micro_grads), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(backprop, zeros, (*micro, d_per_example))
        return (loss, metrics), grads

    return value_and_grad


def _accumulated_value_and_grad(objective, k: int) -> Callable:
    def value_and_grad(params, images, tokens, labels, dropout_rng):
        batch = jax.tree.leaves(images)[0].shape[0]
        labels = jnp.zeros((batch,), jnp.int32) if labels is None else labels
        grad_fn = jax.value_and_grad(objective, has_aux=True)

        def step(total: Any, xs):
            images_b, tokens_b, labels_b, i = xs
            rng = jax.random.fold_in(dropout_rng, i)
            out = grad_fn(params, images_b, tokens_b, labels_b, rng)
            return jax.tree.map(lambda a, b: a + b / k, total, out), None

        micro = (_split_tree(images, k), _split(tokens, k), _split(labels, k), jnp.arange(k))
        firsts = jax.tree.map(lambda x: x[0], micro[:3])
        first = jax.eval_shape(grad_fn, params, *firsts, dropout_rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        total, _ = jax.lax.scan(step, zeros, micro)
        return total

    return value_and_grad
