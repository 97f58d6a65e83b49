"""The ``captioning`` auxiliary term: a LocCa / CapPa decoder on the image tower's tokens.

The decoder has its own two extra input ids past the text vocabulary, a begin-of-caption
and a mask (parallel prediction's input), so that it needs nothing from the tokenizer:
the targets are the captions exactly as the text tower reads them, padding excluded.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.aux_terms import AuxTerm, CaptioningOptions
from clip_jax.errors import UserError
from clip_jax.models.decoder import CaptionDecoder, greedy_decode, teacher_inputs
from clip_jax.models.layers import DTYPES, BlockConfig


class CaptioningTerm(nn.Module):
    """(image tokens, caption tokens) -> per-example {"loss", "token_accuracy"}."""

    options: CaptioningOptions
    width: int
    vocab_size: int  # the text tower's: targets are below it
    max_length: int
    pad_id: int
    dtype: str = "float32"

    @property
    def bos_id(self) -> int:
        return self.vocab_size

    @property
    def mask_id(self) -> int:
        return self.vocab_size + 1

    def setup(self) -> None:
        o = self.options
        cfg = BlockConfig(
            heads=o.heads,
            mlp_hidden=int(self.width * o.mlp_ratio),
            dropout=o.dropout,
            dtype=DTYPES[self.dtype],
        )
        self.decoder = CaptionDecoder(
            cfg, self.width, o.depth, self.vocab_size + 2, self.max_length, self.mask_id
        )

    def logits(
        self,
        image_BxNxE: jax.Array,
        inputs_BxL: jax.Array,
        parallel_B=None,
        train=False,
        image_valid_BxN=None,
    ) -> jax.Array:
        """Next-token logits over the text vocabulary (the decoder's own ids excluded)."""
        return self.decoder(
            image_BxNxE, inputs_BxL, parallel_B, train, image_valid_BxN, vocab=self.vocab_size
        )

    def __call__(
        self,
        image_BxNxE: jax.Array,
        tokens_BxL: jax.Array,
        train: bool = False,
        image_valid_BxN: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        batch = tokens_BxL.shape[0]
        parallel_B = None
        if train and self.options.parallel_fraction > 0:
            draw_B = jax.random.uniform(self.make_rng("dropout"), (batch,))
            parallel_B = draw_B < self.options.parallel_fraction
        inputs_BxL = teacher_inputs(tokens_BxL, self.bos_id)
        nll_BxL, correct_BxL = self.decoder(
            image_BxNxE, inputs_BxL, parallel_B, train, image_valid_BxN,
            targets_BxL=tokens_BxL, vocab=self.vocab_size,
        )  # fmt: skip
        return per_example_captioning(nll_BxL, correct_BxL, tokens_BxL, self.pad_id)


def per_example_captioning(
    nll_BxL: jax.Array, correct_BxL: jax.Array, targets_BxL: jax.Array, pad_id: int
) -> dict[str, jax.Array]:
    """Each caption's mean cross-entropy and token accuracy over its non-padding tokens:
    every caption weighs the same in the batch mean, however long it is."""
    valid_BxL = (targets_BxL != pad_id).astype(jnp.float32)
    count_B = jnp.maximum(valid_BxL.sum(axis=1), 1.0)
    return {
        "loss": (nll_BxL * valid_BxL).sum(axis=1) / count_B,
        "token_accuracy": (correct_BxL * valid_BxL).sum(axis=1) / count_B,
    }


def captioning(options: CaptioningOptions, spec) -> AuxTerm:
    """Factory registered as auxiliary term ``captioning``."""
    text = spec.model.text
    pad_id = getattr(text, "pad_id", None)
    if pad_id is None:  # a SigLIP-style text tower: the tokenizer's padding
        pad_id = getattr(spec.tokenizer, "pad_id", None) or 0
    module = CaptioningTerm(
        options,
        width=options.width or text.width,
        vocab_size=text.vocab_size,
        max_length=text.context_length,
        pad_id=pad_id,
        dtype=getattr(text, "dtype", "float32"),
    )
    return AuxTerm("captioning", module, options.weight)


def greedy_captioner(model: nn.Module, tokenizer, max_length: int | None = None):
    """jit-compiled ``(params, images) -> caption tokens`` of a model trained with the
    ``captioning`` term (its ``aux``), or None when it has none. Build it once and keep
    it: each build compiles anew. The tokenizer must say where a caption ends
    (``eos_id``) and turn ids back into text (``decode``)."""
    term = (model.aux or {}).get("captioning")
    if term is None:
        return None
    if not (hasattr(tokenizer, "eos_id") and hasattr(tokenizer, "decode")):
        raise UserError(
            f"tokenizer.name: the {type(tokenizer).__name__} tokenizer has no eos_id and "
            "decode, which reading the captioning term's captions needs"
        )
    length = max_length or term.max_length
    eos_id = tokenizer.eos_id

    def decode(params, images_BxHxWxC):
        image_BxNxE = model.apply({"params": params}, images_BxHxWxC, method="image_tokens")
        valid_BxN = model.apply(
            {"params": params}, images_BxHxWxC, image_BxNxE, method="image_token_valid"
        )

        def logits(image, inputs):
            variables = {"params": params["aux_captioning"]}
            return term.apply(variables, image, inputs, image_valid_BxN=valid_BxN, method="logits")

        return greedy_decode(logits, image_BxNxE, length, term.bos_id, eos_id, term.pad_id)

    return jax.jit(decode)
