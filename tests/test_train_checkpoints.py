"""Checkpoints on time, a crash in the middle of a save, the run's end on every exit
path, and runs that never start."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder
from clip_jax.spec import load_spec
from clip_jax.train.events import Events, Subscriber, reported
from clip_jax.train.trainer import train
from tests.conftest import QUICKSTART, xla_flags


def saved_steps(folder: RunFolder) -> list[int]:
    return sorted(int(p.name) for p in folder.checkpoints.iterdir() if p.name.isdigit())


# ------------------------------------------------------------ events and status
class Recorder(Subscriber):
    def __init__(self):
        self.seen = []

    def on_stop(self, step):
        self.seen.append(("stop", step))

    def on_finish(self, step, results):
        self.seen.append(("finish", step))

    def on_failure(self, step, error):
        self.seen.append(("failure", step, error))


def interrupt(events):
    raise KeyboardInterrupt


def fail(events):
    raise ZeroDivisionError("division by zero")


@pytest.mark.parametrize(
    "body, raised, expected",
    [
        (lambda events: events.emit("finish", 7, {}), None, [("finish", 7)]),
        (interrupt, KeyboardInterrupt, [("stop", 7)]),
        (fail, ZeroDivisionError, [("failure", 7, "ZeroDivisionError: division by zero")]),
        (lambda events: None, None, [("failure", 7, "the run ended without finishing")]),
    ],
    ids=["finish", "interrupt", "error", "silent-return"],
)
def test_every_exit_reaches_the_subscribers_exactly_once(body, raised, expected):
    recorder = Recorder()
    events = Events([recorder])
    try:
        with reported(events, lambda: 7):
            body(events)
    except (KeyboardInterrupt, ZeroDivisionError) as exc:
        assert type(exc) is raised
    else:
        assert raised is None
    assert recorder.seen == expected


def test_a_second_ctrl_c_keeps_the_first_stop(tmp_path):
    recorder = Recorder()
    events = Events([recorder])
    with pytest.raises(KeyboardInterrupt), reported(events, lambda: 3):
        events.emit("stop", 3)
        raise KeyboardInterrupt
    assert recorder.seen == [("stop", 3)]


# ------------------------------------------------------------ runs that never start
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=60", "train.batch_size"),  # 8 devices
        ("tokenizer.path=/nonexistent/tokenizer.json", "tokenizer.path"),
        ("data.readers=2000", "data.readers"),
        ("train.init_from=/nonexistent/run", "train.init_from"),
    ],
)
def test_a_run_that_cannot_start_leaves_its_folder_untouched(small_run, override, key):
    spec = load_spec(QUICKSTART, small_run + [override])
    folder = RunFolder(spec.run.output_dir)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        train(spec)
    assert not folder.path.exists()


# ---------------------------------------------------------------- timed saves
@pytest.mark.slow
def test_checkpoint_minutes_saves_between_step_checkpoints(small_run):
    overrides = ["train.steps=6", "train.checkpoint_every=1000", "train.keep_checkpoints=10"]
    spec = load_spec(QUICKSTART, small_run + overrides + ["train.checkpoint_minutes=0.0001"])
    train(spec)
    # Every step takes longer than 6 ms: each one is due.
    assert saved_steps(RunFolder(spec.run.output_dir)) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------- a crash during a save
SLOW_SAVE = """
import asyncio, pathlib, runpy, sys
from orbax.checkpoint._src.path import atomicity

real = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
    if self._final_path.name == "{step}":  # the data is written, the commit is not
        pathlib.Path("{marker}").write_text("saving")
        await asyncio.sleep(600)
    return await real(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ["clipctl"] + sys.argv[1:]
runpy.run_module("clipctl.cli", run_name="__main__")
"""


@pytest.mark.slow
def test_a_crash_during_a_save_keeps_the_checkpoint_before_it(small_run, tmp_path):
    overrides = small_run + [
        "train.steps=10",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=1",  # the save in flight must not make room by deleting 5
    ]
    marker = tmp_path / "saving"
    driver = textwrap.dedent(SLOW_SAVE).format(step=10, marker=marker)
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    command = ["run", str(QUICKSTART), *overrides]
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[1].decode()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    folder = RunFolder(tmp_path / "run")
    assert saved_steps(folder) == [5]  # the half-written 10 is not listed as a step
    assert folder.status()["state"] == "failed"  # killed: its pid is gone

    resumed = subprocess.run(
        [sys.executable, "-m", "clipctl.cli", *command], env=env, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert "resumed from the checkpoint at step 5" in resumed.stderr.decode()
    assert saved_steps(folder) == [10]
    assert folder.status()["state"] == "finished"
    steps = [r["step"] for r in folder.metrics() if r["split"] == "train"]
    assert steps == [5, 10]


@pytest.mark.slow
def test_two_processes_save_on_process_0s_clock_together(small_run, tmp_path):
    from tests.test_multihost import clipctl_run, finish, free_port

    port = free_port()
    overrides = [o for o in small_run if not o.startswith("run.output_dir")] + [
        "data.readers=2",
        "train.steps=6",
        "train.log_every=2",
        "train.checkpoint_every=1000",
        "train.keep_checkpoints=10",
        "train.checkpoint_minutes=0.0001",  # due at every step: saved at the agreed ones
        "eval.retrieval=false",
        f"run.output_dir={tmp_path / 'multi'}",
        "distributed.mode=explicit",
        f"distributed.coordinator=127.0.0.1:{port}",
        "distributed.num_processes=2",
    ]
    finish(
        [clipctl_run(overrides + [f"distributed.process_id={rank}"], devices=2) for rank in (0, 1)]
    )
    assert saved_steps(RunFolder(tmp_path / "multi")) == [2, 4, 6]
