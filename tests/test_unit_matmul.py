"""bf16 products with float32 accumulation, one jitted layer-form case: the fast
counterpart of test_matmul's sweep over product forms (marked slow)."""

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.matmul import dot_general_for, mixed_dot_general

bf16 = jnp.bfloat16
DENSE = (((2,), (0,)), ((), ()))  # x[B, T, K] . w[K, N]


def rounded(x):
    return x.astype(bf16).astype(jnp.float32)


def test_a_dense_product_rounds_its_inputs_and_its_cotangent_to_bf16():
    rng = np.random.default_rng(0)  # numpy: jax.random would compile its own programs
    x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((6, 5, 16), (16, 24), (6, 5, 24)))

    @jax.jit
    def both(x, w, g):
        out, pullback = jax.vjp(lambda x, w: mixed_dot_general(x, w, DENSE), x, w)
        ref, ref_pullback = jax.vjp(
            lambda x, w: jax.lax.dot_general(rounded(x), rounded(w), DENSE), x, w
        )
        plain = jax.lax.dot_general(x, w, DENSE)
        return out, ref, plain, pullback(g), ref_pullback(rounded(g))

    out, ref, plain, grads, ref_grads = both(x, w, g)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, plain, rtol=1e-5, atol=1e-5)  # the rounding is real
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, rounded(want), rtol=1e-2, atol=1e-2)


def test_float32_layers_keep_the_default_product():
    assert dot_general_for(None) is None
    assert dot_general_for("float32") is None
    mixed = dot_general_for("bfloat16")
    assert mixed.keywords == {"matmul_dtype": jnp.dtype(bf16)}
    assert dot_general_for("bfloat16") is mixed  # layers built twice compare equal
