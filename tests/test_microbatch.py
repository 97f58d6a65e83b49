"""Gradient caching: k micro-batches give the full batch's loss and gradients, every
negative included, with about k-fold less activation memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.heads import contrastive_objective
from clip_jax.train.microbatch import cached_value_and_grad
from clip_jax.train.state import create_state, make_train_step, state_shardings
from tests.test_sharding import STRATEGIES, batch, build


def value_and_grads(spec, comps, k: int, objective=None, labels=None, params=None):
    tx, _ = comps.optimizer()
    layout = comps.layout
    init, _, shardings = state_shardings(comps.model, tx, layout, spec)
    if params is None:
        params = create_state(init, shardings, seed=0)["params"]
    images, tokens = batch(spec)
    images = jax.device_put(images, layout.batch_sharding(4))
    tokens = jax.device_put(tokens, layout.batch_sharding(2))
    objective = objective or contrastive_objective(comps.model, comps.loss.fn)
    if k == 1:
        fn = jax.value_and_grad(objective, has_aux=True)
    else:
        fn = cached_value_and_grad(objective, k)

    def run(params, images, tokens, labels):
        with layout.activate():
            return fn(params, images, tokens, labels, jax.random.key(0))

    (loss, metrics), grads = jax.jit(run)(params, images, tokens, labels)
    return params, jax.device_get((loss, metrics, grads))


def assert_same(reference, other, rtol=2e-5):
    (ref_loss, ref_metrics, ref_grads), (loss, metrics, grads) = reference, other
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol), metrics, ref_metrics)
    # Gradients: same up to summation order, relative to each tensor's scale (floored:
    # attention's key bias has a true gradient of 0, computed as rounding noise).
    largest = max(float(np.abs(b).max()) for b in jax.tree.leaves(ref_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        scale = max(float(np.abs(b).max()), 1e-3 * largest)
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)


@pytest.mark.parametrize("loss", ["softmax", pytest.param("sigmoid", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_micro_batches_give_the_full_batch_loss_and_gradients(loss):
    spec, comps = build("dp", ["sharding.mesh.data=1"], loss, devices=jax.devices()[:1])
    params, full = value_and_grads(spec, comps, 1)
    _, micro = value_and_grads(spec, comps, 4, params=params)
    assert_same(full, micro)
    # Plain accumulation (each micro-batch scored alone) gives another loss: the
    # comparison above can tell the two apart.
    objective = contrastive_objective(comps.model, comps.loss.fn)
    plain = lambda *args: objective(*args)  # noqa: E731 (no forward/score split)
    _, accumulated = value_and_grads(spec, comps, 4, plain, params=params)
    assert abs(accumulated[0] - full[0]) > 1e-3 * abs(full[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "loss"), [("fsdp", "chunked_sigmoid"), ("fsdp_tp", "softmax"), ("dp", "sigmoid")]
)
def test_micro_batches_compose_with_sharding_and_the_chunked_loss(strategy, loss):
    spec, comps = build(strategy, STRATEGIES[strategy], loss)
    params, full = value_and_grads(spec, comps, 1)
    _, micro = value_and_grads(spec, comps, 2, params=params)
    assert_same(full, micro)


@pytest.mark.slow
def test_a_classification_head_is_exact_too():
    from clip_jax.heads import image_classification
    from clip_jax.schemas import ClassificationHeadOptions

    spec, comps = build("dp", ["sharding.mesh.data=1"], "softmax", devices=jax.devices()[:1])
    head = image_classification(ClassificationHeadOptions(num_classes=5))
    comps.__dict__["model"] = head.attach(comps.model, "clip")
    objective = head.objective(comps.model, None)
    labels = np.arange(spec.train.batch_size, dtype=np.int32) % 5
    labels[:3] = -1  # unlabelled records: micro-batches hold different counts of them
    params, full = value_and_grads(spec, comps, 1, objective, labels)
    _, micro = value_and_grads(spec, comps, 4, objective, labels, params=params)
    assert_same(full, micro)


@pytest.mark.slow
def test_a_plain_objective_is_accumulated():
    """A plugin's objective without a forward/score split: the mean over micro-batches."""
    spec, comps = build("dp", ["sharding.mesh.data=1"], "softmax", devices=jax.devices()[:1])
    model = comps.model

    def mean_norm(params, images, tokens, labels, rng):  # a mean over examples: exact
        img, txt, _, _ = model.apply({"params": params}, images, tokens)
        return jnp.mean(jnp.sum(img * txt, axis=-1)), {}

    params, full = value_and_grads(spec, comps, 1, mean_norm)
    _, micro = value_and_grads(spec, comps, 4, mean_norm, params=params)
    assert_same(full, micro)


def temp_bytes(spec, comps, k: int) -> int:
    tx, schedule = comps.optimizer()
    init, abstract, shardings = state_shardings(comps.model, tx, comps.layout, spec)
    step = make_train_step(
        comps.model, comps.loss.fn, tx, schedule, shardings, comps.layout, microbatches=k
    )
    v, t, size = spec.model.vision, spec.model.text, spec.train.batch_size
    images = jax.ShapeDtypeStruct((size, v.image_size, v.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((size, t.context_length), jnp.int32)
    return step.lower(abstract, images, tokens).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_memory_drops_with_micro_batches():
    # Activations dominate: a long image sequence through a narrow, deep-ish tower.
    spec, comps = build(
        "dp",
        [
            "sharding.mesh.data=1",
            "model.vision.image_size=64",
            "model.vision.patch_size=4",
            "model.vision.depth=2",
            "train.batch_size=64",
        ],
        "softmax",
        devices=jax.devices()[:1],
    )
    full, micro = temp_bytes(spec, comps, 1), temp_bytes(spec, comps, 8)
    # 8 micro-batches: at least 4x less scratch memory (the rest is parameters' size).
    assert micro * 4 < full, (full, micro)


@pytest.mark.slow
def test_a_run_with_micro_batches_trains_like_the_full_batch(small_run, tmp_path):
    """Through the trainer: the same losses step by step, and a clear error when a
    micro-batch cannot be split over the devices."""
    from clip_jax.errors import UserError
    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from tests.conftest import QUICKSTART

    losses = {}
    for k in (1, 4):
        out = tmp_path / f"micro{k}"
        spec = load_spec(
            QUICKSTART,
            [*small_run, "train.steps=10", f"train.microbatches={k}", f"run.output_dir={out}"],
        )
        train(spec)
        records = [r for r in RunFolder(out).metrics() if r["split"] == "train"]
        losses[k] = [r["loss"] for r in records]
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-4)
    bad = load_spec(
        QUICKSTART,
        [
            *small_run,
            "train.microbatches=64",
            "sharding.mesh.data=8",
            f"run.output_dir={tmp_path}/bad",
        ],
    )
    with pytest.raises(UserError, match="64 micro-batches"):
        train(bad)
