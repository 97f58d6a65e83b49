"""Run folders from the outside: list, summarize, launch, stop, resume, plot (clipctl.runs).

The end-to-end test launches a real tiny run as its own process, stops it with
``clipctl stop``, resumes it and lets it finish. The other tests build run folders by
hand and use real processes (a sleeping Python) where a live or dead pid is needed.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder
from clip_jax.spec import SpecError, load_spec, to_toml
from clipctl import runs
from clipctl.cli import cli
from tests.conftest import QUICKSTART, ROOT, xla_flags

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPEC_TEXT = "[train]\nsteps = 100\nbatch_size = 64\n"


# ------------------------------------------------------------------ helpers
@pytest.fixture
def sleeper():
    """A live process that is not a trainer (a stand-in pid to signal or to protect)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def launched():
    """Kill whatever a test launched and left running (only on failure paths)."""
    yield
    for process in list(runs._launched.values()):
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def make_run(path: Path, state: str | None, *, pid: int | None = None, **status) -> RunFolder:
    folder = RunFolder(path)
    folder.write_spec(SPEC_TEXT)
    if state is not None:
        folder.write_status(state, pid=pid, **status)
    return folder


def add_metrics(folder: RunFolder, steps=(10, 20), evals=(20,)) -> None:
    for step in steps:
        folder.append_metrics(
            {
                "step": step,
                "split": "train",
                "loss": 5.0 - step / 10,
                "learning_rate": 1e-3 * step / 20,
                "images_per_s": 640.0,
            }
        )
    for step in evals:
        folder.append_metrics(
            {
                "step": step,
                "split": "validation",
                "zero_shot_top1": 0.25,
                "retrieval_i2t_r1": 0.1,
                "retrieval_t2i_r1": 0.2,
            }
        )


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in RunFolder(run_dir).metrics() if r["split"] == "train"]


