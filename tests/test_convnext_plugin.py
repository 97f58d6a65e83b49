"""The ConvNeXt plugin package (plugins/convnext): discovered, validated, trained."""

import pytest

from clip_jax.plugins import get_registry
from clip_jax.run_folder import RunFolder
from clip_jax.spec import SpecError, load_spec
from clip_jax.train.trainer import train
from tests.conftest import QUICKSTART


def test_the_entry_point_registers_the_architecture():
    registry = get_registry()
    component = registry.get("architecture", "convnext_clip")
    assert component.plugin == "convnext"
    assert {"tiny", "convnext-tiny"} <= set(component.presets)


def test_its_options_are_validated_like_the_builtins():
    spec = load_spec(QUICKSTART, ["model.architecture=convnext_clip"])
    assert spec.model.vision.dims == [32, 64, 128]  # its own "tiny" preset
    with pytest.raises(SpecError) as err:
        load_spec(QUICKSTART, ["model.architecture=convnext_clip", "model.vision.dims=[8,16]"])
    assert "depths (3 stages) and dims (2) must match" in str(err.value)
    with pytest.raises(SpecError, match=r"text.width \(128\) == embed_dim \(64\)"):
        load_spec(
            QUICKSTART,
            [
                "model.architecture=convnext_clip",
                "model.embed_dim=64",
                "model.text.projection=none",
            ],
        )
    with pytest.raises(SpecError, match="model.vision.patch_size"):
        load_spec(QUICKSTART, ["model.architecture=convnext_clip", "model.vision.patch_size=4"])


@pytest.mark.slow
def test_the_plugin_tower_trains_through_the_trainer(small_run):
    overrides = [o for o in small_run if not o.startswith("model.vision")]
    spec = load_spec(
        QUICKSTART,
        overrides
        + ["model.architecture=convnext_clip", "train.steps=10", "train.checkpoint_every=10"],
    )
    results = train(spec)
    folder = RunFolder(spec.run.output_dir)
    losses = [r["loss"] for r in folder.metrics() if r["split"] == "train"]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert folder.status()["state"] == "finished"
    assert (folder.checkpoints / "10").exists()
    assert results["zero_shot_classes"] == 16
