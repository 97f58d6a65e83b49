"""The run spec: TOML + overrides -> a validated, frozen RunSpec with clear errors."""

import tomllib
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_jax.presets import CLIP_PRESETS
from clip_jax.spec import (
    SpecError,
    apply_overrides,
    diff,
    load_spec,
    parse_override,
    read_toml,
    to_dict,
    to_toml,
    validate,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "templates" / "quickstart.toml"


def problems_of(raw=None, overrides=()) -> dict[str, str]:
    """Validate and return {key path: message}; fail if the spec is valid."""
    with pytest.raises(SpecError) as info:
        if raw is None:
            load_spec(QUICKSTART, overrides)
        else:
            validate(apply_overrides(raw, overrides))
    return dict(info.value.problems)


# ------------------------------------------------------------------------ valid specs
def test_quickstart_loads():
    raw = tomllib.loads(QUICKSTART.read_text())
    spec = load_spec(QUICKSTART)
    # the keys tools outside the code rely on
    assert spec.run.output_dir == raw["run"]["output_dir"]
    assert spec.train.steps == raw["train"]["steps"]
    assert spec.train.batch_size == raw["train"]["batch_size"]
    assert spec.loss.name == raw["loss"]["name"]
    assert spec.model.architecture == raw["model"]["architecture"]
    # every value the file sets is the value the spec holds
    for section, table in raw.items():
        for key, value in table.items():
            assert getattr(getattr(spec, section), key) == value, f"{section}.{key}"
    # the preset filled in the towers
    preset = CLIP_PRESETS[raw["model"]["preset"]]
    for tower in ("vision", "text"):
        for key, value in preset[tower].items():
            assert getattr(getattr(spec.model, tower), key) == value, f"model.{tower}.{key}"


def test_empty_spec_gets_defaults():
    spec = validate({})
    assert spec.loss.name == "softmax"
    assert spec.model.architecture == "clip"
    assert spec.optimizer.name == "adamw"
    assert spec.train.steps == 1000
    assert spec.eval.max_examples is None


def test_component_options_follow_the_selected_component():
    spec = load_spec(QUICKSTART, ["loss.name=sigmoid"])
    assert spec.loss.name == "sigmoid"
    assert spec.loss.init_temperature == 10.0
    assert spec.loss.init_bias == -10.0
    # a softmax-only option is an unknown key of the sigmoid loss
    problems = problems_of(overrides=["loss.name=sigmoid", "loss.max_temperature=50"])
    assert list(problems) == ["loss.max_temperature"]
    assert "unknown key" in problems["loss.max_temperature"]


def test_spec_is_frozen():
    spec = load_spec(QUICKSTART)
    with pytest.raises(pydantic.ValidationError):
        spec.train.steps = 3


# -------------------------------------------------------------------- invalid values
@pytest.mark.parametrize(
    ("override", "path"),
    [
        ('train.steps="abc"', "train.steps"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("model.vision.width=wide", "model.vision.width"),
        ("model.text.causal=maybe", "model.text.causal"),
        ("optimizer.learning_rate=-1.0", "optimizer.learning_rate"),
        ("data.train_examples=[1, 2]", "data.train_examples"),
    ],
)
def test_invalid_value_names_full_path(override, path):
    problems = problems_of(overrides=[override])
    assert list(problems) == [path]


def test_invalid_type_message_shows_value():
    problems = problems_of(overrides=['train.steps="abc"'])
    assert "'abc'" in problems["train.steps"]
    error = str(SpecError(list(problems.items())))
    assert error.startswith("train.steps: ")


def test_cross_field_check_names_its_table():
    problems = problems_of(overrides=["model.vision.image_size=30"])
    assert list(problems) == ["model.vision"]
    assert "multiple of patch_size" in problems["model.vision"]


def test_section_must_be_a_table():
    problems = problems_of({"train": 3})
    assert "train" in problems
    assert "must be a table" in problems["train"]


def test_selector_must_be_a_string():
    problems = problems_of({"loss": {"name": 3}})
    assert list(problems) == ["loss.name"]
    assert "must be a string" in problems["loss.name"]


# ---------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("override", "path", "suggestion"),
    [
        ("train.stpes=3", "train.stpes", "train.steps"),
        ("model.vision.widht=64", "model.vision.widht", "model.vision.width"),
        ("model.text.contex_length=8", "model.text.contex_length", "model.text.context_length"),
        ("optimizer.learning_rat=0.1", "optimizer.learning_rat", "optimizer.learning_rate"),
        ("eval.evrey=3", "eval.evrey", "eval.every"),
        ("trian.steps=3", "trian", "train"),
    ],
)
def test_unknown_key_suggests_full_path(override, path, suggestion):
    problems = problems_of(overrides=[override])
    assert list(problems) == [path]
    assert "unknown key" in problems[path]
    assert f"did you mean {suggestion!r}" in problems[path]


def test_unknown_key_without_close_match_has_no_suggestion():
    problems = problems_of(overrides=["train.zzzzqqq=1"])
    assert problems["train.zzzzqqq"] == "unknown key"


def test_unknown_component_suggests_registered_name():
    problems = problems_of(overrides=["loss.name=sigmod"])
    assert list(problems) == ["loss.name"]
    message = problems["loss.name"]
    assert "'sigmod'" in message
    assert "did you mean 'sigmoid'" in message
    assert "softmax" in message  # the available ones are listed


def test_unknown_preset_lists_available():
    problems = problems_of(overrides=["model.preset=huge"])
    assert list(problems) == ["model.preset"]
    assert "tiny" in problems["model.preset"]
    assert "clip-b32" in problems["model.preset"]


def test_several_problems_reported_at_once():
    problems = problems_of(
        overrides=[
            "train.stpes=3",
            "model.vision.widht=3",
            "loss.name=sigmod",
            "train.batch_size=abc",
            "eval.every=-1",
        ]
    )
    assert set(problems) == {
        "train.stpes",
        "model.vision.widht",
        "loss.name",
        "train.batch_size",
        "eval.every",
    }


def test_missing_and_broken_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


# ------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    ("item", "keys", "value"),
    [
        ("train.steps=3", ["train", "steps"], 3),
        ("optimizer.learning_rate=1e-3", ["optimizer", "learning_rate"], 1e-3),
        ("x=2.5", ["x"], 2.5),
        ("x=-7", ["x"], -7),
        ("eval.zero_shot=false", ["eval", "zero_shot"], False),
        ("a.b=true", ["a", "b"], True),
        ("run.name=hello", ["run", "name"], "hello"),
        ('run.name="quoted value"', ["run", "name"], "quoted value"),
        ("run.output_dir=/tmp/some run", ["run", "output_dir"], "/tmp/some run"),
        ("x=a=b", ["x"], "a=b"),
        ("x=", ["x"], ""),
        ("data.train=[1, 2, 3]", ["data", "train"], [1, 2, 3]),
        ('data.train=["a", "b"]', ["data", "train"], ["a", "b"]),
        ("model.vision={depth = 2}", ["model", "vision"], {"depth": 2}),
        (" train.steps =5", ["train", "steps"], 5),
    ],
)
def test_parse_override(item, keys, value):
    got_keys, got_value = parse_override(item)
    assert got_keys == keys
    assert got_value == value
    assert type(got_value) is type(value)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", ".a=1", "a.=1", ""])
