"""open_clip model configs -> our run-spec tables (model, loss, tokenizer, preprocess).

Reads JSON only: an ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``),
open_clip's bare ``model_configs/*.json`` form, or one of open_clip's model names that a
preset here mirrors. OpenAI-style ViTs and timm's SigLIP trunks are understood; options
our towers do not have are refused, naming them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clip_jax.errors import UserError
from clip_jax.models.hf_import import tokenizer_pad_id
from clip_jax.presets import CLIP_PRESETS, OPEN_CLIP_COUNTS
from clip_jax.schemas import CLIP_MEAN, CLIP_STD

# open_clip's model names that a preset here mirrors (its "-quickgelu" twins run OpenAI's
# activation on the same shapes).
_PRESET_OF = {name: preset for preset, (name, _) in OPEN_CLIP_COUNTS.items()}
MODEL_NAMES: dict[str, str] = {
    **_PRESET_OF,
    **{f"{name}-quickgelu": p for name, p in _PRESET_OF.items() if p.startswith("clip-")},
}

# open_clip's dataclass defaults (CLIPVisionCfg, CLIPTextCfg) for keys a config leaves out.
_VISION_DEFAULTS = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
    "image_size": 224, "no_ln_pre": False, "pool_type": "tok", "pos_embed_type": "learnable",
    "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False,
}  # fmt: skip
_TEXT_DEFAULTS = {
    "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
    "mlp_ratio": 4.0, "pad_id": 0, "no_causal_mask": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "text_arch": "clip",
}  # fmt: skip
# Options that change the computation in ways our towers do not have.
_UNSUPPORTED = ("ls_init_value", "attentional_pool", "qk_norm", "scaled_cosine_attn",
                "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "embed_cls",
                "hf_model_name", "variable_text")  # fmt: skip

# timm's SigLIP ViTs, by the size in their names: (width, depth, heads, mlp_ratio).
_TIMM_SIZES = {
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "so400m": (1152, 27, 16, 3.7362),
    "giantopt": (1536, 40, 16, 4.0),
}
_TIMM_NAME = re.compile(r"^vit_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)_siglip(?P<gap>_gap)?_(?P<res>\d+)$")  # fmt: skip
# The SigLIP trunks timm builds with the tanh-approximated GELU (the others use nn.GELU).
_TIMM_GELU_TANH = {
    "vit_base_patch32_siglip_256", "vit_large_patch16_siglip_512",
    "vit_so400m_patch16_siglip_256", "vit_so400m_patch16_siglip_384",
    "vit_so400m_patch16_siglip_512", "vit_giantopt_patch16_siglip_256",
    "vit_giantopt_patch16_siglip_384",
}  # fmt: skip
_TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


# ------------------------------------------------------------ config -> options
def named_tables(name: str) -> tuple[dict[str, Any], bool]:
    """The tables of a built-in open_clip model, from the preset that mirrors it."""
    preset = CLIP_PRESETS[MODEL_NAMES[name]]
    siglip = preset["vision"].get("pool") == "map"
    # SigLIP: timm's nn.GELU and open_clip's text tower run exact GELU (see the docstring).
    quick = not siglip and name.endswith("-quickgelu")
    activation = "quick_gelu" if quick else "gelu"
    vision = {**preset["vision"], "activation": activation, **_vision_layout(siglip)}
    text = {**preset["text"], "activation": activation, **_text_layout(siglip)}
    model = {"architecture": "clip", "embed_dim": preset["embed_dim"], "vision": vision,
             "text": text}  # fmt: skip
    return {"model": model, "loss": {"name": "sigmoid" if siglip else "softmax"}}, siglip


def _vision_layout(siglip: bool) -> dict[str, Any]:
    if siglip:
        return {"patch_bias": True, "norm_pre": False, "pool": "map", "projection": "none"}
    return {"patch_bias": False, "norm_pre": True, "pool": "tok", "projection": "linear",
            "projection_bias": False}  # fmt: skip


def _text_layout(siglip: bool) -> dict[str, Any]:
    if siglip:
        return {"causal": False, "pool": "last", "pad_id": None, "projection": "linear",
                "projection_bias": True}  # fmt: skip
    return {"causal": True, "pool": "eos", "pad_id": 0, "projection": "linear",
            "projection_bias": False}  # fmt: skip


def config_tables(cfg: dict[str, Any], source: Path) -> tuple[dict[str, Any], bool]:
    """The model and loss tables an open_clip model config describes."""
    vision_cfg = cfg.get("vision_cfg") or {}
    text_cfg = cfg.get("text_cfg") or {}
    if not isinstance(vision_cfg, dict) or not isinstance(text_cfg, dict):
        raise UserError(f"{source}: vision_cfg and text_cfg must be JSON objects")
    embed_dim = cfg.get("embed_dim")
    if not isinstance(embed_dim, int):
        raise UserError(f"{source}: model config has no embed_dim")
    quick = bool(cfg.get("quick_gelu", False))
    siglip = bool(vision_cfg.get("timm_model_name"))
    if siglip:
        vision = _timm_vision(vision_cfg, embed_dim, source)
    else:
        vision = _openai_vision_options(vision_cfg, quick, source)
    text = _text_options(text_cfg, quick, source)
    if text["projection"] == "none" and text["width"] != embed_dim:
        raise UserError(f"{source}: text proj_type 'none' needs text width == embed_dim")
    bias = cfg.get("init_logit_bias")
    loss = {"name": "sigmoid"} if bias is not None else {"name": "softmax"}
    model = {"architecture": "clip", "embed_dim": embed_dim, "vision": vision, "text": text}
    return {"model": model, "loss": loss}, siglip


def _check_supported(cfg: dict[str, Any], tower: str, source: Path) -> None:
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise UserError(f"{source}: {tower}_cfg.{key} = {cfg[key]!r} is not supported")
    if cfg.get("block_type") not in (None, "default"):
        raise UserError(
            f"{source}: {tower}_cfg.block_type = {cfg['block_type']!r} is not supported"
        )


def _activation(cfg: dict[str, Any], quick: bool, tower: str, source: Path) -> str:
    kwargs = cfg.get("act_kwargs") or {}
    if quick:
        return "quick_gelu"
    approximate = kwargs.get("approximate", "none")
    if approximate not in ("none", "tanh") or set(kwargs) - {"approximate"}:
        raise UserError(f"{source}: {tower}_cfg.act_kwargs = {kwargs!r} is not supported")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _norm_eps(cfg: dict[str, Any], default: float, tower: str, source: Path) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise UserError(f"{source}: {tower}_cfg.norm_kwargs = {kwargs!r} is not supported")
    return float(kwargs.get("eps", default))


def _square(size: Any, what: str, source: Path) -> int:
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise UserError(f"{source}: {what} {size!r}: only square images are supported")
        size = size[0]
    return int(size)


def _openai_vision_options(cfg: dict[str, Any], quick: bool, source: Path) -> dict[str, Any]:
    v = {**_VISION_DEFAULTS, **cfg}
    _check_supported(v, "vision", source)
    if isinstance(v["layers"], list | tuple):
        raise UserError(
            f"{source}: ResNet image towers (vision_cfg.layers a list) are not supported"
        )
    if v["pool_type"] != "tok":
        raise UserError(
            f"{source}: vision_cfg.pool_type = {v['pool_type']!r} is not supported (tok only)"
        )
    width = int(v["width"])
    if width % int(v["head_width"]):
        raise UserError(f"{source}: vision width {width} is not a multiple of head_width")
    return {
        "image_size": _square(v["image_size"], "vision_cfg.image_size", source),
        "patch_size": _square(v["patch_size"], "vision_cfg.patch_size", source),
        "width": width,
        "depth": int(v["layers"]),
        "heads": width // int(v["head_width"]),
        "mlp_dim": int(width * float(v["mlp_ratio"])),
        "activation": _activation(v, quick, "vision", source),
        "norm_eps": _norm_eps(v, 1e-5, "vision", source),
        "positions": "learned",  # sin_cos_2d is stored as a (frozen) table too
        **_vision_layout(False),
        "norm_pre": not v["no_ln_pre"],
    }


def _timm_vision(cfg: dict[str, Any], embed_dim: int, source: Path) -> dict[str, Any]:
    """A timm SigLIP ViT trunk: its sizes from the timm model name, then ``timm_model_kwargs``
    (open_clip passes them to ``timm.create_model``, where they override the name's)."""
    v = {**_VISION_DEFAULTS, **cfg}
    name = str(v["timm_model_name"])
    match = _TIMM_NAME.match(name)
    if match is None or match["size"] not in _TIMM_SIZES:
        raise UserError(
            f"{source}: timm model {name!r} is not supported (timm's SigLIP ViTs: "
            f"vit_{{{','.join(_TIMM_SIZES)}}}_patchN_siglip_SIZE)"
        )
    width, depth, heads, ratio = _TIMM_SIZES[match["size"]]
    arch = {
        "embed_dim": width, "depth": depth, "num_heads": heads, "mlp_ratio": ratio,
        "patch_size": int(match["patch"]), "img_size": int(match["res"]),
        "act_layer": "gelu_tanh" if name in _TIMM_GELU_TANH else "gelu",
        "global_pool": "avg" if match["gap"] else "map", "class_token": False,
    }  # fmt: skip
    kwargs = dict(v.get("timm_model_kwargs") or {})
    unknown = set(kwargs) - set(arch) - {"qkv_bias", "reg_tokens", "no_embed_class"}
    if unknown or kwargs.get("reg_tokens") or kwargs.get("qkv_bias") is False:
        raise UserError(f"{source}: vision_cfg.timm_model_kwargs {kwargs!r} are not supported")
    arch |= {key: value for key, value in kwargs.items() if key in arch}
    pool = v["timm_pool"]  # open_clip passes it to timm as global_pool
    if pool != "map" or arch["class_token"]:
        raise UserError(
            f"{source}: timm trunk {name!r} with pool {pool!r}: only the attention-pooled "
            "SigLIP trunks (timm_pool 'map', no class token) are supported"
        )
    act = arch["act_layer"]
    if act not in _TIMM_ACTIVATIONS:
        raise UserError(f"{source}: timm act_layer {act!r} is not supported")
    proj = v["timm_proj"]
    if proj == "none":
        projection = {"projection": "none"}
    elif proj in ("linear", "", None):  # "": timm's own head Linear (with bias)
        projection = {"projection": "linear", "projection_bias": bool(v["timm_proj_bias"])}
        if not proj:
            projection["projection_bias"] = True
    else:
        raise UserError(f"{source}: vision_cfg.timm_proj = {proj!r} is not supported")
    width = int(arch["embed_dim"])
    if projection["projection"] == "none" and width != embed_dim:
        raise UserError(f"{source}: timm_proj 'none' needs the trunk width ({width}) == embed_dim")
    return {
        "image_size": _square(arch["img_size"], "timm img_size", source),
        "patch_size": _square(arch["patch_size"], "timm patch_size", source),
        "width": width,
        "depth": int(arch["depth"]),
        "heads": int(arch["num_heads"]),
        "mlp_dim": int(width * float(arch["mlp_ratio"])),
        "activation": _TIMM_ACTIVATIONS[act],
        "norm_eps": 1e-6,  # timm's LayerNorm
        "positions": "learned",
        **_vision_layout(True),
        **projection,
    }


def _text_options(cfg: dict[str, Any], quick: bool, source: Path) -> dict[str, Any]:
    t = {**_TEXT_DEFAULTS, **cfg}
    _check_supported(t, "text", source)
    if t["text_arch"] != "clip":
        raise UserError(f"{source}: text_cfg.text_arch = {t['text_arch']!r} is not supported")
    causal = not t["no_causal_mask"]
    pool = t["pool_type"]
    if pool in ("argmax", "eos"):
        if not causal:
            raise UserError(
                f"{source}: a bidirectional text tower read at its end token is not supported "
                "(open_clip masks no padding there)"
            )
        # The end token is the last non-padding one (argmax: the largest id, OpenAI's BPE).
        pooling = {"pool": "eos", "pad_id": int(t["pad_id"])}
    elif pool in ("last", "first"):
        pooling = {"pool": pool, "pad_id": None}  # open_clip masks no padding
    else:
        raise UserError(f"{source}: text_cfg.pool_type = {pool!r} is not supported")
    width = int(t["width"])
    if t["proj_type"] == "none":
        projection = {"projection": "none"}
    elif t["proj_type"] == "linear":
        projection = {"projection": "linear", "projection_bias": bool(t["proj_bias"])}
    else:
        raise UserError(f"{source}: text_cfg.proj_type = {t['proj_type']!r} is not supported")
    return {
        "vocab_size": int(t["vocab_size"]),
        "context_length": int(t["context_length"]),
        "width": width,
        "depth": int(t["layers"]),
        "heads": int(t["heads"]),
        "mlp_dim": int(width * float(t["mlp_ratio"])),
        "activation": _activation(t, quick, "text", source),
        "norm_eps": _norm_eps(t, 1e-5, "text", source),
        "positions": "learned",
        "causal": causal,
        **pooling,
        **projection,
    }


def tokenizer_defaults(folder: Path, siglip: bool, text_pad: int | None = 0) -> dict[str, Any]:
    """A tokenizer beside the checkpoint; else one that names ``tokenizer.path``. Texts are
    padded with the text tower's padding id where it has one (open_clip's ``pad_id``)."""
    if siglip and (folder / "spiece.model").is_file():
        return {"name": "sentencepiece", "path": str(folder / "spiece.model")}
    pad = text_pad if text_pad is not None else 0
    if (folder / "tokenizer.json").is_file():
        pad = tokenizer_pad_id(folder) if siglip else pad
        return {"name": "bpe", "path": str(folder / "tokenizer.json"), "pad_id": pad}
    if siglip:  # no path: validation asks for tokenizer.path
        return {"name": "sentencepiece"}
    # A path that does not exist (yet): building the tokenizer names tokenizer.path.
    return {"name": "bpe", "path": str(folder / "tokenizer.json"), "pad_id": pad}


def preprocess_defaults(cfg: dict[str, Any], siglip: bool) -> dict[str, Any]:
    """open_clip's preprocess_cfg, defaults as its pretrained configs (_pcfg / _slpcfg)."""
    half = (0.5, 0.5, 0.5)
    mode = cfg.get("resize_mode", "squash" if siglip else "shortest")
    resize = {"shortest": "crop", "squash": "squash"}.get(mode)
    if resize is None:
        raise UserError(f"open_clip preprocess_cfg.resize_mode = {mode!r} is not supported")
    interpolation = cfg.get("interpolation", "bicubic")
    return {
        "mean": list(cfg.get("mean", half if siglip else CLIP_MEAN)),
        "std": list(cfg.get("std", half if siglip else CLIP_STD)),
        "resize": resize,
        "interpolation": "bilinear" if interpolation == "bilinear" else "bicubic",
    }
