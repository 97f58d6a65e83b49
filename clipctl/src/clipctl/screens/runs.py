"""Run folders under the runs root: state, live loss curve, numbers, log tail, actions.

Everything shown is read from the run folders once a second; stop / resume / evaluate
go through ``clipctl.runs`` (signals and separate processes), never into the trainer.
"""

from __future__ import annotations

import os
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Log
from textual.worker import Worker, WorkerState

from clip_jax.errors import UserError
from clipctl.screens import navigation
from clipctl.widgets.loss_plot import LossPlot
from clipctl.widgets.run_details import RunDetails, state_markup

LOG_LINES = 50


class RunsScreen(Screen):
    BINDINGS = navigation("runs") + [
        Binding("s", "stop", "Stop", id="runs.stop"),
        Binding("r", "resume", "Resume", id="runs.resume"),
        Binding("e", "evaluate", "Evaluate", id="runs.evaluate"),
        Binding("f5", "refresh_runs", "Refresh", id="runs.refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.summaries: dict[str, object] = {}
        self.selected: str | None = None
        self.pending_select: Path | None = None
        self.ready = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="run-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="run-detail"):
            yield LossPlot(id="loss-plot")
            yield RunDetails(id="run-stats")
        yield Log(id="run-log", max_lines=LOG_LINES)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"runs in {os.path.relpath(self.app.runs_root)}"
        table = self.query_one(DataTable)
        table.add_columns("run", "state", "step", "loss", "zero-shot")
        self.action_refresh_runs()
        self.set_interval(1.0, self.action_refresh_runs)
        table.focus()
        self.ready = True

    def select_run(self, run_dir: Path) -> None:
        """Select a run (e.g. one just launched) at the next refresh."""
        self.pending_select = Path(run_dir)
        if self.ready:
            self.action_refresh_runs()

    # ---------------------------------------------------------------- refreshing
    def action_refresh_runs(self) -> None:
        from clipctl import runs

        table = self.query_one(DataTable)
        found = runs.find_runs(self.app.runs_root)
        if self.pending_select is not None:
            found_paths = {s.path.resolve(): s.name for s in found}
            target = self.pending_select.resolve()
            if target not in found_paths and target.exists():
                found.append(runs.summarize(target))
                found_paths[target] = found[-1].name
            if target in found_paths:
                self.selected = found_paths[target]
                self.pending_select = None
        self.summaries = {s.name: s for s in found}
        names = [s.name for s in found]
        current = [str(row.value) for row in table.rows]
        if names != current:
            table.clear()
            for s in found:
                table.add_row(*self._cells(s), key=s.name)
        else:
            for s in found:
                for column, value in zip(table.columns, self._cells(s), strict=True):
                    # update_width: a column sized for "0/250" must grow to "250/250"
                    table.update_cell(s.name, column, value, update_width=True)
        if self.selected in self.summaries:
            row = names.index(self.selected)
            if table.cursor_row != row:
                table.move_cursor(row=row)
        elif names:
            self.selected = names[min(table.cursor_row, len(names) - 1)]
        self._show_selected()

    @staticmethod
    def _cells(s) -> tuple[str, str, str, str, str]:
        steps = f"{s.step}/{s.steps}" if s.steps else str(s.step)
        loss = f"{s.loss:.4f}" if s.loss is not None else "-"
        top1 = (s.evaluation or {}).get("zero_shot_top1")
        return (
            s.name,
            state_markup(s.state),
            steps,
            loss,
            f"{top1:.3f}" if top1 is not None else "-",
        )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value in self.summaries:
            self.selected = str(event.row_key.value)
            self._show_selected()

    def _show_selected(self) -> None:
        from clip_jax.run_folder import RunFolder
        from clipctl import runs

        summary = self.summaries.get(self.selected) if self.selected else None
        self.query_one(RunDetails).show(summary)
        plot, log = self.query_one(LossPlot), self.query_one(Log)
        if summary is None:
            plot.show([], [])
            log.clear()
            return
        folder = RunFolder(summary.path)
        records = runs.metrics(summary.path, "train")
        train = [r for r in records if _number(r.get("loss")) and _number(r.get("step"))]
        plot.show([r["step"] for r in train], [r["loss"] for r in train])
        try:
            tail = folder.log_path.read_text(errors="replace").splitlines()[-LOG_LINES:]
        except OSError:
            tail = []
        if getattr(log, "shown_tail", None) != tail:
            log.clear()
            log.write_lines(tail)
            log.shown_tail = tail

    # ------------------------------------------------------------------ actions
    def _selected_summary(self):
        summary = self.summaries.get(self.selected) if self.selected else None
        if summary is None:
            self.notify("no run selected", severity="warning")
        return summary

    def action_stop(self) -> None:
        from clipctl import runs

        summary = self._selected_summary()
        if summary is None:
            return
        if runs.stop(summary.path):
            self.notify(f"stopping {summary.name}: it saves a checkpoint, then exits", markup=False)
        else:
            self.notify(f"{summary.name} is not running", severity="warning", markup=False)

    def action_resume(self) -> None:
        from clipctl import runs

        summary = self._selected_summary()
        if summary is None:
            return
        try:
            resumed = runs.resume(summary.path)
        except (UserError, OSError) as exc:  # refused, or the folder is unreadable
            self.show_error(f"{summary.name} not resumed", exc)
            return
        self.notify(f"resuming {summary.name} (pid {resumed.pid})", markup=False)
        self.action_refresh_runs()

    def action_evaluate(self) -> None:
        summary = self._selected_summary()
        if summary is not None:
            self.notify(f"evaluating {summary.name}...", markup=False)
            self.evaluate(summary.path, summary.name)

    # exit_on_error=False: a failure Textual would otherwise treat as fatal (closing the
    # app, and the runs it watches with it) is shown instead; the expected ones are
    # caught below with a readable message.
    @work(thread=True, exclusive=True, group="evaluate", exit_on_error=False)
    def evaluate(self, path: Path, name: str) -> dict | None:
        from clipctl import runs

        try:
            results = runs.evaluate(path)
        except (UserError, RuntimeError, OSError) as exc:
            self.app.call_from_thread(self.show_error, f"evaluating {name} failed", exc)
            return None
        shown = ", ".join(f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float))
        self.app.call_from_thread(self.notify, f"{name}: {shown}", timeout=10, markup=False)
        return results

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A worker that failed unexpectedly (a bug): say so rather than stay silent."""
        if event.state == WorkerState.ERROR:
            what = event.worker.name or "a background task"
            self.show_error(f"{what} failed unexpectedly", event.worker.error)

    def show_error(self, title: str, error: BaseException | None) -> None:
        """The error's own lines (``key: message``), as clipctl prints them."""
        message = str(error) or type(error).__name__
        self.notify(message, title=title, severity="error", timeout=15, markup=False)


def _number(value: object) -> bool:
    """Whether a metric can be plotted (a damaged record may hold anything)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
