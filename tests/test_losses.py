"""Contrastive losses against hand-written float64 numpy versions (values and gradients)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.losses import sigmoid_loss, softmax_loss
from clip_jax.schemas import SigmoidOptions, SoftmaxOptions


# ------------------------------------------------------------------ numpy reference
def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_softmax(img, txt, log_scale, max_temperature=100.0):
    """Symmetric InfoNCE: (CE over rows + CE over columns) / 2, mean over the batch.

    Returns the loss and its gradients (img, txt, log_scale), derived by hand.
    """
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    clamped = log_scale >= math.log(max_temperature)
    scale = max_temperature if clamped else math.exp(log_scale)
    sim = img @ txt.T
    logits = scale * sim
    b = len(img)
    rows, cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
    loss = -(np.trace(rows) + np.trace(cols)) / (2 * b)
    eye = np.eye(b)
    g_logits = ((np.exp(rows) - eye) + (np.exp(cols) - eye)) / (2 * b)
    g_img = scale * g_logits @ txt
    g_txt = scale * g_logits.T @ img
    g_log_scale = 0.0 if clamped else float((g_logits * logits).sum())
    return loss, g_img, g_txt, g_log_scale


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(img, txt, log_scale, bias):
    """SigLIP: -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / B, z = +1 on the diagonal, else -1."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    scale = math.exp(log_scale)
    logits = scale * img @ txt.T + bias
    b = len(img)
    z = 2 * np.eye(b) - 1
    loss = -_log_sigmoid(z * logits).sum() / b
    g_logits = -z / (1 + np.exp(z * logits)) / b  # d/dl -log sigmoid(z l) = -z sigmoid(-z l)
    g_img = scale * g_logits @ txt
    g_txt = scale * g_logits.T @ img
    g_log_scale = float((g_logits * (logits - bias)).sum())
    g_bias = float(g_logits.sum())
    return loss, g_img, g_txt, g_log_scale, g_bias


