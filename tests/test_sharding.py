"""Sharding strategies on 8 simulated devices: same numbers as one device, right layouts."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from clip_jax.components import components
from clip_jax.errors import UserError
from clip_jax.spec import load_spec
from clip_jax.train.checkpoint import Checkpoints
from clip_jax.train.state import create_state, make_train_step, state_shardings
from tests.conftest import QUICKSTART

MODEL = [
    "model.vision.width=32",
    "model.vision.depth=1",
    "model.vision.heads=4",
    "model.vision.image_size=16",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=4",
    "model.text.vocab_size=300",
    "model.text.context_length=8",
    "model.embed_dim=16",
    "train.batch_size=16",
    "optimizer.warmup_steps=0",
    "optimizer.learning_rate=0.01",
]

STRATEGIES = {
    "dp": ["sharding.mesh.data=8"],
    "fsdp": ["sharding.mesh.fsdp=8"],
    "tp": ["sharding.mesh.data=4", "sharding.mesh.model=2"],
    "fsdp_tp": ["sharding.mesh.fsdp=4", "sharding.mesh.model=2"],
}


def build(strategy: str, mesh: list[str], loss: str = "sigmoid", devices=None):
    spec = load_spec(
        QUICKSTART, MODEL + [f"sharding.strategy={strategy}", f"loss.name={loss}", *mesh]
    )
    comps = components(spec)
    if devices is not None:  # a layout over a subset of the devices
        sharding = spec.sharding
        from clip_jax import sharding as sharding_lib

        factory = {
            "dp": sharding_lib.data_parallel,
            "fsdp": sharding_lib.fully_sharded,
            "tp": sharding_lib.tensor_parallel,
            "fsdp_tp": sharding_lib.fsdp_tensor_parallel,
        }[strategy]
        comps.__dict__["layout"] = factory(sharding, devices)
    return spec, comps


def batch(spec, seed: int = 0):
    rng = np.random.default_rng(seed)
    v, t, size = spec.model.vision, spec.model.text, spec.train.batch_size
    images = rng.normal(size=(size, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = rng.integers(3, 300, size=(size, t.context_length)).astype(np.int32)
    tokens[:, -2:] = 0  # some padding, like real captions
    return images, tokens


def loss_and_grads(spec, comps, params=None):
    """Loss and gradients for one batch (what a train step starts from), and the params.

    ``params`` from another layout are first laid out with this strategy's shardings, so
    each strategy is compared on identical numbers (initialising is the slow part to
    compile on simulated devices, and is tested once per layout below).
    """

    tx, _ = comps.optimizer()
    layout = comps.layout
    init, _, shardings = state_shardings(comps.model, tx, layout, spec)
    if params is None:
        params = create_state(init, shardings, seed=0)["params"]
    else:
        params = jax.device_put(params, shardings["params"])
    images, tokens = batch(spec)
    images = jax.device_put(images, layout.batch_sharding(4))
    tokens = jax.device_put(tokens, layout.batch_sharding(2))

    def loss(params):
        with layout.activate():
            return comps.loss.fn(*comps.model.apply({"params": params}, images, tokens))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return params, value, grads


@pytest.fixture(scope="module")
def single_device_reference():
    results = {}
    for loss in ("sigmoid", "softmax"):
        spec, comps = build("dp", ["sharding.mesh.data=1"], loss, devices=jax.devices()[:1])
        results[loss] = jax.device_get(loss_and_grads(spec, comps))
    return results


CASES = [(s, "sigmoid") for s in STRATEGIES] + [("fsdp_tp", "softmax")]


@pytest.mark.parametrize(("strategy", "loss"), CASES)
@pytest.mark.slow
def test_loss_and_gradients_match_a_single_device(strategy, loss, single_device_reference):
    ref_params, ref_value, ref_grads = single_device_reference[loss]
    spec, comps = build(strategy, STRATEGIES[strategy], loss)
    assert comps.layout.mesh.devices.size == 8
    params, value, grads = loss_and_grads(spec, comps, ref_params)
    if strategy != "dp":
        assert not all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-6),
        grads,
        ref_grads,
    )


def spec_of(array) -> PartitionSpec:
    return array.sharding.spec


@pytest.mark.parametrize("strategy", ["dp", "fsdp_tp"])
@pytest.mark.slow
def test_state_is_created_sharded_as_the_strategy_says(strategy):
    spec, comps = build(strategy, STRATEGIES[strategy])
    tx, _ = comps.optimizer()
    init, _, shardings = state_shardings(comps.model, tx, comps.layout, spec)
    state = create_state(init, shardings, seed=0)
    query = state["params"]["vision"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
    fc1 = state["params"]["vision"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    embed_axis = "fsdp" if "fsdp" in strategy else None
    model_axis = "model" if "tp" in strategy else None
    assert tuple(spec_of(query)) in {(embed_axis, model_axis, None), (embed_axis, model_axis)}
    assert tuple(spec_of(fc1))[:2] == (embed_axis, model_axis)
    # Optimizer state is laid out like the parameters it tracks.
    adam = state["opt_state"][1][0]
    mu_query = adam.mu["vision"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
    assert spec_of(mu_query) == spec_of(query)
    if strategy == "dp":
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state["params"]))
    else:  # no device holds a whole sharded parameter
        shard = query.addressable_shards[0].data
        assert shard.size < query.size


def test_mesh_sizes_that_do_not_cover_the_devices_are_named():
    spec, comps = build("tp", ["sharding.mesh.data=3", "sharding.mesh.model=2"])
    with pytest.raises(UserError, match=r"sharding\.mesh: data=3 x fsdp=1 x model=2 = 6"):
        comps.layout  # noqa: B018
    spec, comps = build("fsdp_tp", ["sharding.mesh.model=3"])  # fsdp defaults to -1
    with pytest.raises(UserError, match="does not divide the 8 devices"):
        comps.layout  # noqa: B018


def test_a_split_that_does_not_divide_is_a_clear_error():
    spec, comps = build("tp", ["sharding.mesh.data=1", "sharding.mesh.model=8"])
    tx, _ = comps.optimizer()
    with pytest.raises(
        UserError, match=r"'heads' axis \(4\) cannot be split over sharding.mesh.model"
    ):
        state_shardings(comps.model, tx, comps.layout, spec)


@pytest.mark.slow
def test_checkpoint_saved_under_one_mesh_restores_under_another(tmp_path):
    spec, dp4 = build("dp", ["sharding.mesh.data=4"], devices=jax.devices()[:4])
    tx, schedule = dp4.optimizer()
    init, _, dp_shardings = state_shardings(dp4.model, tx, dp4.layout, spec)
    state = create_state(init, dp_shardings, seed=0)
    images, tokens = batch(spec)
    step = make_train_step(dp4.model, dp4.loss.fn, tx, schedule, dp_shardings, dp4.layout)
    trained, _ = step(
        state,
        jax.device_put(images, dp4.layout.batch_sharding(4)),
        jax.device_put(tokens, dp4.layout.batch_sharding(2)),
    )
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=1, every=1)
    checkpoints.save(1, trained, {"position": 16})
    checkpoints.close()

    spec8, fsdp8 = build("fsdp", ["sharding.mesh.fsdp=8"])
    tx, schedule = fsdp8.optimizer()
    _, abstract, shardings = state_shardings(fsdp8.model, tx, fsdp8.layout, spec8)
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=1, every=1)
    restored, data = checkpoints.restore(1, abstract)
    checkpoints.close()
    assert data == {"position": 16}
    kernel = restored["params"]["text"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in tuple(spec_of(kernel))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored["params"],
        trained["params"],
    )
    step = make_train_step(fsdp8.model, fsdp8.loss.fn, tx, schedule, shardings, fsdp8.layout)
    images, tokens = batch(spec8, seed=1)
    state, metrics = step(
        restored,
        jax.device_put(images, fsdp8.layout.batch_sharding(4)),
        jax.device_put(tokens, fsdp8.layout.batch_sharding(2)),
    )
    assert int(state["step"]) == 2 and np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_fsdp_gathers_weights_not_the_batch():
    """Activations stay split over the batch inside every block: FSDP's per-device
    scratch memory is about data parallelism's at the same per-device batch (without
    the activation constraints, XLA gathers whole-batch activations instead: 2.7x)."""
    from clip_jax.memory import Estimator

    overrides = [o for o in MODEL if not o.startswith("train.batch_size")]
    estimator = Estimator(QUICKSTART, [*overrides, "model.vision.depth=2"], 8)
    dp, fsdp = estimator.estimate("dp", 512), estimator.estimate("fsdp", 512)
    # FSDP also holds one gathered layer's weights: small next to 64 examples' activations.
    assert fsdp.temporaries <= dp.temporaries * 1.2, (dp, fsdp)
    assert fsdp.arguments < dp.arguments
