"""Sharding strategies: a device mesh plus rules from logical axis names to mesh axes.

The mesh always has the axes ``data``, ``fsdp`` and ``model`` (sizes from
``[sharding.mesh]``, -1 meaning the remaining devices). The batch is split over
``data`` x ``fsdp``; a strategy only chooses which *parameter* axes are split:

    dp       nothing: parameters replicated
    fsdp     ``embed`` (every weight matrix has one) over ``fsdp``
    tp       ``heads`` and ``mlp`` over ``model`` (Megatron-style attention/MLP split)
    fsdp_tp  both

The trainer creates the train state directly with these shardings (``jax.jit`` with
``out_shardings``), so parameters never exist whole on one device unless replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax.errors import MeshError
from clip_jax.schemas import MeshOptions

AXES = ("data", "fsdp", "model")
MESH_KEY = "sharding.mesh"
# The mesh a model is being traced for. Flax's ``with_logical_constraint`` is a no-op
# unless it is given a mesh (or a global abstract mesh is set, which would also make
# Flax constrain DenseGeneral's flat kernel initialiser, and fail), so the constraints
# get it from here.
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``Layout.activate()``, or None (e.g. encoding on one device)."""
    return _ACTIVE_MESH.get()


BATCH_AXES = ("data", "fsdp")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: Rules  # logical parameter axis -> mesh axis
    batch_axes: tuple[str, ...] = BATCH_AXES

    def batch_sharding(self, ndim: int = 1) -> NamedSharding:
        """Leading axis split over the batch axes, the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(self.batch_axes, *([None] * (ndim - 1))))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_divisor(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Trace the model under this mesh and the logical rules, so that its activation
        constraints (``models.layers.constrain``) apply."""
        import flax.linen as nn

        token = _ACTIVE_MESH.set(self.mesh)
        try:
            with self.mesh, nn.logical_axis_rules(self.all_rules):
                yield
        finally:
            _ACTIVE_MESH.reset(token)

    @property
    def all_rules(self) -> Rules:
        """Parameter rules plus the activation rule (batch over the batch axes)."""
        return (("batch", self.batch_axes), *self.rules)


def resolve_mesh_shape(options: MeshOptions, device_count: int) -> tuple[int, int, int]:
    """Axis sizes with -1 filled in; a MeshError naming ``sharding.mesh`` when they
    cannot cover the devices (the spec is valid on its own: only here are the devices
    known, so this is where the mistake is detected)."""
    sizes = [options.data, options.fsdp, options.model]
    known = math.prod(s for s in sizes if s != -1)  # Python ints: no overflow
    if -1 in sizes:
        if device_count % known:
            raise MeshError(
                f"the fixed axis sizes multiply to {known}, which does not divide the "
                f"{device_count} devices; choose sizes that divide {device_count}",
                key=MESH_KEY,
            )
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        shape = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes, strict=True))
        raise MeshError(
            f"{shape} = {math.prod(sizes)} devices, but there are {device_count}; make "
            f"the sizes multiply to {device_count} or set one to -1",
            key=MESH_KEY,
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(options: MeshOptions, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(options, len(devices))
    if devices == jax.devices():
        from jax.experimental import mesh_utils

        # Lays the axes out along the physical interconnect on TPU / multi-host, which
        # refuses some shapes that do multiply to the device count.
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError) as exc:
            sizes = " x ".join(f"{a}={s}" for a, s in zip(AXES, shape, strict=True))
            raise MeshError(
                f"{sizes} cannot be laid out on these devices' interconnect ({exc}); "
                "try another split of the same device count",
                key=MESH_KEY,
            ) from None
    else:
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def _strategy(rules: Rules):
    def factory(options, devices: Sequence[jax.Device] | None = None) -> Layout:
        return Layout(make_mesh(options.mesh, devices), rules)

    factory.rules = rules  # published, so `clipctl info` can size a mesh it does not have
    return factory


data_parallel = _strategy(())
fully_sharded = _strategy((("embed", "fsdp"),))
tensor_parallel = _strategy((("heads", "model"), ("mlp", "model")))
fsdp_tensor_parallel = _strategy((("embed", "fsdp"), ("heads", "model"), ("mlp", "model")))
