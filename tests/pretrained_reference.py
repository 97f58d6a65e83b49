"""Reference checkpoints for tests/test_open_clip_*.py and tests/test_big_vision_*.py.

Neither open_clip nor big_vision is installed here, so the reference checkpoints are
random-init transformers models (nothing is downloaded) whose tensors those test files put
into open_clip's and big_vision's layouts. Parity is measured on unit-norm embeddings:
max |ours - theirs| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import LazyModule
from tests.test_interop import TOL, VOCAB, hf_embeddings, inputs

torch = LazyModule("torch", reason="parity with transformers needs torch (CPU build)")
transformers = LazyModule("transformers", "needs transformers (parity group)", needs=(torch,))

CAPTIONS = ["a red circle", "a blue square at the top", "a small green triangle"] * 30


def tiny_model(layout: str, act: str):
    """A random transformers model: ViT 32 px / patch 8, two layers per tower."""
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": act}  # fmt: skip
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
            "hidden_act": act}  # fmt: skip
    torch.manual_seed(0)
    if layout == "clip":
        text["eos_token_id"] = VOCAB - 1
        config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)
        model = transformers.CLIPModel(config).eval()
    else:
        text["projection_size"] = vision["hidden_size"]
        config = transformers.SiglipConfig(vision_config=vision, text_config=text)
        model = transformers.SiglipModel(config).eval()
        with torch.no_grad():  # not the init values, so that a mix-up would show
            model.logit_scale.fill_(2.5)
            model.logit_bias.fill_(-7.0)
    return model


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_parity(loaded, reference, layout: str) -> dict[str, float]:
    images, ids = inputs(layout)
    want_images, want_texts = hf_embeddings(reference, images, ids)
    diffs = {
        "images": float(np.abs(loaded.encode_images(images) - want_images).max()),
        "texts": float(np.abs(loaded._tokens(ids) - want_texts).max()),
    }
    print(f"{layout} max |ours - transformers|: {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    assert loaded.temperature == pytest.approx(
        float(reference.logit_scale.detach().exp()), rel=1e-6
    )
    return diffs
