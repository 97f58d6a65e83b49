"""Checks across spec tables and of the local files a spec names (``spec_checks``):
what `clipctl run` would refuse before training, `clipctl validate` refuses first, with
exit code 2 and the key to change, without importing jax."""

import pytest
from click.testing import CliRunner

from clip_jax.spec import load_spec
from clip_jax.spec_checks import local_path_problems
from clipctl.cli import cli
from tests.conftest import QUICKSTART, clipctl_in_a_fresh_interpreter


@pytest.fixture
def fresh(tmp_path):
    """Overrides for a fresh run whose folder is in tmp_path."""
    return [f"run.output_dir={tmp_path / 'run'}"]


def started_from(tmp_path, tokenizer: bool = True):
    """A run folder to start from, with (or without) the tokenizer it trained."""
    folder = tmp_path / "base"
    folder.mkdir()
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def validate(*overrides):
    return CliRunner().invoke(cli, ["validate", str(QUICKSTART), *map(str, overrides)])


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("tokenizer.path=/nope.json", "error: tokenizer.path: /nope.json does not exist"),
        ("train.init_from={tmp}/nonexistent", "error: train.init_from: {tmp}/nonexistent does not exist"),
    ],
)  # fmt: skip
def test_validate_refuses_a_missing_local_file_naming_its_key(override, line, tmp_path, fresh):
    result = validate(*fresh, override.format(tmp=tmp_path))
    assert result.exit_code == 2, result.output
    assert line.format(tmp=tmp_path) in result.output
    assert "Traceback" not in result.output


def test_a_run_folder_without_its_tokenizer_is_no_start(tmp_path, fresh):
    """A fresh run takes the tokenizer of the run it starts from (its embeddings' ids)."""
    base = started_from(tmp_path, tokenizer=False)
    result = validate(*fresh, f"train.init_from={base}")
    assert result.exit_code == 2, result.output
    assert f"train.init_from: {base} has no tokenizer.json" in result.output


def test_valid_paths_and_urls_still_validate(tmp_path, fresh):
    base = started_from(tmp_path)
    tokenizer = base / "tokenizer.json"
    for overrides in (
        [],
        [f"train.init_from={base}", f"tokenizer.path={tokenizer}"],
        ["train.init_from=gs://bucket/runs/base"],  # the network's: the trainer checks it
        ["tokenizer.path=gs://bucket/tokenizer.json"],
    ):
        result = validate(*fresh, *overrides)
        assert (result.exit_code, result.output) == (0, "valid\n"), overrides


def test_a_resumed_run_no_longer_needs_the_folder_it_started_from(tmp_path):
    """Its own folder has the tokenizer: the trainer never reads init_from again."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")
    spec = load_spec(QUICKSTART, [f"run.output_dir={run}", f"train.init_from={tmp_path}/gone"])
    assert local_path_problems(spec) == []


def test_validate_checks_the_paths_without_importing_jax(tmp_path):
    args = ["validate", str(QUICKSTART), "tokenizer.path=/nope.json"]
    args += [f"train.init_from={tmp_path}/nonexistent", f"run.output_dir={tmp_path}/run"]
    result = clipctl_in_a_fresh_interpreter(args, exit_codes=(2,))
    assert "tokenizer.path: /nope.json does not exist" in result.stderr
    assert "train.init_from:" in result.stderr and "does not exist" in result.stderr
