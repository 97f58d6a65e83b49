"""Published model sizes, as option dicts (configs as data, no jax import).

Each preset's parameter count equals open_clip's model of the same architecture
(open_clip 3.3, built from its bundled configs; tests/test_presets.py checks them):
ViT-B-32 151,277,313; ViT-B-16 149,620,737; ViT-L-14 427,616,513 (softmax loss);
ViT-B-16-SigLIP 203,155,970; ViT-SO400M-14-SigLIP 877,360,306 (with the sigmoid
loss's logit bias).
"""

from typing import Any

_OPENAI_TEXT = {"vocab_size": 49408, "context_length": 77, "width": 512, "heads": 8, "depth": 12}


def _clip(embed_dim: int, vision: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    """OpenAI CLIP layout: class token, ln_pre, quick_gelu, bias-free projections."""
    return {"embed_dim": embed_dim, "vision": vision, "text": {**_OPENAI_TEXT, **text}}


def _siglip(width: int, depth: int, heads: int, patch: int, context: int, **mlp) -> dict:
    """SigLIP layout (big_vision / timm): patch bias, no ln_pre, MAP pooling whose output
    is the image embedding; bidirectional text read at its last position, projected
    with a bias; LayerNorm eps 1e-6; tanh-approximated GELU."""
    shared = {"width": width, "depth": depth, "heads": heads, "norm_eps": 1e-6,
              "activation": "gelu_tanh", **mlp}  # fmt: skip
    return {
        "embed_dim": width,
        "vision": {
            **shared,
            "image_size": 224,
            "patch_size": patch,
            "patch_bias": True,
            "norm_pre": False,
            "pool": "map",
            "projection": "none",
        },
        "text": {
            **shared,
            "vocab_size": 32000,
            "context_length": context,
            "causal": False,
            "pool": "last",
            "projection_bias": True,
        },
    }


_B16 = {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12}

CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # Sized so that the quickstart learns the embedded dataset in minutes on 2 CPU cores.
    "tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 32, "patch_size": 8, "width": 128, "depth": 3, "heads": 4},
        "text": {"vocab_size": 1024, "context_length": 16, "width": 128, "depth": 2, "heads": 4},
    },
    "clip-b32": _clip(512, {**_B16, "patch_size": 32}, {}),
    "clip-b16": _clip(512, _B16, {}),
    "clip-l14": _clip(
        768,
        {"image_size": 224, "patch_size": 14, "width": 1024, "depth": 24, "heads": 16},
        {"width": 768, "heads": 12},
    ),
    "siglip-b16": _siglip(768, 12, 12, patch=16, context=64),
    "siglip-so400m14": _siglip(1152, 27, 16, patch=14, context=16, mlp_dim=4304),
}

# open_clip's name for each preset and its parameter count there.
OPEN_CLIP_COUNTS: dict[str, tuple[str, int]] = {
    "clip-b32": ("ViT-B-32", 151_277_313),
    "clip-b16": ("ViT-B-16", 149_620_737),
    "clip-l14": ("ViT-L-14", 427_616_513),
    "siglip-b16": ("ViT-B-16-SigLIP", 203_155_970),
    "siglip-so400m14": ("ViT-SO400M-14-SigLIP", 877_360_306),
}
