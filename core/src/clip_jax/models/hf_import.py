"""Reading a transformers folder's configs into run-spec tables (``hf:PATH``).

``config.json`` says which model (CLIPModel, SiglipModel, Siglip2Model) and its sizes;
the tokenizer files and ``preprocessor_config.json`` say how texts and images reach it.
A Siglip2Model is the NaFlex SigLIP 2: the SigLIP layout whose images come as patch
sequences at their native aspect ratio, so it becomes a run with ``preprocess.resize =
"naflex"`` and the processor's patch budget. JSON only: no torch, no tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from clip_jax.errors import UserError
from clip_jax.schemas import CLIP_MEAN, CLIP_STD

ACTIVATIONS_IN = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
MODEL_TYPES = ("clip", "siglip", "siglip2")

# transformers' defaults, for config.json files that leave them out (Siglip2's are
# SigLIP's but for the vision tower's size, given by its position table).
_DEFAULTS = {
    "clip": (
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
         "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
         "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    ),
    "siglip": (
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
         "num_attention_heads": 12, "image_size": 224, "patch_size": 16,
         "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True},
        {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
         "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 64,
         "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    ),
}  # fmt: skip
_SIGLIP2_PATCHES, _SIGLIP2_BUDGET = 256, 256  # num_patches, max_num_patches defaults


def spec_defaults(path: Path) -> dict[str, Any]:
    """The run-spec tables that describe the checkpoint at ``path``: model, loss,
    tokenizer, preprocess."""
    config = _read_json(path / "config.json")
    kind = model_type(path)
    layout = "clip" if kind == "clip" else "siglip"
    vision_cfg, text_cfg = _tower_configs(config, layout)
    vision = {
        **_tower_options(vision_cfg),
        "image_size": _image_size(vision_cfg, kind, path),
        "patch_size": vision_cfg["patch_size"],
    }
    text = {
        **_tower_options(text_cfg),
        "vocab_size": text_cfg["vocab_size"],
        "context_length": text_cfg["max_position_embeddings"],
    }
    if layout == "clip":
        vision |= {"patch_bias": False, "norm_pre": True, "pool": "tok",
                   "projection": "linear", "projection_bias": False}  # fmt: skip
        text |= {"causal": True, "pool": "eos", "pad_id": 0,
                 "projection": "linear", "projection_bias": False}  # fmt: skip
        embed_dim = config.get("projection_dim", 512)
        loss = {"name": "softmax"}
    else:
        if not vision_cfg.get("vision_use_head", True):
            raise UserError(f"{path}: a SigLIP vision tower without its head is not supported")
        vision |= {"patch_bias": True, "norm_pre": False, "pool": "map", "projection": "none"}
        embed_dim = text_cfg.get("projection_size", text_cfg["hidden_size"])
        text |= {"causal": False, "pool": "last", "pad_id": None,
                 "projection": "linear", "projection_bias": True}  # fmt: skip
        loss = {"name": "sigmoid"}
    return {
        "model": {"architecture": "clip", "embed_dim": embed_dim, "vision": vision, "text": text},
        "loss": loss,
        "tokenizer": _tokenizer_defaults(path, layout),
        "preprocess": _preprocess_defaults(path, kind),
    }


def model_type(path: Path) -> str | None:
    """The folder's ``model_type`` (one of ``MODEL_TYPES``); None without a config.json."""
    config = path / "config.json"
    if not config.is_file():
        return None
    data = _read_json(config)
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind not in MODEL_TYPES:
        raise UserError(
            f"{config}: model_type {kind!r} is not supported (clip, siglip or siglip2; SigLIP 2 "
            "checkpoints in the siglip layout load as siglip)"
        )
    return kind


