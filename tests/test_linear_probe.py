"""Linear probe against a float64 reference fit of the same objective (scipy L-BFGS-B).

scipy is not a clip-jax dependency but jax's, so it is always importable next to jax.
"""

import numpy as np
import pytest
import scipy.optimize

from clip_jax.linear_probe import fit_linear_probe, holdout_split, linear_probe

C, D = 3, 8


def blobs(n: int, seed: int, offset: float = 5.0):
    """Three well-separated Gaussian blobs in 8-D, shifted off the origin (so the fit's
    centring is exercised). The centres are fixed; ``seed`` draws the points."""
    centres_CxD = np.random.default_rng(0).normal(size=(C, D)) * 3.0 + offset
    rng = np.random.default_rng(seed)
    labels_N = rng.integers(0, C, n)
    return (centres_CxD[labels_N] + rng.normal(size=(n, D))).astype(np.float32), labels_N


def objective(weights_DxC, bias_C, features_NxD, labels_N, l2):
    """mean CE + l2/2 ||W||^2 in float64, and its gradient (W, b), written by hand."""
    x_NxD = features_NxD.astype(np.float64)
    logits_NxC = x_NxD @ weights_DxC + bias_C
    logits_NxC = logits_NxC - logits_NxC.max(axis=1, keepdims=True)
    probs_NxC = np.exp(logits_NxC)
    probs_NxC /= probs_NxC.sum(axis=1, keepdims=True)
    n = len(labels_N)
    value = -np.log(probs_NxC[np.arange(n), labels_N]).mean() + 0.5 * l2 * (weights_DxC**2).sum()
    g_NxC = (probs_NxC - np.eye(weights_DxC.shape[1])[labels_N]) / n
    return value, x_NxD.T @ g_NxC + l2 * weights_DxC, g_NxC.sum(axis=0)


def reference_fit(features_NxD, labels_N, l2):
    d = features_NxD.shape[1]

    def fun(theta):
        weights_DxC, bias_C = theta[: d * C].reshape(d, C), theta[d * C :]
        value, g_w, g_b = objective(weights_DxC, bias_C, features_NxD, labels_N, l2)
        return value, np.concatenate([g_w.ravel(), g_b])

    result = scipy.optimize.minimize(
        fun,
        np.zeros(d * C + C),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "gtol": 1e-12, "ftol": 1e-15},
    )
    assert result.success, result.message
    return result.x[: d * C].reshape(d, C), result.x[d * C :], result.fun


@pytest.mark.parametrize("l2", [1e-3, 1e-2, 1e-1])
@pytest.mark.slow
def test_matches_reference_fit(l2):
    features_NxD, labels_N = blobs(300, seed=1)
    probe = fit_linear_probe(features_NxD, labels_N, C, l2=l2)
    ref_w, ref_b, ref_value = reference_fit(features_NxD, labels_N, l2)
    value, g_w, g_b = objective(
        probe.weights_DxC.astype(np.float64), probe.bias_C, features_NxD, labels_N, l2
    )
    # Measured: relative gap 6e-6 (l2=1e-3) down to 3e-9 (l2=0.1); max |dW| 2e-3..2e-5.
    np.testing.assert_allclose(value, ref_value, rtol=1e-3)
    assert value >= ref_value - 1e-9  # the reference is the (float64) optimum
    assert np.sqrt((g_w**2).sum() + (g_b**2).sum()) < 1e-3  # stationary on the raw problem
    ref_pred_N = (features_NxD @ ref_w + ref_b).argmax(axis=1)
    np.testing.assert_array_equal(probe.predict(features_NxD), ref_pred_N)
    probs_NxC = probe.predict_proba(features_NxD)
    np.testing.assert_allclose(probs_NxC.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs_NxC.argmax(axis=1), probe.predict(features_NxD))


@pytest.mark.slow
def test_random_labels_reference_and_chance():
    """No signal: the fit still matches the reference, and test accuracy is chance."""
    rng = np.random.default_rng(2)
    features_NxD = rng.normal(size=(300, D)).astype(np.float32)
    labels_N = rng.integers(0, C, 300)
    probe = fit_linear_probe(features_NxD, labels_N, C, l2=1e-4)
    _, _, ref_value = reference_fit(features_NxD, labels_N, 1e-4)
    value, _, _ = objective(
        probe.weights_DxC.astype(np.float64), probe.bias_C, features_NxD, labels_N, 1e-4
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-3)

    test_features_MxD = rng.normal(size=(600, D)).astype(np.float32)
    test_labels_M = rng.integers(0, C, 600)
    result = linear_probe(features_NxD, labels_N, test_features_MxD, test_labels_M, C)
    assert abs(result["linear_probe_top1"] - 1 / C) < 0.08


@pytest.mark.slow  # fits a probe on encoded blobs
def test_separable_blobs():
    train_features_NxD, train_labels_N = blobs(300, seed=1)
    test_features_MxD, test_labels_M = blobs(300, seed=2)
    result = linear_probe(train_features_NxD, train_labels_N, test_features_MxD, test_labels_M, C)
    assert result["linear_probe_top1"] >= 0.99
    assert result["linear_probe_train_examples"] == 300
    assert set(result) == {"linear_probe_top1", "linear_probe_l2", "linear_probe_train_examples"}


@pytest.mark.slow
def test_l2_choice_is_deterministic():
    """Overlapping blobs, so the grid values differ on the holdout; same input, same pick."""
    rng = np.random.default_rng(3)
    features_NxD = rng.normal(size=(200, D)).astype(np.float32)
    labels_N = rng.integers(0, C, 200)
    features_NxD[:, 0] += labels_N  # a weak signal in one dimension
    grid = (1e-4, 1e-2, 1.0)
    runs = [linear_probe(features_NxD, labels_N, features_NxD, labels_N, C, grid) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["linear_probe_l2"] in grid
    fit_A, hold_B = holdout_split(200)
    assert len(hold_B) == 40 and not set(fit_A) & set(hold_B)
    np.testing.assert_array_equal(holdout_split(200)[1], hold_B)


@pytest.mark.slow
def test_single_l2_skips_the_split():
    features_NxD, labels_N = blobs(60, seed=4)
    result = linear_probe(features_NxD, labels_N, features_NxD, labels_N, C, l2_grid=(0.5,))
    assert result["linear_probe_l2"] == 0.5


def test_bad_inputs():
    features_NxD, labels_N = blobs(30, seed=5)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_linear_probe(features_NxD, labels_N + 1, C)
    with pytest.raises(ValueError, match="N x D"):
        fit_linear_probe(features_NxD, labels_N[:10], C)
    with pytest.raises(ValueError, match="l2_grid"):
        linear_probe(features_NxD, labels_N, features_NxD, labels_N, C, l2_grid=())
