"""Fuzzed specs: every template, mutated, through `clipctl validate` and `clipctl run`.

Whatever a person (or a script) writes into a spec, clipctl answers with exit 0 (the
mutation happened to be valid) or exit 2 with one ``error: <key or file>: <message>``
line per problem, naming the key that was changed (or the file's line, for broken TOML);
never a traceback. Mutations: values of the wrong type, out of range, huge, NaN,
unicode; unknown keys; deleted keys and tables; tables replaced by values; broken TOML
syntax; and the same mistakes as command-line overrides.

The `run` path stops before training: the trainer module is replaced by a stand-in, so
jax is never imported and nothing is trained.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_jax.errors import printable
from clip_jax.plugins import get_registry
from clipctl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
# `run` reads the run folder before training: a gs:// one would need the network here.
TEMPLATES = {
    p.stem: re.sub(r'(?m)^output_dir = "gs://[^"]*"', 'output_dir = "runs/fuzzed"', p.read_text())
    for p in sorted((ROOT / "templates").glob("*.toml"))
}
# CLIP_JAX_FUZZ_EXAMPLES=5000 for a longer hunt; the fast tier (-m "not slow") runs 30
# (tests/conftest.py sets the variable there), the full suite 150.
FUZZ = settings(
    max_examples=int(os.environ.get("CLIP_JAX_FUZZ_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LINE = re.compile(r"line \d+, column \d+")


# ------------------------------------------------------------------ strategies
def _paths(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a spec dict: tables and values, nested ones too."""
    found = []
    for key, value in table.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found += _paths(value, (*prefix, key))
    return found


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
scalars = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    text,
    st.sampled_from(["", "hf:/nowhere", "*", "[", "a\x00b", "runs/../..", "é" * 50]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(["x", "stpes", "preset", "name", "mesh"]), text.filter(bool))


@st.composite
def edited_template(draw) -> tuple[str, dict[str, Any], tuple[str, ...], str]:
    """(template name, mutated spec, the key path changed, what was done)."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    raw = tomllib.loads(TEMPLATES[name])
    path = draw(st.sampled_from(_paths(raw)))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["set", "delete", "add"]))
    if action == "set":
        parent[path[-1]] = draw(values)
    elif action == "delete":
        del parent[path[-1]]
    else:  # a new key beside the chosen one
        key = draw(keys.filter(lambda k: k not in parent))
        parent[key] = draw(values)
        path = (*path[:-1], key)
    return name, raw, path, action


@st.composite
def broken_text(draw) -> tuple[str, str]:
    """(template name, its text with characters inserted, a line deleted or cut short)."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    lines = TEMPLATES[name].splitlines(keepends=True)
    at = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["insert", "delete", "truncate"]))
    if how == "delete":
        del lines[at]
    elif how == "truncate":
        lines[at] = lines[at][: draw(st.integers(0, len(lines[at])))]
    else:
        snippet = draw(st.sampled_from(["[", "]", "=", '"', "[[x]]", "= =", "\\", "{", "é"]) | text)
        column = draw(st.integers(0, len(lines[at])))
        lines[at] = lines[at][:column] + snippet + lines[at][column:]
    return name, "".join(lines)


@st.composite
def override(draw) -> tuple[str, str]:
    """(key path, ``key=value``): template keys and made-up ones, any value text."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    known = [".".join(p) for p in _paths(tomllib.loads(TEMPLATES[name]))]
    made_up = st.builds(".".join, st.lists(keys, min_size=1, max_size=3))
    # "-..." is an option to click, which answers with its usage (exit 2) as for any typo
    key = draw((st.sampled_from(known) | made_up).filter(lambda k: not k.startswith("-")))
    value = draw(
        st.sampled_from(["abc", "-1", "0", "1e400", "nan", "inf", "[1, 2]", "{a = 1}", "true"])
        | st.integers().map(str)
        | text
    )
    return key, f"{key}={value}"


# --------------------------------------------------------------------- checks
@pytest.fixture(autouse=True)
def stand_in_trainer(monkeypatch):
    """`clipctl run` gets as far as calling the trainer, which records and returns."""
    calls = []
    trainer = types.ModuleType("clip_jax.train.trainer")

    def train(spec, force=False):
        calls.append(spec)
        return {"step": 0}

    trainer.train = train
    monkeypatch.setitem(sys.modules, "clip_jax.train.trainer", trainer)
    get_registry.cache_clear()
    return calls


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback: the bug this file looks for
    return result


def error_lines(result) -> list[str]:
    """The stderr lines; each must be one ``error: <where>: <what>`` line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert lines, "exit 2 without a message"
    assert "Traceback" not in result.stderr
    for line in lines:
        assert line.startswith("error: "), line
    return [line.removeprefix("error: ") for line in lines]


