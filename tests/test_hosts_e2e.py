"""Two real `clipctl run` trainers through the fake ssh (tests/fake_cloud): trained,
stopped together by `clipctl stop`, resumed by the same command, finished (slow)."""

import shlex
import socket
import sys

import pytest

from clip_jax.run_folder import RunFolder
from tests.conftest import xla_flags
from tests.fake_cloud.harness import (
    HOSTILE,
    QUICKSTART,
    clipctl,
    fake_env,
    launch_files,
    wait_for,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in RunFolder(run_dir).metrics() if r["split"] == "train"]


@pytest.mark.slow
def test_two_hosts_train_stop_and_resume(small_run, tmp_path):
    """Two real `clipctl run` workers through the fake ssh: stopped together by
    `clipctl stop`, resumed by the same command, finished."""
    run_dir = tmp_path / "run"
    remote = shlex.join([sys.executable, "-m", "clipctl.cli"])
    env = fake_env(tmp_path, remote=remote, XLA_FLAGS=xla_flags(2))
    overrides = [o for o in small_run if not o.startswith("run.output_dir")] + [
        f"run.output_dir={run_dir}",
        f"run.name={HOSTILE}",
        "data.readers=2",
        "train.steps=30",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "eval.retrieval=false",
        f"distributed.coordinator=127.0.0.1:{free_port()}",
    ]
    command = ("run", QUICKSTART, *overrides, "--hosts", "ssh:127.0.0.1,localhost")
    launcher = clipctl(tmp_path, *command, env=env, wait=False)
    try:
        wait_for(
            lambda: max(train_steps(run_dir), default=0) >= 3 or launcher.poll() is not None,
            timeout=240,
            what="step 3",
        )
        assert launcher.poll() is None, launcher.communicate()[1].decode()[-3000:]
        stopped = clipctl(tmp_path, "stop", run_dir, env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert launcher.wait(timeout=180) == 130
    finally:
        if launcher.poll() is None:
            launcher.kill()
    status = RunFolder(run_dir).status()
    assert status["state"] == "interrupted"
    stopped_at = status["step"]
    assert 3 <= stopped_at < 30
    assert (RunFolder(run_dir).checkpoints / str(stopped_at)).exists()
    for index in (0, 1):  # both stopped gracefully: each said so in its log
        assert (
            "rerun the same command to resume"
            in (run_dir / "hosts" / f"worker-{index}.log").read_text()
        )

    resumed = clipctl(tmp_path, *command, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from the checkpoint at step {stopped_at}"
        in RunFolder(run_dir).log_path.read_text()
    )
    assert train_steps(run_dir) == list(range(1, 31))
    assert RunFolder(run_dir).status()["state"] == "finished"
    assert not list(tmp_path.glob("PWNED*"))
    assert launch_files(tmp_path) == []
    finished = clipctl(tmp_path, *command, env=env)
    assert finished.returncode == 0 and "already finished at step 30" in finished.stderr
