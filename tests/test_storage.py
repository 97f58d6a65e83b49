"""Run folders on URLs (gs://), through clip_jax.storage.

There is no cloud here: the URL tests use TensorFlow's in-memory ``ram://`` file system,
served by the same ``tf.io.gfile`` calls that serve gs://. ram:// lives in one process,
so the CLI is exercised in-process (CliRunner). Orbax cannot checkpoint to ram:// (it
sends every non-gs:// path to tensorstore's local-file driver): that refusal is tested,
and a gs:// checkpoint directory is checked to reach orbax unmangled.
"""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from clip_jax import storage
from clip_jax.errors import PathError
from clip_jax.run_folder import RunFolder
from clipctl.cli import cli


@pytest.fixture
def ram_url() -> str:
    """A fresh ram:// folder (ram:// is process-wide, so each test takes its own name;
    the few bytes written go with the test process)."""
    return f"ram://clip-jax-tests/{uuid.uuid4().hex}"


def gfile_text(url: str) -> str:
    """What another reader of the store sees, bypassing clip_jax.storage."""
    import tensorflow as tf

    with tf.io.gfile.GFile(url, "rb") as f:
        return f.read().decode()


# ------------------------------------------------------------------ the layer
def test_local_paths_stay_pathlib_and_urls_keep_their_scheme():
    assert storage.path("runs/x") == Path("runs/x")
    url = storage.path("gs://bucket/runs/x/")
    assert isinstance(url, storage.UrlPath)
    assert str(url / "checkpoints") == "gs://bucket/runs/x/checkpoints"
    assert (url / "metrics.jsonl").name == "metrics.jsonl"
    assert str(url.parent) == "gs://bucket/runs"
    assert str((url / "a.json").with_name("b.json")) == "gs://bucket/runs/x/b.json"
    assert storage.is_url("ram://x") and not storage.is_url("/tmp/gs:/x")


def test_reading_a_local_run_folder_imports_neither_jax_nor_tensorflow(tmp_path):
    code = (
        "import sys; from clip_jax.run_folder import RunFolder\n"
        f"f = RunFolder({str(tmp_path / 'run')!r})\n"
        "f.write_spec('[run]\\n'); f.append_metrics({'step': 1}); f.log('hi')\n"
        "f.write_status('running', step=1); list(f.metrics()); f.status(); f.flush()\n"
        "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_local_appends_are_written_at_once(tmp_path):
    folder = RunFolder(tmp_path, flush_s=3600)
    folder.append_metrics({"step": 1})
    folder.append_metrics({"step": 2})
    folder.log("two lines")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / "run.log").read_text().endswith(" two lines\n")


# ------------------------------------------------------- a run folder on ram://
def test_run_folder_files_live_on_the_url(ram_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would land here
    folder = RunFolder(ram_url)
    assert not folder.exists() and folder.status() == {"state": "new"}
    folder.write_spec('[run]\noutput_dir = "x"\n')
    folder.write_status("finished", step=3, steps=3)
    folder.append_metrics({"step": 3, "split": "validation", "loss": 0.5})
    folder.log("hello")
    folder.flush()

    assert folder.exists() and folder.read_spec() == {"run": {"output_dir": "x"}}
    assert folder.status()["state"] == "finished"
    assert folder.last_eval() == {"step": 3, "split": "validation", "loss": 0.5}
    assert json.loads(gfile_text(f"{ram_url}/status.json"))["step"] == 3
    assert gfile_text(f"{ram_url}/run.log").endswith(" hello\n")
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "metrics.jsonl",
        "run.log",
        "spec.resolved.toml",
        "status.json",
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written to a local "ram:" folder


def test_url_appends_are_batched_and_written_before_a_state_change(ram_url):
    folder = RunFolder(ram_url, flush_s=3600)
    folder.write_spec("")
    metrics_url, status_url = f"{ram_url}/metrics.jsonl", f"{ram_url}/status.json"
    folder.append_metrics({"step": 1})  # the first append is written at once
    folder.append_metrics({"step": 2})  # the next waits for the flush interval
    assert gfile_text(metrics_url) == '{"step": 1}\n'
    folder.write_status("running", step=2)  # the first "running" flushes everything
    assert gfile_text(metrics_url) == '{"step": 1}\n{"step": 2}\n'
    folder.append_metrics({"step": 3})
    folder.write_status("running", step=3)  # later ones wait with the records
    assert gfile_text(metrics_url) == '{"step": 1}\n{"step": 2}\n'
    assert json.loads(gfile_text(status_url))["step"] == 2

    folder.write_status("finished", step=3)  # a state change: records first, then it
    assert gfile_text(metrics_url) == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert json.loads(gfile_text(status_url))["state"] == "finished"


def test_url_appends_continue_a_file_and_truncate(ram_url):
    first = RunFolder(ram_url)
    first.write_spec("")
    for step in (1, 2, 3):
        first.append_metrics({"step": step})
    first.flush()
    resumed = RunFolder(ram_url, flush_s=0)  # a new process continues the same file
    resumed.truncate_metrics(2)
    resumed.append_metrics({"step": 3, "again": True})
    lines = gfile_text(f"{ram_url}/metrics.jsonl").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1},
        {"step": 2},
        {"step": 3, "again": True},
    ]


