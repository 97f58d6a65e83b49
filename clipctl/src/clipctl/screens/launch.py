"""Before launching: what differs from the template, the resolved spec, then go.

The run starts as its own process (see ``clipctl.runs.launch``) and the app moves to
the runs screen to watch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static


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


class LaunchScreen(Screen):
    BINDINGS = [
        Binding("ctrl+l", "launch", "Launch run", id="launch.start", priority=True),
        Binding("escape", "back", "Back", id="launch.back"),
    ]

    def __init__(self, path: Path, original: dict[str, Any], resolved: dict[str, Any]) -> None:
        super().__init__()
        self.path, self.original, self.resolved = path, original, resolved

    def compose(self) -> ComposeResult:
        from clip_jax.spec import to_toml, validate
        from clipctl.spec_edit import as_dict, load_document

        edited = as_dict(load_document(self.path))
        diff = changes(self.original, edited) or ["(no changes from the template)"]
        output_dir = self.resolved.get("run", {}).get("output_dir", "?")
        yield Header()
        with VerticalScroll(id="launch-pane"):
            yield Static(
                f"spec:       {self.path}\nrun folder: {output_dir}\n\n"
                "[b]changed from the template[/b]\n" + "\n".join(diff) + "\n",
                id="launch-summary",
            )
            resolved_toml = to_toml(validate(edited))
            yield Static(Syntax(resolved_toml, "toml", theme="ansi_dark"), id="launch-resolved")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "launch"

    def action_launch(self) -> None:
        from clip_jax.errors import UserError
        from clipctl import runs

        try:
            summary = runs.launch(self.path)
        except UserError as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"launched {summary.path} (pid {summary.pid})")
        self.app.pop_screen()
        self.app.pop_screen()
        self.app.show_run(summary.path)

    def action_back(self) -> None:
        self.app.pop_screen()
