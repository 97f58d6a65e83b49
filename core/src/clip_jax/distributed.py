"""Multi-process runs: start ``jax.distributed`` from the spec, and a few collectives.

Every process runs the same trainer; process 0 alone writes the run folder's files
(orbax checkpoints are written by all processes together).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clip_jax.errors import UserError

_started = False


def initialize(options: Any) -> None:
    """Call before anything touches a jax device; a no-op for ``mode = "off"``."""
    global _started
    if options.mode == "off" or _started:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        # CPU collectives across processes (tests, laptops); accelerators bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if options.mode == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                options.coordinator, options.num_processes, options.process_id
            )
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"distributed: could not start ({exc})") from exc
    _started = True


def is_main() -> bool:
    return jax.process_index() == 0


def allgather(values: np.ndarray) -> np.ndarray:
    """Concatenate each process's 1-D array in process order."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values), tiled=True)
    return np.asarray(gathered)


def any_process(flag: bool) -> bool:
    """True on every process when any process's ``flag`` is (all must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(allgather(np.asarray([flag], np.int32)).any())


def to_host(tree: Any) -> Any:
    """A full numpy copy of a sharded pytree on every process (all must call it)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
