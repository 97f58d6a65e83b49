"""Orbax checkpoints of the train state plus the data position (keep N, async).

Restoring takes the abstract state with the *current* shardings, so a checkpoint saved
under one mesh restores under another.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.ERROR)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int, every: int):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.every = every

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict[str, Any], force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"])

    def restore_params(self, step: int, abstract_state: Any) -> Any:
        return self.restore(step, abstract_state)[0]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
