"""Experiment loggers: the ``[logging]`` table, the built-in jsonl and tensorboard
loggers, the wandb plugin (offline), and trackers that fail without stopping a run."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clip_jax.plugins import get_registry, hookimpl
from clip_jax.run_folder import RunFolder
from clip_jax.spec import SpecError, to_dict, to_toml, validate
from clip_jax.train.events import Events, Subscriber, Tolerant
from clipctl.cli import cli
from tests.conftest import QUICKSTART

pytestmark = pytest.mark.usefixtures("fresh_registry")  # and `plugin`: tests/conftest.py


# ----------------------------------------------------------------- test plugins
class FailsAtStart:
    """A tracker whose start fails, as wandb does when nobody is logged in."""

    @hookimpl
    def register_loggers(self, register):
        def factory(options, run):
            raise PermissionError("not logged in")

        register("test-fails-at-start", factory)


class FailsLater(Subscriber):
    """A tracker that starts, then fails at its second train record (a full disk)."""

    def __init__(self):
        self.steps = []

    def on_step(self, step, record):
        self.steps.append(step)
        if len(self.steps) == 2:
            raise OSError("no space left on device")


class FailsLaterPlugin:
    @hookimpl
    def register_loggers(self, register):
        register("test-fails-later", lambda options, run: FailsLater())


class BrokenLoggerPlugin:
    """A logger plugin whose hook raises: nothing of it is registered."""

    @hookimpl
    def register_loggers(self, register):
        raise RuntimeError("the tracker's SDK is missing")


# ------------------------------------------------------------------------ spec
def test_a_spec_without_logging_resolves_as_before():
    spec = validate({})
    assert spec.logging.loggers == ["jsonl"]
    assert "logging" not in to_dict(spec)  # spec.resolved.toml unchanged by the feature
    assert "[logging" not in to_toml(spec)


def test_listed_loggers_get_their_option_tables():
    spec = validate({"logging": {"loggers": ["jsonl", "tensorboard"]}})
    assert spec.logging.tensorboard.flush_seconds == 10.0
    written = to_dict(spec)["logging"]
    assert written == {"loggers": ["jsonl", "tensorboard"], "tensorboard": {"flush_seconds": 10.0}}
    assert validate(to_dict(spec)) == spec  # the resolved spec reads back the same


def test_wandb_options_are_the_plugins_and_validated():
    spec = validate(
        {"logging": {"loggers": ["wandb"], "wandb": {"project": "clip", "mode": "offline"}}}
    )
    assert spec.logging.wandb.project == "clip"
    assert get_registry().get("logger", "wandb").plugin == "wandb"
    with pytest.raises(SpecError) as info:
        validate({"logging": {"loggers": ["wandb"], "wandb": {"mode": "loud", "projekt": "x"}}})
    problems = dict(info.value.problems)
    assert set(problems) == {"logging.wandb.mode", "logging.wandb.projekt"}
    assert "did you mean 'logging.wandb.project'" in problems["logging.wandb.projekt"]


def test_unknown_or_repeated_logger_is_a_spec_error_naming_logging_loggers():
    with pytest.raises(SpecError) as info:
        validate({"logging": {"loggers": ["jsonl", "tensorbord", "jsonl"]}})
    assert info.value.key == "logging.loggers"
    messages = [m for path, m in info.value.problems if path == "logging.loggers"]
    assert "unknown logger 'tensorbord'; did you mean 'tensorboard'?" in messages[0]
    assert messages[1] == "'jsonl' is listed twice"


def test_an_unlisted_loggers_table_is_still_checked():
    # switching a configured tracker on or off is one edit of logging.loggers
    spec = validate({"logging": {"tensorboard": {"flush_seconds": 1}}})
    assert spec.logging.loggers == ["jsonl"]
    with pytest.raises(SpecError) as info:
        validate({"logging": {"tensorboard": {"flush_seconds": 0}, "jsonl": {"x": 1}}})
    assert {p for p, _ in info.value.problems} == {
        "logging.tensorboard.flush_seconds",
        "logging.jsonl",
    }


def test_a_broken_logger_plugin_stops_clipctl_run_before_anything_starts(plugin, tmp_path):
    plugin(BrokenLoggerPlugin(), "test-broken-logger")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(QUICKSTART),
            'logging.loggers=["jsonl", "test-tracker"]',
            f"run.output_dir={out}",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "logging.loggers: unknown logger 'test-tracker'" in result.stderr
    assert "test-broken-logger" in result.stderr
    assert "the tracker's SDK is missing" in result.stderr
    assert not out.exists()


def test_plugins_lists_the_loggers(plugin):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["builtins"]["registers"]["logger"] == ["jsonl", "tensorboard"]
    assert plugins["wandb"]["registers"] == {"logger": ["wandb"]}
    assert plugins["wandb"]["distribution"] == "clip-jax-wandb"
    assert plugins["wandb"]["errors"] == []


# -------------------------------------------------------------------- tolerant
def test_a_failing_subscriber_warns_once_and_is_switched_off():
    messages = []
    failing = FailsLater()

    class Later(Subscriber):
        steps = []

        def on_step(self, step, record):
            self.steps.append(step)

    events = Events()
    events.subscribe(Tolerant(failing, "disk", events.message))
    events.subscribe(Later())
    events.subscribe(type("Log", (Subscriber,), {"on_message": lambda s, t: messages.append(t)})())
    for step in (1, 2, 3, 4):
        events.emit("step", step, {"loss": 1.0})
    events.emit("finish", 4, {})
    assert failing.steps == [1, 2]  # not called after its failure
    assert Later.steps == [1, 2, 3, 4]  # the others go on
    assert len(messages) == 1
    assert "logger 'disk' failed in on_step (OSError: no space left on device)" in messages[0]
    assert messages[0].startswith("warning: ")


def test_the_jsonl_logger_is_a_name_not_a_second_writer():
    """The trainer's RunFolderWriter keeps the run folder; a second writer on a URL
    folder would be a second Appender, and the two would overwrite each other's lines."""
    import uuid

    from clip_jax.train.loggers import RunContext, jsonl_logger

    url = f"ram://clip-jax-tests/{uuid.uuid4().hex}"
    folder = RunFolder(url)
    folder.write_spec("")
    folder.append_metrics({"step": 5, "split": "train"})  # the trainer's writer
    logger = jsonl_logger(None, RunContext("x", folder.path, {}, 10))
    logger.on_step(6, {"loss": 2.0})
    logger.on_finish(10, {})
    assert [r["step"] for r in RunFolder(url).metrics()] == [5]  # it wrote nothing
    assert not (folder.path / "status.json").exists()


