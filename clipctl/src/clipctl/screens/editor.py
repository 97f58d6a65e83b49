"""The spec editor: a form generated from the spec schema, validated as you type.

Every change is written into a tomlkit document (so the template's comments survive)
and the whole spec is validated again; each problem is shown at its field with the
same message ``clipctl validate`` prints. ``ctrl+t`` shows the raw TOML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, OptionList, Static
from textual.widgets.option_list import Option

from clip_jax.errors import printable
from clipctl import form, spec_edit
from clipctl.widgets.field_row import FieldRow


class EditorScreen(Screen):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="editor.save", priority=True),
        Binding("ctrl+l", "launch", "Launch", id="editor.launch", priority=True),
        Binding("ctrl+t", "toggle_raw", "Raw TOML", id="editor.raw", priority=True),
        Binding("escape", "back", "Back", id="editor.back"),
    ]

    def __init__(self, path: Path, template: Path | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.source = template if template is not None else self.path
        self.doc = spec_edit.load_document(self.source)
        self.original = spec_edit.as_dict(self.doc)
        self.saved_text = spec_edit.dumps(self.doc) if template is None else None
        self.problems: dict[str, str] = {}
        self.resolved: dict[str, Any] = {}
        self.section = form.sections()[0]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield OptionList(*[Option(s, id=s) for s in form.sections()], id="sections")
            yield VerticalScroll(id="fields")
            with VerticalScroll(id="raw-pane"):
                yield Static(id="raw")
        yield Static(id="problems")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.path.name} (from {self.source.name})"
        self.query_one("#raw-pane").display = False
        self.revalidate()
        self.query_one("#sections", OptionList).highlighted = 0

    # --------------------------------------------------------------- validation
    @property
    def registry(self):
        from clip_jax.plugins import get_registry

        return get_registry()

    def revalidate(self) -> None:
        from clip_jax.spec import SpecError, to_dict, validate

        try:
            spec = validate(spec_edit.as_dict(self.doc), self.registry)
        except SpecError as exc:
            self.problems = {path: message for path, message in exc.problems}
        else:
            self.problems = {}
            self.resolved = to_dict(spec)
        for row in self.query(FieldRow):
            row.show_error(self.problems.get(row.field.path))
        self._show_problems()
        if self.query_one("#raw-pane").display:
            self._show_raw()

    def _show_problems(self) -> None:
        bar = self.query_one("#problems", Static)
        if not self.problems:
            bar.update("[green]valid[/green]")
            bar.set_class(False, "-invalid")
            return
        lines = [  # the user's keys and values, escaped: never read as markup
            escape(f"{printable(path)}: {message}" if path else message)
            for path, message in self.problems.items()
        ]
        bar.update(f"[red]{len(lines)} problem(s)[/red]  " + "  |  ".join(lines))
        bar.set_class(True, "-invalid")

    # ------------------------------------------------------------------- fields
    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id == "sections":
            self.section = event.option.id
            self.render_fields()

    def render_fields(self) -> None:
        container = self.query_one("#fields", VerticalScroll)
        container.remove_children()
        table = spec_edit.get_value(self.doc, self.section, {})
        table = table if isinstance(table, dict) else {}
        resolved = self.resolved.get(self.section, {})
        rows = []
        for field in form.section_fields(self.section, table, self.registry):
            value = spec_edit.get_value(self.doc, field.path)
            placeholder = _lookup(resolved, field.path.split(".")[1:], field.default)
            row = FieldRow(field, value, placeholder, self.section)
            rows.append(row)
        for row in rows:
            row.error = self.problems.get(row.field.path)
        container.mount_all(rows)

    def on_field_row_changed(self, event: FieldRow.Changed) -> None:
        path, value = event.path, event.value
        section, _, key = path.partition(".")
        if value is None:
            spec_edit.remove_value(self.doc, path)
        else:
            spec_edit.set_value(self.doc, path, value)
        selector = form.COMPONENT_SECTIONS.get(section, (None,))[0]
        rerender = key in (selector, "preset")
        if key == selector and value is not None:
            # Keys the new component does not know would only be errors: drop them.
            accepted = form.option_keys(self.registry, section, value)
            table = spec_edit.get_value(self.doc, section, {})
            for name in list(table):
                if name not in accepted and name != "preset":
                    spec_edit.remove_value(self.doc, f"{section}.{name}")
        self.revalidate()
        if rerender:
            self.render_fields()

    # ------------------------------------------------------------------ actions
    def action_toggle_raw(self) -> None:
        pane = self.query_one("#raw-pane")
        pane.display = not pane.display
        self.query_one("#fields").display = not pane.display
        if pane.display:
            self._show_raw()

    def _show_raw(self) -> None:
        text = spec_edit.dumps(self.doc)
        self.query_one("#raw", Static).update(Syntax(text, "toml", theme="ansi_dark"))

    def action_save(self) -> None:
        from clipctl.screens.save import SaveScreen

        if self.problems:
            self.notify(f"fix {len(self.problems)} problem(s) before saving", severity="error")
            return
        self.app.push_screen(SaveScreen(self.path), self._save_to)

    def _save_to(self, path: Path | None) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = spec_edit.dumps(self.doc)
        path.write_text(text)
        self.path, self.saved_text = path, text
        self.sub_title = f"{path.name} (from {self.source.name})"
        self.notify(f"saved {path}", markup=False)

    def action_launch(self) -> None:
        from clipctl.screens.launch import LaunchScreen

        if self.problems:
            self.notify(f"fix {len(self.problems)} problem(s) before launching", severity="error")
            return
        if self.saved_text != spec_edit.dumps(self.doc):
            self.notify("save the spec first (ctrl+s)", severity="warning")
            return
        self.app.push_screen(LaunchScreen(self.path, self.original, self.resolved))

    def action_back(self) -> None:
        self.app.pop_screen()


def _lookup(table: dict[str, Any], keys: list[str], default: Any) -> Any:
    node: Any = table
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node