def test_bad_override_form(item):
    with pytest.raises(SpecError, match="key.path=value"):
        parse_override(item)
    with pytest.raises(SpecError):
        load_spec(QUICKSTART, [item])


def test_overrides_create_nested_tables_and_leave_input_alone():
    raw = {"train": {"steps": 3}}
    out = apply_overrides(raw, ["model.vision.depth=5", "train.steps=4", "train.steps=6"])
    assert out == {"train": {"steps": 6}, "model": {"vision": {"depth": 5}}}
    assert raw == {"train": {"steps": 3}}


def test_override_through_a_value_is_an_error():
    with pytest.raises(SpecError) as info:
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])
    assert info.value.problems[0][0] == "train.steps"


def test_overrides_win_over_the_file():
    spec = load_spec(QUICKSTART, ["train.steps=7", "run.output_dir=/tmp/x", "loss.name=sigmoid"])
    assert spec.train.steps == 7
    assert spec.run.output_dir == "/tmp/x"
    assert spec.loss.name == "sigmoid"


# --------------------------------------------------------------------------- presets
def test_preset_merges_with_user_values_winning():
    spec = validate({"model": {"preset": "tiny", "vision": {"depth": 5}}})
    assert spec.model.vision.depth == 5  # user
    assert spec.model.vision.width == 128  # preset
    assert spec.model.vision.patch_size == 8  # preset
    assert spec.model.text.depth == 2  # preset
    assert spec.model.embed_dim == 128  # preset
    assert spec.model.preset == "tiny"


