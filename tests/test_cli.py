"""clipctl: exit codes, messages, templates, plugins, data synth, and a light start-up."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from clip_jax.plugins import get_registry
from clip_jax.spec import validate
from clipctl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "templates" / "quickstart.toml"


def clipctl(*args, env=None):
    """Run clipctl in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "clipctl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture
def runner():
    get_registry.cache_clear()
    yield CliRunner()
    get_registry.cache_clear()


# ------------------------------------------------------------- validate / show
def test_validate_valid_spec():
    result = clipctl("validate", QUICKSTART, "train.steps=10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "valid"


def test_validate_misspelled_key_exits_2_with_suggestion():
    result = clipctl("validate", QUICKSTART, "train.stpes=10")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "train.stpes" in result.stderr
    assert "did you mean 'train.steps'" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_misspelled_key_in_the_file(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        QUICKSTART.read_text().replace("[model]\n", "[model]\nvision = { widht = 64 }\n")
    )
    result = clipctl("validate", spec)
    assert result.returncode == 2
    assert "model.vision.widht" in result.stderr
    assert "did you mean 'model.vision.width'" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_lists_every_problem(runner):
    result = runner.invoke(
        cli, ["validate", str(QUICKSTART), "loss.name=sigmod", "train.steps=abc", "eval.evry=1"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3
    assert any(line.startswith("error: loss.name: ") and "'sigmoid'" in line for line in lines)
    assert any(line.startswith("error: train.steps: ") for line in lines)
    assert any("did you mean 'eval.every'" in line for line in lines)
    assert "valid" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.toml"], "not found"),
        ([str(QUICKSTART), "novalue"], "key.path=value"),
    ],
)
def test_validate_user_errors_exit_2(runner, args, message):
    result = runner.invoke(cli, ["validate", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_broken_toml_exits_2(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text("[train\n")
    result = clipctl("validate", spec)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {spec}: line 1, column 7: not valid TOML: ")
    assert "Traceback" not in result.stderr


def test_a_missing_spec_names_the_file(runner):
    result = runner.invoke(cli, ["validate", "missing.toml"])
    assert result.exit_code == 2
    assert result.stderr == "error: missing.toml: spec file not found\n"


def test_show_prints_toml_that_revalidates(runner):
    result = runner.invoke(cli, ["show", str(QUICKSTART), "train.steps=7", "loss.name=sigmoid"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert data["train"]["steps"] == 7
    assert data["loss"]["name"] == "sigmoid"
    assert data["model"]["vision"]["width"] > 0  # the preset was applied
    spec = validate(data)
    assert spec.train.steps == 7
    assert spec.loss.init_bias == -10.0


def test_show_invalid_exits_2(runner):
    result = runner.invoke(cli, ["show", str(QUICKSTART), "train.stpes=7"])
    assert result.exit_code == 2
    assert "train.stpes" in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------- templates
def test_templates_lists_quickstart_with_description(runner):
    result = runner.invoke(cli, ["templates"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "quickstart" in lines
    description = lines["quickstart"].removeprefix("quickstart").strip()
    assert description
    assert description == get_registry().templates["quickstart"].description


def test_templates_copy(runner, tmp_path):
    dest = tmp_path / "mine.toml"
    result = runner.invoke(cli, ["templates", "copy", "quickstart", str(dest)])
    assert result.exit_code == 0, result.output
    assert dest.read_text() == QUICKSTART.read_text()
    # into a folder: keeps the template's file name
    result = runner.invoke(cli, ["templates", "copy", "quickstart", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "quickstart.toml").read_text() == QUICKSTART.read_text()


def test_templates_copy_refuses_to_overwrite(runner, tmp_path):
    dest = tmp_path / "mine.toml"
    dest.write_text("# my own spec\n")
    result = runner.invoke(cli, ["templates", "copy", "quickstart", str(dest)])
    assert result.exit_code != 0
    assert "exists" in result.stderr
    assert dest.read_text() == "# my own spec\n"


def test_templates_copy_unknown(runner, tmp_path):
    result = runner.invoke(cli, ["templates", "copy", "quikstart", str(tmp_path / "x.toml")])
    assert result.exit_code != 0
    assert "unknown template 'quikstart'" in result.stderr
    assert "quickstart" in result.stderr
    assert not (tmp_path / "x.toml").exists()


# ------------------------------------------------------------------- plugins
def test_plugins_json(runner):
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    builtins = plugins["builtins"]
    assert builtins["distribution"] == "clip-jax"
    assert builtins["errors"] == []
    assert {"softmax", "sigmoid"} <= set(builtins["registers"]["loss"])
    assert "clip" in builtins["registers"]["architecture"]
    assert "dp" in builtins["registers"]["sharding"]
    assert {"tfrecord", "synthetic"} <= set(builtins["registers"]["data_source"])
    assert "bpe" in builtins["registers"]["tokenizer"]
    assert "adamw" in builtins["registers"]["optimizer"]
    templates = plugins["clipctl-templates"]
    assert templates["distribution"] == "clipctl"
    assert "quickstart" in templates["registers"]["template"]
    for plugin in plugins.values():
        assert set(plugin) == {"name", "distribution", "version", "registers", "errors"}


def test_plugins_text(runner):
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "builtins" in result.stdout
    assert "loss: softmax, sigmoid" in result.stdout
    assert "clipctl-templates" in result.stdout


def test_plugins_shows_a_broken_plugin(runner):
    from clip_jax.plugins import hookimpl, register_plugin, unregister_plugin

    class Broken:
        @hookimpl
        def register_losses(self, register):
            raise ImportError("needs a package that is not installed")

    register_plugin(Broken(), "test-cli-broken")
    try:
        result = runner.invoke(cli, ["plugins", "--json"])
        assert result.exit_code == 0, result.output
        plugins = {p["name"]: p for p in json.loads(result.stdout)}
        assert "needs a package" in plugins["test-cli-broken"]["errors"][0]
        result = runner.invoke(cli, ["plugins"])
        assert "error: register_losses failed" in result.stdout
        # validating a spec that does not use it still works
        result = runner.invoke(cli, ["validate", str(QUICKSTART)])
        assert result.exit_code == 0
        result = runner.invoke(cli, ["validate", str(QUICKSTART), "loss.name=focal"])
        assert result.exit_code == 2
        assert "test-cli-broken" in result.stderr
    finally:
        unregister_plugin("test-cli-broken")


# ------------------------------------------------------------ help and start-up
def test_help():
    result = clipctl("--help")
    assert result.returncode == 0
    for command in ("validate", "show", "run", "eval", "templates", "plugins", "data"):
        assert command in result.stdout
    assert clipctl().returncode == 0  # no arguments: the help (the TUI comes later)


@pytest.mark.parametrize("sub", ["validate", "show", "run", "eval", "templates", "plugins"])
def test_subcommand_help(runner, sub):
    result = runner.invoke(cli, [sub, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_cli_does_not_import_jax_or_tensorflow():
    code = textwrap.dedent(
        f"""
        import sys
        import clipctl.cli
        heavy = ("jax", "tensorflow", "flax", "optax", "orbax")

        def loaded():
            return [m for m in heavy if m in sys.modules]

        assert not loaded(), ("import", loaded())
        for args in (["--help"], ["validate", {str(QUICKSTART)!r}, "train.steps=3"],
                     ["show", {str(QUICKSTART)!r}], ["templates"], ["plugins", "--json"],
                     ["validate", {str(QUICKSTART)!r}, "train.stpes=3"],
                     ["validate", {str(QUICKSTART)!r}, "train.steps=nan", "[=1"],
                     ["validate", "missing.toml"], ["info", "missing.toml"]):
            try:
                clipctl.cli.cli(args, standalone_mode=True)
            except SystemExit as exit:
                assert exit.code in (0, 2, None), (args, exit.code)
            assert not loaded(), (args, loaded())
        print("light")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


# ----------------------------------------------------------------- data synth
@pytest.mark.slow
def test_data_synth(runner, tmp_path):
    out = tmp_path / "synth"
    args = ["data", "synth", str(out), "--train-examples", "64", "--validation-examples", "32"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "64 train and 32 validation examples (16 classes)" in result.stdout
    # small splits still get 8 shards, so that several readers / processes can share them
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        f"{i:05d}.tfrecord" for i in range(8)
    ]
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        f"{i:05d}.tfrecord" for i in range(8)
    ]
    assert len(json.loads((out / "classes.json").read_text())["classes"]) == 16

    from clip_jax.data.pipeline import iterate, make_dataset
    from clip_jax.data.synthetic import make_example

    dataset = make_dataset(
        sorted(str(p) for p in (out / "train").iterdir()), image_size=32, batch_size=64, train=False
    )
    (batch,) = list(iterate(dataset))
    assert batch.captions == [make_example(0, i, 32)[1] for i in range(64)]

    # a second run reuses the folder
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output


def test_data_synth_refuses_foreign_folder(runner, tmp_path):
    (tmp_path / "precious.txt").write_text("do not touch")
    result = runner.invoke(cli, ["data", "synth", str(tmp_path), "--train-examples", "8"])
    assert result.exit_code == 2  # the user's to fix: another folder
    assert result.stderr.startswith(f"error: {tmp_path}: ")
    assert "not written by" in result.stderr
    assert not isinstance(result.exception, FileExistsError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_a_stop_swallowed_in_a_finaliser_prints_no_traceback():
    # SIGTERM during imports raises KeyboardInterrupt; landing in a gc callback, Python
    # "ignores" it with a traceback. The stop is remembered, so that report is noise;
    # other swallowed errors are still reported.
    code = (
        "from clipctl.cli import _interrupt_on_sigterm\n"
        "_interrupt_on_sigterm()\n"
        "class Stop:\n    def __del__(self): raise KeyboardInterrupt\n"
        "class Broken:\n    def __del__(self): raise ValueError('still reported')\n"
        "Stop(); Broken()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "KeyboardInterrupt" not in result.stderr
    assert "ValueError: still reported" in result.stderr


@pytest.mark.slow
def test_info_takes_a_templates_name_for_the_memory_estimate_too(tmp_path, monkeypatch):
    """The parameter table and the memory estimate read the same spec: a template's name
    (all a wheel install has) works for both."""
    from tests.conftest import SMALL_RUN

    monkeypatch.chdir(tmp_path)  # no file called "quickstart" here
    result = CliRunner().invoke(cli, ["info", "quickstart", *SMALL_RUN, "--json"])
    assert result.exit_code == 0, result.output
    (estimate,) = json.loads(result.output)["memory"]["estimates"]
    assert estimate["peak"] > 0
