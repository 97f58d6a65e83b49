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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.ERROR)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int, every: int):
        self.directory = Path(directory).absolute()
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