def test_preset_via_overrides():
    spec = load_spec(QUICKSTART, ["model.preset=clip-b32", "model.text.depth=3"])
    assert spec.model.vision.width == 768
    assert spec.model.vision.patch_size == 32
    assert spec.model.text.vocab_size == 49408
    assert spec.model.text.depth == 3


def test_preset_values_still_validated_against_user_values():
    # tiny's patch size 8 does not divide a user image size of 36
    problems = problems_of({"model": {"preset": "tiny", "vision": {"image_size": 36}}})
    assert list(problems) == ["model.vision"]


# --------------------------------------------------------------------------- output
def test_to_toml_round_trip():
    spec = load_spec(QUICKSTART, ["loss.name=sigmoid", "train.steps=12", "eval.max_examples=9"])
    again = validate(tomllib.loads(to_toml(spec)))
    assert to_dict(again) == to_dict(spec)
    assert again == spec


def test_validating_the_same_input_twice_gives_equal_specs():
    assert validate({"train": {"steps": 5}}) == validate({"train": {"steps": 5}})


def test_to_dict_orders_sections_and_drops_none():
    data = to_dict(load_spec(QUICKSTART))
    assert list(data) == [
        "run",
        "model",
        "loss",
        "head",
        "optimizer",
        "train",
        "data",
        "preprocess",
        "tokenizer",
        "sharding",
        "eval",
    ]
    assert "max_examples" not in data["eval"]
    assert data["model"]["architecture"] == "clip"


def test_diff():
    a = {"a": 1, "b": {"c": 2, "d": [1]}, "e": {"f": 1}}
    b = {"a": 1, "b": {"c": 3, "d": [1]}, "g": 4, "e": {"f": 1}}
    assert diff(a, b) == ["b.c", "g"]
    assert diff(b, a) == ["b.c", "g"]
    assert diff(a, a) == []
    assert diff({"x": {"y": 1}}, {"x": 2}) == ["x"]


def test_diff_of_specs_names_changed_keys():
    one = to_dict(load_spec(QUICKSTART))
    two = to_dict(load_spec(QUICKSTART, ["train.steps=5", "model.vision.depth=1"]))
    assert diff(one, two) == ["model.vision.depth", "train.steps"]
    assert diff(one, to_dict(load_spec(QUICKSTART))) == []


# ------------------------------------------------------------------------ hypothesis
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.integers(min_value=-(10**12), max_value=10**12))
def test_train_steps_override(steps):
    if steps >= 1:
        assert load_spec(QUICKSTART, [f"train.steps={steps}"]).train.steps == steps
    else:
        with pytest.raises(SpecError) as info:
            load_spec(QUICKSTART, [f"train.steps={steps}"])
        assert [path for path, _ in info.value.problems] == ["train.steps"]


