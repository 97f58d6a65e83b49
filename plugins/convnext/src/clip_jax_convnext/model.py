"""The ConvNeXt image tower (Liu et al. 2022, "A ConvNet for the 2020s") in Flax Linen.

A tower is any module ``(images, train=False) -> (batch, features)``; parameters carry
logical axis names (``embed`` for channels, ``mlp`` for the inverted bottleneck) so the
core sharding strategies split them like the ViT's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.clip import Clip, two_tower
from clip_jax.models.layers import DTYPES
from clip_jax.models.text import TextTower
from clip_jax_convnext.options import ConvNextClipOptions, ConvNextOptions


def _norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _conv(features: int, size: int, stride: int, name: str, dtype, groups: int = 1) -> nn.Conv:
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding="SAME" if stride == 1 else "VALID",
        feature_group_count=groups,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.02), (None, None, None, "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> 4x MLP -> layer scale, plus the residual."""

    kernel_size: int
    mlp_ratio: float
    layer_scale_init: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        channels = x_BxHxWxC.shape[-1]
        h = _conv(channels, self.kernel_size, 1, "dwconv", self.dtype, groups=channels)(x_BxHxWxC)
        h = _norm("norm", self.dtype)(h)
        h = nn.Dense(
            int(channels * self.mlp_ratio),
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), ("embed", "mlp")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
            name="fc1",
        )(h)
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(
            channels,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(0.02), ("mlp", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="fc2",
        )(h)
        if self.layer_scale_init > 0:
            gamma = self.param(
                "layer_scale",
                nn.with_logical_partitioning(
                    nn.initializers.constant(self.layer_scale_init), ("embed",)
                ),
                (channels,),
            )
            h = h * gamma.astype(h.dtype)
        return x_BxHxWxC + h


class ConvNextTower(nn.Module):
    options: ConvNextOptions

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        o = self.options
        dtype = DTYPES[o.dtype]
        x = _conv(o.dims[0], 4, 4, "stem", dtype)(images_BxHxWxC.astype(dtype))
        x = _norm("stem_norm", dtype)(x)
        for stage, (depth, dim) in enumerate(zip(o.depths, o.dims, strict=True)):
            if stage:  # downsample between stages: LayerNorm then a 2x2 stride-2 conv
                x = _norm(f"down_{stage}_norm", dtype)(x)
                x = _conv(dim, 2, 2, f"down_{stage}", dtype)(x)
            for i in range(depth):
                x = ConvNextBlock(
                    o.kernel_size, o.mlp_ratio, o.layer_scale_init, dtype,
                    name=f"stage_{stage}_block_{i}",
                )(x)  # fmt: skip
                x = nn.with_logical_constraint(x, ("batch", None, None, None))
        return _norm("head_norm", dtype)(x.mean(axis=(1, 2)))  # global average pool


def build(options: ConvNextClipOptions, init_temperature: float, init_bias: float | None) -> Clip:
    """Factory of ``convnext_clip``: the core's two-tower model around this image tower."""
    return two_tower(
        ConvNextTower(options.vision),
        TextTower(options.text),
        options,
        init_temperature,
        init_bias,
    )
