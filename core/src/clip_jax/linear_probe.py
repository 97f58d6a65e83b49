"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

CLIP's linear-probe protocol (Radford et al. 2021, appendix A.3) fits sklearn's
L-BFGS logistic regression on the raw features, with the regularisation strength picked
on a validation split and the probe then refit on all training features. This is the
same objective and optimiser in JAX, so it runs where the features are (GPU/TPU) and adds
no dependency:

    objective(W, b) = mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * ||W||^2

The bias is not penalised (as in sklearn). ``l2`` relates to sklearn's ``C`` as
``l2 = 1 / (C * N)`` for N training examples.

Features are *not* standardised per dimension: that would change which weights the
penalty favours, and published CLIP probe numbers use raw features. The fit does
centre them and divide by one global scale, but both are exact reparametrisations (the
centring is absorbed by the unpenalised bias, the scale by ``l2``), so the optimum and
the objective value are those of the raw problem; only the conditioning improves, which
makes one gradient tolerance mean the same for L2-normalised CLIP embeddings (entries
around 1/sqrt(D)) as for unit-variance features.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

# Penalties tried by `linear_probe`: sklearn's C from 1e6 down to about 1/N for a few
# thousand examples. OpenAI swept 96 log-spaced values over a wider range; a decade
# apart is enough to pick the regime, and each extra value costs a full fit.
DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class Probe:
    """A fitted probe on raw features: ``logits_NxC = features_NxD @ weights_DxC + bias_C``."""

    weights_DxC: np.ndarray
    bias_C: np.ndarray
    l2: float
    iterations: int
    grad_norm: float  # of the (reparametrised) objective at the end: ~0 when converged

    def logits(self, features_NxD: np.ndarray) -> np.ndarray:
        return np.asarray(features_NxD, np.float32) @ self.weights_DxC + self.bias_C

    def predict_proba(self, features_NxD: np.ndarray) -> np.ndarray:
        logits_NxC = self.logits(features_NxD)
        logits_NxC = logits_NxC - logits_NxC.max(axis=1, keepdims=True)
        probs_NxC = np.exp(logits_NxC)
        return probs_NxC / probs_NxC.sum(axis=1, keepdims=True)

    def predict(self, features_NxD: np.ndarray) -> np.ndarray:
        return self.logits(features_NxD).argmax(axis=1)


def _objective(params: tuple, features_NxD, labels_N, l2) -> jax.Array:
    weights_DxC, bias_C = params
    logits_NxC = features_NxD @ weights_DxC + bias_C
    ce_N = optax.softmax_cross_entropy_with_integer_labels(logits_NxC, labels_N)
    return ce_N.mean() + 0.5 * l2 * jnp.sum(weights_DxC**2)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(features_NxD, labels_N, l2, tol, num_classes: int, steps: int):
    """Full-batch L-BFGS from zero until the gradient norm is below ``tol`` or ``steps``."""
    params = (
        jnp.zeros((features_NxD.shape[1], num_classes), features_NxD.dtype),
        jnp.zeros((num_classes,), features_NxD.dtype),
    )
    fun = functools.partial(_objective, features_NxD=features_NxD, labels_N=labels_N, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < steps) & (grad_norm >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
    # The state's gradient is the one at the last accepted point; recompute at the end.
    grad_norm = otu.tree_norm(jax.grad(fun)(params))
    return params, otu.tree_get(state, "count"), grad_norm


def _check(features_NxD: np.ndarray, labels_N: np.ndarray, num_classes: int) -> None:
    if features_NxD.ndim != 2 or labels_N.shape != (features_NxD.shape[0],):
        raise ValueError(
            f"want features N x D and N labels, got {features_NxD.shape} and {labels_N.shape}"
        )
    if len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels_N.min()}..{labels_N.max()}"
        )


