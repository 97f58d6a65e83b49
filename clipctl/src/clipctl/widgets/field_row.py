"""One spec key in the editor: its name, an input that fits its type, and its error."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select, Switch

from clipctl.form import Field
from clipctl.spec_edit import MISSING, parse_input


def _text(value: Any) -> str:
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    import tomlkit

    return tomlkit.item(value).as_string()


class FieldRow(Vertical):
    """Posts ``FieldRow.Changed`` with the parsed value (None: remove the key)."""

    class Changed(Message):
        def __init__(self, path: str, value: Any) -> None:
            super().__init__()
            self.path, self.value = path, value

    def __init__(self, field: Field, value: Any, placeholder: Any, section: str) -> None:
        super().__init__(classes="field-row")
        self.field, self.value, self.placeholder = field, value, placeholder
        self.label = field.path.removeprefix(section + ".")
        self.error: str | None = None
        # What the input shows; change events that repeat it (e.g. on mount) are ignored,
        # so looking at a table never writes its defaults into the spec.
        shown = value if value is not MISSING else placeholder
        self.shown = _text(value) if field.kind == "text" else shown

    @property
    def input_id(self) -> str:
        return "field-" + self.field.path.replace(".", "--")

    def compose(self) -> ComposeResult:
        f = self.field
        with Horizontal(classes="field-line"):
            yield Label(self.label, classes="field-label")
            if f.kind == "bool":
                current = self.value if self.value is not MISSING else bool(self.placeholder)
                yield Switch(value=bool(current), id=self.input_id)
            elif f.kind == "choice":
                current = self.value if self.value is not MISSING else self.placeholder
                options = [(c or "(none)", c) for c in f.choices]
                if current not in f.choices:
                    options.append((str(current), current))
                yield Select(
                    options, value=current, allow_blank=False, id=self.input_id, compact=True
                )
            else:
                yield Input(
                    _text(self.value),
                    placeholder=_text(self.placeholder),
                    id=self.input_id,
                    tooltip=f.description or None,
                    compact=True,
                )
        yield Label("", classes="field-error")

    def on_mount(self) -> None:
        self.show_error(self.error)

    def show_error(self, message: str | None) -> None:
        """Mark the field; safe to call before the row has been composed."""
        self.error = message
        self.set_class(bool(message), "-invalid")
        for label in self.query(".field-error").results(Label):
            label.update(escape(message or ""))  # the user's text: never markup
            label.display = bool(message)

    def _changed(self, shown: Any, value: Any) -> None:
        if shown == self.shown:
            return
        self.shown = shown
        self.post_message(self.Changed(self.field.path, value))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        text = event.value.strip()
        self._changed(event.value, parse_input(text) if text else None)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        self._changed(event.value, event.value)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._changed(event.value, event.value or None)
