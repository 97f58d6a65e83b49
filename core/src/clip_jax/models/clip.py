"""The CLIP two-tower model: towers -> linear projections -> L2-normalised embeddings.

The logit scale (and, for the sigmoid loss, a logit bias) are parameters of the model,
initialised from the loss's options, so that a checkpoint carries everything needed
to score image-text pairs.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import dense_init, zeros
from clip_jax.models.text import TextTower
from clip_jax.models.vit import VisionTower
from clip_jax.schemas import ClipOptions


def l2_normalize(x_BxD: jax.Array) -> jax.Array:
    x_BxD = x_BxD.astype(jnp.float32)
    return x_BxD * jax.lax.rsqrt(jnp.sum(x_BxD * x_BxD, axis=-1, keepdims=True) + 1e-12)


class Clip(nn.Module):
    options: ClipOptions
    init_temperature: float = 1 / 0.07
    init_bias: float | None = None

    def setup(self) -> None:
        o = self.options
        self.vision = VisionTower(o.vision)
        self.text = TextTower(o.text)
        self.vision_proj = nn.Dense(
            o.embed_dim,
            use_bias=o.projection_bias,
            kernel_init=dense_init(("embed", "proj")),
            bias_init=zeros(("proj",)),
        )
        self.text_proj = nn.Dense(
            o.embed_dim,
            use_bias=o.projection_bias,
            kernel_init=dense_init(("embed", "proj")),
            bias_init=zeros(("proj",)),
        )
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_temperature)), ()
        )
        if self.init_bias is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_bias), ())

    def encode_images(self, images_BxHxWxC: jax.Array) -> jax.Array:
        return l2_normalize(self.vision_proj(self.vision(images_BxHxWxC)))

    def encode_texts(self, tokens_BxL: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(self.text(tokens_BxL)))

    def __call__(self, images_BxHxWxC: jax.Array, tokens_BxL: jax.Array):
        """Embeddings of both towers plus the (log) logit scale and the bias (or 0)."""
        bias = self.logit_bias if self.init_bias is not None else jnp.zeros(())
        return (
            self.encode_images(images_BxHxWxC),
            self.encode_texts(tokens_BxL),
            self.logit_scale,
            bias,
        )


def build_clip(options: ClipOptions, init_temperature: float, init_bias: float | None) -> Clip:
    """Factory registered as architecture ``clip``."""
    return Clip(options, init_temperature=init_temperature, init_bias=init_bias)
