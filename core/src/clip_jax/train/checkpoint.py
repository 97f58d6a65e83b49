"""Orbax checkpoints of the train state plus the data position (keep N, async).

Restoring takes the abstract state with the *current* shardings, so a checkpoint saved
under one mesh restores under another.

A save is written to a temporary directory and renamed into place once complete (orbax
commits atomically), and older checkpoints are removed only after a newer one is
committed: a crash during a save leaves the checkpoints before it intact, and the
half-written one is never listed.

The train state's ``"guard"`` entry (the spike statistics, ``clip_jax.train.guards``) is
saved as an item of its own, so that what reads only the parameters (``clipctl eval``,
warm starts) sees the same ``state`` item as before, and checkpoints written before
guards existed still resume (with a fresh guard).

The directory may be a gs:// URL: orbax writes its metadata through ``etils.epath`` and
the arrays through tensorstore's own GCS driver. Other URL schemes are refused up front:
this orbax sends every path that is not gs:// to tensorstore's local-file driver.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from clip_jax import storage
from clip_jax.errors import PathError

logging.getLogger("absl").setLevel(logging.ERROR)

# URL schemes orbax can write a checkpoint to (arrays through tensorstore).
CHECKPOINT_SCHEMES = ("gs",)


def checkpoint_directory(directory: str | os.PathLike) -> epath.Path | Path:
    """The directory as orbax takes it: a local path made absolute, a gs:// URL as is."""
    location = os.fspath(directory)
    if not storage.is_url(location):
        return Path(location).absolute()
    scheme = location.partition("://")[0]
    if scheme not in CHECKPOINT_SCHEMES:
        raise PathError(
            f"checkpoints cannot be written to {scheme}:// (orbax writes arrays through "
            f"tensorstore, which it sends to local folders and "
            f"{', '.join(s + '://' for s in CHECKPOINT_SCHEMES)} only): choose a local "
            "folder or a gs:// URL",
            key="run.output_dir",
        )
    return epath.Path(location)


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int, every: int):
        self.directory = checkpoint_directory(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.every = every
        self.closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict[str, Any], force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        state = dict(state)
        guard = state.pop("guard", None)
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data)}
        if guard is not None:
            items["guard"] = ocp.args.StandardSave(guard)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, step: int, abstract_state: Any, abstract_guard: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """(state, data) at ``step``; with ``abstract_guard``, the state's ``"guard"``
        entry when the checkpoint has one of that shape (else the caller starts one)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        state = dict(restored["state"])
        if abstract_guard is not None and self._has_item(step, "guard"):
            try:
                guard = self.manager.restore(
                    step, args=ocp.args.Composite(guard=ocp.args.StandardRestore(abstract_guard))
                )["guard"]
                state["guard"] = guard
            except (ValueError, KeyError):  # another window size: statistics start afresh
                pass
        return state, dict(restored["data"])

    def restore_params(self, step: int, abstract_state: Any) -> Any:
        return self.restore(step, abstract_state)[0]["params"]

    def _has_item(self, step: int, name: str) -> bool:
        return (self.directory / str(step) / name).is_dir()

    def wait(self) -> None:
        """Until the saves in flight are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves in flight, then release the manager; again is a no-op."""
        if self.closed:
            return
        self.closed = True
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()
