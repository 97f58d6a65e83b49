"""The TUI tests' steps (tests/test_tui*.py): start the app under Textual's Pilot, open a
spec, show a section, type into a field, press a key and let the app settle, wait."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import tomlkit
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import Input

from clip_jax.spec import load_spec
from clipctl.app import ClipctlApp
from clipctl.screens.editor import EditorScreen
from clipctl.screens.launch import LaunchScreen
from clipctl.screens.runs import RunsScreen
from clipctl.widgets.field_row import FieldRow
from tests.conftest import QUICKSTART

SIZE = (80, 24)


def run_app(
    tmp_path: Path,
    steps: Callable[[ClipctlApp, Pilot], Awaitable[None]],
    runs_root: Path | None = None,
    size: tuple[int, int] = SIZE,
) -> None:
    """Start the app in tmp_path (its runs under tmp_path / "runs" unless runs_root says
    otherwise) and take `steps(app, pilot)` in it; the app exits when they are done."""

    async def scenario():
        app = ClipctlApp(
            runs_root=tmp_path / "runs" if runs_root is None else runs_root, cwd=tmp_path
        )
        async with app.run_test(size=size) as pilot:
            await steps(app, pilot)

    asyncio.run(scenario())


async def press(pilot: Pilot, key: str) -> None:
    """Press a key and let the app answer it."""
    await pilot.press(key)
    await pilot.pause()


async def open_spec(pilot: Pilot, path: Path, template: Path | None = None) -> Screen:
    """What "Open spec: PATH" in the palette does (a new spec from `template` if given);
    the screen shown afterwards."""
    pilot.app.open_editor(path, template)
    await pilot.pause()
    return pilot.app.screen


async def open_launch_screen(pilot: Pilot, spec_path: Path) -> LaunchScreen:
    """Open a spec and press ctrl+l in its editor."""
    await open_spec(pilot, spec_path)
    await pilot.press("ctrl+l")
    assert isinstance(pilot.app.screen, LaunchScreen)
    return pilot.app.screen


async def show_section(pilot: Pilot, editor: EditorScreen, section: str) -> None:
    sections = editor.query_one("#sections")
    sections.highlighted = [o.id for o in sections.options].index(section)
    await pilot.pause()


async def type_into(pilot: Pilot, editor: EditorScreen, path: str, text: str) -> FieldRow:
    field = editor.query_one("#field-" + path.replace(".", "--"), Input)
    field.focus()
    field.value = text
    await pilot.pause()
    return next(row for row in editor.query(FieldRow) if row.field.path == path)


async def wait_until(pilot: Pilot, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.25)


def run_state(app: ClipctlApp, name: str) -> str | None:
    screen = app.screen
    if not isinstance(screen, RunsScreen) or name not in screen.summaries:
        return None
    return screen.summaries[name].state


def errors_shown(app: ClipctlApp) -> list[str]:
    """The error notifications so far: title and message, as the user reads them."""
    return [f"{n.title}: {n.message}" for n in app._notifications if n.severity == "error"]


def write_spec(path: Path, overrides: list[str]) -> Path:
    """The quickstart template with overrides applied, comments kept (like a saved spec)."""
    from clipctl.spec_edit import load_document, parse_input, set_value

    doc = load_document(QUICKSTART)
    for item in overrides:
        key, _, value = item.partition("=")
        set_value(doc, key, parse_input(value))
    path.write_text(tomlkit.dumps(doc))
    return path


def broken_run(root: Path) -> Path:
    """A run folder with a spec and a finished status but no checkpoint to evaluate."""
    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import to_toml

    folder = RunFolder(root / "broken")
    folder.path.mkdir(parents=True)
    folder.write_spec(to_toml(load_spec(QUICKSTART, [f"run.output_dir={folder.path}"])))
    folder.write_status("finished", step=10, steps=10)
    return folder.path


def launch_screen(spec_path: Path, shown_as: Path | None = None) -> LaunchScreen:
    """The launch screen for spec_path (named as `shown_as` if given), made without its
    editor: the quickstart is the spec as it was before editing."""
    from clip_jax.spec import to_dict, validate
    from clipctl.spec_edit import as_dict, load_document

    original = as_dict(load_document(QUICKSTART))
    resolved = to_dict(validate(as_dict(load_document(spec_path))))
    return LaunchScreen(spec_path if shown_as is None else shown_as, original, resolved)
