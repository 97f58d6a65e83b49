"""Transformer building blocks shared by both towers.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``) so that a sharding strategy can map them onto mesh axes without touching
the model code. A block's shape is one frozen ``BlockConfig``, built from a tower's
options by ``block_config``, so the many knobs travel together and hash for nn.scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.attention import AttentionMask, dense_mask, fused_attention
from clip_jax.models.matmul import dot_general_for
from clip_jax.sharding import active_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(nn.gelu, approximate=False),  # torch.nn.GELU(), open_clip's ViTs
    "gelu_tanh": partial(nn.gelu, approximate=True),  # SigLIP / big_vision
    "quick_gelu": quick_gelu,
    "swiglu": nn.silu,  # the gate's activation; Mlp adds the gated product
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    heads: int
    mlp_hidden: int
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    use_bias: bool = True
    qk_norm: bool = False
    rotary: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    matmul_dtype: Any = None  # None: products in ``dtype``
    param_dtype: Any = jnp.float32
    attention: str = "xla"  # or "cudnn": jax.nn.dot_product_attention's implementation

    @property
    def dot_general(self):
        """What the block's dense layers multiply with (``models.matmul``)."""
        return dot_general_for(self.matmul_dtype)


def block_config(options, dtype=None) -> BlockConfig:
    """One mapping from a tower's options (vision or text) to its blocks' shape."""
    hidden = options.mlp_dim or int(options.width * options.mlp_ratio)
    matmul = getattr(options, "matmul_dtype", None)
    return BlockConfig(
        heads=options.heads,
        mlp_hidden=hidden,
        activation=options.activation,
        norm=options.norm,
        norm_eps=options.norm_eps,
        use_bias=options.use_bias,
        qk_norm=options.qk_norm,
        rotary=getattr(options, "positions", None) == "rotary",
        dropout=options.dropout,
        dtype=DTYPES[options.dtype] if dtype is None else dtype,
        matmul_dtype=None if matmul is None else DTYPES[matmul],
        param_dtype=DTYPES[getattr(options, "param_dtype", "float32")],
        attention=getattr(options, "attention", "xla"),
    )


# Activations inside a block stay split over the batch axes (and, under tensor
# parallelism, over heads / MLP units like the weights that make them). Without these,
# XLA may meet an FSDP-sharded weight by gathering the batch instead of the weight.
HEADS_ACTIVATION = ("batch", None, "heads", None)
MLP_ACTIVATION = ("batch", None, "mlp")


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """A logical sharding constraint under ``Layout.activate()``; a no-op elsewhere
    (e.g. encoding on one device)."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return nn.with_logical_constraint(x, names, mesh=mesh)


def dense_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def make_norm(cfg: BlockConfig, name: str, axis_name: str = "embed") -> nn.Module:
    """LayerNorm (bias follows ``use_bias``) or RMSNorm, with the config's epsilon."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            scale_init=scale_init,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_bias=cfg.use_bias,
        scale_init=scale_init,
        bias_init=zeros((axis_name,)),
        name=name,
    )


def rotate(x_BxLxHxK: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (RoFormer), half-split layout, positions 0..L-1."""
    length, head_dim = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
    half = head_dim // 2
    inv_freq_F = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles_LxF = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_F[None]
    sin, cos = jnp.sin(angles_LxF)[None, :, None], jnp.cos(angles_LxF)[None, :, None]
    x1, x2 = x_BxLxHxK[..., :half].astype(jnp.float32), x_BxLxHxK[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def attend(cfg: BlockConfig, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask: AttentionMask | None):
    """Scaled dot-product attention. cuDNN's fused kernel takes 16-bit inputs only, so
    with activations in float32 (bf16 products) its inputs are cast and its output
    cast back."""
    if cfg.attention != "cudnn":
        length, keys = q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]
        dense = dense_mask(mask, length, keys)
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=dense)
    dtype = q_BxLxHxK.dtype
    low = cfg.matmul_dtype if jnp.dtype(dtype) == jnp.float32 else dtype
    q, k, v = (t.astype(low or jnp.bfloat16) for t in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
    return fused_attention(q, k, v, mask).astype(dtype)


class Attention(nn.Module):
    cfg: BlockConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask: AttentionMask | None,
        kv_BxSxD: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention, or cross-attention from ``x`` to ``kv`` when it is given."""
        cfg = self.cfg
        width = x_BxLxD.shape[-1]
        head_dim = width // cfg.heads
        kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD

        def project(name: str, inputs: jax.Array) -> jax.Array:
            return nn.DenseGeneral(
                (cfg.heads, head_dim),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                dot_general=cfg.dot_general,
                use_bias=cfg.use_bias,
                kernel_init=dense_init(("embed", "heads", "kv")),
                bias_init=zeros(("heads", "kv")),
                name=name,
            )(inputs)

        q_BxLxHxK = project("query", x_BxLxD)
        k_BxSxHxK, v_BxSxHxK = project("key", kv_BxSxD), project("value", kv_BxSxD)
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK = (
            constrain(t, HEADS_ACTIVATION) for t in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK)
        )
        if cfg.qk_norm:  # ViT-22B: normalise queries and keys per head, stabler logits
            q_BxLxHxK = make_norm(cfg, "query_norm", "kv")(q_BxLxHxK)
            k_BxSxHxK = make_norm(cfg, "key_norm", "kv")(k_BxSxHxK)
        if cfg.rotary:
            q_BxLxHxK, k_BxSxHxK = rotate(q_BxLxHxK), rotate(k_BxSxHxK)
        out_BxLxHxK = attend(cfg, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask)
        out_BxLxHxK = constrain(out_BxLxHxK, HEADS_ACTIVATION)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            dot_general=cfg.dot_general,
            use_bias=cfg.use_bias,
            kernel_init=dense_init(("heads", "kv", "embed")),
            bias_init=zeros(("embed",)),
            name="out",
        )(out_BxLxHxK)


