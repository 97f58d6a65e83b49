"""Installed plugins: distribution, version, what each registers, load errors."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from clipctl.screens import navigation


class PluginsScreen(Screen):
    BINDINGS = navigation("plugins") + [Binding("f5", "reload", "Reload", id="plugins.reload")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="plugin-table", cursor_type="row", zebra_stripes=True)
        yield Static(id="plugin-errors")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "plugins"
        table = self.query_one(DataTable)
        table.add_columns("plugin", "distribution", "registers")
        self.action_reload()
        table.focus()

    def action_reload(self) -> None:
        from clip_jax.plugins import get_registry

        table = self.query_one(DataTable)
        table.clear()
        errors = []
        for info in get_registry().plugins:
            lines = [f"{k}: {', '.join(v)}" for k, v in info.registers.items()] or ["-"]
            origin = f"{info.distribution or '-'} {info.version or ''}".strip()
            name = f"[red]{info.name} (error)[/red]" if info.errors else info.name
            table.add_row(name, origin, "\n".join(lines), key=info.name, height=len(lines))
            errors += [f"[red]{info.name}[/red]: {error}" for error in info.errors]
        self.query_one("#plugin-errors", Static).update("\n".join(errors) or "no load errors")