def test_older_specs_still_validate():
    # run folders written before per-tower projections had one model.projection_bias
    spec = validate({"model": {"preset": "tiny", "projection_bias": True}})
    assert spec.model.vision.projection_bias and spec.model.text.projection_bias
    kept = validate({"model": {"projection_bias": True, "text": {"projection_bias": False}}})
    assert kept.model.vision.projection_bias and not kept.model.text.projection_bias


def test_a_run_folder_from_an_older_schema_is_the_same_run(tmp_path):
    import tomlkit

    from clip_jax.run_folder import RunFolder, RunFolderConflict, check_run_folder

    old = {
        "run": {"output_dir": str(tmp_path)},
        "model": {"preset": "tiny", "projection_bias": False},
    }
    folder = RunFolder(tmp_path)
    folder.write_spec(tomlkit.dumps(old))
    check_run_folder(folder, validate(old), force=False)  # new keys take their defaults
    changed = validate({**old, "train": {"steps": 7}})
    with pytest.raises(RunFolderConflict, match="train.steps"):
        check_run_folder(folder, changed, force=False)


# ------------------------------------------------- found by the fuzzer (test_spec_fuzz)
def test_a_preset_that_is_not_a_string_is_named_not_a_crash():
    problems = problems_of({"model": {"preset": ["tiny"]}})  # was TypeError: unhashable
    assert list(problems) == ["model.preset"]
    assert "unknown preset ['tiny']" in problems["model.preset"]


@pytest.mark.parametrize(
    ("override", "path", "message"),
    [
        ("train.steps=100000000000000000000", "train.steps", "out of range"),
        ("model.vision.image_size=-100000000000000000000", "model.vision.image_size", "range"),
        ("optimizer.learning_rate=inf", "optimizer.learning_rate", "finite"),
        ("optimizer.learning_rate=nan", "optimizer.learning_rate", "finite"),
        ('run.output_dir="runs/a\\u0000b"', "run.output_dir", "NUL"),
        ('data.dir="\\u0000"', "data.dir", "NUL"),
        ('run.output_dir=""', "run.output_dir", "must name the run's folder"),
        ("sharding.mesh=3", "sharding.mesh", "must be a table (got 3)"),
        ("train.lr_scale=[1]", "train.lr_scale", "must be a table"),
    ],
)
def test_values_no_option_can_mean_are_named_once(override, path, message):
    problems = problems_of(overrides=[override])
    assert list(problems) == [path]  # once: not again by pydantic's own check
    assert message in problems[path]


def test_a_key_holding_brackets_is_still_named():
    # pydantic's location tags hold "[": stripping them used to drop this key (IndexError)
    problems = problems_of(overrides=["[=1", "train.[x]=2"])
    assert problems == {"[": "unknown key", "train.[x]": "unknown key"}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[train]\nsteps = 3\n[model\n", "line 3, column 7: "),
        ("[train]\nsteps = ", "line 2, column 9 (the end of the file): "),
        ('[run]\nname = "x\n', "line 2, column 10: "),
    ],
)
def test_broken_toml_names_the_file_line_and_column(tmp_path, text, where):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    ((key, message),) = info.value.problems
    assert key == str(bad) and info.value.key == str(bad)
    assert message.startswith(where + "not valid TOML: "), message


def test_a_file_that_is_not_text_is_a_spec_error(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\xd0\xff\x00binary")
    with pytest.raises(SpecError, match="cannot read the spec file") as info:
        load_spec(binary)
    assert info.value.problems[0][0] == str(binary)


def test_a_bare_carriage_return_is_read_as_tomllib_reads_it(tmp_path):
    """Found by the fuzzer: reading the file as text turned a lone CR into a newline, so
    a file that tomllib refuses passed validation."""
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(b"\r[train]\nsteps = 5\n")
    with pytest.raises(SpecError, match=r"line 1, column 1: not valid TOML"):
        read_toml(spec_file)