def test_pending_appends_are_written_at_exit(ram_url):
    folder = RunFolder(ram_url, flush_s=3600)
    folder.write_spec("")
    folder.log("first")
    folder.log("last words")
    assert "last words" not in gfile_text(f"{ram_url}/run.log")
    storage.flush_at_exit()  # what atexit runs
    assert gfile_text(f"{ram_url}/run.log").endswith(" last words\n")


@pytest.fixture
def store_fails(monkeypatch):
    """``store_fails(n)``: the next ``n`` object writes fail as a store error would."""
    real = storage.UrlPath.write_text
    failures = [0]

    def write_text(self, text, encoding="utf-8"):
        if failures[0] > 0:
            failures[0] -= 1
            raise storage.StorageError("503 backend unavailable", key=str(self))
        real(self, text, encoding)

    monkeypatch.setattr(storage.UrlPath, "write_text", write_text)
    return lambda n: failures.__setitem__(0, n)


def test_a_failed_rewrite_loses_and_repeats_nothing(ram_url, store_fails):
    appender = storage.Appender(storage.path(f"{ram_url}/run.log"), flush_s=3600)
    appender.append("one\n")  # the first append is written at once
    appender._pending.append("two\n")
    store_fails(1)
    with pytest.raises(storage.StorageError):
        appender.flush()  # a direct flush says the lines are not there...
    appender.flush()  # ...and the next one writes them once
    assert gfile_text(f"{ram_url}/run.log") == "one\ntwo\n"


def test_a_store_error_on_a_timed_write_is_a_warning_not_the_end_of_the_run(
    ram_url, store_fails, caplog
):
    folder = RunFolder(ram_url, flush_s=0)
    folder.write_spec("")
    store_fails(2)
    folder.append_metrics({"step": 1})  # fails: warned, kept
    folder.append_metrics({"step": 2})  # fails again: no second warning
    folder.write_status("running", step=2)  # the store is back: all of it, once
    warnings = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0].getMessage()
    assert gfile_text(f"{ram_url}/metrics.jsonl") == '{"step": 1}\n{"step": 2}\n'
    assert json.loads(gfile_text(f"{ram_url}/status.json"))["step"] == 2


def test_records_before_a_checkpoint_or_an_evaluation_are_written_with_it(ram_url):
    """A resume keeps the records up to its checkpoint: on a URL they must be written
    by then, not at the next timed write (which a killed run never reaches)."""
    from clip_jax.train.events import RunFolderWriter

    folder = RunFolder(ram_url, flush_s=3600)
    folder.write_spec("")
    writer = RunFolderWriter(folder, total=4)
    for step in (1, 2):
        writer.on_step(step, {"loss": 1.0})
    writer.on_checkpoint(2)
    assert [r["step"] for r in RunFolder(ram_url).metrics()] == [1, 2]
    writer.on_step(3, {"loss": 1.0})
    writer.on_eval(3, {"accuracy": 0.5})
    assert [r["step"] for r in RunFolder(ram_url).metrics()] == [1, 2, 3, 3]


def test_a_url_runs_status_is_as_written_a_local_one_is_checked(ram_url, tmp_path):
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(ended.stdout)  # a process that is gone
    for where in (ram_url, tmp_path):
        RunFolder(where).write_spec("")
        RunFolder(where).write_status("running", pid=pid, step=1)
    assert RunFolder(tmp_path).status()["state"] == "failed"  # its process is gone
    assert RunFolder(ram_url).status()["state"] == "running"  # may be on another machine


