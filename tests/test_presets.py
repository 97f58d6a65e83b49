"""Presets have exactly the parameters of open_clip's model of the same architecture.

The figures were counted with open_clip 3.3 / timm 1.0 in a scratch environment
(``open_clip.create_model(name)``, no weights): total, ``visual.*`` and text parameters.
open_clip keeps each projection inside its tower; here it sits between the towers.
"""

import math

import flax.linen as nn
import jax
import pytest

from clip_jax.plugins import get_registry
from clip_jax.presets import OPEN_CLIP_COUNTS
from clip_jax.spec import validate
from clip_jax.train.state import param_shapes

OPEN_CLIP_SPLIT = {  # (visual incl. projection, text incl. projection)
    "ViT-B-32": (87_849_216, 63_428_096),
    "ViT-B-16": (86_192_640, 63_428_096),
    "ViT-L-14": (303_966_208, 123_650_304),
    "ViT-B-16-SigLIP": (92_884_224, 110_271_744),
    "ViT-SO400M-14-SigLIP": (427_680_704, 449_679_600),
}


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", list(OPEN_CLIP_COUNTS))
@pytest.mark.slow
def test_preset_matches_open_clip(preset):
    name, total = OPEN_CLIP_COUNTS[preset]
    loss = "sigmoid" if preset.startswith("siglip") else "softmax"
    spec = validate({"model": {"preset": preset}, "loss": {"name": loss}})
    registry = get_registry()
    loss_component = registry.get("loss", loss).factory(spec.loss, None)
    model = registry.get("architecture", "clip").factory(
        spec.model, loss_component.init_temperature, loss_component.init_bias
    )
    params = nn.unbox(param_shapes(model, spec))
    visual, text = OPEN_CLIP_SPLIT[name]
    assert count(params) == total
    assert count(params["vision"]) + count(params.get("vision_proj", {})) == visual
    assert count(params["text"]) + count(params.get("text_proj", {})) == text


def test_any_preset_field_can_be_overridden():
    spec = validate({"model": {"preset": "siglip-b16", "vision": {"image_size": 384}}})
    assert spec.model.vision.image_size == 384
    assert spec.model.vision.pool == "map" and spec.model.text.pool == "last"
