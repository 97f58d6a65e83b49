"""The text tower: token (+ position) embeddings, a transformer, pooled output.

Padding is ``options.pad_id`` (0 by default) and every sequence ends with its
end-of-text token, so "eos" pooling reads the last non-padding position (a padding id
inside the text, such as CLIP's "!" = 0, does not move it). Bidirectional towers mask
padded keys only: every position, padding included, reads the real tokens, which is
what "last" pooling (text padded to a fixed length) relies on. ``pad_id = None`` masks
nothing, as SigLIP was trained: its padding is read like any token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.attention import AttentionMask
from clip_jax.models.layers import DTYPES, MapHead, block_config, make_norm, tower_encoder
from clip_jax.schemas import TextOptions


class TextTower(nn.Module):
    options: TextOptions

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, train: bool = False) -> jax.Array:
        o = self.options
        dtype = DTYPES[o.dtype]
        cfg = block_config(o, dtype)
        length = tokens_BxL.shape[1]
        if length > o.context_length:
            raise ValueError(f"got {length} tokens, context_length is {o.context_length}")
        x_BxLxD = nn.Embed(
            o.vocab_size,
            o.width,
            dtype=dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="token_embed",
        )(tokens_BxL)
        if o.positions == "learned":  # rotary positions live in the attention instead
            pos_LxD = self.param(
                "pos_embed",
                nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                (o.context_length, o.width),
                cfg.param_dtype,
            )
            x_BxLxD = x_BxLxD + pos_LxD[:length].astype(dtype)
        if o.pad_id is None:
            valid_BxL = jnp.ones(tokens_BxL.shape, jnp.bool_)
        else:
            valid_BxL = tokens_BxL != o.pad_id
        if o.causal:
            mask = AttentionMask(causal=True)
        elif o.pad_id is None:
            mask = None
        else:
            mask = AttentionMask(valid_BxS=valid_BxL)
        x_BxLxD = tower_encoder(o, cfg, deterministic=not train)(x_BxLxD, mask)
        x_BxLxD = make_norm(cfg, "ln_final")(x_BxLxD)
        if o.pool == "eos":
            last_B = jnp.max(jnp.where(valid_BxL, jnp.arange(length), 0), axis=1)
            return jnp.take_along_axis(x_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        if o.pool == "last":
            return x_BxLxD[:, -1]
        if o.pool == "first":
            return x_BxLxD[:, 0]
        if o.pool == "map":
            return MapHead(cfg, name="map_head")(x_BxLxD, valid_BxL)
        weights_BxL = valid_BxL.astype(x_BxLxD.dtype)
        summed_BxD = jnp.einsum("bld,bl->bd", x_BxLxD, weights_BxL)
        return summed_BxD / jnp.maximum(weights_BxL.sum(axis=1, keepdims=True), 1)
