"""The ``wandb`` logger: a clip-jax run as a Weights & Biases run.

Train records go to ``train/<key>`` and evaluations to ``eval/<key>``, plotted against
``trainer/step`` (the run's step); the resolved spec is the W&B config, with the
parameter counts and the machine under ``parameters`` and ``machine``. The W&B run id is
kept in the run folder (``wandb-run-id``), so resuming the folder resumes the same W&B
run.

The step is a metric of its own (``define_metric``), not W&B's ``step=``: W&B drops,
with a warning only, every row whose ``step=`` is below its current one, and a clip-jax
run goes back in steps twice: a resume trains again the steps after its checkpoint, and
a guard rollback those after the checkpoint it restores. With ``trainer/step`` those
steps are logged again, and a rollback is marked (``guard/rollback_from`` at the step
it went back to).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from clip_jax.train.events import Subscriber
from clip_jax.train.loggers import RunContext, numbers
from clip_jax_wandb.options import WandbOptions

RUN_ID_FILE = "wandb-run-id"
STEP = "trainer/step"  # the x axis of every clip-jax chart


def wandb_logger(options: WandbOptions, run: RunContext) -> Subscriber:
    """Start (or resume) the W&B run; raises what ``wandb.init`` raises (e.g. not
    logged in), which the trainer turns into one warning."""
    import wandb

    run_id = _run_id(run.folder)
    settings = wandb.Settings(console="off", quiet=True)  # the trainer owns the terminal
    wandb_run = wandb.init(
        project=options.project,
        entity=options.entity,
        name=options.name or run.name,
        tags=list(options.tags),
        mode=options.mode,
        dir=_files_dir(run.folder),
        id=run_id,
        resume="allow",
        config=run.spec,
        reinit="create_new",
        settings=settings,
    )
    return WandbLogger(wandb_run)


def _files_dir(folder: Any) -> str | None:
    """Where wandb writes: WANDB_DIR when set (wandb reads it), else the run folder when
    it is local (a gs:// one cannot be: then wandb's default, ./wandb)."""
    if os.environ.get("WANDB_DIR") or not isinstance(folder, Path):
        return None
    return str(folder)


def _run_id(folder: Any) -> str:
    """This run folder's W&B run id: the one saved there, else a new one, saved."""
    path = folder / RUN_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        path.write_text(run_id + "\n")
        return run_id


class WandbLogger(Subscriber):
    def __init__(self, run: Any):
        self.run = run
        run.define_metric(STEP)
        for prefix in ("train", "eval", "guard"):
            run.define_metric(f"{prefix}/*", step_metric=STEP)

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({STEP: step, **values})  # a row of its own: never dropped

    def on_run_info(self, step: int, info: dict[str, Any]) -> None:
        update = {"parameters": info["parameters"], "machine": info["machine"]}
        self.run.config.update(update, allow_val_change=True)

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        self._log(step, {f"train/{k}": v for k, v in numbers(record).items()})

    def on_eval(self, step: int, results: dict[str, Any]) -> None:
        if results:
            self._log(step, {f"eval/{k}": v for k, v in numbers(results).items()})

    def on_rollback(self, step: int, to_step: int) -> None:
        # W&B cannot take rows back: the steps after ``to_step`` will be there twice
        self._log(to_step, {"guard/rollback_from": float(step)})

    def on_finish(self, step: int, results: dict[str, Any]) -> None:
        self._end(0)

    def on_stop(self, step: int) -> None:
        self._end(0)  # interrupted, resumable: not a crash

    def on_failure(self, step: int, error: str) -> None:
        self._end(1)  # after a stop, too (an error while stopping): then a no-op

    def _end(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
