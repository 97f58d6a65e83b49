"""Before launching: what differs from the template, will it fit, the resolved spec, go.

The memory estimate compiles the train step for the local devices in a subprocess
(``clip_jax.memory.run_worker``), so the screen stays responsive and the app never
imports jax; launching a run that does not fit asks for a second ctrl+l. The run starts
as its own process (see ``clipctl.runs.launch``) and the app moves to the runs screen.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(original: dict[str, Any], edited: dict[str, Any]) -> list[str]:
    """Lines 'key: old -> new' for every key the user changed."""
    before, after = _flatten(original), _flatten(edited)
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "(default)"), after.get(key, "(default)")
        if old != new:
            lines.append(f"{key}: {old!r} -> {new!r}")
    return lines


def memory_summary(report: dict[str, Any]) -> tuple[str, bool | None]:
    """(Rich text, fits) of a ``clip_jax.memory`` report for one strategy: peak per
    device, its parts and the verdict against the device memory (None: unknown)."""
    from clip_jax.fits import size

    e, memory = report["estimates"][0], report["device_memory"]
    mesh = " x ".join(f"{axis}={n}" for axis, n in e["mesh"].items())
    lines = [
        f"[b]memory per device[/b]  {e['strategy']}, {mesh}, batch {e['batch']:,} "
        f"({e['per_device_batch']:,} / device)",
        f"peak {size(e['peak'])}: state and batch {size(e['arguments'])}, temporaries "
        f"{size(e['temporaries'])}",
    ]
    fits = e["fits"]
    if memory is None:
        lines.append("no local accelerator reports its memory (see `clipctl info --device`)")
    else:
        share = f"{e['peak'] / memory['bytes']:.0%} of {escape(memory['label'])}"
        lines.append(
            f"[green]fits[/green]: {share}"
            if fits
            else f"[b red]DOES NOT FIT[/b red]: {share}; lower train.batch_size or raise "
            "train.microbatches (`clipctl info --max-batch --microbatches 1,2,4`)"
        )
    if report.get("note"):
        lines.append(f"[dim]* {escape(report['note'])}[/dim]")
    return "\n".join(lines), fits


def headless_command(spec_path: Path, cwd: Path, hosts: str = "") -> str:
    """The shell line that starts this run without the TUI (what ctrl+l runs), the spec
    path relative to the working directory when it lies below it."""
    shown = Path(os.path.relpath(spec_path, cwd)) if spec_path.is_relative_to(cwd) else spec_path
    return shlex.join(["clipctl", "run", str(shown), *(["--hosts", hosts] if hosts else [])])


def hosts_hint() -> tuple[str, str]:
    """(the hosts field's first value, a line about it): on a TPU VM, every worker of the
    slice is offered (``TPU_NAME`` names it, where the VM's environment says)."""
    from clipctl.hosts import on_tpu_vm

    if not on_tpu_vm():
        return "", "hosts: empty starts the run here; tpu:NAME[@ZONE], ssh:H1,H2 or slurm"
    name = os.environ.get("TPU_NAME", "")
    return (
        f"tpu:{name}" if name else "",
        "hosts: this is a TPU VM: tpu:NAME[@ZONE] starts the run on every worker",
    )


def _resolved_view(edited: dict[str, Any]) -> Syntax | str:
    """The resolved spec, or its problems when the file changed since it was checked."""
    from clip_jax.errors import UserError, format_problems
    from clip_jax.spec import to_toml, validate

    try:
        return Syntax(to_toml(validate(edited)), "toml", theme="ansi_dark")
    except UserError as exc:
        return "[red]" + escape("\n".join(format_problems(exc))) + "[/red]"


class LaunchScreen(Screen):
    BINDINGS = [
        Binding("ctrl+l", "launch", "Launch run", id="launch.start", priority=True),
        Binding("escape", "back", "Back", id="launch.back"),
    ]

    def __init__(self, path: Path, original: dict[str, Any], resolved: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.original, self.resolved = path, original, resolved
        self.fits: bool | None = None  # None: unknown (estimating, failed, no memory size)
        self.warned = False  # a run that does not fit launches on the second ctrl+l
        self._estimating: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        from clipctl.spec_edit import as_dict, load_document

        edited = as_dict(load_document(self.path))
        diff = changes(self.original, edited) or ["(no changes from the template)"]
        output_dir = self.resolved.get("run", {}).get("output_dir", "?")
        yield Header()
        with VerticalScroll(id="launch-pane"):
            hosts, hint = hosts_hint()
            yield Static(
                f"spec:       {escape(str(self.path))}\nrun folder: {escape(str(output_dir))}",
                id="launch-summary",
            )
            yield Static(self._headless(hosts), id="launch-command")
            yield Input(hosts, placeholder=hint, id="launch-hosts")
            yield Static(
                "[b]changed from the template[/b]\n" + "\n".join(map(escape, diff)),
                id="launch-changes",
            )
            yield Static(
                "[b]memory per device[/b]  estimating: compiling the train step...",
                id="launch-memory",
            )
            yield Static(_resolved_view(edited), id="launch-resolved")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "launch"
        self.estimate_memory()

    def _headless(self, hosts: str) -> str:
        command = headless_command(self.path.absolute(), self.app.cwd.absolute(), hosts.strip())
        return f"headless:   {escape(command)}"

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "launch-hosts":
            self.query_one("#launch-command", Static).update(self._headless(event.value))

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def estimate_memory(self) -> None:
        from clip_jax.memory import run_worker

        request = {"path": str(self.path), "overrides": [], "devices": None, "batch": None}
        request |= {"memory": "local", "search": False, "strategies": None, "microbatches": None}
        try:
            report = run_worker(request, simulate=False, on_process=self._started)
            text, fits = memory_summary(report)
        except Exception as exc:  # shown, never fatal: the run can still be launched
            lines = [escape(line) for line in str(exc).strip().splitlines()]
            lines = lines or [type(exc).__name__]
            text = "\n".join(
                [f"[b]memory per device[/b]  [red]estimate failed[/red]: {lines[0]}"]
                + lines[1:][-3:]
            )
            fits = None
        with contextlib.suppress(RuntimeError):  # the app has closed meanwhile
            self.app.call_from_thread(self._show_estimate, text, fits)

    def _started(self, process: subprocess.Popen) -> None:
        self._estimating = process

    def _show_estimate(self, text: str, fits: bool | None) -> None:
        self._estimating = None
        if not self.is_attached:
            return
        self.fits = fits
        shown = self.query_one("#launch-memory", Static)
        shown.update(text)
        shown.set_class(fits is False, "-too-big")

    def _stop_estimate(self) -> None:
        process, self._estimating = self._estimating, None
        if process is not None and process.poll() is None:
            process.terminate()  # it may hold the accelerator the run needs

    def on_unmount(self) -> None:
        self._stop_estimate()

    def action_launch(self) -> None:
        from clip_jax.errors import UserError
        from clipctl import runs

        if self.fits is False and not self.warned:
            self.warned = True
            self.notify(
                "this run does not fit in the device memory (see above); press ctrl+l "
                "again to launch it anyway",
                severity="warning",
                timeout=8,
            )
            return
        self._stop_estimate()
        try:
            hosts = self.query_one("#launch-hosts", Input).value.strip()
            summary = runs.launch(self.path, hosts=hosts or None)
        except (UserError, OSError) as exc:  # the spec, the folder: shown, not fatal
            self.notify(str(exc), title="not launched", severity="error", timeout=10, markup=False)
            return
        self.notify(f"launched {summary.path} (pid {summary.pid})", markup=False)
        self.app.pop_screen()
        self.app.pop_screen()
        self.app.show_run(summary.path)

    def action_back(self) -> None:
        self.app.pop_screen()
