"""The Textual app driven by its Pilot: edit, validate, save, launch, watch, stop, resume."""

import pytest
from textual.widgets import DataTable, Input

from clip_jax.plugins import hookimpl, register_plugin, unregister_plugin
from clip_jax.spec import SpecError, load_spec
from clipctl.screens.editor import EditorScreen
from clipctl.screens.launch import LaunchScreen
from clipctl.screens.runs import RunsScreen
from clipctl.screens.save import SaveScreen
from clipctl.widgets.field_row import FieldRow
from tests.conftest import QUICKSTART
from tests.tui_support import (
    broken_run,
    errors_shown,
    open_launch_screen,
    open_spec,
    press,
    run_app,
    run_state,
    show_section,
    type_into,
    wait_until,
    write_spec,
)


def test_edit_template_invalid_value_fix_and_save(tmp_path):
    async def scenario(app, pilot):
        await pilot.press("enter")  # the highlighted template: quickstart
        editor = app.screen
        assert isinstance(editor, EditorScreen)

        await show_section(pilot, editor, "train")
        row = await type_into(pilot, editor, "train.steps", "abc")
        with pytest.raises(SpecError) as cli_error:
            load_spec(QUICKSTART, ["train.steps=abc"])
        (path, message), *_ = cli_error.value.problems
        assert path == "train.steps"
        assert row.has_class("-invalid")
        assert editor.problems == {"train.steps": message}  # what `validate` prints
        await pilot.press("ctrl+s")
        assert not any(isinstance(s, SaveScreen) for s in app.screen_stack)

        row = await type_into(pilot, editor, "train.steps", "120")
        assert not row.has_class("-invalid") and editor.problems == {}
        await show_section(pilot, editor, "optimizer")
        await type_into(pilot, editor, "optimizer.learning_rate", "0.003")

        await pilot.press("ctrl+s")
        save_path = app.screen.query_one("#save-path", Input)
        save_path.value = str(tmp_path / "specs" / "mine.toml")
        await press(pilot, "enter")

    run_app(tmp_path, scenario)
    saved = tmp_path / "specs" / "mine.toml"
    text = saved.read_text()
    assert "# Quickstart: a tiny CLIP" in text  # the template's comments survive
    spec = load_spec(saved)
    assert spec.train.steps == 120 and spec.optimizer.learning_rate == 0.003


def test_switching_the_loss_shows_its_own_fields(tmp_path):
    async def scenario(app, pilot):
        editor = await open_spec(pilot, tmp_path / "x.toml", QUICKSTART)
        await show_section(pilot, editor, "loss")
        paths = {row.field.path for row in editor.query(FieldRow)}
        assert "loss.max_temperature" in paths and "loss.init_bias" not in paths
        editor.query_one("#field-loss--name").value = "sigmoid"
        await pilot.pause()
        paths = {row.field.path for row in editor.query(FieldRow)}
        assert "loss.init_bias" in paths and "loss.max_temperature" not in paths
        assert editor.problems == {}

    run_app(tmp_path, scenario)


@pytest.mark.slow
def test_launch_watch_stop_resume_from_the_tui(small_run, tmp_path):
    runs_root = tmp_path / "runs"
    overrides = [o for o in small_run if not o.startswith("run.output_dir")]
    spec_path = write_spec(
        tmp_path / "tiny.toml",
        overrides
        + [
            f"run.output_dir={runs_root / 'tiny'}",
            "train.steps=120",
            "train.log_every=1",
            "train.checkpoint_every=1000",
        ],
    )

    async def scenario(app, pilot):
        await open_launch_screen(pilot, spec_path)
        await press(pilot, "ctrl+l")
        assert isinstance(app.screen, RunsScreen)
        await wait_until(pilot, lambda: run_state(app, "tiny") == "running", 120, "running")
        await wait_until(pilot, lambda: app.screen.summaries["tiny"].step >= 3, 120, "a few steps")
        table = app.screen.query_one(DataTable)
        assert "running" in str(table.get_row("tiny")[1])

        await pilot.press("s")
        await wait_until(pilot, lambda: run_state(app, "tiny") == "interrupted", 60, "stop")
        stopped_at = app.screen.summaries["tiny"].step
        assert stopped_at in app.screen.summaries["tiny"].checkpoints

        await pilot.press("r")
        await wait_until(pilot, lambda: run_state(app, "tiny") == "finished", 240, "finish")
        summary = app.screen.summaries["tiny"]
        assert summary.step == 120
        assert summary.evaluation["zero_shot_top1"] > 1 / 16
        assert "finished" in str(app.screen.query_one(DataTable).get_row("tiny")[1])

    run_app(tmp_path, scenario, runs_root)
    from clip_jax.run_folder import RunFolder

    steps = [r["step"] for r in RunFolder(runs_root / "tiny").metrics() if r["split"] == "train"]
    assert steps == list(range(1, 121))  # resumed where it stopped, nothing repeated
    losses = [r["loss"] for r in RunFolder(runs_root / "tiny").metrics() if "loss" in r]
    assert losses[-1] < losses[0]