def embeddings(seed, batch=12, dim=16, aligned=0.0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(batch, dim))
    txt = aligned * img + rng.normal(size=(batch, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


@functools.cache
def _value_and_grad(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


_jit = functools.cache(jax.jit)

SOFTMAX = softmax_loss(SoftmaxOptions())
SIGMOID = sigmoid_loss(SigmoidOptions())


def grads(fn, img, txt, log_scale, bias):
    value, g = _value_and_grad(fn)(
        jnp.asarray(img), jnp.asarray(txt), jnp.float32(log_scale), jnp.float32(bias)
    )
    return float(value), *(np.asarray(x, dtype=np.float64) for x in g)


# ----------------------------------------------------------------------------- tests
def test_init_values():
    softmax = softmax_loss(SoftmaxOptions())
    assert softmax.init_temperature == pytest.approx(1 / 0.07)
    assert softmax.init_bias is None
    sigmoid = sigmoid_loss(SigmoidOptions())
    assert sigmoid.init_temperature == 10.0
    assert sigmoid.init_bias == -10.0
    assert sigmoid_loss(SigmoidOptions(init_bias=-3.0, init_temperature=5.0)).init_bias == -3.0


@pytest.mark.parametrize(
    ("seed", "log_scale", "aligned"), [(0, math.log(1 / 0.07), 0.0), (1, 0.0, 2.0), (2, 3.0, 1.0)]
)
def test_softmax_matches_numpy(seed, log_scale, aligned):
    img, txt = embeddings(seed, aligned=aligned)
    fn = SOFTMAX.fn
    value, g_img, g_txt, g_scale, g_bias = grads(fn, img, txt, log_scale, 0.0)
    ref, r_img, r_txt, r_scale = np_softmax(img, txt, log_scale)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(g_img, r_img, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_txt, r_txt, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_scale, r_scale, rtol=1e-4, atol=1e-6)
    assert g_bias == 0.0  # the softmax loss ignores the bias


@pytest.mark.parametrize(
    ("seed", "log_scale", "bias", "aligned"),
    [(0, math.log(10.0), -10.0, 0.0), (1, 1.0, 0.5, 2.0), (2, 2.5, -3.0, 5.0)],
)
def test_sigmoid_matches_numpy(seed, log_scale, bias, aligned):
    img, txt = embeddings(seed, aligned=aligned)
    fn = SIGMOID.fn
    value, g_img, g_txt, g_scale, g_bias = grads(fn, img, txt, log_scale, bias)
    ref, r_img, r_txt, r_scale, r_bias = np_sigmoid(img, txt, log_scale, bias)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    np.testing.assert_allclose(g_img, r_img, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_txt, r_txt, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_scale, r_scale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_bias, r_bias, rtol=1e-4, atol=1e-6)


def test_numpy_gradients_match_finite_differences():
    """The hand-derived reference gradients are themselves right."""
    img, txt = embeddings(3, batch=5, dim=4, aligned=1.0)
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    eps = 1e-6

    def check(loss_and_grads, extra):
        _, g_img, _, g_scale, *rest = loss_and_grads(img, txt, 1.5, *extra)
        bumped = img.copy()
        bumped[2, 1] += eps
        lo = loss_and_grads(img, txt, 1.5, *extra)[0]
        hi = loss_and_grads(bumped, txt, 1.5, *extra)[0]
        np.testing.assert_allclose((hi - lo) / eps, g_img[2, 1], rtol=1e-4, atol=1e-7)
        hi = loss_and_grads(img, txt, 1.5 + eps, *extra)[0]
        np.testing.assert_allclose((hi - lo) / eps, g_scale, rtol=1e-4, atol=1e-7)
        if rest:
            hi = loss_and_grads(img, txt, 1.5, extra[0] + eps)[0]
            np.testing.assert_allclose((hi - lo) / eps, rest[0], rtol=1e-4, atol=1e-7)

    check(np_softmax, ())
    check(np_sigmoid, (-2.0,))


def test_softmax_clamps_temperature():
    img, txt = embeddings(4, aligned=1.0)
    options = SoftmaxOptions(max_temperature=20.0)
    fn = softmax_loss(options).fn
    above, _, _, g_scale, _ = grads(fn, img, txt, math.log(500.0), 0.0)
    at_max, *_ = grads(fn, img, txt, math.log(20.0), 0.0)
    np.testing.assert_allclose(above, at_max, rtol=1e-6)
    np.testing.assert_allclose(above, np_softmax(img, txt, math.log(500.0), 20.0)[0], rtol=1e-5)
    assert g_scale == 0.0  # no gradient pushes the scale further up
    below, *_ = grads(fn, img, txt, math.log(10.0), 0.0)
    assert abs(below - at_max) > 1e-3


def test_softmax_is_symmetric_in_the_towers():
    img, txt = embeddings(5, aligned=1.0)
    fn = _jit(SOFTMAX.fn)
    np.testing.assert_allclose(
        fn(img, txt, jnp.float32(2.0), 0.0), fn(txt, img, jnp.float32(2.0), 0.0), rtol=1e-6
    )


def test_perfectly_matched_pairs_have_low_loss():
    dim = 16
    eye = np.eye(dim, dtype=np.float32)[:8]  # orthonormal, each image matches its text
    softmax = _jit(SOFTMAX.fn)
    assert float(softmax(eye, eye, jnp.float32(math.log(100.0)), 0.0)) < 1e-6
    shuffled = eye[::-1]
    assert float(softmax(eye, shuffled, jnp.float32(math.log(100.0)), 0.0)) > 50
    sigmoid = _jit(SIGMOID.fn)
    good = float(sigmoid(eye, eye, jnp.float32(math.log(100.0)), jnp.float32(-50.0)))
    bad = float(sigmoid(eye, shuffled, jnp.float32(math.log(100.0)), jnp.float32(-50.0)))
    assert good < 1e-6 < 1 < bad


def test_sigmoid_at_init_is_dominated_by_negatives():
    # With t = 10 and b = -10 the B^2 - B negative pairs cost almost nothing and each
    # positive about 10 - 10 cos: the loss starts near 10 (1 - mean cos) + small.
    img, txt = embeddings(6, batch=32)
    loss = SIGMOID
    value = float(
        _jit(loss.fn)(
            img, txt, jnp.float32(math.log(loss.init_temperature)), jnp.float32(loss.init_bias)
        )
    )
    ref = np_sigmoid(img, txt, math.log(10.0), -10.0)[0]
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    assert 5 < value < 15


def test_losses_jit_and_batch_size_one():
    img, txt = embeddings(7, batch=1)
    for loss, bias in ((SOFTMAX, 0.0), (SIGMOID, -1.0)):
        value = _jit(loss.fn)(img, txt, jnp.float32(1.0), jnp.float32(bias))
        assert value.shape == ()
        assert np.isfinite(float(value))
    # one pair: softmax has nothing to contrast with
    np.testing.assert_allclose(
        float(_jit(SOFTMAX.fn)(img, txt, jnp.float32(1.0), 0.0)), 0.0, atol=1e-6
    )
