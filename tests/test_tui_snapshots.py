"""Snapshots of every screen at 80x24 (update with `pytest --snapshot-update`).

The runs screen reads a real quickstart run folder kept in tests/snapshot_data (its
metrics, status and log, without the checkpoint files).
"""

from pathlib import Path

import pytest

from clipctl.app import ClipctlApp
from clipctl.screens.launch import LaunchScreen
from tests.tui_support import SIZE, launch_screen, show_section, type_into

DATA = Path(__file__).parent / "snapshot_data"


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("CLIP_JAX_PLUGINS", "clipctl-templates")  # only this repo's plugins
    from clip_jax.plugins import get_registry

    get_registry.cache_clear()
    yield ClipctlApp(runs_root=DATA / "runs", cwd=DATA)
    get_registry.cache_clear()


def test_templates_screen(snap_compare, app):
    assert snap_compare(app, terminal_size=SIZE)


def test_editor_screen_with_an_invalid_value(snap_compare, app):
    async def edit(pilot):
        await pilot.press("enter")
        editor = pilot.app.screen
        await show_section(pilot, editor, "train")
        await type_into(pilot, editor, "train.steps", "-5")

    assert snap_compare(app, terminal_size=SIZE, run_before=edit)


def test_launch_screen(snap_compare, app, monkeypatch):
    # the estimate (a subprocess compiling the train step) is tested in test_tui
    monkeypatch.setattr(LaunchScreen, "estimate_memory", lambda self: None)

    async def open_launch(pilot):
        edited = DATA / "edited.toml"
        pilot.app.push_screen(launch_screen(edited, edited.relative_to(DATA.parent.parent)))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=open_launch)


def test_runs_screen(snap_compare, app):
    async def go(pilot):
        await pilot.press("f3")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=go)


def test_plugins_screen(snap_compare, app):
    assert snap_compare(app, terminal_size=SIZE, press=["f4"])
