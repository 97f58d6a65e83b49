"""The ``clip`` architecture in open_clip's layout: ``open_clip:PATH`` references (import).

What a reference names:

- ``open_clip:DIR``: a folder as open_clip's hub export writes it: ``open_clip_config.json``
  (``{"model_cfg": {...}, "preprocess_cfg": {...}}``) beside ``open_clip_model.safetensors``
  or ``open_clip_pytorch_model.bin``.
- ``open_clip:FILE``: a state dict (``.safetensors``, ``.bin``, ``.pt``, ``.pth``; training
  checkpoints with a ``state_dict`` entry and DDP's ``module.`` prefix are fine) whose config
  lies beside it: ``FILE``'s stem + ``.json``, else ``open_clip_config.json``. Either the hub
  form above or a bare model config such as open_clip's ``model_configs/ViT-B-32.json``.
- ``open_clip:FILE#NAME`` (or ``DIR#NAME``): one of open_clip's built-in model names that a
  preset here mirrors (``MODEL_NAMES``), whatever config files lie beside it.

Two layouts, told apart by the config (``timm_model_name``) and mapped from the resulting
options (``vision.pool``), as ``hf_format`` does for transformers:

- OpenAI-style ViT CLIP (open_clip's VisionTransformer + TextTransformer): packed
  ``in_proj`` attention, ``visual.proj`` / ``text_projection`` used as ``x @ proj`` (so
  already a Flax kernel), causal text read at its end-of-text token. open_clip reads that
  token as the argmax of the ids, which is the last non-padding position for its tokenizer
  (end-of-text is the largest id): our ``pool = "eos"`` with ``pad_id = 0``. Activation:
  ``quick_gelu`` where the config says so (OpenAI's weights), exact GELU otherwise.
- timm-based SigLIP (``visual.trunk.*``: timm's VisionTransformer with ``global_pool="map"``
  whose ``attn_pool`` is our MAP head; text under ``text.*``, bidirectional, read at the last
  position with nothing masked, projected with a bias; ``logit_bias``). open_clip runs these
  with what timm and its config name: exact GELU for the first SigLIP trunks (big_vision
  trained them with the tanh approximation, a difference of ~1e-3 in activations) and
  ``gelu_tanh`` where timm's model or ``act_kwargs`` says so. We follow open_clip.

numpy only: configs are read as JSON, tensors through ``pretrained.read_tensors``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax.errors import UserError
from clip_jax.models.hf_format import tokenizer_pad_id
from clip_jax.models.weight_layout import (
    CONV,
    COPY,
    IGNORED,
    LINEAR,
    attention_out,
    split_heads,
    stack_scanned,
)
from clip_jax.presets import CLIP_PRESETS, OPEN_CLIP_COUNTS
from clip_jax.schemas import CLIP_MEAN, CLIP_STD

CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

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


# ------------------------------------------------------------------- the format
class OpenClipFormat:
    """``open_clip:PATH``: an open_clip state dict and its model config (or name)."""

    name = "open_clip"
    description = "an open_clip checkpoint: state dict + open_clip_config.json or model name"

    def recognizes(self, path: Path) -> bool:
        base, _ = split_ref(path)
        if base.is_dir():
            return (base / CONFIG_NAME).is_file() or any(
                (base / name).is_file() for name in CHECKPOINT_NAMES
            )
        return base.is_file() and base.suffix in CHECKPOINT_SUFFIXES

    def spec_defaults(self, path: Path) -> dict[str, Any]:
        """The run-spec tables this checkpoint implies (reads JSON only)."""
        base, name = split_ref(path)
        folder = base if base.is_dir() else base.parent
        if name is not None:
            tables, siglip = _named_tables(name)
            preprocess: dict[str, Any] = {}
        else:
            model_cfg, preprocess, source = _read_config(base)
            tables, siglip = _config_tables(model_cfg, source)
        return {
            **tables,
            "tokenizer": _tokenizer_defaults(folder, siglip),
            "preprocess": _preprocess_defaults(preprocess, siglip),
        }

    def read_tensors(self, path: Path) -> dict[str, np.ndarray]:
        """The state dict, without DDP's ``module.`` prefix."""
        from clip_jax.pretrained import read_tensors

        return _without_ddp_prefix(read_tensors(checkpoint_file(split_ref(path)[0])))

    def read_params(self, path: Path, spec, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(flat parameters named our way, our name -> their tensor name)."""
        tensors = _without_ddp_prefix(tensors)
        options = spec.model
        pool = options.vision.pool
        if pool not in ("tok", "map"):
            raise UserError(
                f"model.vision.pool = {pool!r}: open_clip checkpoints hold a class token "
                "('tok', OpenAI-style ViTs) or timm's attention pool ('map', SigLIP)"
            )
        timm = pool == "map"
        # CustomTextCLIP keeps its text tower under text.*, CLIP at the top level.
        text = "text." if any(k.startswith("text.") for k in tensors) else ""
        items = list(_vision_entries(options, tensors) if timm else _openai_vision(options))
        items += _text_entries(options, text)
        items.append(("logit_scale", "logit_scale", _scalar))
        if "logit_bias" in tensors:
            items.append(("logit_bias", "logit_bias", _scalar))
        params, names = {}, {}
        for ours, theirs, to_ours in items:
            params[ours] = _convert(tensors, theirs, to_ours)
            names[ours] = theirs
        init_bias = getattr(spec.loss, "init_bias", None)
        if "logit_bias" not in params and init_bias is not None:  # a sigmoid loss on CLIP
            params["logit_bias"] = np.asarray(init_bias, np.float32)
        used = set(names.values())
        unused = sorted(k for k in tensors if k not in used and not IGNORED.match(k))
        if unused:
            raise UserError(
                f"{path}: tensor {unused[0]} ({len(unused)} unused in all) has no place in the "
                "model its open_clip config describes"
            )
        return stack_scanned(params, options), names

    def write(self, params, spec, tokenizer_file, out: Path) -> None:
        raise UserError(
            "exporting to the open_clip format is not supported yet (export to hf instead)"
        )


OPEN_CLIP_FORMAT = OpenClipFormat()


# ------------------------------------------------------------------ references
def split_ref(path: Path) -> tuple[Path, str | None]:
    """(checkpoint file or folder, open_clip model name or None) of ``PATH[#NAME]``."""
    if path.exists():
        return path, None
    head, sep, name = str(path).rpartition("#")
    if not sep:
        return path, None
    if name not in MODEL_NAMES:
        raise UserError(
            f"open_clip model {name!r} is not one this package knows (known: "
            f"{', '.join(MODEL_NAMES)}); for another model, put its open_clip config JSON "
            "beside the checkpoint"
        )
    return Path(head), name


def _without_ddp_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def checkpoint_file(base: Path) -> Path:
    if not base.is_dir():
        return base
    for name in CHECKPOINT_NAMES:
        if (base / name).is_file():
            return base / name
    raise UserError(f"{base} has no open_clip weights ({' or '.join(CHECKPOINT_NAMES)})")


def _read_config(base: Path) -> tuple[dict, dict, Path]:
    """(model config, preprocess config, the file) for a checkpoint file or folder."""
    if base.is_dir():
        candidates = [base / CONFIG_NAME]
    else:
        candidates = [base.with_suffix(".json"), base.parent / CONFIG_NAME]
    for file in candidates:
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"{file} is not readable JSON: {exc}") from None
            if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
                return config["model_cfg"], config.get("preprocess_cfg") or {}, file
            if isinstance(config, dict) and "vision_cfg" in config:
                return config, {}, file
            raise UserError(f"{file} is no open_clip config (no model_cfg or vision_cfg)")
    names = " or ".join(str(f.name) for f in candidates)
    raise UserError(
        f"{base}: no open_clip config beside it ({names}); add one, or name the model: "
        f"open_clip:{base}#NAME with NAME one of {', '.join(MODEL_NAMES)}"
    )


# ------------------------------------------------------------ config -> options
def _named_tables(name: str) -> tuple[dict[str, Any], bool]:
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


def _config_tables(cfg: dict[str, Any], source: Path) -> tuple[dict[str, Any], bool]:
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


def _tokenizer_defaults(folder: Path, siglip: bool) -> dict[str, Any]:
    """A tokenizer beside the checkpoint; else one that names ``tokenizer.path``."""
    if siglip and (folder / "spiece.model").is_file():
        return {"name": "sentencepiece", "path": str(folder / "spiece.model")}
    if (folder / "tokenizer.json").is_file():
        pad = tokenizer_pad_id(folder) if siglip else 0
        return {"name": "bpe", "path": str(folder / "tokenizer.json"), "pad_id": pad}
    if siglip:  # no path: validation asks for tokenizer.path
        return {"name": "sentencepiece"}
    # A path that does not exist (yet): building the tokenizer names tokenizer.path.
    return {"name": "bpe", "path": str(folder / "tokenizer.json"), "pad_id": 0}


def _preprocess_defaults(cfg: dict[str, Any], siglip: bool) -> dict[str, Any]:
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


# ------------------------------------------------------------------ parameters
def _part(count: int, index: int, kind: Callable) -> Callable:
    """The ``index``-th of ``count`` equal row blocks of a packed tensor, then ``kind``."""
    return lambda w: kind(np.split(w, count, axis=0)[index])


def _scalar(w: np.ndarray) -> np.ndarray:
    if w.size != 1:
        raise ValueError("not a scalar")
    return w.reshape(())


def _norm(ours: str, theirs: str) -> Iterator[tuple]:
    yield f"{ours}/scale", f"{theirs}.weight", COPY[0]
    yield f"{ours}/bias", f"{theirs}.bias", COPY[0]


def _linear(ours: str, theirs: str, kernel: Callable = LINEAR[0]) -> Iterator[tuple]:
    yield f"{ours}/kernel", f"{theirs}.weight", kernel
    yield f"{ours}/bias", f"{theirs}.bias", COPY[0]


def _packed(ours: str, weight: str, bias: str, names, width: int, heads: int) -> Iterator[tuple]:
    """q/k/v (or k/v) from row blocks of one packed projection (torch (n*D, D))."""
    per_head = split_heads(width, heads)[0]
    for index, name in enumerate(names):
        yield f"{ours}/{name}/kernel", weight, _part(len(names), index, per_head)
        yield f"{ours}/{name}/bias", bias, _part(len(names), index, per_head)


def _resblock(ours: str, theirs: str, width: int, heads: int) -> Iterator[tuple]:
    """open_clip's ResidualAttentionBlock (OpenAI's layout)."""
    yield from _norm(f"{ours}/ln_1", f"{theirs}.ln_1")
    yield from _norm(f"{ours}/ln_2", f"{theirs}.ln_2")
    attn = f"{theirs}.attn"
    yield from _packed(
        f"{ours}/attn", f"{attn}.in_proj_weight", f"{attn}.in_proj_bias",
        ("query", "key", "value"), width, heads,
    )  # fmt: skip
    yield from _linear(f"{ours}/attn/out", f"{attn}.out_proj", attention_out(heads)[0])
    yield from _linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.c_fc")
    yield from _linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.c_proj")


def _timm_block(ours: str, theirs: str, width: int, heads: int) -> Iterator[tuple]:
    """timm's ViT Block."""
    yield from _norm(f"{ours}/ln_1", f"{theirs}.norm1")
    yield from _norm(f"{ours}/ln_2", f"{theirs}.norm2")
    attn = f"{theirs}.attn"
    yield from _packed(
        f"{ours}/attn", f"{attn}.qkv.weight", f"{attn}.qkv.bias",
        ("query", "key", "value"), width, heads,
    )  # fmt: skip
    yield from _linear(f"{ours}/attn/out", f"{attn}.proj", attention_out(heads)[0])
    yield from _linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1")
    yield from _linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2")


def _openai_vision(options) -> Iterator[tuple]:
    v = options.vision
    yield "vision/patch_embed/kernel", "visual.conv1.weight", CONV[0]
    yield "vision/class_token", "visual.class_embedding", COPY[0]
    yield "vision/pos_embed", "visual.positional_embedding", COPY[0]
    if v.norm_pre:
        yield from _norm("vision/ln_pre", "visual.ln_pre")
    for i in range(v.depth):
        yield from _resblock(
            f"vision/encoder/block_{i}", f"visual.transformer.resblocks.{i}", v.width, v.heads
        )
    yield from _norm("vision/ln_post", "visual.ln_post")
    if v.projection == "linear":
        yield "vision_proj/kernel", "visual.proj", COPY[0]  # used as x @ proj


def _vision_entries(options, tensors) -> Iterator[tuple]:
    """timm's SigLIP trunk under ``visual.trunk`` (its attn_pool is our MAP head)."""
    v, trunk = options.vision, "visual.trunk"
    yield from _linear("vision/patch_embed", f"{trunk}.patch_embed.proj", CONV[0])
    yield "vision/pos_embed", f"{trunk}.pos_embed", lambda w: w.reshape(-1, w.shape[-1])
    for i in range(v.depth):
        yield from _timm_block(f"vision/encoder/block_{i}", f"{trunk}.blocks.{i}", v.width, v.heads)
    yield from _norm("vision/ln_post", f"{trunk}.norm")
    pool, head = f"{trunk}.attn_pool", "vision/map_head"
    yield f"{head}/probe", f"{pool}.latent", COPY[0]
    per_head = split_heads(v.width, v.heads)[0]
    yield f"{head}/attn/query/kernel", f"{pool}.q.weight", per_head
    yield f"{head}/attn/query/bias", f"{pool}.q.bias", per_head
    yield from _packed(
        f"{head}/attn", f"{pool}.kv.weight", f"{pool}.kv.bias", ("key", "value"), v.width, v.heads
    )
    yield from _linear(f"{head}/attn/out", f"{pool}.proj", attention_out(v.heads)[0])
    yield from _norm(f"{head}/ln", f"{pool}.norm")
    yield from _linear(f"{head}/mlp/fc1", f"{pool}.mlp.fc1")
    yield from _linear(f"{head}/mlp/fc2", f"{pool}.mlp.fc2")
    if v.projection == "linear":
        # timm_proj "linear": open_clip's head; "" : timm's own classifier head.
        proj = f"{trunk}.head" if f"{trunk}.head.weight" in tensors else "visual.head.proj"
        yield "vision_proj/kernel", f"{proj}.weight", LINEAR[0]
        if v.projection_bias:
            yield "vision_proj/bias", f"{proj}.bias", COPY[0]


def _text_entries(options, prefix: str) -> list[tuple]:
    t = options.text
    out = [
        ("text/token_embed/embedding", f"{prefix}token_embedding.weight", COPY[0]),
        ("text/pos_embed", f"{prefix}positional_embedding", COPY[0]),
    ]
    for i in range(t.depth):
        out += _resblock(
            f"text/encoder/block_{i}", f"{prefix}transformer.resblocks.{i}", t.width, t.heads
        )
    out += _norm("text/ln_final", f"{prefix}ln_final")
    if t.projection == "linear" and t.projection_bias:  # an nn.Linear
        out += _linear("text_proj", f"{prefix}text_projection")
    elif t.projection == "linear":  # a parameter used as x @ proj
        out.append(("text_proj/kernel", f"{prefix}text_projection", COPY[0]))
    return out


def _convert(tensors: dict[str, np.ndarray], name: str, to_ours: Callable) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name}, which its open_clip config implies")
    tensor = np.asarray(tensors[name], np.float32)
    try:
        return np.asarray(to_ours(tensor), np.float32)
    except ValueError:
        raise UserError(
            f"tensor {name} of shape {tensor.shape} does not fit the model its open_clip "
            "config describes"
        ) from None
