"""The fused-attention path's padding and masks, checked on a CPU.

cuDNN's kernel needs a GPU, so these tests give ``fused_attention`` the XLA
implementation: what they check is that the arguments it builds for the kernel (odd
lengths padded, causal order and padding as the kernel's own masks, other patterns as a
dense mask with the padding folded in) give the attention of the unpadded inputs,
values and gradients, for every mask the towers and the decoder use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.attention import AttentionMask, dense_mask, fused_attention

BATCH, HEADS, HEAD_DIM = 3, 2, 8


def _inputs(length: int, keys: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = lambda n: (BATCH, n, HEADS, HEAD_DIM)  # noqa: E731
    return (
        jax.random.normal(kq, shape(length)),
        jax.random.normal(kk, shape(keys)),
        jax.random.normal(kv, shape(keys)),
    )


def _masks(length: int, keys: int) -> dict[str, AttentionMask | None]:
    valid_BxS = jnp.arange(keys)[None] < jnp.array([keys, keys - 2, 1])[:, None]
    holes_BxS = valid_BxS.at[0, 1].set(False)  # a pad token inside the text: not a prefix
    parallel_B = jnp.array([False, True, False])
    pattern_BxLxS = jnp.tril(jnp.ones((length, keys), bool))[None] | parallel_B[:, None, None]
    masks = {
        "none": None,
        "empty": AttentionMask(),
        "valid": AttentionMask(valid_BxS=valid_BxS),
        "valid with holes": AttentionMask(valid_BxS=holes_BxS),
    }
    if length == keys:
        masks["causal"] = AttentionMask(causal=True)
        masks["pattern"] = AttentionMask(pattern_BxLxS=pattern_BxLxS)
        masks["causal and valid"] = AttentionMask(valid_BxS=valid_BxS, causal=True)
    return masks


slow = pytest.mark.slow
SHAPES = [  # odd, even, CLIP's text, a MAP probe, cross-attention
    (7, 7),
    (5, 6),
    pytest.param(8, 8, marks=slow),
    pytest.param(77, 77, marks=slow),
    pytest.param(1, 9, marks=slow),
    pytest.param(4, 7, marks=slow),
]


@pytest.mark.parametrize(("length", "keys"), SHAPES)
def test_fused_arguments_give_the_attention_of_the_unpadded_inputs(length, keys):
    q, k, v = _inputs(length, keys)
    for name, mask in _masks(length, keys).items():
        want = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=dense_mask(mask, length, keys))
        got = jax.jit(fused_attention, static_argnums=4)(q, k, v, mask, "xla")
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)


@slow
@pytest.mark.parametrize(("length", "keys"), [(7, 7), (1, 9), (5, 6)])
def test_fused_arguments_give_the_gradients_of_the_unpadded_inputs(length, keys):
    q, k, v = _inputs(length, keys, seed=1)
    cotangent = jax.random.normal(jax.random.key(2), q.shape)
    for name, mask in _masks(length, keys).items():

        def reference(q, k, v, mask=mask):
            out = jax.nn.dot_product_attention(q, k, v, mask=dense_mask(mask, length, keys))
            return jnp.sum(out * cotangent)

        def fused(q, k, v, mask=mask):
            return jnp.sum(fused_attention(q, k, v, mask, implementation="xla") * cotangent)

        want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(q, k, v)
        got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(q, k, v)
        for a, b, which in zip(got, want, "qkv", strict=True):
            assert np.all(np.isfinite(a)), (name, which)
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{name}: d{which}")


def test_the_kernel_gets_its_own_masks_and_even_lengths(monkeypatch):
    """Causal order and padding reach the kernel as its masks, not as a dense bias (the
    bias costs memory traffic and, in training, forbids odd lengths); every length it
    sees is even."""
    calls = []

    def record(q, k, v, **options):
        calls.append((q.shape[1], k.shape[1], sorted(options)))
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q, k, v = _inputs(77, 77)
    fused_attention(q, k, v, AttentionMask(causal=True))
    fused_attention(q, k, v, None)
    q, k, v = _inputs(8, 8)
    fused_attention(q, k, v, None)
    q, k, v = _inputs(1, 197)
    fused_attention(q, k, v, AttentionMask(valid_BxS=jnp.ones((BATCH, 197), bool)))
    assert calls == [
        (78, 78, ["implementation", "is_causal", "key_value_seq_lengths", "query_seq_lengths"]),
        (78, 78, ["implementation", "is_causal", "key_value_seq_lengths", "query_seq_lengths"]),
        (8, 8, ["implementation", "is_causal"]),
        (2, 198, ["implementation", "mask"]),
    ]
