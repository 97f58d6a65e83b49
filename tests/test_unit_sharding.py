"""The four sharding strategies as built from a spec on the 8 simulated CPU devices
(conftest): mesh shapes, the batch divisor and sharding, and the parameter rules. No
model, nothing compiled."""

import jax
import pytest
from jax.sharding import PartitionSpec

from clip_jax import sharding
from clip_jax.components import components
from clip_jax.schemas import MeshOptions
from clip_jax.spec import validate


def layout_of(strategy: str, **mesh):
    table = {"strategy": strategy, **({"mesh": mesh} if mesh else {})}
    return components(validate({"sharding": table})).layout


def test_the_tests_run_on_eight_simulated_cpu_devices():
    assert jax.device_count() == 8
    assert jax.default_backend() == "cpu"


@pytest.mark.parametrize(
    ("strategy", "mesh", "shape", "divisor"),
    [
        # defaults: dp over every device on `data`, fsdp over every device on `fsdp`
        ("dp", {}, (8, 1, 1), 8),
        ("fsdp", {}, (1, 8, 1), 8),
        ("tp", {}, (8, 1, 1), 8),
        ("fsdp_tp", {}, (1, 8, 1), 8),
        # the model axis takes devices away from the batch
        ("tp", {"model": 2}, (4, 1, 2), 4),
        ("fsdp_tp", {"model": 2}, (1, 4, 2), 4),
        ("fsdp_tp", {"model": 4}, (1, 2, 4), 2),
        ("dp", {"data": 2, "fsdp": 2, "model": 2}, (2, 2, 2), 4),
        ("fsdp", {"data": 2}, (2, 4, 1), 8),
        ("tp", {"data": -1, "model": 8}, (1, 1, 8), 1),
    ],
)
def test_mesh_shape_and_batch_divisor(strategy, mesh, shape, divisor):
    layout = layout_of(strategy, **mesh)
    assert layout.mesh.axis_names == ("data", "fsdp", "model")
    assert tuple(layout.mesh.shape[a] for a in layout.mesh.axis_names) == shape
    assert layout.batch_divisor == divisor
    assert sorted(d.id for d in layout.mesh.devices.flat) == list(range(8))  # each once


@pytest.mark.parametrize(
    ("strategy", "rules"),
    [
        ("dp", ()),
        ("fsdp", (("embed", "fsdp"),)),
        ("tp", (("heads", "model"), ("mlp", "model"))),
        ("fsdp_tp", (("embed", "fsdp"), ("heads", "model"), ("mlp", "model"))),
    ],
)
def test_each_strategy_splits_only_its_parameter_axes(strategy, rules):
    layout = layout_of(strategy)
    assert layout.rules == rules
    # The factory publishes the same rules, for `clipctl info` to size a mesh it lacks.
    target = {"dp": "data_parallel", "fsdp": "fully_sharded", "tp": "tensor_parallel"}
    assert getattr(sharding, target.get(strategy, "fsdp_tensor_parallel")).rules == rules
    # Activations: the batch over data x fsdp, whatever the strategy.
    assert layout.all_rules == (("batch", ("data", "fsdp")), *rules)


def test_batch_sharding_splits_the_leading_axis_over_data_and_fsdp():
    layout = layout_of("fsdp_tp", model=2)  # 1 x 4 x 2
    images = layout.batch_sharding(4)
    assert images.spec == PartitionSpec(("data", "fsdp"), None, None, None)
    assert layout.batch_sharding().spec == PartitionSpec(("data", "fsdp"))
    assert layout.replicated().spec == PartitionSpec()
    array = jax.device_put(jax.numpy.arange(8 * 3).reshape(8, 3), layout.batch_sharding(2))
    # 4 batch shards of 2 rows, each held by the 2 devices of its model axis
    rows = {(s.index[0].start, s.index[0].stop) for s in array.addressable_shards}
    assert rows == {(0, 2), (2, 4), (4, 6), (6, 8)}
    assert len(array.addressable_shards) == 8


def test_activate_publishes_the_mesh_only_inside():
    layout = layout_of("fsdp")
    assert sharding.active_mesh() is None
    with layout.activate():
        assert sharding.active_mesh() is layout.mesh
    assert sharding.active_mesh() is None


@pytest.mark.parametrize(
    ("sizes", "count", "shape"),
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((1, 1, -1), 4, (1, 1, 4)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((-1, 1, 1), 1, (1, 1, 1)),
    ],
)
def test_resolve_mesh_shape_fills_in_the_remaining_devices(sizes, count, shape):
    data, fsdp, model = sizes
    options = MeshOptions(data=data, fsdp=fsdp, model=model)
    assert sharding.resolve_mesh_shape(options, count) == shape


def test_a_mesh_over_some_devices_uses_them_in_order():
    devices = jax.devices()[4:]
    layout = sharding.tensor_parallel(
        validate({"sharding": {"strategy": "tp", "mesh": {"model": 2}}}).sharding, devices
    )
    assert layout.mesh.devices.shape == (2, 1, 2)
    assert [d.id for d in layout.mesh.devices.flat] == [d.id for d in devices]
    assert layout.batch_divisor == 2
