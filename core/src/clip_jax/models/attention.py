"""Which keys a query may read, and the attention product that honours it.

A mask travels as its structure (causal order, per-key validity, any other pattern)
rather than as one dense (B, 1, L, S) array, because cuDNN's fused kernel applies its
own causal and padding masks in the kernel but takes a dense mask as an additive bias
of that full shape, which costs memory traffic and, in training, refuses odd sequence
lengths. CLIP's 77 text tokens and a ViT-B/16's 197 are both odd (and some cuDNN
builds refuse odd lengths in the backward pass even without a bias), so the fused path
pads them to even ones and hides the padding with the kernel's own length masks.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AttentionMask:
    """Keys a query may read: those valid for its example, not in its future (causal),
    and allowed by ``pattern``. Every part is optional; an empty mask reads every key."""

    valid_BxS: jax.Array | None = None  # per example, which keys are real (not padding)
    pattern_BxLxS: jax.Array | None = None  # any other pattern, per example and query
    causal: bool = struct.field(pytree_node=False, default=False)

    @property
    def is_empty(self) -> bool:
        return not self.causal and self.valid_BxS is None and self.pattern_BxLxS is None


def dense_mask(mask: AttentionMask | None, length: int, keys: int) -> jax.Array | None:
    """The mask as one boolean array broadcastable to (B, 1, length, keys); None: all keys."""
    if mask is None or mask.is_empty:
        return None
    parts = []
    if mask.causal:
        parts.append(jnp.tril(jnp.ones((length, keys), jnp.bool_))[None, None])
    if mask.valid_BxS is not None:
        parts.append(mask.valid_BxS[:, None, None, :])
    if mask.pattern_BxLxS is not None:
        parts.append(mask.pattern_BxLxS[:, None])
    return reduce(jnp.logical_and, parts)


def _pad_to_even(x_BxLxHxK: jax.Array) -> jax.Array:
    if x_BxLxHxK.shape[1] % 2 == 0:
        return x_BxLxHxK
    return jnp.pad(x_BxLxHxK, ((0, 0), (0, 1), (0, 0), (0, 0)))


def fused_attention(
    q_BxLxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask: AttentionMask | None,
    implementation: str | None = "cudnn",
) -> jax.Array:
    """``jax.nn.dot_product_attention`` in the form cuDNN's fused kernel trains at any
    length: odd lengths padded by one zero query / key, causal order and padding given
    as the kernel's own masks, only other patterns as a dense mask (with the padding
    folded in). The padded query row is sliced off, so it never reaches the output or
    the gradients. ``implementation`` is exposed so that the same arguments can be
    checked on a CPU with ``"xla"``."""
    batch, length, keys = q_BxLxHxK.shape[0], q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]
    q, k, v = (_pad_to_even(t) for t in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
    padded = q.shape[1] != length or k.shape[1] != keys
    mask = mask or AttentionMask()
    options: dict[str, Any] = {}
    if mask.valid_BxS is None and mask.pattern_BxLxS is None:
        options["is_causal"] = mask.causal
        if padded:
            options["query_seq_lengths"] = jnp.full((batch,), length, jnp.int32)
            options["key_value_seq_lengths"] = jnp.full((batch,), keys, jnp.int32)
    else:
        dense_BxLxS = jnp.broadcast_to(dense_mask(mask, length, keys)[:, 0], (batch, length, keys))
        # A padded key is never read; a padded query reads every real key, so that no
        # row is empty (its output is dropped below).
        dense_BxLxS = jnp.pad(dense_BxLxS, ((0, 0), (0, 0), (0, k.shape[1] - keys)))
        if q.shape[1] > length:
            real_S = jnp.arange(k.shape[1]) < keys
            real_Bx1xS = jnp.broadcast_to(real_S, (batch, 1, k.shape[1]))
            dense_BxLxS = jnp.concatenate([dense_BxLxS, real_Bx1xS], axis=1)
        options["mask"] = dense_BxLxS[:, None]
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation, **options)
    return out[:, :length]
