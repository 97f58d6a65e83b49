"""The launch screen's headless command line and hosts, and the runs table's columns."""

import asyncio

from textual.widgets import DataTable, Input

from clipctl.app import ClipctlApp
from clipctl.screens.launch import LaunchScreen
from tests.conftest import QUICKSTART
from tests.test_tui import broken_run, errors_shown, write_spec


def test_the_step_column_grows_with_the_step(tmp_path):
    """A column sized for a new run's "0/250" showed a finished one as "250/2"."""
    from clip_jax.run_folder import RunFolder

    run_dir = broken_run(tmp_path / "runs")
    folder = RunFolder(run_dir)
    folder.write_status("running", step=0, steps=250)

    async def scenario():
        app = ClipctlApp(runs_root=tmp_path / "runs", cwd=tmp_path)
        async with app.run_test(size=(100, 24)) as pilot:
            await pilot.press("f3")
            await pilot.pause()
            folder.write_status("finished", step=250, steps=250)
            app.screen.action_refresh_runs()
            await pilot.pause()
            table = app.screen.query_one(DataTable)
            step = list(table.columns.values())[2]
            assert table.get_cell("broken", step.key) == "250/250"
            assert step.content_width >= len("250/250")

    asyncio.run(scenario())


def test_the_headless_command_is_quoted_for_a_shell(tmp_path):
    from clipctl.screens.launch import headless_command

    odd = tmp_path / "my specs" / "x; touch PWNED.toml"
    assert headless_command(odd, tmp_path) == "clipctl run 'my specs/x; touch PWNED.toml'"
    assert headless_command(odd, tmp_path / "elsewhere") == f"clipctl run '{odd}'"


def test_the_launch_screen_takes_hosts_and_shows_the_command_that_uses_them(tmp_path, monkeypatch):
    from clip_jax.spec import to_dict, validate
    from clipctl.spec_edit import as_dict, load_document

    monkeypatch.setattr(LaunchScreen, "estimate_memory", lambda self: None)  # no compiling
    spec_path = write_spec(tmp_path / "pod.toml", [f"run.output_dir={tmp_path / 'runs' / 'pod'}"])
    original = as_dict(load_document(QUICKSTART))
    resolved = to_dict(validate(as_dict(load_document(spec_path))))

    async def scenario():
        app = ClipctlApp(runs_root=tmp_path / "runs", cwd=tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            launch = LaunchScreen(spec_path, original, resolved)
            app.push_screen(launch)
            await pilot.pause()
            hosts = launch.query_one("#launch-hosts", Input)
            hosts.value = "ssh:gpu0,gpu1"
            await pilot.pause()
            command = str(launch.query_one("#launch-command").render())
            assert command == "headless:   clipctl run pod.toml --hosts ssh:gpu0,gpu1"
            hosts.value = "moon:base"
            await pilot.press("ctrl+l")  # refused with the reason, nothing started
            await pilot.pause()
            assert app.screen is launch
            (shown,) = errors_shown(app)
            assert shown.startswith("not launched: ") and "moon" in shown
            assert not (tmp_path / "runs" / "pod").exists()

    asyncio.run(scenario())
