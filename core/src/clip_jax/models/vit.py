"""The ViT image tower (CLIP layout: patch conv without bias, class token, ln_pre/ln_post)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import DTYPES, MapHead, layer_norm, tower_encoder
from clip_jax.schemas import VisionOptions


class VisionTower(nn.Module):
    options: VisionOptions

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
        o = self.options
        dtype = DTYPES[o.dtype]
        patches_BxhxwxD = nn.Conv(
            o.width,
            (o.patch_size, o.patch_size),
            strides=(o.patch_size, o.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            name="patch_embed",
        )(images_BxHxWxC.astype(dtype))
        batch = patches_BxhxwxD.shape[0]
        x_BxNxD = patches_BxhxwxD.reshape(batch, -1, o.width)
        if o.pool == "tok":
            cls_D = self.param(
                "class_token",
                nn.with_logical_partitioning(nn.initializers.normal(o.width**-0.5), ("embed",)),
                (o.width,),
            )
            cls_Bx1xD = jnp.broadcast_to(cls_D.astype(dtype), (batch, 1, o.width))
            x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        pos_NxD = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(o.width**-0.5), (None, "embed")),
            x_BxNxD.shape[1:],
        )
        x_BxNxD = x_BxNxD + pos_NxD.astype(dtype)
        if o.registers:  # "Vision Transformers Need Registers": no position, dropped at the end
            reg_RxD = self.param(
                "registers",
                nn.with_logical_partitioning(
                    nn.initializers.normal(o.width**-0.5), (None, "embed")
                ),
                (o.registers, o.width),
            )
            reg_BxRxD = jnp.broadcast_to(reg_RxD.astype(dtype), (batch, o.registers, o.width))
            x_BxNxD = jnp.concatenate([x_BxNxD, reg_BxRxD], axis=1)
        x_BxNxD = layer_norm("ln_pre", dtype)(x_BxNxD)
        x_BxNxD = tower_encoder(o, dtype)(x_BxNxD)
        if o.registers:
            x_BxNxD = x_BxNxD[:, : -o.registers]
        if o.pool == "tok":
            return layer_norm("ln_post", dtype)(x_BxNxD[:, 0])
        if o.pool == "gap":
            return layer_norm("ln_post", dtype)(x_BxNxD.mean(axis=1))
        x_BxNxD = layer_norm("ln_post", dtype)(x_BxNxD)
        mlp_hidden = int(o.width * o.mlp_ratio)
        return MapHead(o.heads, mlp_hidden, o.activation, dtype, name="map_head")(x_BxNxD)
