"""The launch screen's headless command line and hosts, and the runs table's columns."""

from textual.widgets import DataTable, Input

from clipctl.screens.launch import LaunchScreen
from tests.tui_support import broken_run, errors_shown, launch_screen, press, run_app, write_spec


def test_the_step_column_grows_with_the_step(tmp_path):
    """A column sized for a new run's "0/250" showed a finished one as "250/2"."""
    from clip_jax.run_folder import RunFolder

    run_dir = broken_run(tmp_path / "runs")
    folder = RunFolder(run_dir)
    folder.write_status("running", step=0, steps=250)

    async def scenario(app, pilot):
        await press(pilot, "f3")
        folder.write_status("finished", step=250, steps=250)
        app.screen.action_refresh_runs()
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        step = list(table.columns.values())[2]
        assert table.get_cell("broken", step.key) == "250/250"
        assert step.content_width >= len("250/250")

    run_app(tmp_path, scenario, size=(100, 24))


def test_the_headless_command_is_quoted_for_a_shell(tmp_path):
    from clipctl.screens.launch import headless_command

    odd = tmp_path / "my specs" / "x; touch PWNED.toml"
    assert headless_command(odd, tmp_path) == "clipctl run 'my specs/x; touch PWNED.toml'"
    assert headless_command(odd, tmp_path / "elsewhere") == f"clipctl run '{odd}'"


def test_the_launch_screen_takes_hosts_and_shows_the_command_that_uses_them(tmp_path, monkeypatch):
    monkeypatch.setattr(LaunchScreen, "estimate_memory", lambda self: None)  # no compiling
    spec_path = write_spec(tmp_path / "pod.toml", [f"run.output_dir={tmp_path / 'runs' / 'pod'}"])

    async def scenario(app, pilot):
        launch = launch_screen(spec_path)
        app.push_screen(launch)
        await pilot.pause()
        hosts = launch.query_one("#launch-hosts", Input)
        hosts.value = "ssh:gpu0,gpu1"
        await pilot.pause()
        command = str(launch.query_one("#launch-command").render())
        assert command == "headless:   clipctl run pod.toml --hosts ssh:gpu0,gpu1"
        hosts.value = "moon:base"
        await press(pilot, "ctrl+l")  # refused with the reason, nothing started
        assert app.screen is launch
        (shown,) = errors_shown(app)
        assert shown.startswith("not launched: ") and "moon" in shown
        assert not (tmp_path / "runs" / "pod").exists()

    run_app(tmp_path, scenario, size=(100, 30))
