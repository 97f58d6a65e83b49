"""Pick a template (from every plugin) to start a new spec; the right pane previews it."""

from __future__ import annotations

from pathlib import Path

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList, Static
from textual.widgets.option_list import Option

from clipctl.screens import navigation


class TemplatesScreen(Screen):
    BINDINGS = navigation("templates") + [
        Binding("enter", "choose", "New spec from template", id="templates.choose", show=True),
    ]

    def compose(self) -> ComposeResult:
        from clip_jax.plugins import get_registry

        self.templates = dict(sorted(get_registry().templates.items()))
        yield Header()
        with Horizontal():
            yield OptionList(
                *[
                    Option(f"{name}\n[dim]{t.description}[/dim]", id=name)
                    for name, t in self.templates.items()
                ],
                id="template-list",
            )
            with VerticalScroll(id="template-preview-pane"):
                yield Static(id="template-preview")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "templates"
        options = self.query_one(OptionList)
        if self.templates:  # the quickstart first: it runs anywhere, in minutes
            names = list(self.templates)
            options.highlighted = names.index("quickstart") if "quickstart" in names else 0
        options.focus()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        template = self.templates[event.option.id]
        text = template.path.read_text()
        preview = Syntax(text, "toml", theme="ansi_dark", line_numbers=False, word_wrap=True)
        self.query_one("#template-preview", Static).update(preview)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._open(event.option.id)

    def action_choose(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is not None:
            self._open(options.get_option_at_index(options.highlighted).id)

    def _open(self, name: str) -> None:
        template = self.templates[name]
        self.app.open_editor(Path(self.app.cwd) / f"{name}.toml", template.path)
