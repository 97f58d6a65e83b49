"""The CLIP two-tower model: towers -> projections -> L2-normalised embeddings.

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
    """Any image tower and text tower, each followed by its projection into the shared space.

    A tower is a Flax module ``(inputs, train=False) -> (batch, features)``: the ViT and
    text transformer here, or a plugin's (a conv net, say). ``projection`` "none" uses
    the tower's output as the embedding.
    """

    vision: nn.Module
    text: nn.Module
    embed_dim: int
    vision_projection: str = "linear"
    vision_projection_bias: bool = False
    text_projection: str = "linear"
    text_projection_bias: bool = False
    init_temperature: float = 1 / 0.07
    init_bias: float | None = None

    def setup(self) -> None:
        self.vision_proj = self._projection(self.vision_projection, self.vision_projection_bias)
        self.text_proj = self._projection(self.text_projection, self.text_projection_bias)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_temperature)), ()
        )
        if self.init_bias is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_bias), ())

    def _projection(self, kind: str, bias: bool):
        if kind == "none":
            return lambda x: x
        return nn.Dense(
            self.embed_dim,
            use_bias=bias,
            kernel_init=dense_init(("embed", "proj")),
            bias_init=zeros(("proj",)),
        )

    def encode_images(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        return l2_normalize(self.vision_proj(self.vision(images_BxHxWxC, train=train)))

    def encode_texts(self, tokens_BxL: jax.Array, train: bool = False) -> jax.Array:
        return l2_normalize(self.text_proj(self.text(tokens_BxL, train=train)))

    def __call__(self, images_BxHxWxC: jax.Array, tokens_BxL: jax.Array, train: bool = False):
        """Embeddings of both towers plus the (log) logit scale and the bias (or 0)."""
        bias = self.logit_bias if self.init_bias is not None else jnp.zeros(())
        return (
            self.encode_images(images_BxHxWxC, train),
            self.encode_texts(tokens_BxL, train),
            self.logit_scale,
            bias,
        )


def two_tower(
    vision: nn.Module, text: nn.Module, options, init_temperature: float, init_bias: float | None
) -> Clip:
    """A Clip from two towers and model options with ``embed_dim`` and per-tower
    ``projection``/``projection_bias`` (plugins with their own image tower use this too)."""
    return Clip(
        vision,
        text,
        options.embed_dim,
        vision_projection=options.vision.projection,
        vision_projection_bias=options.vision.projection_bias,
        text_projection=options.text.projection,
        text_projection_bias=options.text.projection_bias,
        init_temperature=init_temperature,
        init_bias=init_bias,
    )


def build_clip(options: ClipOptions, init_temperature: float, init_bias: float | None) -> Clip:
    """Factory registered as architecture ``clip``."""
    return two_tower(
        VisionTower(options.vision), TextTower(options.text), options, init_temperature, init_bias
    )