def test_loggers_can_change_when_a_run_resumes(tmp_path):
    from clip_jax.run_folder import RunFolderConflict, check_run_folder

    folder = RunFolder(tmp_path / "run")
    folder.write_spec(to_toml(validate({})))  # a run made before [logging] existed
    check_run_folder(folder, validate({"logging": {"loggers": ["tensorboard"]}}), False)
    with pytest.raises(RunFolderConflict, match="train.steps"):  # what trains still counts
        check_run_folder(folder, validate({"train": {"steps": 7}}), False)


def test_a_run_folder_keeps_its_wandb_run_id(tmp_path):
    from clip_jax_wandb.logger import RUN_ID_FILE, _run_id

    first = _run_id(tmp_path)
    assert first.isalnum() and first == first.lower()
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    assert _run_id(tmp_path) == first  # resuming the folder resumes the W&B run
    assert _run_id(tmp_path / ".." / tmp_path.name) == first


# ------------------------------------------------------------------ end to end
def tensorboard_events(logdir):
    """{tag: [(step, value)]} of every event file under ``logdir``, read by TensorFlow's
    own event reader; text summaries as str."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                item = array.item() if array.ndim == 0 else array.tolist()
                if isinstance(item, bytes):
                    item = item.decode()
                found.setdefault(value.tag, []).append((event.step, item))
    return found


@pytest.mark.slow
def test_quickstart_logs_to_tensorboard_and_offline_wandb(small_run, tmp_path, monkeypatch, plugin):
    """Only tensorboard and wandb listed (no jsonl): the run folder still has its
    metrics; two trackers that fail each cost one warning and the run finishes."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing is sent
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    (tmp_path / "wandb-files").mkdir()
    plugin(FailsAtStart(), "test-fails-at-start")
    plugin(FailsLaterPlugin(), "test-fails-later")
    loggers = '["tensorboard", "wandb", "test-fails-at-start", "test-fails-later"]'
    overrides = small_run + [
        "train.steps=10",
        "eval.max_examples=64",
        f"logging.loggers={loggers}",
        'logging.wandb.tags=["test"]',
        "logging.wandb.project=clip-jax-tests",
    ]
    result = CliRunner().invoke(cli, ["run", str(QUICKSTART), *overrides])
    assert result.exit_code == 0, result.output
    folder = RunFolder(tmp_path / "run")
    assert folder.status()["state"] == "finished"
    train = [r for r in folder.metrics() if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10]
    final = folder.last_eval()

    # TensorBoard: train/ and eval/ scalars at their steps, the start record
    logged = tensorboard_events(tmp_path / "run" / "tensorboard")
    assert [step for step, _ in logged["train/loss"]] == [5, 10]
    assert logged["train/loss"][-1][1] == pytest.approx(train[-1]["loss"], rel=1e-6)
    eval_keys = [k for k in final if k not in ("step", "split", "time")]
    assert eval_keys and all(f"eval/{k}" in logged for k in eval_keys)
    assert logged[f"eval/{eval_keys[0]}"] == [(10, pytest.approx(final[eval_keys[0]]))]
    total = logged["parameters/total"][0][1]
    assert total > logged["parameters/vision"][0][1] > 0
    assert "steps = 10" in logged["run/spec"][0][1]
    assert "device_kind" in logged["run/machine"][0][1]

    # run.log: the start record, and one warning per failing tracker
    log = folder.log_path.read_text()
    assert f"parameters: total {int(total):,}" in log
    assert log.count("logger 'test-fails-at-start' could not start") == 1
    assert "PermissionError: not logged in" in log
    assert log.count("logger 'test-fails-later' failed in on_step") == 1

    # W&B: one offline run under WANDB_DIR, its history and config read back
    runs = list((tmp_path / "wandb-files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    history, config = wandb_run_file(runs[0] / f"run-{run_id}.wandb")
    assert [row["trainer/step"] for row in history] == [5, 10, 10]  # train, train, eval
    assert history[1]["train/loss"] == pytest.approx(train[-1]["loss"], rel=1e-6)
    assert history[-1][f"eval/{eval_keys[0]}"] == pytest.approx(final[eval_keys[0]])
    assert config["train"]["steps"] == 10  # the resolved spec
    assert config["parameters"]["total"] == total
    assert config["machine"]["devices"] == 8


@pytest.mark.slow
def test_steps_trained_again_reach_wandb_and_tensorboard(tmp_path, monkeypatch):
    """After a guard rollback (or a resume) steps come again: W&B's own step would drop
    them; both trackers log them, and mark the rollback."""
    from clip_jax.schemas import TensorBoardOptions
    from clip_jax.train.loggers import RunContext, tensorboard_logger
    from clip_jax_wandb.logger import wandb_logger
    from clip_jax_wandb.options import WandbOptions

    monkeypatch.delenv("WANDB_DIR", raising=False)  # files in the run folder (dir=)
    run = RunContext("again", tmp_path, {}, 4)
    trackers = [
        wandb_logger(WandbOptions(mode="offline", project="clip-jax-tests"), run),
        tensorboard_logger(TensorBoardOptions(), run),
    ]
    wandb_dir = Path(trackers[0].run.dir).parent  # .../offline-run-<time>-<id>/files
    events = Events(trackers)
    for step in (1, 2, 3):
        events.emit("step", step, {"loss": float(step)})
    events.emit("rollback", 3, 1)
    for step in (2, 3):
        events.emit("step", step, {"loss": step / 10})
    events.emit("eval", 3, {"accuracy": 0.5})
    events.emit("finish", 3, {})
    import wandb

    wandb.teardown()  # finish() may return before wandb's service has written the file

    (run_file,) = wandb_dir.glob("run-*.wandb")
    history, _ = wandb_run_file(run_file)
    train = [(r["trainer/step"], r["train/loss"]) for r in history if "train/loss" in r]
    assert train == [(1, 1.0), (2, 2.0), (3, 3.0), (2, 0.2), (3, pytest.approx(0.3))]
    assert {"trainer/step": 1, "guard/rollback_from": 3.0}.items() <= history[3].items()
    assert history[-1]["eval/accuracy"] == 0.5

    logged = tensorboard_events(tmp_path / "tensorboard")
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 2, 3]
    assert logged["guard/rollback_from"] == [(1, 3.0)]
    assert logged["run/guard"] == [(1, "rollback: steps 2..3 again")]


def wandb_run_file(path):
    """(history rows, config) of an offline W&B run file: wandb keeps no Python reader,
    so this reads its framing (a LevelDB-style log of 32 KiB blocks after a 7-byte
    header; each chunk: CRC, length, type) and parses the records with wandb's protos."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    history, config, pos, pending = [], {}, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # 1: whole record, 2/3: first/middle chunk, 4: last
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        kind_of = record.WhichOneof("record_type")
        items = {
            "history": record.history.item,
            "run": record.run.config.update,  # wandb.init's config
            "config": record.config.update,  # later updates
        }.get(kind_of)
        if items is not None:  # a key is .key, or .nested_key's parts
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            history.append(row) if kind_of == "history" else config.update(row)
    return history, config


def test_a_hard_quit_writes_interrupted_and_calls_no_tracker(tmp_path):
    """A second Ctrl-C the main thread cannot answer quits at once (signals.StopRequest's
    on_quit): the run folder says "interrupted", not "failed" for a process gone, and no
    tracker's network call holds the exit up."""
    from clip_jax.train.events import RunFolderWriter

    folder = RunFolder(tmp_path / "run")
    folder.write_spec("")
    folder.write_status("running", step=3, steps=10)
    called = []
    tracker = type("Tracker", (Subscriber,), {"on_stop": lambda s, step: called.append(step)})()
    events = Events([RunFolderWriter(folder, 10), tracker])
    events.quitting(7)
    status = folder.status()
    assert (status["state"], status["step"], status["steps"]) == ("interrupted", 7, 10)
    assert called == [] and events.ended is None
