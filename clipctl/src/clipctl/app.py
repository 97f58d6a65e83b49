"""``clipctl`` with no arguments: the Textual app.

Three modes, each its own screen stack: templates (-> spec editor -> launch), runs and
plugins. Runs start as their own processes and the app only reads run folders, so
closing it (or losing the SSH session) never stops training.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding

from clipctl.commands import ClipctlCommands
from clipctl.screens.plugins import PluginsScreen
from clipctl.screens.runs import RunsScreen
from clipctl.screens.templates import TemplatesScreen


class ClipctlApp(App):
    TITLE = "clipctl"
    CSS_PATH = "clipctl.tcss"
    COMMANDS = App.COMMANDS | {ClipctlCommands}
    MODES = {"templates": TemplatesScreen, "runs": RunsScreen, "plugins": PluginsScreen}
    DEFAULT_MODE = "templates"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
        Binding("f2", "switch_mode('templates')", "Templates", id="app.templates", show=False),
        Binding("f3", "switch_mode('runs')", "Runs", id="app.runs", show=False),
        Binding("f4", "switch_mode('plugins')", "Plugins", id="app.plugins", show=False),
    ]

    def __init__(self, runs_root: str | Path = "runs", cwd: str | Path = "."):
        super().__init__()
        self.runs_root = Path(runs_root)
        self.cwd = Path(cwd)

    def open_editor(self, path: Path, template: Path | None = None) -> None:
        """Edit a spec file (or a new spec started from a template); a file that cannot
        be read is shown as an error, and the app goes on."""
        from clip_jax.errors import UserError
        from clipctl.screens.editor import EditorScreen

        try:
            editor = EditorScreen(path, template)
        except UserError as exc:
            self.notify(
                str(exc), title="cannot open the spec", severity="error", timeout=10, markup=False
            )
            return
        self.switch_mode("templates")
        self.push_screen(editor)

    def show_run(self, run_dir: Path | None = None) -> None:
        self.switch_mode("runs")
        if run_dir is not None:
            self.screen.select_run(run_dir)


def main() -> None:
    ClipctlApp().run()
