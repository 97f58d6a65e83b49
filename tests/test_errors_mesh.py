"""Mesh mistakes are MeshErrors naming ``sharding.mesh``: the spec is valid on its own,
and only once the devices are known is a shape found not to fit them."""

import pytest

from clip_jax.errors import MeshError, UserError
from clip_jax.schemas import MeshOptions
from clip_jax.sharding import resolve_mesh_shape


@pytest.mark.parametrize(
    ("sizes", "devices", "message"),
    [
        ({"data": 3, "fsdp": 1, "model": 1}, 8, "data=3 x fsdp=1 x model=1 = 3 devices, but"),
        ({"data": -1, "fsdp": 3, "model": 1}, 8, "multiply to 3, which does not divide the 8"),
        ({"data": 2, "fsdp": 2, "model": 1}, 1, "= 4 devices, but there are 1"),
    ],
)
def test_a_mesh_that_does_not_fit_names_sharding_mesh(sizes, devices, message):
    with pytest.raises(MeshError) as info:
        resolve_mesh_shape(MeshOptions(**sizes), devices)
    assert isinstance(info.value, UserError)
    assert info.value.key == "sharding.mesh"
    assert message in info.value.message
    assert str(info.value).startswith("sharding.mesh: ")


def test_huge_axis_sizes_are_a_mesh_error_not_an_overflow():
    # numpy's int64 product wrapped around (2**62 * 4 == 0); Python's does not
    sizes = MeshOptions(data=2**62, fsdp=4, model=1)
    with pytest.raises(MeshError, match=str(2**64)):
        resolve_mesh_shape(sizes, 8)


def test_a_fitting_mesh_fills_in_the_remaining_devices():
    assert resolve_mesh_shape(MeshOptions(data=-1, fsdp=2, model=2), 8) == (2, 2, 2)


def test_a_shape_the_interconnect_refuses_is_a_mesh_error(monkeypatch):
    import jax
    from jax.experimental import mesh_utils

    from clip_jax.sharding import make_mesh

    def refuse(shape, devices):
        raise NotImplementedError("Failed to find assignment for mesh_shape")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    with pytest.raises(MeshError) as info:
        make_mesh(MeshOptions(data=-1, fsdp=1, model=1), jax.devices())
    assert info.value.key == "sharding.mesh"
    assert "interconnect" in info.value.message and "Failed to find" in info.value.message