class ExtraLossPlugin:
    @hookimpl
    def register_losses(self, register):
        register("tui_test_loss", lambda options: None, description="registered by a test")


def test_plugins_screen_lists_a_registered_plugin(tmp_path):
    register_plugin(ExtraLossPlugin(), "tui-test-plugin")
    try:

        async def scenario(app, pilot):
            await press(pilot, "f4")
            table = app.screen.query_one(DataTable)
            row = table.get_row("tui-test-plugin")
            assert "tui_test_loss" in str(row[2])
            assert "builtins" in [str(k.value) for k in table.rows]

        run_app(tmp_path, scenario, runs_root=tmp_path)
    finally:
        unregister_plugin("tui-test-plugin")


# ------------------------------------------------------------- will it fit?
def memory_text(screen: LaunchScreen) -> str:
    return str(screen.query_one("#launch-memory").render())


@pytest.mark.slow
def test_launch_screen_warns_before_launching_a_run_that_does_not_fit(
    small_run, tmp_path, monkeypatch
):
    from clipctl import runs

    monkeypatch.setenv("CLIP_JAX_DEVICE_MEMORY", "1MiB")  # what the estimate compares with
    runs_root = tmp_path / "runs"
    overrides = [o for o in small_run if not o.startswith("run.output_dir")]
    spec_path = write_spec(
        tmp_path / "big.toml", overrides + [f"run.output_dir={runs_root / 'big'}"]
    )

    async def scenario(app, pilot):
        launch = await open_launch_screen(pilot, spec_path)
        assert "estimating" in memory_text(launch)  # in a worker: the screen is up
        command = str(launch.query_one("#launch-command").render())
        assert command == "headless:   clipctl run big.toml"  # to repeat it without the TUI

        def estimated() -> bool:
            return launch.fits is not None or "failed" in memory_text(launch)

        await wait_until(pilot, estimated, 120, "the estimate")
        assert launch.fits is False, memory_text(launch)
        assert "DOES NOT FIT" in memory_text(launch) and "1MiB" in memory_text(launch)
        assert launch.query_one("#launch-memory").has_class("-too-big")

        await press(pilot, "ctrl+l")  # warned, not launched
        assert app.screen is launch and launch.warned
        assert not (runs_root / "big").exists()
        await press(pilot, "ctrl+l")  # the user insists: launched
        assert isinstance(app.screen, RunsScreen)

    run_app(tmp_path, scenario, runs_root)
    try:
        assert runs.summarize(runs_root / "big").state in runs.ACTIVE | runs.ENDED
    finally:
        runs.stop(runs_root / "big")
        runs.wait_for_state(runs_root / "big", runs.ENDED, 120)


@pytest.mark.slow
def test_a_failing_estimate_is_shown_and_the_app_goes_on(small_run, tmp_path):
    spec_path = write_spec(tmp_path / "odd.toml", small_run + ["train.batch_size=100"])

    async def scenario(app, pilot):
        launch = await open_launch_screen(pilot, spec_path)
        await wait_until(pilot, lambda: "failed" in memory_text(launch), 120, "the failed estimate")
        assert "batch 100 must be a multiple of" in memory_text(launch)
        assert launch.fits is None and app.screen is launch
        await press(pilot, "escape")
        assert not isinstance(app.screen, LaunchScreen)

    run_app(tmp_path, scenario)