def _image_size(vision_cfg: dict, kind: str, path: Path) -> int:
    """Siglip2 sizes its tower by the square position table (``num_patches``): our
    ``image_size`` is that grid's side in pixels."""
    if kind != "siglip2":
        return vision_cfg["image_size"]
    patches = vision_cfg.get("num_patches", _SIGLIP2_PATCHES)
    side = math.isqrt(patches)
    if side * side != patches:
        raise UserError(
            f"{path / 'config.json'}: vision_config.num_patches = {patches} is not a square "
            "grid, which the learned position table must be"
        )
    return side * vision_cfg["patch_size"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON: {exc}") from None


def _tower_configs(config: dict, layout: str) -> tuple[dict, dict]:
    vision_defaults, text_defaults = _DEFAULTS[layout]
    vision = {**vision_defaults, **(config.get("vision_config") or {})}
    text = {**text_defaults, **(config.get("text_config") or {})}
    return vision, text


def _tower_options(cfg: dict) -> dict[str, Any]:
    act = cfg["hidden_act"]
    if act not in ACTIVATIONS_IN:
        raise UserError(f"config.json: hidden_act {act!r} is not supported")
    return {
        "width": cfg["hidden_size"],
        "depth": cfg["num_hidden_layers"],
        "heads": cfg["num_attention_heads"],
        "mlp_dim": cfg["intermediate_size"],
        "activation": ACTIVATIONS_IN[act],
        "norm_eps": cfg["layer_norm_eps"],
        "positions": "learned",
    }


def _tokenizer_defaults(path: Path, layout: str) -> dict[str, Any]:
    if layout == "siglip" and (path / "spiece.model").is_file():
        return {"name": "sentencepiece", "path": str(path / "spiece.model")}
    if (path / "tokenizer.json").is_file():
        pad = 0 if layout == "clip" else tokenizer_pad_id(path)
        return {"name": "bpe", "path": str(path / "tokenizer.json"), "pad_id": pad}
    raise UserError(
        f"{path} has no tokenizer (tokenizer.json, or spiece.model for SigLIP): save the "
        "model's tokenizer with it (tokenizer.save_pretrained(PATH))"
    )


def tokenizer_pad_id(path: Path) -> int:
    """The id of the tokenizer's own padding token (SigLIP pads with it, unmasked)."""
    config = path / "tokenizer_config.json"
    pad = _read_json(config).get("pad_token") if config.is_file() else None
    if isinstance(pad, dict):
        pad = pad.get("content")
    vocab = _read_json(path / "tokenizer.json")
    for token in vocab.get("added_tokens", []):
        if token.get("content") == pad:
            return int(token["id"])
    return 0


def _resample(config: dict, file: Path, default: int) -> int:
    """PIL's resample code: 3 bicubic, 2 bilinear; no other."""
    resample = config.get("resample", default)
    if resample not in (2, 3):
        raise UserError(f"{file}: resample {resample!r} is not supported (2 bilinear, 3 bicubic)")
    return resample


def _preprocess_defaults(path: Path, kind: str) -> dict[str, Any]:
    """The processor's image handling: CLIP's crop, SigLIP's squash, or Siglip2's NaFlex
    at its ``max_num_patches`` (transformers' defaults where the file is silent: bicubic
    for CLIP and SigLIP, bilinear for Siglip2)."""
    file = path / "preprocessor_config.json"
    config = _read_json(file) if file.is_file() else {}
    siglip = kind != "clip"
    half = (0.5, 0.5, 0.5)
    resample = _resample(config, file, default=2 if kind == "siglip2" else 3)
    out: dict[str, Any] = {
        "mean": list(config.get("image_mean", half if siglip else CLIP_MEAN)),
        "std": list(config.get("image_std", half if siglip else CLIP_STD)),
        "interpolation": "bilinear" if resample == 2 else "bicubic",
    }
    if kind == "siglip2":
        return {
            **out,
            "resize": "naflex",
            "max_patches": config.get("max_num_patches", _SIGLIP2_BUDGET),
        }
    return {**out, "resize": "crop" if config.get("do_center_crop", not siglip) else "squash"}
