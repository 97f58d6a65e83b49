"""Sharding strategies: a device mesh plus rules from logical axis names to mesh axes.

A strategy returns a ``Layout``: the mesh, the logical->mesh rules for parameters, and
the batch sharding. The trainer creates the train state directly with those shardings
(``jax.jit`` with ``out_shardings``), so parameters never exist whole on one device
unless the strategy replicates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax.schemas import DataParallelOptions


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
    batch_axes: tuple[str, ...]

    def batch_sharding(self, ndim: int = 1) -> NamedSharding:
        """Leading axis split over the batch axes, the rest replicated."""
        spec = PartitionSpec(self.batch_axes, *([None] * (ndim - 1)))
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_divisor(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))


def data_parallel(options: DataParallelOptions) -> Layout:
    """Factory registered as sharding strategy ``dp``."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    # No logical axis maps to a mesh axis: every parameter is replicated.
    return Layout(mesh, rules=(), batch_axes=("data",))
