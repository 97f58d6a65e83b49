"""Progress for a stream that is not a terminal (a log file, CI): plain periodic lines
with step, loss, learning rate, images/s and ETA, every line also in run.log; and the
``Clock`` that measures the images/s and the ``time/*`` figures."""

import io
import re
import time

import pytest

from clip_jax.run_folder import RunFolder
from clip_jax.train.progress import Clock, Progress, format_eta


def metrics(loss=1.23456, lr=1e-3, ips=1280.0, batch_size=64):
    return {"loss": loss, "learning_rate": lr, "images_per_s": ips, "batch_size": batch_size}


def log_lines(folder: RunFolder) -> list[str]:
    # Each log line starts with a "%Y-%m-%d %H:%M:%S " time stamp.
    return [line.split(" ", 2)[2] for line in folder.log_path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (4.9, "0:00:04"), (59, "0:00:59"), (3725, "1:02:05"), (-3, "0:00:00")],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_plain_lines_carry_step_loss_lr_images_per_second_and_eta(tmp_path):
    stream = io.StringIO()
    folder = RunFolder(tmp_path)
    progress = Progress(total=100, start=0, folder=folder, stream=stream)
    assert progress.bar is None  # a StringIO is not a terminal
    progress.update(10, metrics())
    # 90 steps left x 64 images at 1280 images/s = 4.5 s
    line = "step 10/100 | loss 1.2346 | lr 1.00e-03 | 1,280 img/s | ETA 0:00:04"
    assert stream.getvalue() == line + "\n"
    assert log_lines(folder) == [line]
    progress.close()


def test_plain_lines_are_periodic_and_the_last_step_is_always_shown(tmp_path):
    stream = io.StringIO()
    folder = RunFolder(tmp_path)
    # (a period under the machine's uptime: the first line is due at time.monotonic())
    progress = Progress(total=30, start=0, folder=folder, stream=stream, plain_every_s=60)
    for step in (10, 20, 30):
        progress.update(step, metrics())
    shown = stream.getvalue().splitlines()
    # The first update is shown, the second falls within the period, the last is the end.
    assert [line.split(" | ")[0] for line in shown] == ["step 10/30", "step 30/30"]
    assert shown[-1].endswith("ETA 0:00:00")
    # The log gets every update, shown or not.
    assert [line.split(" | ")[0] for line in log_lines(folder)] == [
        "step 10/30",
        "step 20/30",
        "step 30/30",
    ]


def test_every_update_is_shown_with_no_period_and_without_a_rate_the_eta_is_zero(tmp_path):
    stream = io.StringIO()
    progress = Progress(
        total=10, start=0, folder=RunFolder(tmp_path), stream=stream, plain_every_s=0
    )
    progress.update(1, metrics(ips=0.0))  # before the clock has a rate
    progress.update(2, {"loss": 0.5, "learning_rate": 2e-4})  # no images_per_s key at all
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == "step 1/10 | loss 1.2346 | lr 1.00e-03 | 0 img/s | ETA 0:00:00"
    assert lines[1] == "step 2/10 | loss 0.5000 | lr 2.00e-04 | 0 img/s | ETA 0:00:00"


def test_messages_go_to_the_stream_and_the_log_and_quiet_writes_only_the_log(tmp_path):
    stream = io.StringIO()
    loud = Progress(total=10, start=0, folder=RunFolder(tmp_path / "a"), stream=stream)
    (tmp_path / "a").mkdir()
    loud.message("evaluating")
    assert stream.getvalue() == "evaluating\n"
    assert log_lines(loud.folder) == ["evaluating"]

    stream = io.StringIO()
    (tmp_path / "b").mkdir()
    quiet = Progress(total=10, start=0, folder=RunFolder(tmp_path / "b"), stream=stream, quiet=True)
    quiet.message("evaluating")
    quiet.update(10, metrics())
    assert stream.getvalue() == ""
    assert len(log_lines(quiet.folder)) == 2


def test_resume_at_moves_the_step_without_printing(tmp_path):
    stream = io.StringIO()
    progress = Progress(total=100, start=0, folder=RunFolder(tmp_path), stream=stream)
    progress.resume_at(40)
    assert progress.step == 40 and stream.getvalue() == ""


# ---------------------------------------------------------------------------- Clock
def test_clock_lap_splits_the_wall_time_between_steps_eval_and_checkpoint():
    clock = Clock()
    assert not clock.started
    clock.start(step=10)
    assert clock.started
    with clock.timing("eval"):
        time.sleep(0.03)
    with clock.timing("checkpoint"):
        time.sleep(0.02)
    with clock.timing("data_wait"):
        time.sleep(0.01)
    figures = clock.lap(step=14, batch_size=8)
    assert figures["time/eval_s"] >= 0.03
    assert figures["time/checkpoint_s"] >= 0.02
    # images/s counts all the wall time; step time leaves eval and checkpoint out:
    # 4 steps x step_s + eval + checkpoint = the wall time = 32 images / images_per_s.
    elapsed = 4 * 8 / figures["images_per_s"]
    assert elapsed >= 0.06
    assert 4 * figures["time/step_s"] + figures["time/eval_s"] + figures[
        "time/checkpoint_s"
    ] == pytest.approx(elapsed)
    assert 0.01 / elapsed <= figures["time/data_wait_frac"] <= 1.0
    # The lap restarts the clock: nothing carried over, no steps, no rate.
    again = clock.lap(step=14, batch_size=8)
    assert again["images_per_s"] == 0.0 and again["time/step_s"] == 0.0
    assert again["time/eval_s"] == again["time/checkpoint_s"] == 0.0


def test_progress_line_format_is_stable(tmp_path):
    """The format other tools (``clipctl runs``, people's greps) read: fixed fields."""
    stream = io.StringIO()
    progress = Progress(total=1000, start=0, folder=RunFolder(tmp_path), stream=stream)
    progress.update(1, metrics(loss=12.0, lr=3e-5, ips=1234567.0, batch_size=4096))
    pattern = (
        r"step \d+/\d+ \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d,]+ img/s \| "
        r"ETA \d+:\d\d:\d\d"
    )
    assert re.fullmatch(pattern, stream.getvalue().strip())
    assert "1,234,567 img/s" in stream.getvalue()