def wait_until(condition, timeout: float, what: str, run_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = runs.summarize(run_dir).state
        if state in ("failed", "finished") or time.monotonic() > deadline:
            log = (run_dir / runs.LAUNCH_LOG).read_text()[-3000:]
            pytest.fail(f"{what}: run is {state}\n{log}")
        time.sleep(0.1)


# --------------------------------------------------------------- end to end
@pytest.mark.slow
def test_launch_stop_resume_finish(small_run, tmp_path, monkeypatch, launched):
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    root = tmp_path / "runs"
    run = root / "tiny"
    overrides = small_run + [
        f"run.output_dir={run}",
        "train.steps=60",
        "train.log_every=1",
        "train.checkpoint_every=1000",
    ]
    started = runs.launch(QUICKSTART, overrides)
    assert started.state == "starting"
    assert started.pid not in (None, os.getpid())
    assert started.steps == 60
    assert (run / runs.LAUNCH_LOG).exists()

    wait_until(lambda: len(train_steps(run)) >= 3, 120, "no training steps logged", run)
    assert runs.summarize(run).state == "running"

    result = CliRunner().invoke(cli, ["stop", str(run), "--wait", "--timeout", "120"])
    assert result.exit_code == 0, result.output
    assert f"pid {started.pid}" in result.stdout
    stopped = runs.summarize(run)
    assert stopped.state == "interrupted"
    assert 3 <= stopped.step < 60
    assert stopped.checkpoints == [stopped.step]  # saved on the way out
    assert stopped.eta_s is None
    assert f"interrupted at step {stopped.step}" in result.stdout

    resumed = runs.resume(run)
    assert resumed.state == "starting" and resumed.pid != started.pid
    with pytest.raises(ValueError, match="stop it before resuming"):
        runs.resume(run)
    final = runs.wait_for_state(run, runs.ENDED, timeout=180)
    assert final.state == "finished", (run / runs.LAUNCH_LOG).read_text()[-3000:]
    assert train_steps(run) == list(range(1, 61))  # continued: no repeats, no gaps
    assert f"resumed from the checkpoint at step {stopped.step}" in (run / "run.log").read_text()
    assert final.eta_s == 0.0
    assert final.checkpoints[-1] == 60

    listed = CliRunner().invoke(cli, ["runs", str(root), "--json"])
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "tiny" and entry["state"] == "finished"
    assert entry["step"] == entry["steps"] == 60
    assert entry["evaluation"]["step"] == 60
    assert 0.0 <= entry["evaluation"]["zero_shot_top1"] <= 1.0
    table = CliRunner().invoke(cli, ["runs", str(root)])
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[1].split()[:3] == ["tiny", "finished", "60/60"]

    evaluated = runs.evaluate(run, timeout=120)  # the TUI's evaluate action
    assert evaluated["step"] == 60
    assert evaluated["zero_shot_top1"] == pytest.approx(entry["evaluation"]["zero_shot_top1"])

    png = tmp_path / "curves.png"
    plotted = CliRunner().invoke(cli, ["plot", str(run), "--out", str(png)])
    assert plotted.exit_code == 0, plotted.output
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

    assert runs.stop(run) is False
    again = CliRunner().invoke(cli, ["stop", str(run)])
    assert again.exit_code == 2
    assert again.stderr.startswith("error: ") and "not running (state: finished)" in again.stderr
    with pytest.raises(ValueError, match="already finished at step 60"):
        runs.resume(run)


@pytest.mark.slow
def test_a_run_stopped_before_its_first_step_is_interrupted(small_run, monkeypatch, launched):
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    started = runs.launch(QUICKSTART, small_run + ["train.steps=50"])
    run = started.path
    # "running": the trainer has taken over and is importing jax, preparing data, compiling.
    wait_until(lambda: runs.summarize(run).state == "running", 60, "never running", run)
    assert runs.stop(run) is True
    done = runs.wait_for_state(run, runs.ENDED, timeout=60)
    log = (run / runs.LAUNCH_LOG).read_text()
    assert done.state == "interrupted", log
    assert train_steps(run) == [] and done.checkpoints == []
    assert "Traceback" not in log
    assert runs.summarize(run).eta_s is None


# ------------------------------------------------------- folders by hand
def test_find_runs_lists_run_folders_and_ignores_the_rest(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "b", "finished", steps=100, step=100)
    make_run(root / "a", None)  # a spec but no status yet
    nested = RunFolder(root / "group" / "c")
    nested.path.mkdir(parents=True)
    nested.write_status("interrupted", step=30, steps=100)  # a status but no spec
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "empty").mkdir()
    for name in ("10", "20", "tmp-30"):
        (root / "b" / "checkpoints" / name).mkdir(parents=True)
    (root / "b" / "checkpoints" / "10" / "status.json").write_text("{}")  # never a run

    found = runs.find_runs(root)
    assert [run.name for run in found] == ["a", "b", "group/c"]
    assert [run.state for run in found] == ["unknown", "finished", "interrupted"]
    assert found[1].checkpoints == [10, 20]
    assert found[2].step == 30 and found[2].steps == 100
    assert found[0].steps == 100  # from the spec when the status does not say
    assert runs.find_runs(tmp_path / "missing") == []


def test_summary_of_a_running_run_and_a_graceful_stop(tmp_path, sleeper):
    folder = make_run(tmp_path / "run", "running", pid=sleeper.pid, step=20, steps=100)
    add_metrics(folder)
    summary = runs.summarize(folder.path)
    assert summary.state == "running" and summary.pid == sleeper.pid
    assert summary.step == 20 and summary.steps == 100
    assert summary.loss == pytest.approx(3.0)
    assert summary.learning_rate == pytest.approx(1e-3)
    assert summary.images_per_s == 640.0
    assert summary.eta_s == pytest.approx((100 - 20) * 64 / 640)
    assert summary.evaluation["zero_shot_top1"] == 0.25
    assert json.loads(json.dumps(summary.to_dict()))["path"] == str(folder.path)

    result = CliRunner().invoke(cli, ["stop", str(folder.path)])
    assert result.exit_code == 0, result.output
    assert f"pid {sleeper.pid}" in result.stdout
    assert sleeper.wait(timeout=30) == -signal.SIGTERM
    # The stand-in died without writing "interrupted": its status is a dead "running".
    assert runs.summarize(folder.path).state == "failed"


