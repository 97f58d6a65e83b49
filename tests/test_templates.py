"""Every shipped template validates here, and says what it promises."""

import pytest

from clip_jax.plugins import get_registry
from clip_jax.spec import load_spec

TEMPLATES = sorted(get_registry().templates)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_validates_and_has_a_description(name):
    template = get_registry().templates[name]
    assert template.description
    load_spec(template.path)


def test_the_pod_templates_choose_what_they_say():
    templates = get_registry().templates
    assert {"quickstart", "clip-b32", "siglip-b16"} <= set(templates)
    siglip = load_spec(templates["siglip-b16"].path)
    assert (siglip.loss.name, siglip.sharding.strategy) == ("chunked_sigmoid", "fsdp")
    assert siglip.model.vision.patch_size == 16 and siglip.train.batch_size == 32768
    clip = load_spec(templates["clip-b32"].path)
    assert (clip.loss.name, clip.sharding.strategy) == ("softmax", "dp")
    assert clip.model.vision.patch_size == 32 and clip.model.vision.width == 768
