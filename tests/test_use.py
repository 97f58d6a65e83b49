"""Using a trained model: clipctl eval on any labelled set, predict on image files, export."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clip_jax.errors import UserError
from clipctl.cli import cli
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_dir):
    """A short quickstart-sized run (module-wide: several tests use it read-only)."""
    from clip_jax.spec import load_spec
    from clip_jax.train.trainer import train
    from tests.conftest import SMALL_RUN

    run = tmp_path_factory.mktemp("use") / "run"
    overrides = [
        *SMALL_RUN, f"data.dir={synthetic_dir}", "data.train_examples=1024",
        "data.validation_examples=256", f"run.output_dir={run}", "train.steps=30",
    ]  # fmt: skip
    train(load_spec(QUICKSTART, overrides))
    return run


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.slow
def test_eval_on_any_labelled_set_with_a_linear_probe(runner, trained_run, synthetic_dir):
    data = str(synthetic_dir / "validation" / "*.tfrecord")
    args = [
        "eval", str(trained_run), "--data", data,
        "--classes", str(synthetic_dir / "classes.json"), "--label-key", "label",
        "--caption-key", "", "--linear-probe", "--json",
        "--probe-data", str(synthetic_dir / "train" / "*.tfrecord"),
    ]  # fmt: skip
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results["examples"] == 256 and results["zero_shot_classes"] == 16
    assert "retrieval_i2t_r1" not in results  # no captions read
    # 16 classes, chance 1/16: after 30 steps the probe on the frozen embeddings does
    # better than chance and than zero-shot prompts (0.35 against 0.19, measured)
    assert results["linear_probe_top1"] > 3 / 16
    assert results["linear_probe_top1"] > results["zero_shot_top1"]
    assert results["linear_probe_train_examples"] == 1024
    recorded = [json.loads(line) for line in (trained_run / "metrics.jsonl").open()]
    # filed under the set it read, not as the run's own validation split (same folder name)
    assert recorded[-1]["split"] == f"eval:{data}"
    assert recorded[-1]["linear_probe_top1"] == results["linear_probe_top1"]


@pytest.mark.slow
def test_eval_bad_input_is_exit_2(runner, trained_run, tmp_path):
    result = runner.invoke(cli, ["eval", str(trained_run), "--data", str(tmp_path / "*.tfrecord")])
    assert result.exit_code == 2 and "--data: no files match" in result.stderr
    result = runner.invoke(cli, ["eval", str(trained_run), "--classes", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "x.json" in result.stderr
    data = str(tmp_path / "*.tfrecord")
    result = runner.invoke(cli, ["eval", str(trained_run), "--data", data, "--linear-probe"])
    assert result.exit_code == 2 and "needs --probe-data" in result.stderr
    result = runner.invoke(cli, ["eval", f"hf:{tmp_path}"])
    assert result.exit_code == 2 and "pass --data" in result.stderr


@pytest.mark.slow  # imports TensorFlow to read the glob (seconds)
def test_eval_checks_data_and_classes_before_loading_the_model(runner, tmp_path):
    """No run folder at all: the inputs are refused before any model would load."""
    run = str(tmp_path / "no-run")
    result = runner.invoke(cli, ["eval", run, "--data", str(tmp_path / "nomatch" / "*")])
    assert result.exit_code == 2 and "--data: no files match" in result.stderr
    result = runner.invoke(cli, ["eval", run, "--classes", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "none.json" in result.stderr


def test_eval_table_sizes_its_key_column_and_keeps_small_floats(runner, monkeypatch):
    import clip_jax.inference

    results = {"step": 30, "linear_probe_train_examples": 1024, "linear_probe_l2": 1e-5}
    monkeypatch.setattr(clip_jax.inference, "evaluate_run", lambda *a, **k: results)
    result = runner.invoke(cli, ["eval", "run", "--linear-probe"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2].split() == ["linear_probe_l2", "1e-05"]
    assert len({line.rindex(" ") for line in lines}) == 1  # values in one column


@pytest.mark.slow
def test_eval_names_a_wrong_key_and_a_missing_classes_list(runner, trained_run, synthetic_dir):
    data = str(synthetic_dir / "validation" / "*.tfrecord")
    base = ["eval", str(trained_run), "--data", data, "--max-examples", "32"]
    result = runner.invoke(cli, [*base, "--image-key", "image"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()  # one line, no TensorFlow log lines
    assert "--image-key" in line and "'image'" in line and "jpg" in line
    classes = str(synthetic_dir / "classes.json")
    result = runner.invoke(cli, [*base, "--classes", classes, "--label-key", "nolabel"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "--label-key" in line and "nolabel" in line
    result = runner.invoke(cli, [*base, "--label-key", "label", "--json"])  # no --classes
    assert result.exit_code == 0, result.output
    assert "zero_shot_top1" not in json.loads(result.stdout)
    assert "pass --classes" in result.stderr


@pytest.mark.slow
def test_predict_classifies_image_files(runner, trained_run, tmp_path):
    from PIL import Image, ImageDraw

    paths = []
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        image = Image.new("RGB", (48, 40), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((8, 6, 40, 34), fill=colour)
        paths.append(tmp_path / f"{name}.png")
        image.save(paths[-1])
    labels = "red circle,blue circle,green square"
    args = ["predict", str(trained_run), "--labels", labels, "--json"]
    for path in paths:
        args += ["--image", str(path)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [str(p) for p in paths]
    for row in rows:
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["label"] == max(row["probs"], key=row["probs"].get)

    import clip_jax

    model = clip_jax.load(trained_run)
    from_files = model.encode_images([str(p) for p in paths])
    from_arrays = model.encode_images([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_allclose(from_files, from_arrays, atol=1e-6)

    missing = runner.invoke(
        cli, ["predict", str(trained_run), "--image", "nope.png", "--labels", "a"]
    )
    assert missing.exit_code == 2 and "nope.png does not exist" in missing.stderr


@pytest.mark.slow
def test_export_command(runner, trained_run, tmp_path):
    out = tmp_path / "hf"
    result = runner.invoke(cli, ["export", str(trained_run), str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    again = runner.invoke(cli, ["export", str(trained_run), str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.stderr
    wrong = runner.invoke(
        cli, ["export", str(trained_run), str(tmp_path / "x"), "--format", "onnx"]
    )
    assert wrong.exit_code == 2 and "cannot be written as 'onnx'" in wrong.stderr


def test_export_refuses_before_reading_any_checkpoint(runner, tmp_path):
    """What transformers cannot express is known from the spec: no restore is needed."""
    from clip_jax.spec import to_toml, validate

    run = tmp_path / "run"
    run.mkdir()
    spec = validate({"model": {"preset": "tiny", "vision": {"pool": "gap"}}})
    (run / "spec.resolved.toml").write_text(to_toml(spec))  # no checkpoint at all
    result = runner.invoke(cli, ["export", str(run), str(tmp_path / "out")])
    assert result.exit_code == 2 and "model.vision.pool = 'gap'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_published_model_is_named_as_given(tmp_path):
    """Not as a spec key the caller never wrote (train.init_from)."""
    import clip_jax

    missing = f"hf:{tmp_path / 'nope'}"
    with pytest.raises(UserError) as caught:
        clip_jax.load(missing)
    assert str(caught.value) == f"{missing}: {tmp_path / 'nope'} does not exist"
    result = CliRunner().invoke(cli, ["predict", missing, "--image", "x.png", "--labels", "a"])
    assert result.exit_code == 2 and "train.init_from" not in result.stderr, result.output
