"""End-to-end training on the embedded dataset: learning, run folder, resume, refusal."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clip_jax.run_folder import RunFolder
from clip_jax.spec import load_spec
from clip_jax.train.trainer import RunFolderConflict, train
from tests.conftest import QUICKSTART, xla_flags


def train_lines(folder: RunFolder) -> list[dict]:
    return [r for r in folder.metrics() if r["split"] == "train"]


@pytest.mark.slow
def test_short_run_lowers_loss_and_fills_the_run_folder(small_run):
    spec = load_spec(QUICKSTART, small_run + ["train.steps=40", "train.checkpoint_every=20"])
    results = train(spec)
    folder = RunFolder(spec.run.output_dir)

    lines = train_lines(folder)
    assert [r["step"] for r in lines] == list(range(5, 41, 5))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.3
    for key in ("loss", "learning_rate", "images_per_s", "grad_norm", "temperature"):
        assert key in lines[-1]
    assert lines[-1]["images_per_s"] > 0
    assert lines[-1]["skipped_records"] == 0

    evals = [r for r in folder.metrics() if r["split"] == "validation"]
    assert len(evals) == 1 and evals[0]["step"] == 40
    assert evals[0]["zero_shot_classes"] == 16
    assert results["zero_shot_top1"] == evals[0]["zero_shot_top1"]
    assert results["zero_shot_top1"] > 1 / 16  # better than chance after 40 steps

    assert (folder.path / "spec.resolved.toml").exists()
    assert (folder.path / "tokenizer.json").exists()
    assert (folder.path / "run.log").read_text().count("step 40/40") == 1
    assert sorted(int(p.name) for p in folder.checkpoints.iterdir() if p.name.isdigit()) == [20, 40]
    assert folder.status()["state"] == "finished"


@pytest.mark.slow
def test_resume_continues_the_step_count_and_data_position(small_run):
    spec = load_spec(QUICKSTART, small_run + ["train.steps=10", "train.checkpoint_every=10"])
    train(spec)
    folder = RunFolder(spec.run.output_dir)

    # A finished run finishes at once: nothing new is trained or logged.
    before = list(folder.metrics())
    again = train(spec)
    assert list(folder.metrics()) == before
    assert again["step"] == 10

    # Asking for more steps (explicitly) continues from step 10, not from zero.
    longer = load_spec(QUICKSTART, small_run + ["train.steps=20", "train.checkpoint_every=10"])
    with pytest.raises(RunFolderConflict, match="train.steps"):
        train(longer)
    train(longer, force=True)
    steps = [r["step"] for r in train_lines(folder)]
    assert steps == [5, 10, 15, 20]


@pytest.mark.slow
def test_eval_command_and_refusal_through_the_cli(small_run):
    from click.testing import CliRunner

    from clipctl.cli import cli

    runner = CliRunner()
    spec_args = ["run", str(QUICKSTART), *small_run, "train.steps=10"]
    first = runner.invoke(cli, spec_args)
    assert first.exit_code == 0, first.output
    run_dir = load_spec(QUICKSTART, small_run).run.output_dir

    result = runner.invoke(cli, ["eval", run_dir, "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["step"] == 10
    for key in ("zero_shot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= metrics[key] <= 1.0
    final = [r for r in RunFolder(run_dir).metrics() if r["split"] == "validation"][-1]
    assert metrics["zero_shot_top1"] == pytest.approx(final["zero_shot_top1"])

    changed = runner.invoke(cli, [*spec_args, "optimizer.learning_rate=0.5"])
    assert changed.exit_code == 2  # the user's to fix: exit 2, as for a bad spec
    assert "optimizer.learning_rate" in changed.output and "--force" in changed.output


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_rerun_resumes(small_run, tmp_path):
    overrides = small_run + ["train.steps=60", "train.log_every=1", "train.checkpoint_every=1000"]
    command = [sys.executable, "-m", "clipctl.cli", "run", str(QUICKSTART), *overrides]
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder = RunFolder(tmp_path / "run")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(train_lines(folder)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr.decode()
    assert folder.status()["state"] == "interrupted"
    stopped_at = folder.status()["step"]
    assert 3 <= stopped_at < 60
    assert b"Traceback" not in stderr

    resumed = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"resumed from the checkpoint at step {stopped_at}" in resumed.stderr.decode()
    steps = [r["step"] for r in train_lines(folder)]
    assert steps == list(range(1, 61))
    assert json.loads(resumed.stdout.decode().splitlines()[-1])["zero_shot_classes"] == 16


@pytest.mark.slow
def test_records_written_a_step_late_hold_their_own_step_and_say_where_time_went(
    small_run, tmp_path
):
    # log_every=3 is neither an eval nor a checkpoint step: those records are written
    # after the next step is dispatched, and must still be their own step's.
    common = ["train.steps=10", "train.checkpoint_every=5", "eval.every=5"]
    late = load_spec(QUICKSTART, small_run + common + ["train.log_every=3"])
    every = load_spec(
        QUICKSTART,
        small_run + common + ["train.log_every=1", f"run.output_dir={tmp_path / 'every'}"],
    )
    train(late)
    train(every)
    late_lines = train_lines(RunFolder(late.run.output_dir))
    every_lines = {r["step"]: r for r in train_lines(RunFolder(every.run.output_dir))}

    assert [r["step"] for r in late_lines] == [3, 6, 9, 10]
    for record in late_lines:
        for key in ("loss", "learning_rate", "grad_norm", "skipped_records"):
            assert record[key] == every_lines[record["step"]][key], key
        assert 0.0 <= record["time/data_wait_frac"] <= 1.0
        assert record["time/step_s"] > 0 and record["images_per_s"] > 0
        assert record["time/eval_s"] >= 0 and record["time/checkpoint_s"] >= 0
    # Steps 5's evaluation and checkpoint fall between the records of steps 3 and 6.
    assert late_lines[1]["time/eval_s"] > 0 and late_lines[1]["time/checkpoint_s"] > 0
    assert late_lines[0]["time/eval_s"] == 0 and late_lines[0]["time/checkpoint_s"] == 0
