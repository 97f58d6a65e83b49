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
from flax.linen.dtypes import promote_dtype

from clip_jax.models.attention import AttentionMask
from clip_jax.models.chunks import checkpointed, chunk_rows, over_rows
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
    """(image tokens, decoder inputs) -> next-token logits, float32; with ``targets``,
    each position's (cross-entropy, correct) instead (``VocabProjection``)."""

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
        targets_BxL: jax.Array | None = None,
        vocab: int | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``image_valid_BxN``: which image tokens are the image's (NaFlex padding is not
        attended to); None: all. ``vocab``: score only the first ``vocab`` ids."""
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
        head = VocabProjection(cfg, self.width, self.vocab_size, name="logits")
        if targets_BxL is None:
            return head(x_BxLxD, vocab)
        return head.cross_entropy(x_BxLxD, targets_BxL, vocab)


class VocabProjection(nn.Module):
    """The decoder's output layer: ``nn.Dense``'s parameters (``kernel``, ``bias``), and
    its cross-entropy formed a chunk of caption positions at a time under
    ``jax.checkpoint``, so that the (batch, length, vocabulary) logits, their softmax and
    its gradient never exist whole: at 32,000 tokens they were the largest temporaries of
    SigLIP 2's step (about 40 MiB a pair)."""

    cfg: BlockConfig
    width: int
    vocab_size: int

    def setup(self) -> None:
        dtype = self.cfg.param_dtype
        shape = (self.width, self.vocab_size)
        self.kernel = self.param("kernel", dense_init(("embed", "vocab")), shape, dtype)
        self.bias = self.param("bias", zeros(("vocab",)), (self.vocab_size,), dtype)

    def _logits(self, x_BxLxD: jax.Array, kernel_DxV: jax.Array, bias_V: jax.Array):
        x_BxLxD, kernel_DxV, bias_V = promote_dtype(
            x_BxLxD, kernel_DxV, bias_V, dtype=self.cfg.dtype
        )
        dot_general = self.cfg.dot_general or jax.lax.dot_general
        logits = dot_general(x_BxLxD, kernel_DxV, (((x_BxLxD.ndim - 1,), (0,)), ((), ())))
        return (logits + bias_V).astype(jnp.float32)

    def __call__(self, x_BxLxD: jax.Array, vocab: int | None = None) -> jax.Array:
        """Float32 logits over the first ``vocab`` ids (None: all)."""
        vocab = vocab or self.vocab_size
        return self._logits(x_BxLxD, self.kernel[:, :vocab], self.bias[:vocab])

    def cross_entropy(
        self, x_BxLxD: jax.Array, targets_BxL: jax.Array, vocab: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(negative log-likelihood, argmax == target) of each position, float32, over the
        first ``vocab`` ids: the values of the dense formula, a chunk at a time."""
        vocab = vocab or self.vocab_size
        kernel_DxV, bias_V = self.kernel[:, :vocab], self.bias[:vocab]

        @checkpointed
        def chunk(x_BxlxD, targets_Bxl):
            logits_BxlxV = self._logits(x_BxlxD, kernel_DxV, bias_V)
            picked_Bxl = jnp.take_along_axis(logits_BxlxV, targets_Bxl[..., None], axis=-1)
            nll_Bxl = jax.nn.logsumexp(logits_BxlxV, axis=-1) - picked_Bxl[..., 0]
            correct_Bxl = (jnp.argmax(logits_BxlxV, axis=-1) == targets_Bxl).astype(jnp.float32)
            return (nll_Bxl, correct_Bxl), None

        size = chunk_rows(x_BxLxD.shape[0], vocab)
        (nll_BxL, correct_BxL), _ = over_rows(chunk, (x_BxLxD, targets_BxL), size)
        return nll_BxL, correct_BxL


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
