"""Two real processes on 127.0.0.1 (gloo collectives) train like one process with 4 devices."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from clip_jax.run_folder import RunFolder
from tests.conftest import QUICKSTART, xla_flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clipctl_run(overrides: list[str], devices: int, extra: tuple[str, ...] = ()):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    command = [sys.executable, "-m", "clipctl.cli", "run", str(QUICKSTART), *overrides, *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(procs: list[subprocess.Popen]) -> None:
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr.decode()[-3000:]
    finally:  # never leave a peer waiting for the coordinator
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run_dir).metrics() if r["split"] == "train"}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_together(small_run, tmp_path):
    base = [o for o in small_run if not o.startswith("run.output_dir")] + [
        "data.readers=2",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "eval.retrieval=false",
    ]
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"

    def multi(steps: int, *extra: str) -> list[subprocess.Popen]:
        port = free_port()
        return [
            clipctl_run(
                base
                + [
                    f"train.steps={steps}",
                    f"run.output_dir={multi_dir}",
                    "distributed.mode=explicit",
                    f"distributed.coordinator=127.0.0.1:{port}",
                    "distributed.num_processes=2",
                    f"distributed.process_id={rank}",
                ],
                devices=2,
                extra=extra,
            )
            for rank in (0, 1)
        ]

    finish(multi(3))
    finish([clipctl_run(base + ["train.steps=3", f"run.output_dir={single_dir}"], devices=4)])
    single, two = train_losses(single_dir), train_losses(multi_dir)
    assert sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(single[step], rel=1e-4)

    # Both processes restore the checkpoint written together at step 3 and go on.
    # Resume with more steps; then Ctrl-C on one process (not the coordinator) stops
    # both at the same step: each saves its part of one checkpoint and none is left
    # waiting in a collective. The single process is stopped the same way.
    multi_stop = interrupt(multi(200, "--force"), victim=1, run_dir=multi_dir)
    assert "resumed from the checkpoint at step 3" in RunFolder(multi_dir).log_path.read_text()
    assert (RunFolder(multi_dir).checkpoints / str(multi_stop)).exists()
    single_run = clipctl_run(
        base + ["train.steps=200", f"run.output_dir={single_dir}"], devices=4, extra=("--force",)
    )
    single_stop = interrupt([single_run], victim=0, run_dir=single_dir)
    single, two = train_losses(single_dir), train_losses(multi_dir)
    assert sorted(two) == list(range(1, multi_stop + 1))
    for step in range(4, min(multi_stop, single_stop) + 1):
        assert two[step] == pytest.approx(single[step], rel=1e-4)
    evals = [r for r in RunFolder(multi_dir).metrics() if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [3]
    assert evals[-1]["zero_shot_classes"] == 16


def interrupt(procs: list[subprocess.Popen], victim: int, run_dir, after_step: int = 8) -> int:
    """SIGINT to one process once ``after_step`` is logged; all must exit 130, interrupted
    at one step (returned)."""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and max(train_losses(run_dir)) < after_step:
            assert all(proc.poll() is None for proc in procs), procs[0].stderr.read().decode()
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGINT)
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert codes == [130] * len(procs)
    status = RunFolder(run_dir).status()
    assert status["state"] == "interrupted"
    assert after_step <= status["step"] < 200
    return status["step"]
