"""bf16 products with float32 accumulation: same numbers as rounding the inputs to bf16
and multiplying in float32, in the forward and (with a bf16 cotangent) the backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.models.matmul import mixed_dot_general
from clip_jax.spec import load_spec
from tests.conftest import QUICKSTART

bf16 = jnp.bfloat16


def rounded(x):
    return x.astype(bf16).astype(jnp.float32)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dims"),
    [
        ((6, 5, 16), (16, 24), (((2,), (0,)), ((), ()))),  # Dense, K < N
        ((6, 5, 48), (48, 8), (((2,), (0,)), ((), ()))),  # Dense, K > N
        ((6, 5, 16), (16, 2, 4), (((2,), (0,)), ((), ()))),  # q/k/v projections
        ((6, 5, 2, 4), (2, 4, 16), (((2, 3), (0, 1)), ((), ()))),  # attention output
        ((3, 5, 16), (3, 16, 4), (((2,), (1,)), ((0,), (0,)))),  # batched: the fallback
    ],
)
@pytest.mark.slow
def test_values_and_gradients(x_shape, w_shape, dims):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    g = jax.random.normal(
        jax.random.key(2), jax.eval_shape(lambda: jax.lax.dot_general(x, w, dims)).shape
    )

    def reference(x, w):
        return jax.lax.dot_general(rounded(x), rounded(w), dims)

    out, pullback = jax.vjp(lambda x, w: mixed_dot_general(x, w, dims), x, w)
    np.testing.assert_allclose(out, reference(x, w), rtol=1e-5, atol=1e-5)
    assert out.dtype == jnp.float32
    # The backward multiplies a bf16 cotangent: the reference does the same rounding.
    _, ref_pullback = jax.vjp(reference, x, w)
    for got, want in zip(pullback(g), ref_pullback(rounded(g)), strict=True):
        np.testing.assert_allclose(got, rounded(want), rtol=1e-2, atol=1e-2)
        assert got.dtype == jnp.float32


@pytest.mark.slow
def test_a_bf16_model_stays_close_to_float32_and_keeps_float32_parameters():
    small = ["model.vision.depth=1", "model.text.depth=1"]
    fast = ["model.vision.matmul_dtype=bfloat16", "model.text.matmul_dtype=bfloat16"]
    ref, mixed = (components(load_spec(QUICKSTART, small + extra)) for extra in ([], fast))
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    tokens = jnp.tile(jnp.arange(1, 17)[None], (4, 1))
    params = ref.model.init(jax.random.key(0), images, tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    a, b = ref.model.apply(params, images, tokens), mixed.model.apply(params, images, tokens)
    for x, y in zip(a[:2], b[:2], strict=True):  # unit embeddings: bf16 keeps ~3 digits
        np.testing.assert_allclose(y, x, atol=2e-2)
        assert not np.array_equal(x, y)


def test_param_dtype_makes_bf16_parameters():
    spec = load_spec(
        QUICKSTART,
        ["model.vision.depth=1", "model.text.depth=1", "model.vision.param_dtype=bfloat16"],
    )
    comps = components(spec)
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32)
    params = jax.eval_shape(comps.model.init, jax.random.key(0), images, tokens)["params"]
    vision = {
        p.value.dtype
        for p in jax.tree.leaves(params["vision"], is_leaf=lambda x: hasattr(x, "value"))
    }
    text = {
        p.value.dtype
        for p in jax.tree.leaves(params["text"], is_leaf=lambda x: hasattr(x, "value"))
    }
    assert vision == {jnp.dtype(bf16)} and text == {jnp.dtype(jnp.float32)}


def test_cudnn_attention_is_refused_without_bf16_or_without_a_gpu():
    from clip_jax.errors import UserError
    from clip_jax.spec import SpecError

    with pytest.raises(SpecError, match="attention"):
        load_spec(QUICKSTART, ["model.vision.attention=cudnn"])
    spec = load_spec(QUICKSTART, ["model.text.attention=cudnn", "model.text.matmul_dtype=bfloat16"])
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU cuDNN attention is allowed")
    with pytest.raises(UserError, match=r"model\.text\.attention: 'cudnn' runs on NVIDIA GPUs"):
        components(spec).check()