class Mlp(nn.Module):
    """Two-layer MLP; with ``swiglu``, a SiLU-gated unit (Shazeer 2020) of the same hidden size."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = partial(
            nn.Dense,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            dot_general=cfg.dot_general,
            use_bias=cfg.use_bias,
            kernel_init=dense_init(("embed", "mlp")),
            bias_init=zeros(("mlp",)),
        )
        h_BxLxM = constrain(dense(cfg.mlp_hidden, name="fc1")(x_BxLxD), MLP_ACTIVATION)
        if cfg.activation == "swiglu":
            gate_BxLxM = constrain(dense(cfg.mlp_hidden, name="gate")(x_BxLxD), MLP_ACTIVATION)
            h_BxLxM = nn.silu(gate_BxLxM) * h_BxLxM
        else:
            h_BxLxM = ACTIVATIONS[cfg.activation](h_BxLxM)
        return dense(
            x_BxLxD.shape[-1],
            use_bias=cfg.use_bias,
            kernel_init=dense_init(("mlp", "embed")),
            bias_init=zeros(("embed",)),
            name="fc2",
        )(h_BxLxM)


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    cfg: BlockConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: AttentionMask | None) -> jax.Array:
        drop = nn.Dropout(self.cfg.dropout, deterministic=self.deterministic)
        h = make_norm(self.cfg, "ln_1")(x_BxLxD)
        x_BxLxD = x_BxLxD + drop(Attention(self.cfg, name="attn")(h, mask))
        h = make_norm(self.cfg, "ln_2")(x_BxLxD)
        return x_BxLxD + drop(Mlp(self.cfg, name="mlp")(h))


class MapHead(nn.Module):
    """Multihead attention pooling (big_vision's MAP): a learned probe attends to all tokens."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, valid_BxN: jax.Array | None = None) -> jax.Array:
        batch, _, width = x_BxNxD.shape
        probe_1x1xD = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, width),
            self.cfg.param_dtype,
        )
        probe_Bx1xD = jnp.broadcast_to(probe_1x1xD.astype(self.cfg.dtype), (batch, 1, width))
        mask = AttentionMask(valid_BxS=valid_BxN)
        # The probe has no position: no rotary here, whatever the tower's blocks use.
        cross = dataclasses.replace(self.cfg, rotary=False)
        x_Bx1xD = Attention(cross, name="attn")(probe_Bx1xD, mask, x_BxNxD)
        y_Bx1xD = make_norm(self.cfg, "ln")(x_Bx1xD)
        x_Bx1xD = x_Bx1xD + Mlp(self.cfg, name="mlp")(y_Bx1xD)
        return x_Bx1xD[:, 0]


REMAT_POLICIES = {
    # "minimal": keep the matrix products' outputs, recompute the cheap elementwise work.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # "full": keep only each block's input, recompute the whole block in the backward.
    "full": jax.checkpoint_policies.nothing_saveable,
}


class ScannedBlock(Block):
    """A Block in the (carry, output) form ``nn.scan`` expects."""

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: AttentionMask | None):
        x_BxLxD = super().__call__(x_BxLxD, mask)
        return constrain(x_BxLxD, ("batch", None, None)), None


class Encoder(nn.Module):
    """``depth`` blocks, optionally rematerialised and/or scanned.

    Scanning stacks the blocks' parameters on a leading ``layers`` axis and traces one
    block, so the program (and compile time) does not grow with depth.
    """

    depth: int
    cfg: BlockConfig
    scan: bool = False
    remat: str = "none"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: AttentionMask | None = None) -> jax.Array:
        if self.scan:
            block = ScannedBlock
            if self.remat != "none":
                block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = stack(self.cfg, self.deterministic, name="blocks")(x_BxLxD, mask)
            return x_BxLxD
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat])
        for i in range(self.depth):
            x_BxLxD = block(self.cfg, self.deterministic, name=f"block_{i}")(x_BxLxD, mask)
            # Activations stay split over the batch axes whatever the parameters do
            # (a no-op outside a mesh context, e.g. when encoding on one device).
            x_BxLxD = constrain(x_BxLxD, ("batch", None, None))
        return x_BxLxD


def tower_encoder(options, cfg: BlockConfig, deterministic: bool) -> Encoder:
    """The transformer of a tower (vision or text) from its options: one mapping for both."""
    return Encoder(
        options.depth,
        cfg,
        scan=options.scan_layers,
        remat=options.remat,
        deterministic=deterministic,
        name="encoder",
    )
