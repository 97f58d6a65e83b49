"""Transformer building blocks shared by both towers.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``) so that a sharding strategy can map them onto mesh axes without touching
the model code.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": nn.gelu,
    "quick_gelu": quick_gelu,
}


def dense_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=zeros(("embed",)),
        name=name,
    )


class Attention(nn.Module):
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_BxHxLxL: jax.Array | None,
        kv_BxSxD: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention, or cross-attention from ``x`` to ``kv`` when it is given."""
        width = x_BxLxD.shape[-1]
        head_dim = width // self.heads
        kv_BxSxD = x_BxLxD if kv_BxSxD is None else kv_BxSxD

        def project(name: str, inputs: jax.Array) -> jax.Array:
            return nn.DenseGeneral(
                (self.heads, head_dim),
                dtype=self.dtype,
                kernel_init=dense_init(("embed", "heads", "kv")),
                bias_init=zeros(("heads", "kv")),
                name=name,
            )(inputs)

        q_BxLxHxK = project("query", x_BxLxD)
        k_BxLxHxK, v_BxLxHxK = project("key", kv_BxSxD), project("value", kv_BxSxD)
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_BxHxLxL
        )
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=dense_init(("heads", "kv", "embed")),
            bias_init=zeros(("embed",)),
            name="out",
        )(out_BxLxHxK)


class Mlp(nn.Module):
    hidden: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        width = x_BxLxD.shape[-1]
        h_BxLxM = nn.Dense(
            self.hidden,
            dtype=self.dtype,
            kernel_init=dense_init(("embed", "mlp")),
            bias_init=zeros(("mlp",)),
            name="fc1",
        )(x_BxLxD)
        h_BxLxM = ACTIVATIONS[self.activation](h_BxLxM)
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=dense_init(("mlp", "embed")),
            bias_init=zeros(("embed",)),
            name="fc2",
        )(h_BxLxM)


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    heads: int
    mlp_hidden: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = layer_norm("ln_1", self.dtype)(x_BxLxD)
        x_BxLxD = x_BxLxD + Attention(self.heads, self.dtype, name="attn")(h, mask)
        h = layer_norm("ln_2", self.dtype)(x_BxLxD)
        return x_BxLxD + Mlp(self.mlp_hidden, self.activation, self.dtype, name="mlp")(h)


class MapHead(nn.Module):
    """Multihead attention pooling (big_vision's MAP): a learned probe attends to all tokens."""

    heads: int
    mlp_hidden: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        batch, _, width = x_BxNxD.shape
        probe_1x1xD = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, width),
        )
        probe_Bx1xD = jnp.broadcast_to(probe_1x1xD.astype(self.dtype), (batch, 1, width))
        x_Bx1xD = Attention(self.heads, self.dtype, name="attn")(probe_Bx1xD, None, x_BxNxD)
        y_Bx1xD = layer_norm("ln", self.dtype)(x_Bx1xD)
        x_Bx1xD = x_Bx1xD + Mlp(self.mlp_hidden, self.activation, self.dtype, name="mlp")(y_Bx1xD)
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
    def __call__(self, x_BxLxD: jax.Array, mask: jax.Array | None):
        x_BxLxD = super().__call__(x_BxLxD, mask)
        return nn.with_logical_constraint(x_BxLxD, ("batch", None, None)), None


class Encoder(nn.Module):
    """``depth`` blocks, optionally rematerialised and/or scanned.

    Scanning stacks the blocks' parameters on a leading ``layers`` axis and traces one
    block, so the program (and compile time) does not grow with depth.
    """

    depth: int
    heads: int
    mlp_hidden: int
    activation: str
    dtype: jnp.dtype = jnp.float32
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        args = (self.heads, self.mlp_hidden, self.activation, self.dtype)
        if self.scan:
            block = ScannedBlock
            if self.remat != "none":
                block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = stack(*args, name="blocks")(x_BxLxD, mask)
            return x_BxLxD
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat])
        for i in range(self.depth):
            x_BxLxD = block(*args, name=f"block_{i}")(x_BxLxD, mask)
            # Activations stay split over the batch axes whatever the parameters do
            # (a no-op outside a mesh context, e.g. when encoding on one device).
            x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", None, None))
        return x_BxLxD


def tower_encoder(options, dtype) -> Encoder:
    """The transformer of a tower (vision or text) from its options: one mapping for both."""
    return Encoder(
        options.depth,
        options.heads,
        int(options.width * options.mlp_ratio),
        options.activation,
        dtype,
        scan=options.scan_layers,
        remat=options.remat,
        name="encoder",
    )
