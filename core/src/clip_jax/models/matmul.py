"""Matrix products with bfloat16 inputs and float32 accumulation, forward and backward.

Mixed precision only pays when every product of the step runs in it, the two products
of the backward pass included, and autodiff does not give that by itself: the
transpose of ``dot(bf16, bf16) -> f32`` multiplies the float32 cotangent by a bfloat16
operand, and XLA runs a mixed-dtype product as a float32 one. The custom VJP here casts
the cotangent once and keeps all three products (output, input gradient, weight
gradient) as bf16 x bf16 -> f32. On XLA's CPU backend the weight gradient also needs
its operand physically transposed (see ``_weight_grad``), which is measured by
``bench/train_throughput.py``; on GPU and TPU the same graph maps onto the matrix units
as usual. Products with batch dimensions (attention's) keep plain autodiff.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

DotGeneral = Callable[..., jax.Array]


@functools.cache  # one function per dtype: layers built twice compare equal
def dot_general_for(matmul_dtype) -> DotGeneral | None:
    """The ``dot_general`` a Flax layer should use for products in ``matmul_dtype``
    (``None``: the layer's default, which computes in its own dtype)."""
    if matmul_dtype is None or jnp.dtype(matmul_dtype) == jnp.float32:
        return None
    return partial(mixed_dot_general, matmul_dtype=jnp.dtype(matmul_dtype))


def mixed_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    matmul_dtype=jnp.bfloat16,
) -> jax.Array:
    """``lax.dot_general`` with inputs cast to ``matmul_dtype``, accumulated in float32,
    returned in the inputs' dtype. Same signature as ``lax.dot_general``."""
    del precision
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    trailing = tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
    leading = tuple(rhs_contract) == tuple(range(n))
    if lhs_batch or rhs_batch or not (trailing and leading):
        # Other forms: inputs rounded to matmul_dtype, multiplied in float32, which every
        # backend runs (XLA's CPU backend refuses some bf16 forms at run time).
        def rounded(x):
            return x.astype(matmul_dtype).astype(jnp.float32)

        out = lax.dot_general(rounded(lhs), rounded(rhs), dimension_numbers)
        return out.astype(out_dtype)
    return _dense_product(lhs, rhs, n, matmul_dtype, jnp.dtype(out_dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_product(x, w, contracted: int, matmul_dtype, out_dtype):
    """x[..., K...] . w[K..., N...]: the layer form (trailing axes of the input against
    leading axes of the kernel), computed as one 2-D product."""
    out, _ = _dense_forward(x, w, contracted, matmul_dtype, out_dtype)
    return out


def _dense_forward(x, w, contracted, matmul_dtype, out_dtype):
    free_x, free_w = x.shape[: x.ndim - contracted], w.shape[contracted:]
    k = math.prod(w.shape[:contracted])
    x_MxK = x.reshape(-1, k).astype(matmul_dtype)
    w_KxN = w.reshape(k, -1).astype(matmul_dtype)
    y_MxN = lax.dot(x_MxK, w_KxN, preferred_element_type=jnp.float32)
    out = y_MxN.astype(out_dtype).reshape(*free_x, *free_w)
    # Residuals must be arrays: the operands keep their shapes, empty arrays their dtypes.
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return out, (x.astype(matmul_dtype), w.astype(matmul_dtype), dtypes)


def _dense_backward(contracted, matmul_dtype, out_dtype, residuals, g):
    x, w, (x_dtype, w_dtype) = residuals
    k = math.prod(w.shape[:contracted])
    x_MxK, w_KxN = x.reshape(-1, k), w.reshape(k, -1)
    g_MxN = g.reshape(x_MxK.shape[0], w_KxN.shape[1]).astype(matmul_dtype)
    # dx = g . w^T: contracting both operands' last axes is a form the libraries take as is.
    dx_MxK = lax.dot_general(
        g_MxN, w_KxN, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    if jax.default_backend() == "cpu":
        dw_KxN = _weight_grad(x_MxK, g_MxN)
    else:  # GPU and TPU libraries take the transposed operand as is
        dw_KxN = lax.dot_general(
            x_MxK, g_MxN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
    dx = dx_MxK.astype(x_dtype.dtype).reshape(x.shape)
    return dx, dw_KxN.astype(w_dtype.dtype).reshape(w.shape)


def _weight_grad(x_MxK: jax.Array, g_MxN: jax.Array) -> jax.Array:
    """x^T . g in float32, written for XLA's CPU backend, which runs a bf16 product fast
    only in row-major form: one contracting the rows of both operands is upcast to
    float32 (5x slower on an avx512_bf16 CPU), so the input is transposed first.

    How it is transposed matters as much (clip-b32 text fc2, [2464, 2048] bf16; measured
    with the product): a plain 2-D transpose behind a barrier, 9.9 ms, against 22 ms for
    the unit-batch 3-D transpose XLA emits when the product alone is written over a
    batch of one. The input is the operand transposed even where it is the larger:
    transposing the product instead leaves a transposed read for the optimizer's update
    to fuse, which XLA's loop emitter runs 7x slower than a transpose (fc2 of clip-b32:
    13.0 against 7.3 ms for the gradient and its update)."""
    x_KxM = lax.optimization_barrier(x_MxK.T)  # folded into the product, it is upcast
    # The unit batch keeps the transpose a separate operand; the barrier keeps a
    # consumer's transpose out of the product (folded in, XLA cannot run it in bf16).
    out_KxN = jnp.einsum(
        "ckm,cmn->kn", x_KxM[None], g_MxN[None], preferred_element_type=jnp.float32
    )
    return lax.optimization_barrier(out_KxN)


def _dense_fwd_rule(x, w, contracted, matmul_dtype, out_dtype):
    return _dense_forward(x, w, contracted, matmul_dtype, out_dtype)


_dense_product.defvjp(_dense_fwd_rule, _dense_backward)


@functools.cache
def patch_conv_for(matmul_dtype) -> Callable | None:
    """A ``conv_general_dilated`` for a patch embedding (stride = kernel, no padding) that
    runs as one ``mixed_dot_general`` product over flattened patches; ``None``: XLA's
    convolution in the layer's dtype."""
    dot_general = dot_general_for(matmul_dtype)
    if dot_general is None:
        return None

    def patch_conv(inputs, kernel, strides, padding, dimension_numbers=None, **unused):
        ph, pw, channels, features = kernel.shape  # HWIO, the layout Flax's Conv keeps
        batch, height, width, _ = inputs.shape  # NHWC
        if tuple(strides) != (ph, pw) or height % ph or width % pw:
            raise ValueError("patch_conv needs stride = kernel size and whole patches")
        gh, gw = height // ph, width // pw
        patches = inputs.reshape(batch, gh, ph, gw, pw, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, gh, gw, ph * pw * channels)
        flat_kernel = kernel.reshape(ph * pw * channels, features)
        return dot_general(patches, flat_kernel, (((3,), (0,)), ((), ())))

    return patch_conv
