"""A captioning decoder over image tokens: CapPa (Tschannen et al., 2023) and the LocCa
decoder of SigLIP 2's recipe.

A small transformer reads the caption so far (causal self-attention) and the image
tower's patch tokens (cross-attention) and predicts the next token: the teacher-forced
captioning loss trains the image tower to keep what a caption needs, which contrastive
losses alone underweight. CapPa's parallel prediction replaces every input token with a
mask token and drops the causal mask for a share of the examples, so the decoder must
predict the whole caption from the image alone: a harder task that the paper found
makes the image tower better. Greedy decoding is for reading what the model learned.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.attention import AttentionMask
from clip_jax.models.layers import Attention, BlockConfig, Mlp, dense_init, make_norm, zeros


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the image, MLP."""

    cfg: BlockConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask: AttentionMask,
        image_BxNxD: jax.Array,
        image_mask: AttentionMask | None = None,
    ) -> jax.Array:
        drop = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
        h = make_norm(self.cfg, "ln_1")(x_BxLxD)
        x_BxLxD = x_BxLxD + drop(Attention(self.cfg, name="self_attn")(h, mask))
        h = make_norm(self.cfg, "ln_2")(x_BxLxD)
        cross = dataclasses.replace(self.cfg, rotary=False)
        x_BxLxD = x_BxLxD + drop(Attention(cross, name="cross_attn")(h, image_mask, image_BxNxD))
        h = make_norm(self.cfg, "ln_3")(x_BxLxD)
        return x_BxLxD + drop(Mlp(self.cfg, name="mlp")(h))


class CaptionDecoder(nn.Module):
    """(image tokens, decoder inputs) -> next-token logits, float32."""

    cfg: BlockConfig
    width: int
    depth: int
    vocab_size: int
    max_length: int
    mask_id: int  # the input token of parallel prediction

    @nn.compact
    def __call__(
        self,
        image_BxNxE: jax.Array,
        inputs_BxL: jax.Array,
        parallel_B: jax.Array | None = None,
        train: bool = False,
        image_valid_BxN: jax.Array | None = None,
    ) -> jax.Array:
        """``image_valid_BxN``: which image tokens are the image's (NaFlex padding is not
        attended to); None: all."""
        cfg, (batch, length) = self.cfg, inputs_BxL.shape
        if length > self.max_length:
            raise ValueError(f"got {length} tokens, the decoder's max_length is {self.max_length}")
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=cfg.dot_general)
        image_BxNxD = nn.Dense(
            self.width, kernel_init=dense_init((None, "embed")), name="image_proj", **dense
        )(image_BxNxE.astype(cfg.dtype))
        image_BxNxD = make_norm(cfg, "ln_image")(image_BxNxD)
        causal_LxL = jnp.tril(jnp.ones((length, length), jnp.bool_))
        if parallel_B is None:
            parallel_B = jnp.zeros((batch,), jnp.bool_)
        inputs_BxL = jnp.where(parallel_B[:, None], self.mask_id, inputs_BxL)
        # Parallel examples see every (mask) position; the others only the past.
        mask = AttentionMask(pattern_BxLxS=causal_LxL[None] | parallel_B[:, None, None])
        x_BxLxD = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="token_embed",
        )(inputs_BxL)
        pos_LxD = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (self.max_length, self.width),
            cfg.param_dtype,
        )
        x_BxLxD = x_BxLxD + pos_LxD[:length].astype(cfg.dtype)
        image_mask = AttentionMask(valid_BxS=image_valid_BxN)
        for i in range(self.depth):
            x_BxLxD = DecoderBlock(cfg, not train, name=f"block_{i}")(
                x_BxLxD, mask, image_BxNxD, image_mask
            )
        x_BxLxD = make_norm(cfg, "ln_final")(x_BxLxD)
        logits = nn.Dense(
            self.vocab_size,
            kernel_init=dense_init(("embed", "vocab")),
            bias_init=zeros(("vocab",)),
            name="logits",
            **dense,
        )(x_BxLxD)
        return logits.astype(jnp.float32)


def teacher_inputs(tokens_BxL: jax.Array, bos_id: int) -> jax.Array:
    """The decoder's inputs for targets ``tokens``: the captions shifted right by a BOS."""
    bos = jnp.full((tokens_BxL.shape[0], 1), bos_id, tokens_BxL.dtype)
    return jnp.concatenate([bos, tokens_BxL[:, :-1]], axis=1)


def captioning_loss(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, token accuracy) over the targets that are not padding."""
    valid_BxL = (targets_BxL != pad_id).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    nll_BxL = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
    count = jnp.maximum(valid_BxL.sum(), 1.0)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return (nll_BxL * valid_BxL).sum() / count, (correct_BxL * valid_BxL).sum() / count


def greedy_decode(
    decode_logits, image_BxNxE: jax.Array, length: int, bos_id: int, eos_id: int, pad_id: int
) -> jax.Array:
    """Captions, one token at a time: ``decode_logits(image, inputs) -> logits``. After
    a caption's end-of-text token, its remaining positions are padding. Traceable: jit
    it (with the model) to decode many batches with one compilation."""
    batch = image_BxNxE.shape[0]
    tokens_BxL = jnp.full((batch, length), pad_id, jnp.int32)

    def step(i, carry):
        tokens_BxL, done_B = carry
        logits = decode_logits(image_BxNxE, teacher_inputs(tokens_BxL, bos_id))
        next_B = jnp.where(done_B, pad_id, jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32))
        return tokens_BxL.at[:, i].set(next_B), done_B | (next_B == eos_id)

    tokens_BxL, _ = jax.lax.fori_loop(0, length, step, (tokens_BxL, jnp.zeros((batch,), jnp.bool_)))
    return tokens_BxL