def test_a_dead_process_shows_as_failed_and_cannot_be_stopped(tmp_path, dead_pid):
    for state in ("running", "starting"):
        folder = make_run(tmp_path / state, state, pid=dead_pid, step=5, steps=100)
        summary = runs.summarize(folder.path)
        assert summary.state == "failed"
        assert f"pid {dead_pid}" in summary.error
        assert summary.eta_s is None
        assert runs.stop(folder.path) is False
        result = CliRunner().invoke(cli, ["stop", str(folder.path)])
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ")
        assert "is not running (state: failed)" in result.stderr
        assert "Traceback" not in result.output


def test_a_zombie_is_not_a_live_run(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    folder = make_run(tmp_path / "run", "running", pid=process.pid, steps=100)
    deadline = time.monotonic() + 30
    while runs.summarize(folder.path).state != "failed":  # exited, not yet reaped
        assert time.monotonic() < deadline, "a zombie still counts as a running run"
        time.sleep(0.05)
    assert process.poll() == 0


def test_a_reused_pid_is_never_signalled(tmp_path, sleeper):
    # The status was written an hour before this process started: the run's own
    # process is long gone and the pid now belongs to someone else.
    folder = make_run(
        tmp_path / "run", "running", pid=sleeper.pid, steps=100, updated=time.time() - 3600
    )
    assert runs.summarize(folder.path).state == "failed"
    assert runs.stop(folder.path) is False
    time.sleep(0.2)
    assert sleeper.poll() is None


def test_runs_command_table_json_and_errors(tmp_path, dead_pid):
    root = tmp_path / "runs"
    add_metrics(make_run(root / "done", "finished", step=100, steps=100), evals=(20, 100))
    add_metrics(make_run(root / "crashed", "running", pid=dead_pid, step=20, steps=100))
    runner = CliRunner()

    table = runner.invoke(cli, ["runs", str(root)])
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["RUN", "STATE", "STEP", "LOSS", "ZERO-SHOT", "IMAGES/S", "ETA"]
    assert rows[0].split() == ["crashed", "failed", "20/100", "3.0000", "0.250", "640", "-"]
    assert rows[1].split() == ["done", "finished", "100/100", "3.0000", "0.250", "640", "0:00:00"]

    listed = runner.invoke(cli, ["runs", str(root), "--json"])
    assert [r["name"] for r in json.loads(listed.stdout)] == ["crashed", "done"]

    missing = runner.invoke(cli, ["runs", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: no folder")
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(cli, ["runs", str(tmp_path / "empty")])
    assert empty.exit_code == 0 and "no runs under" in empty.stderr
    assert json.loads(runner.invoke(cli, ["runs", str(tmp_path / "empty"), "--json"]).stdout) == []

    not_a_run = runner.invoke(cli, ["stop", str(tmp_path / "empty")])
    assert not_a_run.exit_code == 2 and "is not a run folder" in not_a_run.stderr


def test_plot_writes_a_png(tmp_path):
    folder = make_run(tmp_path / "run", "finished", step=40, steps=40)
    add_metrics(folder, steps=range(1, 41), evals=(20, 40))
    result = CliRunner().invoke(cli, ["plot", str(folder.path)])
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.strip())
    assert written == folder.path / "curves.png"
    data = written.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

    bare = make_run(tmp_path / "new", None)
    result = CliRunner().invoke(cli, ["plot", str(bare.path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "no training metrics yet" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_launch_checks_before_starting_anything(tmp_path, sleeper):
    out = tmp_path / "run"
    with pytest.raises(SpecError, match="train.stpes"):
        runs.launch(QUICKSTART, ["train.stpes=3", f"run.output_dir={out}"])
    assert not out.exists()

    # A folder that holds a finished run of another spec is not taken over...
    folder = RunFolder(out)
    folder.write_spec(to_toml(load_spec(QUICKSTART, [f"run.output_dir={out}"])))
    folder.write_status("finished", step=250, steps=250)
    with pytest.raises(ValueError, match=r"differs in: train\.steps"):
        runs.launch(QUICKSTART, [f"run.output_dir={out}", "train.steps=10"])
    # ...and one whose run is alive is never launched into twice.
    folder.write_status("running", pid=sleeper.pid, step=3, steps=250)
    with pytest.raises(UserError, match="stop it first"):  # the TUI catches UserError
        runs.launch(QUICKSTART, [f"run.output_dir={out}"], force=True)
    with pytest.raises(ValueError, match="stop it before resuming"):
        runs.resume(out)
    assert not (out / runs.LAUNCH_LOG).exists()
    assert runs.summarize(out).pid == sleeper.pid

    folder.write_status("finished", step=250, steps=250)
    with pytest.raises(ValueError, match="already finished at step 250"):
        runs.resume(out)
    result = CliRunner().invoke(cli, ["resume", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "already finished" in result.stderr


def test_resume_starts_where_relative_paths_were_meant(tmp_path, monkeypatch):
    project = tmp_path / "project"
    run = project / "runs" / "x"
    run.mkdir(parents=True)
    # A spec with run.output_dir = "runs/x" was launched from the project folder:
    # resuming from anywhere else runs from there again.
    assert runs._working_dir(run, "runs/x") == project.resolve()
    assert runs._working_dir(run, "./runs/x") == project.resolve()
    monkeypatch.chdir(project)
    assert runs._working_dir(Path("runs/x"), "runs/x") is None  # already there
    assert runs._working_dir(run, str(run)) is None  # absolute

    folder = RunFolder(run)
    folder.write_spec('[run]\noutput_dir = "old/place"\n')
    folder.write_status("interrupted", step=5, steps=10)
    with pytest.raises(ValueError, match="was it moved"):
        runs.resume(run)
    assert not (run / runs.LAUNCH_LOG).exists()


@pytest.mark.slow
def test_evaluate_reports_a_failure(tmp_path):
    from clip_jax.errors import RunFolderError

    with pytest.raises(RunFolderError, match="nothing-here is not a run folder"):
        runs.evaluate(tmp_path / "nothing-here", timeout=120)


def test_bare_clipctl_without_a_terminal_prints_help():
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 0
    for command in ("runs", "stop", "resume", "plot", "run", "eval"):
        assert f"  {command} " in result.stdout


def test_runs_and_plot_stay_light(tmp_path):
    folder = make_run(tmp_path / "runs" / "r", "finished", step=40, steps=40)
    add_metrics(folder, steps=range(1, 41))
    code = textwrap.dedent(
        f"""
        import sys
        import clipctl.cli, clipctl.plot, clipctl.runs
        from clipctl.cli import cli

        heavy = ("jax", "tensorflow", "flax", "orbax", "textual", "matplotlib")
        assert not [m for m in heavy if m in sys.modules]
        for args in (["runs", {str(tmp_path / "runs")!r}, "--json"], ["stop", {str(folder.path)!r}],
                     ["plot", {str(folder.path)!r}]):
            try:
                cli(args, standalone_mode=True)
            except SystemExit:
                pass
        print([m for m in heavy if m in sys.modules])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['matplotlib']"


def test_the_summary_and_the_details_show_skipped_data_and_guard_events(tmp_path):
    from clipctl.widgets.run_details import RunDetails

    folder = make_run(tmp_path / "bad-data", "running")
    add_metrics(folder)
    folder.append_metrics(
        {
            "step": 30,
            "split": "train",
            "loss": 1.0,
            "skipped_records": 7,
            "skipped/undecodable": 5,
            "skipped/empty_caption": 2,
            "skipped/missing_key": 0,
            "guard/skipped_updates": 1,
            "guard/rollbacks": 0,
        }
    )
    summary = runs.summarize(folder.path)
    assert summary.skipped == {"undecodable": 5, "empty_caption": 2}
    assert summary.guards == {"skipped_updates": 1}
    shown = []
    details = RunDetails()
    details.update = shown.append  # the text the widget would render
    details.show(summary)
    assert "skipped undecodable 5, empty caption 2" in shown[0]
    assert "skipped updates 1" in shown[0]


def test_a_damaged_status_or_metrics_file_reads_as_unknown_not_a_crash(tmp_path):
    folder = make_run(tmp_path / "damaged", None)
    (folder.path / "status.json").write_text("[1, 2]")
    (folder.path / "metrics.jsonl").write_bytes(b'{"step": 1, "split": "train"}\n\xff\xfe\n')
    assert folder.status() == {"state": "unknown"}
    assert list(folder.metrics()) == [{"step": 1, "split": "train"}]
