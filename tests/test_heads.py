"""Downstream heads ([head]): image and text classification and LiT, from a short
contrastive run; what they refuse before training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.errors import UserError
from clip_jax.models.clip import two_tower
from clip_jax.models.vit import VisionTower
from clip_jax.plugins import hookimpl, register_plugin, unregister_plugin
from clip_jax.presets import CLIP_PRESETS
from clip_jax.run_folder import RunFolder
from clip_jax.schemas import ClipOptions
from clip_jax.spec import SpecError, load_spec, to_dict, validate
from clip_jax.train.state import param_shapes
from clip_jax.train.trainer import train
from clip_jax.train.warm_start import fit_params, params_of_run
from tests.conftest import QUICKSTART, SMALL_RUN

IMAGE_HEAD = ["head.name=image_classification", "head.num_classes=16"]
TEXT_HEAD = ["head.name=text_classification", "head.num_classes=16"]
FAST_EVAL = ["eval.zero_shot=false", "eval.retrieval=false"]  # the head's accuracy alone


def overrides(synthetic_dir, out) -> list[str]:
    return SMALL_RUN + [
        f"data.dir={synthetic_dir}",
        "data.train_examples=1024",
        "data.validation_examples=256",
        f"run.output_dir={out}",
    ]


@pytest.fixture(scope="module")
def base(synthetic_dir, tmp_path_factory):
    """A short contrastive run (20 steps) that the heads start from: (spec, results)."""
    out = tmp_path_factory.mktemp("heads") / "base"
    spec = load_spec(
        QUICKSTART,
        overrides(synthetic_dir, out) + ["train.steps=20", "train.checkpoint_every=20"],
    )
    return spec, train(spec)


def head_run(synthetic_dir, tmp_path, extra, init_from=None):
    more = [f"train.init_from={init_from}"] if init_from else []
    spec = load_spec(QUICKSTART, overrides(synthetic_dir, tmp_path / "head") + extra + more)
    return spec, train(spec)


def flat(params) -> dict[str, np.ndarray]:
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


@pytest.mark.slow
def test_image_classification_beats_the_zero_shot_of_the_run_it_starts_from(
    base, synthetic_dir, tmp_path
):
    base_spec, base_results = base
    steps = ["train.steps=30", "train.checkpoint_every=30", "optimizer.schedule=constant"]
    spec, results = head_run(
        synthetic_dir,
        tmp_path,
        IMAGE_HEAD + ["head.kind=map", "optimizer.learning_rate=3e-3"] + steps,
        init_from=base_spec.run.output_dir,
    )
    assert results["head_top1"] > base_results["zero_shot_top1"] + 0.05
    assert results["head_top5"] >= results["head_top1"]
    folder = RunFolder(spec.run.output_dir)
    evals = [r for r in folder.metrics() if r["split"] == "validation"]
    assert evals[-1]["head_top1"] == results["head_top1"]
    assert "zero_shot_top1" in evals[-1]  # the contrastive evaluations keep working
    assert "train_top1" in [r for r in folder.metrics() if r["split"] == "train"][-1]
    assert "(head/ initialised fresh)" in (folder.path / "run.log").read_text()

    # Only the image tower and the head train: the rest stays as the source left it.
    before, after = (
        flat(params_of_run(base_spec.run.output_dir)[0]),
        flat(params_of_run(folder.path)[0]),
    )
    assert {n.split("/")[0] for n in after} - {n.split("/")[0] for n in before} == {"head"}
    for name, value in before.items():
        if not name.startswith("vision/"):
            np.testing.assert_array_equal(value, after[name], err_msg=name)
    assert any(not np.array_equal(before[n], after[n]) for n in before if n.startswith("vision/"))
    # a step that was never saved (`clipctl eval/export --step 7`): the saved ones listed
    with pytest.raises(UserError, match=r"has no checkpoint at step 7 \(saved: 30\)"):
        params_of_run(folder.path, step=7)


@pytest.mark.slow
def test_lit_keeps_the_image_tower_bit_identical_and_trains_the_text_tower(
    base, synthetic_dir, tmp_path
):
    base_spec, _ = base
    spec, results = head_run(
        synthetic_dir,
        tmp_path,
        ["head.name=lit", "train.steps=5", "train.checkpoint_every=5"],
        init_from=base_spec.run.output_dir,
    )
    assert "zero_shot_top1" in results
    before, after = (
        flat(params_of_run(base_spec.run.output_dir)[0]),
        flat(params_of_run(spec.run.output_dir)[0]),
    )
    assert before.keys() == after.keys()  # LiT adds no parameters
    locked = [n for n in before if n.startswith(("vision/", "vision_proj/"))]
    assert len(locked) > 10
    for name in locked:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    text = [n for n in before if n.startswith("text/")]
    assert all(not np.array_equal(before[n], after[n]) for n in text)
    assert not np.array_equal(before["logit_scale"], after["logit_scale"])


@pytest.mark.slow
def test_text_classification_trains_and_reports_its_accuracy(synthetic_dir, tmp_path):
    steps = ["train.steps=20", "train.checkpoint_every=20", "optimizer.schedule=constant"]
    lr = ["optimizer.learning_rate=3e-3"]
    spec, results = head_run(synthetic_dir, tmp_path, TEXT_HEAD + FAST_EVAL + steps + lr)
    assert results["head_top1"] > 0.5  # chance is 1/16: the caption names the class
    folder = RunFolder(spec.run.output_dir)
    train_lines = [r for r in folder.metrics() if r["split"] == "train"]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    evals = [r for r in folder.metrics() if r["split"] == "validation"]
    assert evals[-1]["head_top1"] == results["head_top1"] and "zero_shot_top1" not in evals[-1]
    # clipctl eval with options adds to the run's own evaluation: the head's accuracy stays
    from clip_jax.inference import evaluate_run

    again = evaluate_run(spec.run.output_dir, max_examples=64)
    assert again["examples"] == 64 and again["head_top1"] > 0.5


# ------------------------------------------------------------------ refused at once
class ImageOnlyPlugin:
    """An architecture with an image tower and no text tower."""

    @hookimpl
    def register_architectures(self, register):
        def build(options, init_temperature, init_bias):
            return two_tower(
                VisionTower(options.vision), None, options, init_temperature, init_bias
            )

        register("image_only", build, options=ClipOptions, presets=CLIP_PRESETS)


@pytest.fixture
def image_only():
    register_plugin(ImageOnlyPlugin(), "image-only-test")
    yield
    unregister_plugin("image-only-test")


def test_a_head_on_a_missing_tower_is_refused_before_the_run_folder(
    image_only, synthetic_dir, tmp_path
):
    out = tmp_path / "run"
    spec = load_spec(
        QUICKSTART,
        overrides(synthetic_dir, out) + TEXT_HEAD + ["model.architecture=image_only"],
    )
    with pytest.raises(UserError, match=r"head\.name: 'text_classification' .* text tower"):
        train(spec)
    assert not out.exists()


def test_classification_without_labels_is_refused_before_the_run_folder(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    spec = load_spec(QUICKSTART, overrides(synthetic_dir, out) + IMAGE_HEAD + ["data.label_key="])
    with pytest.raises(UserError, match=r"data\.label_key: head 'image_classification'"):
        train(spec)
    assert not out.exists()


@pytest.mark.slow
def test_a_label_beyond_num_classes_stops_before_the_first_step(synthetic_dir, tmp_path):
    spec = load_spec(
        QUICKSTART,
        overrides(synthetic_dir, tmp_path / "run")
        + ["head.name=image_classification", "head.num_classes=4", "train.steps=2"],
    )
    with pytest.raises(UserError, match=r"head\.num_classes is 4, but .* label 1[0-5]"):
        train(spec)
    assert not any(r["split"] == "train" for r in RunFolder(spec.run.output_dir).metrics())


def test_map_on_a_tower_without_tokens_is_named():
    spec = validate(
        {
            "model": {"architecture": "convnext_clip"},
            "head": {"name": "image_classification", "num_classes": 3, "kind": "map"},
        }  # fmt: skip
    )
    with pytest.raises(UserError, match=r"head\.kind = 'map'"):
        param_shapes(components(spec).model, spec)


# ------------------------------------------------------------------ spec and params
def test_no_head_table_is_the_contrastive_head_and_adds_nothing():
    spec = validate({"model": {"preset": "tiny"}})
    assert to_dict(spec)["head"] == {"name": "contrastive"}
    comps = components(spec)
    assert comps.model.head is None and comps.train_options is spec.train
    assert "head" not in param_shapes(comps.model, spec)


def test_head_options_are_validated_with_their_key_paths():
    with pytest.raises(SpecError, match=r"head\.num_classes: required"):
        validate({"head": {"name": "image_classification"}})
    with pytest.raises(SpecError, match=r"head\.kind"):
        validate({"head": {"name": "text_classification", "num_classes": 3, "kind": "mlp"}})
    with pytest.raises(SpecError, match=r"head\.name: unknown head 'lti'; did you mean 'lit'"):
        validate({"head": {"name": "lti"}})
    lit = validate({"head": {"name": "lit"}})
    assert components(lit).train_options.freeze == ["(vision|vision_proj)/.*"]


@pytest.mark.parametrize("kind", ["linear", "map"])
def test_heads_add_parameters_under_head_only(kind):
    plain = validate({"model": {"preset": "tiny"}})
    spec = validate(
        {
            "model": {"preset": "tiny"},
            "head": {"name": "image_classification", "num_classes": 7, "kind": kind},
        }  # fmt: skip
    )
    shapes = param_shapes(components(spec).model, spec)
    assert set(shapes) - set(param_shapes(components(plain).model, plain)) == {"head"}
    assert shapes["head"]["classifier"]["kernel"].value.shape == (128, 7)
    assert ("map" in shapes["head"]) == (kind == "map")


def test_fit_params_initialises_only_missing_head_parameters_fresh():
    source = {"vision": {"w": np.ones(3, np.float32)}}
    target = {
        "head": {"b": jax.ShapeDtypeStruct((2,), jnp.float32)},
        "vision": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
    }
    asked = []

    def fresh(names):
        asked.extend(names)
        return {"head": {"b": np.full(2, 7.0)}, "aux_x": {"w": np.full(1, 7.0)}}

    source["aux_x"] = {"w": np.full(1, 3.0)}  # a term the source has: kept, not re-drawn
    target["aux_x"] = {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}
    fitted = fit_params(source, target, 0, fresh_head=fresh)
    assert asked == ["head/b"]
    np.testing.assert_array_equal(fitted["head"]["b"], [7.0, 7.0])
    np.testing.assert_array_equal(fitted["aux_x"]["w"], [3.0])
    np.testing.assert_array_equal(fitted["vision"]["w"], source["vision"]["w"])
    with pytest.raises(UserError, match="the checkpoint has no head/b"):
        fit_params(source, target, 0)
    target["text"] = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(UserError, match="the checkpoint has no text/w: different models"):
        fit_params(source, target, 0, fresh_head=lambda names: {"head": {"b": np.zeros(2)}})