def names_the_key(lines: list[str], path: tuple[str, ...]) -> bool:
    """Some line's location is the key, a table around it, a key under it, or (for a
    change that moves a whole section, like a component's selector) in its section."""
    dotted, section = printable(".".join(path)), printable(path[0])
    for line in lines:
        where = line.split(": ", 1)[0]
        if dotted.startswith(where) or where.startswith(dotted) or where.split(".")[0] == section:
            return True
    return False


def check_spec(spec_file: Path, *overrides: str) -> list[str] | None:
    """`validate` and `run` agree: both exit 0, or both exit 2 with the same lines; a
    valid spec's `show` output is itself a valid spec."""
    checked = invoke("validate", str(spec_file), *overrides)
    ran = invoke("run", str(spec_file), *overrides, "--force")
    if checked.exit_code == 0:
        assert checked.stdout.strip() == "valid"
        assert ran.exit_code == 0, ran.output
        shown = invoke("show", str(spec_file), *overrides)
        assert shown.exit_code == 0, shown.output
        with tempfile.TemporaryDirectory() as folder:  # never beside a template
            resolved = Path(folder) / "resolved.toml"
            resolved.write_text(shown.stdout, encoding="utf-8")
            assert invoke("validate", str(resolved)).exit_code == 0
        return None
    lines = error_lines(checked)
    assert error_lines(ran) == lines
    return lines


# ---------------------------------------------------------------------- tests
def write(folder: str, raw: dict[str, Any]) -> Path:
    """The spec as a file (`run` only reads its run folder before training)."""
    spec_file = Path(folder) / "spec.toml"
    spec_file.write_text(tomlkit.dumps(raw), encoding="utf-8")
    return spec_file


@functools.cache
def own_problems(name: str) -> frozenset[str]:
    """What a template says unmutated: from-pretrained names weights to download first."""
    spec_file = ROOT / "templates" / f"{name}.toml"
    result = CliRunner().invoke(cli, ["validate", str(spec_file)])
    return frozenset() if result.exit_code == 0 else frozenset(error_lines(result))


@FUZZ
@given(edited_template())
def test_a_mutated_template_is_valid_or_names_the_key(case):
    name, raw, path, action = case
    with tempfile.TemporaryDirectory() as folder:
        lines = check_spec(write(folder, raw))
    new = [line for line in lines or [] if line not in own_problems(name)]
    if new:
        assert names_the_key(new, path), (name, action, path, new)


@FUZZ
@given(broken_text())
def test_broken_toml_names_the_file_and_line(case):
    name, source = case
    with tempfile.TemporaryDirectory() as folder:
        spec_file = Path(folder) / "spec.toml"
        spec_file.write_text(source, encoding="utf-8")
        try:
            tomllib.loads(source)
        except tomllib.TOMLDecodeError:
            lines = check_spec(spec_file)
            assert lines is not None and len(lines) == 1
            assert lines[0].startswith(f"{spec_file}: "), lines
            assert LINE.search(lines[0]), lines
        else:  # still TOML: a spec mistake, if any, names its key
            for line in check_spec(spec_file) or []:
                assert ": " in line and not line.startswith(": "), line


@FUZZ
@given(override())
def test_a_wrong_override_names_its_key(case):
    key, item = case
    template = ROOT / "templates" / "quickstart.toml"
    with tempfile.TemporaryDirectory() as folder:
        lines = check_spec(template, f"run.output_dir={Path(folder) / 'run'}", item)
        assert not (Path(folder) / "run").exists()  # nothing written before training
    if lines is None:
        return
    bad_form = any(line.startswith("override ") for line in lines)
    assert bad_form or names_the_key(lines, tuple(key.strip().split("."))), (item, lines)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_is_valid_through_both_commands(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/quickstart) the same wherever it runs
    spec_file = write(str(tmp_path), tomllib.loads(TEMPLATES[name]))
    lines = check_spec(spec_file)
    # until its weights are downloaded, or the quickstart has run, as each says
    if name in ("from-pretrained", "lit", "finetune-classifier"):
        assert [line.split(": ")[0] for line in lines] == ["train.init_from"]
    else:
        assert lines is None


def test_the_run_path_reaches_the_trainer_only_when_valid(tmp_path, stand_in_trainer):
    # the stand-in is what makes the tests above stop before training: prove it is used
    spec_file = write(str(tmp_path), tomllib.loads(TEMPLATES["quickstart"]))
    # its own run folder: a finished runs/quickstart in the working directory (the
    # README's first command) would make `run` say "already finished" and stop there
    fresh = f"run.output_dir={tmp_path / 'run'}"
    assert invoke("run", str(spec_file), fresh).exit_code == 0
    assert len(stand_in_trainer) == 1
    assert invoke("run", str(spec_file), "train.steps=0").exit_code == 2
    assert len(stand_in_trainer) == 1
