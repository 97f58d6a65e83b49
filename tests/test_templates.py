"""Every shipped template validates here, and says what it promises."""

import json
import tomllib
from pathlib import Path

import pytest

from clip_jax.plugins import get_registry
from clip_jax.spec import SpecError, load_spec

TEMPLATES = sorted(get_registry().templates)


def load_toml(path: Path) -> dict:
    return tomllib.loads(Path(path).read_text())


def hf_folder(path: Path) -> Path:
    """The files a transformers CLIP folder has that validation reads (no weights)."""
    path.mkdir()
    config = {"model_type": "clip", "projection_dim": 64,
              "vision_config": {"hidden_size": 64, "num_hidden_layers": 1, "image_size": 32,
                                "patch_size": 8, "num_attention_heads": 2, "intermediate_size": 128},
              "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 512,
                              "num_attention_heads": 2, "intermediate_size": 128}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_validates_and_has_a_description(name, tmp_path):
    template = get_registry().templates[name]
    assert template.description
    init_from = str(load_toml(template.path).get("train", {}).get("init_from", ""))
    overrides = []
    if init_from.startswith("hf:"):  # the template names the user's folder: make one
        overrides = [f"train.init_from=hf:{hf_folder(tmp_path / 'hf')}"]
    load_spec(template.path, overrides)


def test_from_pretrained_takes_the_model_from_the_checkpoint(tmp_path):
    template = get_registry().templates["from-pretrained"]
    folder = hf_folder(tmp_path / "hf")
    spec = load_spec(template.path, [f"train.init_from=hf:{folder}", "model.vision.image_size=64"])
    assert (spec.model.vision.width, spec.model.vision.patch_size) == (64, 8)
    assert spec.model.vision.image_size == 64  # the user's key wins
    assert spec.model.text.vocab_size == 512 and spec.model.embed_dim == 64
    assert spec.tokenizer.path == str(folder / "tokenizer.json")


def test_the_pod_templates_choose_what_they_say():
    templates = get_registry().templates
    assert {"quickstart", "clip-b32", "siglip-b16"} <= set(templates)
    siglip = load_spec(templates["siglip-b16"].path)
    assert (siglip.loss.name, siglip.sharding.strategy) == ("chunked_sigmoid", "fsdp")
    assert siglip.model.vision.patch_size == 16 and siglip.train.batch_size == 32768
    clip = load_spec(templates["clip-b32"].path)
    assert (clip.loss.name, clip.sharding.strategy) == ("softmax", "dp")
    assert clip.model.vision.patch_size == 32 and clip.model.vision.width == 768


def test_a_resolved_spec_validates_without_its_source_checkpoint(tmp_path):
    """Resuming a run started from hf:PATH does not need PATH any more."""
    from clip_jax.spec import to_toml

    folder = hf_folder(tmp_path / "hf")
    template = get_registry().templates["from-pretrained"]
    resolved = tmp_path / "spec.resolved.toml"
    resolved.write_text(to_toml(load_spec(template.path, [f"train.init_from=hf:{folder}"])))
    (folder / "config.json").unlink()
    (folder / "tokenizer.json").unlink()
    folder.rmdir()
    spec = load_spec(resolved)
    assert spec.model.vision.width == 64 and spec.train.init_from == f"hf:{folder}"
    with pytest.raises(SpecError, match="train.init_from: .*does not exist"):
        load_spec(template.path, [f"train.init_from=hf:{folder}"])
