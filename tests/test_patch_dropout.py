"""Patch dropout (FLIP): fewer tokens in training, every token at evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.vit import VisionTower, drop_patches
from clip_jax.schemas import VisionOptions

OPTIONS = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2)


def test_kept_tokens_are_a_random_subset_with_the_class_token_first():
    x = jnp.arange(2 * 17 * 4, dtype=jnp.float32).reshape(2, 17, 4)
    out = drop_patches(x, 0.5, 1, jax.random.key(0))
    assert out.shape == (2, 9, 4)  # class token + 8 of 16 patches
    for b in range(2):
        np.testing.assert_array_equal(out[b, 0], x[b, 0])
        rows = {tuple(r) for r in np.asarray(x[b, 1:])}
        kept = [tuple(r) for r in np.asarray(out[b, 1:])]
        assert set(kept) <= rows and len(set(kept)) == 8
    other = drop_patches(x, 0.5, 1, jax.random.key(1))
    assert not np.array_equal(out, other)  # another step, other patches
    assert not np.array_equal(out[0, 1:] - x[0, 0], out[1, 1:] - x[1, 0])  # per image


@pytest.mark.slow
def test_training_drops_patches_and_evaluation_sees_them_all():
    plain = VisionTower(VisionOptions(**OPTIONS))
    dropping = VisionTower(VisionOptions(**OPTIONS, patch_dropout=0.75))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = plain.init(jax.random.key(1), images)
    # Same parameters; evaluation is exactly the model without patch dropout.
    np.testing.assert_array_equal(dropping.apply(params, images), plain.apply(params, images))
    seen = []
    with jax.disable_jit():
        from flax import linen as nn

        def record(next_fun, args, kwargs, context):
            if context.module.name == "encoder":
                seen.append(args[0].shape[1])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            trained = dropping.apply(
                params, images, train=True, rngs={"dropout": jax.random.key(2)}
            )
    assert seen == [1 + 4]  # class token + a quarter of the 16 patches
    assert not np.allclose(trained, plain.apply(params, images))
