"""Progress for people: a rich bar on a terminal, plain periodic lines elsewhere.

Both show step, loss, images/s and ETA. Every line also goes to the run's ``run.log``.
The ``Clock`` measures where the time between two train records went.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from clip_jax.run_folder import RunFolder
from clip_jax.train.events import Subscriber


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Clock:
    """images/s and the ``time/*`` keys of a train record, over the steps since the last.

    ``time/step_s`` is the mean wall time of a step with evaluations and checkpoint saves
    left out (they have their own keys), ``time/data_wait_frac`` the share of the wall time
    the loop waited for its next batch (with no step left on the device: the input
    pipeline's share of the time). ``images_per_s`` counts all the wall time between the
    two records. The clock starts after the first step: compilation is not counted.
    """

    PARTS = ("data_wait", "eval", "checkpoint")

    def __init__(self) -> None:
        self.since: float | None = None
        self.step = 0
        self.spent = dict.fromkeys(self.PARTS, 0.0)

    @property
    def started(self) -> bool:
        return self.since is not None

    def start(self, step: int) -> None:
        """Count from now, ``step`` being done."""
        self.since, self.step = time.perf_counter(), step
        self.spent = dict.fromkeys(self.PARTS, 0.0)

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        """Add the time the block takes to ``part`` (one of ``PARTS``)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.spent[part] += time.perf_counter() - began

    def lap(self, step: int, batch_size: int) -> dict[str, float]:
        """The figures since the last lap, ``step`` having just finished; then restart."""
        elapsed = time.perf_counter() - (self.since or time.perf_counter())
        steps = step - self.step
        stepping = max(elapsed - self.spent["eval"] - self.spent["checkpoint"], 0.0)
        wait_frac = min(self.spent["data_wait"] / elapsed, 1.0) if elapsed > 0 else 0.0
        figures = {
            "images_per_s": steps * batch_size / elapsed if steps else 0.0,
            "time/step_s": stepping / steps if steps else 0.0,
            "time/data_wait_frac": wait_frac,
            "time/eval_s": self.spent["eval"],
            "time/checkpoint_s": self.spent["checkpoint"],
        }
        self.start(step)
        return figures


class Progress(Subscriber):
    """The display, and run.log: a subscriber of the loop's events."""

    def __init__(
        self,
        total: int,
        start: int,
        folder: RunFolder,
        stream: TextIO | None = None,
        plain_every_s: float = 10.0,
        quiet: bool = False,
        batch_size: int = 0,
    ):
        self.total, self.step = total, start
        self.batch_size = batch_size  # for the ETA
        self.quiet = quiet  # processes other than the first of a multi-process run
        self.folder = folder
        self.stream = stream or sys.stderr
        self.plain_every_s = plain_every_s
        self.last_plain = 0.0
        self.bar = None
        if self.stream.isatty() and not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def resume_at(self, step: int) -> None:
        """After restoring a checkpoint: the bar starts where the run left off."""
        self.step = step
        if self.bar is not None:
            self.bar.reset(self.task, total=self.total, completed=step, info="")

    def message(self, text: str) -> None:
        """A line for the user (and the log) that is not a progress update."""
        self.folder.log(text)
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self.step = step
        ips = metrics.get("images_per_s") or 0.0
        batch_size = metrics.get("batch_size", self.batch_size)
        eta = (self.total - step) * batch_size / ips if ips else 0.0
        info = f"loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e} | {ips:,.0f} img/s"
        line = f"step {step}/{self.total} | {info} | ETA {format_eta(eta)}"
        self.folder.log(line)
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif time.monotonic() - self.last_plain >= self.plain_every_s or step >= self.total:
            self.last_plain = time.monotonic()
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    # ------------------------------------------------------------------ events
    def on_message(self, text: str) -> None:
        self.message(text)

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        self.update(step, record)

    def on_eval(self, step: int, results: dict[str, Any]) -> None:
        if results:
            shown = " | ".join(f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float))
            self.message(f"eval step {step} | {shown}")

    def on_guard(self, step: int, event: str, text: str) -> None:
        self.message(text)

    def on_stop(self, step: int) -> None:
        self.message(f"stopped at step {step}; rerun the same command to resume")

    def on_rollback(self, step: int, to_step: int) -> None:
        self.message(f"rolled back from step {step} to the checkpoint at step {to_step}")
        self.resume_at(to_step)

    def on_failure(self, step: int, error: str) -> None:
        self.folder.log(f"failed at step {step}: {error}")  # the caller prints the error
