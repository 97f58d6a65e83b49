"""Published model sizes, as option dicts (configs as data, no jax import)."""

from typing import Any

_OPENAI_TEXT = {"vocab_size": 49408, "context_length": 77, "width": 512, "heads": 8, "depth": 12}

CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # Sized so that the quickstart learns the embedded dataset in minutes on 2 CPU cores.
    "tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 32, "patch_size": 8, "width": 128, "depth": 3, "heads": 4},
        "text": {"vocab_size": 1024, "context_length": 16, "width": 128, "depth": 2, "heads": 4},
    },
    # OpenAI CLIP ViT-B/32 (open_clip ViT-B-32: 151,277,313 parameters).
    "clip-b32": {
        "embed_dim": 512,
        "vision": {"image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12},
        "text": _OPENAI_TEXT,
    },
}
