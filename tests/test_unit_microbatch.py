"""Gradient caching on a hand-made two-tower objective (a linear map per tower, the real
softmax loss): a few small programs to compile instead of the CLIP model's. The fast
counterpart of test_microbatch, which does the same on the CLIP model (marked slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.heads import SplitObjective
from clip_jax.losses import softmax_loss
from clip_jax.schemas import SoftmaxOptions
from clip_jax.train.microbatch import _merge, _split, cached_value_and_grad

B, IMG, TXT, D = 8, 6, 5, 4
LOSS = softmax_loss(SoftmaxOptions()).fn


def normalise(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def forward(params, images, tokens, dropout_rng):
    """Per example: the two embeddings (the image one shifted by a number drawn from
    the rng, standing in for dropout: which rng each micro-batch gets matters); shared:
    the logit scale and bias."""
    shift = (jax.random.key_data(dropout_rng)[-1] % 16).astype(jnp.float32) / 16
    img = normalise(images @ params["vision"] + shift)
    txt = normalise(tokens @ params["text"])
    return (img, txt), (params["log_scale"], jnp.float32(0.0))


def score(per_example, shared, labels):
    (img, txt), (log_scale, bias) = per_example, shared
    return LOSS(img, txt, log_scale, bias), {"mean_cos": jnp.mean(jnp.sum(img * txt, -1))}


OBJECTIVE = SplitObjective(forward, score)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {
        "vision": jnp.asarray(rng.normal(size=(IMG, D)), jnp.float32),
        "text": jnp.asarray(rng.normal(size=(TXT, D)), jnp.float32),
        "log_scale": jnp.float32(2.0),
    }
    images = jnp.asarray(rng.normal(size=(B, IMG)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(B, TXT)), jnp.float32)
    return params, images, tokens


def test_split_takes_every_kth_row_and_merge_puts_them_back():
    x = jnp.arange(8 * 2).reshape(8, 2)
    micro = _split(x, 4)
    assert micro.shape == (4, 2, 2)
    assert micro[:, :, 0].tolist() == [[0, 8], [2, 10], [4, 12], [6, 14]]  # rows i, i+4
    np.testing.assert_array_equal(_merge(micro), x)


def test_micro_batches_give_the_full_batch_loss_and_gradients(problem):
    params, images, tokens = problem
    k = 4
    rng = jax.random.key(1)

    def reference(params):
        """The full batch, each row's dropout noise drawn as its micro-batch draws it."""
        noise_rngs = [jax.random.fold_in(rng, i) for i in range(k)]
        (img, txt), shared = forward(params, images, tokens, rng)
        per_micro = [
            forward(params, images[i::k], tokens[i::k], noise_rngs[i])[0][0] for i in range(k)
        ]
        img = _merge(jnp.stack(per_micro))
        return score((img, txt), shared, None)

    (want, want_metrics), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    fn = jax.jit(cached_value_and_grad(OBJECTIVE, k))
    (loss, metrics), grads = fn(params, images, tokens, None, rng)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["mean_cos"], want_metrics["mean_cos"], rtol=1e-5)
    for name in params:  # the shared logit scale counted once, not k times
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_a_plain_objective_is_the_mean_over_micro_batches(problem):
    params, images, tokens = problem

    def mean_norm(params, images, tokens, labels, rng):  # a mean over examples: exact
        img = images @ params["vision"]
        return jnp.mean(jnp.sum(img**2, -1)) * jnp.exp(params["log_scale"]), {}

    (want, _), want_grads = jax.jit(jax.value_and_grad(mean_norm, has_aux=True))(
        params, images, tokens, None, None
    )
    (loss, _), grads = jax.jit(cached_value_and_grad(mean_norm, 4))(
        params, images, tokens, None, jax.random.key(0)
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
