"""Numbers of the selected run: state, step, learning rate, images/s, ETA, evaluation."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.widgets import Static

STATE_COLOURS = {
    "running": "yellow",
    "starting": "yellow",
    "finished": "green",
    "interrupted": "magenta",
    "failed": "red",
}


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def state_markup(state: str) -> str:
    colour = STATE_COLOURS.get(state, "white")
    return f"[{colour}]{escape(state)}[/{colour}]"


class RunDetails(Static):
    def show(self, summary: Any | None) -> None:
        if summary is None:
            self.update("no run selected")
            return
        s = summary
        lines = [
            f"[b]{escape(s.name)}[/b] {state_markup(s.state)}",
            f"step   {s.step}/{s.steps if s.steps is not None else '?'}",
            f"loss   {s.loss:.4f}" if s.loss is not None else "loss   -",
            f"lr     {s.learning_rate:.2e}" if s.learning_rate is not None else "lr     -",
            f"img/s  {s.images_per_s:,.0f}" if s.images_per_s else "img/s  -",
            f"ETA    {format_eta(s.eta_s)}",
        ]
        hosts = getattr(s, "hosts", None)
        if hosts:  # a multi-host launch: worker 0 (the coordinator) first
            lines.append(f"hosts  {len(hosts)}: {escape(', '.join(hosts))}")
        evaluation = s.evaluation or {}
        for key in ("zero_shot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
            if key in evaluation:
                lines.append(f"{key.replace('retrieval_', '')[:14]:<14} {evaluation[key]:.3f}")
        if evaluation:
            lines.append(f"(eval at step {evaluation.get('step')})")
        if s.skipped:  # bad data, by reason: what to look at in the shards
            reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s.skipped.items())
            lines.append(f"skipped {escape(reasons)}")
        if s.guards:
            guards = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s.guards.items())
            lines.append(f"[yellow]guards[/yellow] {escape(guards)}")
        ckpts = ", ".join(map(str, s.checkpoints[-3:])) or "-"
        lines.append(f"ckpts  {ckpts}")
        if s.error:  # why it failed: the launch's own error line, when it said one
            lines.append(f"[red]error[/red]  {escape(s.error)}")
        self.update("\n".join(lines))