def test_staged_and_local_copies_carry_files_for_local_only_libraries(ram_url):
    target = storage.path(f"{ram_url}/tokenizer.json")
    with storage.staged(target) as local:
        assert isinstance(local, Path)
        local.write_text('{"model": "bpe"}')
    assert gfile_text(str(target)) == '{"model": "bpe"}'
    with storage.local_copy(target) as local:
        assert local.read_text() == '{"model": "bpe"}'
    with storage.local_copy(None) as nothing:
        assert nothing is None


def test_missing_url_files_raise_file_not_found(ram_url):
    with pytest.raises(FileNotFoundError):
        storage.path(f"{ram_url}/nothing.json").read_text()


# --------------------------------------------------------------------- clipctl
def test_clipctl_runs_lists_url_runs_and_stop_refuses_them(ram_url):
    folder = RunFolder(f"{ram_url}/exp/a")
    folder.write_spec("[train]\nsteps = 10\nbatch_size = 8\n")
    folder.write_status("running", pid=1, step=4, steps=10)
    folder.append_metrics({"step": 4, "split": "train", "loss": 1.25})
    runner = CliRunner()

    listed = runner.invoke(cli, ["runs", ram_url, "--json"])
    assert listed.exit_code == 0, listed.output
    (run,) = json.loads(listed.stdout)
    assert (run["name"], run["state"], run["step"], run["loss"]) == ("exp/a", "running", 4, 1.25)
    assert run["path"] == f"{ram_url}/exp/a"

    stopped = runner.invoke(cli, ["stop", f"{ram_url}/exp/a"])
    assert stopped.exit_code == 2
    assert "cannot be stopped from here" in stopped.output
    assert "Traceback" not in stopped.output

    missing = runner.invoke(cli, ["runs", f"{ram_url}/nowhere"])
    assert missing.exit_code == 2 and "no folder" in missing.output


# ----------------------------------------------------------------- checkpoints
def test_checkpoint_directories_reach_orbax_unmangled(tmp_path, monkeypatch):
    from clip_jax.train.checkpoint import checkpoint_directory

    monkeypatch.chdir(tmp_path)
    assert checkpoint_directory("runs/x/checkpoints") == tmp_path / "runs/x/checkpoints"
    gs = checkpoint_directory(storage.path("gs://bucket/runs/x") / "checkpoints")
    assert str(gs) == "gs://bucket/runs/x/checkpoints"  # not made relative to the cwd
    with pytest.raises(PathError) as refused:
        checkpoint_directory("ram://bucket/runs/x/checkpoints")
    assert refused.value.key == "run.output_dir" and "ram://" in refused.value.message


# ------------------------------------------------------------- the trainer's uses
@pytest.mark.slow
def test_the_trainer_keeps_its_tokenizer_in_a_url_run_folder(small_run, ram_url):
    from clip_jax.components import components
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import load_tokenizer
    from tests.conftest import QUICKSTART

    spec = load_spec(QUICKSTART, small_run + [f"run.output_dir={ram_url}"])
    comps = components(spec)
    folder = RunFolder(ram_url)
    trained = load_tokenizer(comps, folder, comps.data.train_files)
    assert json.loads(gfile_text(f"{ram_url}/tokenizer.json"))  # saved through gfile
    reloaded = load_tokenizer(comps, folder, train_files=[])  # no captions: the saved copy
    captions = ["a small red circle at the top left", "a large blue square"]
    assert reloaded.vocab_size == trained.vocab_size
    assert (reloaded(captions) == trained(captions)).all()


@pytest.mark.slow
def test_a_run_on_a_scheme_orbax_cannot_write_is_refused_before_its_folder_exists(
    small_run, ram_url
):
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from tests.conftest import QUICKSTART

    spec = load_spec(QUICKSTART, small_run + [f"run.output_dir={ram_url}"])
    with pytest.raises(PathError) as refused:
        train(spec)
    assert refused.value.key == "run.output_dir" and "ram://" in refused.value.message
    assert not storage.path(ram_url).exists()


@pytest.mark.slow
def test_clipctl_runs_on_an_unreachable_bucket_is_one_line_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "clipctl.cli", "runs", "gs://clip-jax-tests-no-such-bucket/runs"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "no folder gs://clip-jax-tests-no-such-bucket/runs" in done.stderr
    assert "Traceback" not in done.stderr
