"""Contrastive losses over a batch of paired, L2-normalised embeddings.

Each factory takes its validated options and the sharding ``Layout`` and returns a ``Loss``: the function plus the
initial logit scale / bias the model should start from. Embeddings arrive as global
arrays (sharded over the batch by the trainer); XLA inserts the gathers the
similarity matrix needs, so negatives come from the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from clip_jax.schemas import SigmoidOptions, SoftmaxOptions

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class Loss:
    fn: LossFn  # (img_emb_BxD, txt_emb_BxD, log_scale, bias) -> scalar
    init_temperature: float
    init_bias: float | None  # None: the model has no logit bias


def softmax_loss(options: SoftmaxOptions, layout: object = None) -> Loss:
    max_log_scale = math.log(options.max_temperature)

    def fn(img_emb_BxD, txt_emb_BxD, log_scale, bias):
        scale = jnp.exp(jnp.minimum(log_scale, max_log_scale))
        logits_BxB = scale * img_emb_BxD @ txt_emb_BxD.T
        labels_B = jnp.arange(logits_BxB.shape[0])
        i2t = optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels_B)
        t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels_B)
        return (i2t.mean() + t2i.mean()) / 2

    return Loss(fn, options.init_temperature, None)


def sigmoid_loss(options: SigmoidOptions, layout: object = None) -> Loss:
    def fn(img_emb_BxD, txt_emb_BxD, log_scale, bias):
        logits_BxB = jnp.exp(log_scale) * img_emb_BxD @ txt_emb_BxD.T + bias
        batch = logits_BxB.shape[0]
        labels_BxB = 2 * jnp.eye(batch) - 1  # +1 on the diagonal, -1 elsewhere
        # Sum over all pairs, normalised by the batch size (SigLIP paper, eq. 1).
        return -jnp.sum(jax.nn.log_sigmoid(labels_BxB * logits_BxB)) / batch

    return Loss(fn, options.init_temperature, options.init_bias)