# ------------------------------------------------ errors: shown, the app goes on
@pytest.mark.slow  # a clipctl eval subprocess
def test_evaluating_a_broken_run_folder_is_shown_and_the_app_goes_on(tmp_path):
    run_dir = broken_run(tmp_path / "runs")

    async def scenario(app, pilot):
        await press(pilot, "f3")
        await pilot.press("e")  # `clipctl eval` in a worker: exits 2, says why
        await wait_until(pilot, lambda: errors_shown(app), 120, "the error")
        (shown,) = errors_shown(app)
        assert shown == f"evaluating broken failed: {run_dir} has no checkpoint yet"
        assert isinstance(app.screen, RunsScreen) and app.is_running
        await press(pilot, "f5")  # still answering
        assert "broken" in app.screen.summaries

    run_app(tmp_path, scenario)


def test_a_bug_in_a_worker_is_shown_and_the_app_goes_on(tmp_path, monkeypatch):
    from clipctl import runs

    def broken_evaluate(run_dir, timeout=None):
        raise KeyError("a bug in clip-jax")  # not a mistake the worker expects

    monkeypatch.setattr(runs, "evaluate", broken_evaluate)
    broken_run(tmp_path / "runs")

    async def scenario(app, pilot):
        await press(pilot, "f3")
        await pilot.press("e")
        await wait_until(pilot, lambda: errors_shown(app), 30, "the error")
        (shown,) = errors_shown(app)
        assert "failed unexpectedly" in shown and "a bug in clip-jax" in shown
        assert isinstance(app.screen, RunsScreen) and app.is_running

    run_app(tmp_path, scenario)


def test_a_spec_that_is_not_toml_is_shown_and_the_app_goes_on(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 3\n[model\n")

    async def scenario(app, pilot):
        await open_spec(pilot, bad)  # what "Open spec: bad.toml" in the palette does
        (shown,) = errors_shown(app)
        assert shown.startswith(f"cannot open the spec: {bad}: line 3, column 7: not valid")
        assert not isinstance(app.screen, EditorScreen) and app.is_running

    run_app(tmp_path, scenario)


def test_markup_in_a_wrong_value_is_shown_as_typed(tmp_path):
    async def scenario(app, pilot):
        editor = await open_spec(pilot, tmp_path / "x.toml", QUICKSTART)
        await show_section(pilot, editor, "train")
        row = await type_into(pilot, editor, "train.steps", "[/b]")  # was a MarkupError
        await pilot.pause()
        assert row.has_class("-invalid") and app.is_running
        assert "'[/b]'" in str(editor.query_one("#problems").render())

    run_app(tmp_path, scenario)


@pytest.mark.slow
def test_launching_a_spec_whose_glob_matches_nothing_shows_why_it_failed(tmp_path):
    runs_root = tmp_path / "runs"
    glob = tmp_path / "shards" / "*.tfrecord"
    spec_path = tmp_path / "noshards.toml"
    text = QUICKSTART.read_text()
    data = text[text.index("[data]") : text.index("[tokenizer]")]
    text = text.replace(data, f'[data]\nsource = "tfrecord"\ntrain = "{glob}"\n\n')
    spec_path.write_text(text.replace('"runs/quickstart"', f'"{runs_root / "noshards"}"'))

    async def scenario(app, pilot):
        await open_launch_screen(pilot, spec_path)
        await press(pilot, "ctrl+l")  # the spec is valid: launched, and fails at once
        assert isinstance(app.screen, RunsScreen)
        await wait_until(pilot, lambda: run_state(app, "noshards") == "failed", 120, "fail")
        error = app.screen.summaries["noshards"].error
        assert error.startswith("data.train: ") and str(glob) in error
        assert "data.train" in str(app.screen.query_one("#run-stats").render())
        assert app.is_running

    run_app(tmp_path, scenario, runs_root)


def test_a_damaged_run_folder_is_listed_and_the_app_goes_on(tmp_path):
    run_dir = broken_run(tmp_path / "runs")
    (run_dir / "metrics.jsonl").write_text(
        '3\n[1]\n{"split": "train", "step": "x", "loss": null}\n'
        '{"split": "train", "step": 4, "loss": 2.5}\n'
    )
    (run_dir / "run.log").write_bytes(b"\xff\xfe not text \x00\n")

    async def scenario(app, pilot):
        await press(pilot, "f3")
        await press(pilot, "f5")  # a refresh, as the screen's 1 s timer runs it
        assert app.is_running and isinstance(app.screen, RunsScreen)
        summary = app.screen.summaries["broken"]
        assert summary.step == 10 and summary.loss == 2.5  # the one good record

    run_app(tmp_path, scenario)
