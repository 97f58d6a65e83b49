"""The ViT image tower.

The defaults give OpenAI CLIP's layout (patch conv without bias, class token, learned
positions including the class slot, ln_pre/ln_post); options give timm/big_vision's
SigLIP layout (patch bias, no ln_pre, MAP pooling) and the rest of the design space.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.attention import AttentionMask
from clip_jax.models.layers import DTYPES, MapHead, block_config, make_norm, tower_encoder
from clip_jax.models.matmul import patch_conv_for
from clip_jax.models.naflex import NaflexImages, as_patch_row, resample_positions
from clip_jax.schemas import VisionOptions


def sincos2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings (MoCo v3 / big_vision), (h*w, width)."""
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
    y, x = y.reshape(-1)[:, None] * omega[None], x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def drop_patches(x_BxNxD: jax.Array, rate: float, keep_first: int, rng: jax.Array) -> jax.Array:
    """A random ``1 - rate`` of the tokens after the first ``keep_first`` (the class
    token), chosen per image (FLIP, Li et al. 2023). Positions are already added, so
    each kept token still knows where it came from."""
    batch, length, _ = x_BxNxD.shape
    patches = length - keep_first
    kept = max(1, round(patches * (1 - rate)))
    scores_BxP = jax.random.uniform(rng, (batch, patches))
    _, index_BxK = jax.lax.top_k(scores_BxP, kept)
    picked_BxKxD = jnp.take_along_axis(x_BxNxD[:, keep_first:], index_BxK[..., None], axis=1)
    return jnp.concatenate([x_BxNxD[:, :keep_first], picked_BxKxD], axis=1)


class VisionTower(nn.Module):
    options: VisionOptions

    @nn.compact
    def __call__(
        self,
        images: jax.Array | NaflexImages,
        train: bool = False,
        masked: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Pooled features of square images (B x H x W x C), or of NaFlex images (padded
        patch sequences at native aspect ratio, ``models.naflex``) with the same weights.

        ``masked``: (B x N bool, D mask token): those patch embeddings are replaced by the
        token before positions are added (masked prediction, ``models.self_supervised``).
        """
        o = self.options
        dtype = DTYPES[o.dtype]
        cfg = block_config(o, dtype)
        naflex = isinstance(images, NaflexImages)
        if naflex and o.positions != "learned":
            raise ValueError("NaFlex images need model.vision.positions = 'learned'")
        if naflex and train and o.patch_dropout:
            raise ValueError("NaFlex images and model.vision.patch_dropout do not combine")
        # NaFlex: the patches side by side, one patch high, for the same patch embedding.
        images_BxHxWxC = as_patch_row(images.patches_BxNxP, o.patch_size) if naflex else images
        patches_BxhxwxD = nn.Conv(
            o.width,
            (o.patch_size, o.patch_size),
            strides=(o.patch_size, o.patch_size),
            padding="VALID",
            use_bias=o.patch_bias,
            dtype=dtype,
            param_dtype=cfg.param_dtype,
            conv_general_dilated=patch_conv_for(cfg.matmul_dtype),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embed",
        )(images_BxHxWxC.astype(dtype))
        batch, grid_h, grid_w, _ = patches_BxhxwxD.shape
        x_BxNxD = patches_BxhxwxD.reshape(batch, -1, o.width)
        if masked is not None:
            mask_BxN, token_D = masked
            x_BxNxD = jnp.where(mask_BxN[..., None], token_D.astype(dtype), x_BxNxD)
        if o.positions == "sincos2d":
            x_BxNxD = x_BxNxD + jnp.asarray(sincos2d(grid_h, grid_w, o.width), dtype)
        if o.pool == "tok":
            cls_D = self.param(
                "class_token",
                nn.with_logical_partitioning(nn.initializers.normal(o.width**-0.5), ("embed",)),
                (o.width,),
                cfg.param_dtype,
            )
            cls_Bx1xD = jnp.broadcast_to(cls_D.astype(dtype), (batch, 1, o.width))
            x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        first = int(o.pool == "tok")  # tokens before the patches
        if o.positions == "learned":  # CLIP layout: the class token has a position too
            side = o.image_size // o.patch_size  # the table is the square grid's
            pos_NxD = self.param(
                "pos_embed",
                nn.with_logical_partitioning(
                    nn.initializers.normal(o.width**-0.5), (None, "embed")
                ),
                (first + side * side, o.width),
                cfg.param_dtype,
            )
            if naflex:
                table_GxGxD = pos_NxD[first:].reshape(side, side, o.width)
                grid_BxNxD = resample_positions(
                    table_GxGxD, images.grid_Bx2, x_BxNxD.shape[1] - first
                )
                lead_BxFxD = jnp.broadcast_to(pos_NxD[:first], (batch, first, o.width))
                x_BxNxD = x_BxNxD + jnp.concatenate([lead_BxFxD, grid_BxNxD], 1).astype(dtype)
            else:
                x_BxNxD = x_BxNxD + pos_NxD.astype(dtype)
        if train and o.patch_dropout:
            x_BxNxD = drop_patches(
                x_BxNxD, o.patch_dropout, int(o.pool == "tok"), self.make_rng("dropout")
            )
        if o.registers:  # "Vision Transformers Need Registers": no position, dropped at the end
            reg_RxD = self.param(
                "registers",
                nn.with_logical_partitioning(
                    nn.initializers.normal(o.width**-0.5), (None, "embed")
                ),
                (o.registers, o.width),
                cfg.param_dtype,
            )
            reg_BxRxD = jnp.broadcast_to(reg_RxD.astype(dtype), (batch, o.registers, o.width))
            x_BxNxD = jnp.concatenate([x_BxNxD, reg_BxRxD], axis=1)
        if o.norm_pre:
            x_BxNxD = make_norm(cfg, "ln_pre")(x_BxNxD)
        valid_BxN = None
        if naflex:  # padding patches are never read; the other tokens always are
            ones = lambda n: jnp.ones((batch, n), jnp.bool_)
            valid_BxN = jnp.concatenate([ones(first), images.valid_BxN, ones(o.registers)], 1)
        mask = None if valid_BxN is None else AttentionMask(valid_BxS=valid_BxN)
        x_BxNxD = tower_encoder(o, cfg, deterministic=not train)(x_BxNxD, mask)
        if o.registers:
            x_BxNxD = x_BxNxD[:, : -o.registers]
            valid_BxN = None if valid_BxN is None else valid_BxN[:, : -o.registers]
        if o.pool == "tok":
            return make_norm(cfg, "ln_post")(x_BxNxD[:, 0])
        if o.pool == "gap":
            if valid_BxN is None:
                return make_norm(cfg, "ln_post")(x_BxNxD.mean(axis=1))
            weights_BxNx1 = valid_BxN[..., None].astype(x_BxNxD.dtype)
            mean_BxD = (x_BxNxD * weights_BxNx1).sum(1) / weights_BxNx1.sum(1)
            return make_norm(cfg, "ln_post")(mean_BxD)
        x_BxNxD = make_norm(cfg, "ln_post")(x_BxNxD)
        return MapHead(cfg, name="map_head")(x_BxNxD, valid_BxN)
