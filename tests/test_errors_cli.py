"""One error path: every user mistake is `error: <key or file>: <message>`, exit 2.

The commands raise (``clip_jax.errors.UserError`` where a mistake is found,
``clipctl.errors.CommandFailed`` for an outcome that is nobody's mistake); the clipctl
group alone prints and picks the exit code. A bug still shows its traceback (exit 1).
"""

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from clip_jax.errors import MeshError, PathError, UserError, format_problems
from clip_jax.spec import SpecError
from clipctl import errors
from clipctl.cli import cli
from tests.conftest import QUICKSTART, ROOT


def clipctl(*args, cwd=ROOT):
    """Run clipctl in a fresh interpreter, as a user would (the real trainer)."""
    return subprocess.run(
        [sys.executable, "-m", "clipctl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def spec_with(tmp_path: Path, section: str, table: str) -> Path:
    """The quickstart with one table replaced, its run folder in tmp_path/run."""
    text = QUICKSTART.read_text()
    start = text.index(f"[{section}]")
    end = text.find("\n[", start + 1)
    text = text[:start] + table + (text[end:] if end != -1 else "\n")
    text = text.replace('output_dir = "runs/quickstart"', f'output_dir = "{tmp_path / "run"}"')
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    return spec


# ------------------------------------------------------------------ the error type
def test_a_user_error_carries_its_key_and_says_it():
    error = MeshError("data=3 x fsdp=1 x model=1 = 3 devices, but there are 8", key="sharding.mesh")
    assert isinstance(error, UserError) and error.key == "sharding.mesh"
    assert str(error) == "sharding.mesh: data=3 x fsdp=1 x model=1 = 3 devices, but there are 8"
    assert error.problems == [("sharding.mesh", error.message)]
    assert str(UserError("no key")) == "no key" and UserError("no key").key is None


def test_a_spec_error_is_one_line_per_problem():
    error = SpecError([("train.steps", "must be >= 1"), ("", "override 'x' is odd")])
    assert format_problems(error) == ["train.steps: must be >= 1", "override 'x' is odd"]
    assert error.key == "train.steps"


def test_an_unprintable_key_stays_on_its_line():
    error = UserError("unknown key", key="a\nb\x1e")
    assert format_problems(error) == ["a\\nb\\x1e: unknown key"]


# ------------------------------------------------------------ the one error path
@click.command()
@click.argument("what")
def raising(what: str) -> None:
    """A stand-in command that fails the way it is told to."""
    if what == "user":
        raise PathError("no files match; check the glob", key="data.train")
    if what == "failed":
        raise errors.CommandFailed("the wait timed out")
    raise ZeroDivisionError("a bug")


@pytest.fixture
def group_with_raising():
    cli.add_command(raising)
    yield cli
    cli.commands.pop("raising")


def test_the_group_prints_a_user_error_in_one_line_and_exits_2(group_with_raising):
    result = CliRunner().invoke(group_with_raising, ["raising", "user"])
    assert result.exit_code == 2
    assert result.stderr == "error: data.train: no files match; check the glob\n"
    assert result.stdout == ""


def test_a_failure_that_is_no_mistake_is_one_line_and_exit_1(group_with_raising):
    result = CliRunner().invoke(group_with_raising, ["raising", "failed"])
    assert result.exit_code == 1
    assert result.stderr == "error: the wait timed out\n"


def test_a_bug_keeps_its_traceback(group_with_raising):
    result = CliRunner().invoke(group_with_raising, ["raising", "bug"])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)  # click's main re-raises it


def test_nested_group_commands_share_the_path(tmp_path):
    runner = CliRunner()
    (tmp_path / "mine.txt").write_text("mine")
    result = runner.invoke(cli, ["data", "synth", str(tmp_path), "--train-examples", "8"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path}: ") and "Traceback" not in result.stderr
    result = runner.invoke(cli, ["templates", "copy", "quikstart", str(tmp_path / "x.toml")])
    assert result.exit_code == 2
    assert "did you mean 'quickstart'?" in result.stderr


@pytest.mark.parametrize("command", ["plot", "stop", "resume"])
def test_a_folder_that_is_no_run_is_a_user_error(command, tmp_path):
    result = CliRunner().invoke(cli, [command, str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {tmp_path} is not a run folder (no spec.resolved.toml or status.json)\n"
    )


def test_a_mesh_that_does_not_fit_the_devices_names_sharding_mesh():
    args = ["info", QUICKSTART, "sharding.mesh.data=3", "--devices", "8", "--no-memory"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: sharding.mesh: data=3 x fsdp=1 x model=1 = 3 ")
    assert len(result.stderr.splitlines()) == 1


def test_predict_options_are_checked_before_any_model_is_loaded():
    result = CliRunner().invoke(cli, ["predict", "nowhere", "--image", "x.png", "--labels", ","])
    assert result.exit_code == 2
    assert result.stderr == "error: --labels: give at least one class name\n"


# ------------------------------------- mistakes found by the data and trainer code
# These need the data/trainer checks that run before the run folder is written.
@pytest.mark.slow
def test_run_with_a_glob_that_matches_nothing_names_data_train(tmp_path):
    glob = tmp_path / "shards" / "*.tfrecord"
    spec = spec_with(tmp_path, "data", f'[data]\nsource = "tfrecord"\ntrain = "{glob}"\n')
    result = clipctl("run", spec)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: data.train: ") and str(glob) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_with_a_missing_tokenizer_file_names_tokenizer_path(tmp_path):
    missing = tmp_path / "tokenizer.json"
    spec = spec_with(
        tmp_path, "tokenizer", f'[tokenizer]\nname = "bpe"\nvocab_size = 1024\npath = "{missing}"\n'
    )
    result = clipctl("run", spec)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: tokenizer.path: ") and str(missing) in line
    assert not (tmp_path / "run").exists()
