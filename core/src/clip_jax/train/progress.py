"""Progress for people: a rich bar on a terminal, plain periodic lines elsewhere.

Both show step, loss, images/s and ETA. Every line also goes to the run's ``run.log``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from clip_jax.run_folder import RunFolder


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self,
        total: int,
        start: int,
        folder: RunFolder,
        stream: TextIO | None = None,
        plain_every_s: float = 10.0,
        quiet: bool = False,
    ):
        self.total, self.step = total, start
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
        eta = (self.total - step) * metrics.get("batch_size", 0) / ips if ips else 0.0
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