def fit_linear_probe(
    features_NxD: np.ndarray,
    labels_N: np.ndarray,
    num_classes: int,
    l2: float = 1e-4,
    steps: int = 1000,
    tol: float = 1e-5,
) -> Probe:
    """Minimise mean cross-entropy + ``l2``/2 ||W||^2 on raw features (full batch, L-BFGS).

    Deterministic: zero initialisation, full batch, no sampling. ``steps`` caps L-BFGS
    iterations (sklearn's ``max_iter``; OpenAI used 1000); ``tol`` is on the gradient norm
    of the centred and rescaled problem, in float32.
    """
    features_NxD = np.asarray(features_NxD, np.float32)
    labels_N = np.asarray(labels_N, np.int32)
    _check(features_NxD, labels_N, num_classes)
    if len(labels_N) == 0:
        raise ValueError("no training examples")
    mean_D = features_NxD.mean(axis=0)
    centred_NxD = features_NxD - mean_D
    scale = float(np.sqrt(np.mean(centred_NxD**2))) or 1.0
    # x' = (x - mean) / scale, W' = scale * W: same logits up to the bias, same objective
    # when l2' = l2 / scale^2.
    (weights_DxC, bias_C), count, grad_norm = _fit(
        jnp.asarray(centred_NxD / scale),
        jnp.asarray(labels_N),
        jnp.float32(l2 / scale**2),
        jnp.float32(tol),
        num_classes=num_classes,
        steps=steps,
    )
    weights_DxC = np.asarray(weights_DxC) / scale
    bias_C = np.asarray(bias_C) - mean_D @ weights_DxC
    return Probe(weights_DxC, bias_C, float(l2), int(count), float(grad_norm))


def holdout_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) indices: a fixed-seed permutation, so features sorted by class still
    give a holdout with every class, and the same N always gives the same split."""
    order_N = np.random.default_rng(seed).permutation(n)
    holdout = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order_N[holdout:]), np.sort(order_N[:holdout])


def linear_probe(
    train_features_NxD: np.ndarray,
    train_labels_N: np.ndarray,
    test_features_MxD: np.ndarray,
    test_labels_M: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    holdout_fraction: float = 0.2,
    steps: int = 1000,
) -> dict:
    """CLIP's protocol: pick ``l2`` on a held-out slice of the training features, refit on
    all of them, report top-1 on the test features.

    The pick is the best holdout accuracy; ties go to the lower holdout cross-entropy, then
    to the earlier grid value, so it is deterministic.
    """
    train_features_NxD = np.asarray(train_features_NxD, np.float32)
    train_labels_N = np.asarray(train_labels_N, np.int64)
    test_features_MxD = np.asarray(test_features_MxD, np.float32)
    test_labels_M = np.asarray(test_labels_M, np.int64)
    _check(train_features_NxD, train_labels_N, num_classes)
    _check(test_features_MxD, test_labels_M, num_classes)
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    if len(test_labels_M) == 0:
        raise ValueError("no test examples")
    n = len(train_labels_N)
    if len(l2_grid) == 1:
        chosen = float(l2_grid[0])
    else:
        if n < 2:
            raise ValueError("choosing l2 needs at least 2 training examples")
        fit_N, hold_H = holdout_split(n, holdout_fraction)
        best = None
        for l2 in l2_grid:
            probe = fit_linear_probe(
                train_features_NxD[fit_N], train_labels_N[fit_N], num_classes, l2, steps
            )
            probs_HxC = probe.predict_proba(train_features_NxD[hold_H])
            labels_H = train_labels_N[hold_H]
            accuracy = float((probs_HxC.argmax(axis=1) == labels_H).mean())
            ce = float(
                -np.log(np.maximum(probs_HxC[np.arange(len(labels_H)), labels_H], 1e-30)).mean()
            )
            if best is None or (accuracy, -ce) > best[:2]:
                best = (accuracy, -ce, float(l2))
        chosen = best[2]
    probe = fit_linear_probe(train_features_NxD, train_labels_N, num_classes, chosen, steps)
    top1 = float((probe.predict(test_features_MxD) == test_labels_M).mean())
    return {
        "linear_probe_top1": top1,
        "linear_probe_l2": chosen,
        "linear_probe_train_examples": n,
    }
