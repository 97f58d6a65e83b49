"""The ``clip`` architecture in Hugging Face's layout: transformers' CLIPModel and SiglipModel.

Both directions live here (the writing side in ``hf_export``), with the architecture that owns the parameter names, so no
generic code names a parameter. numpy only (no torch, no jax): reading a config or
converting tensors is cheap and safe anywhere.

- CLIP: patch conv without bias, class token, learned positions with a class slot,
  ln_pre, causal text read at its end token, bias-free projections.
- SigLIP (and SigLIP 2 checkpoints published in the same layout): patch bias, no class
  token, MAP head (torch's packed ``in_proj``) whose output is the image embedding,
  bidirectional text read at its last position with nothing masked, a text head with bias.
  A NaFlex run exports as Siglip2Model: the same tensors but the patch embedding, a
  Linear on flattened patches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax.errors import UserError
from clip_jax.models.weight_layout import (
    CONV,
    COPY,
    IGNORED,
    LINEAR,
    SCALAR,
    SCALAR_0D,
    attention_out,
    convert,
    finish_import,
    flat_patches,
    split_heads,
    tensor,
)
from clip_jax.schemas import CLIP_MEAN, CLIP_STD

ACTIVATIONS_IN = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
ACTIVATIONS_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# transformers' defaults, for config.json files that leave them out.
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


def _norm(ours: str, theirs: str, bias: bool = True) -> Iterator[tuple]:
    yield f"{ours}/scale", f"{theirs}.weight", COPY
    if bias:
        yield f"{ours}/bias", f"{theirs}.bias", COPY


def _dense(
    ours: str, theirs: str, kind=LINEAR, bias: bool = True, bias_kind=COPY
) -> Iterator[tuple]:
    yield f"{ours}/kernel", f"{theirs}.weight", kind
    if bias:
        yield f"{ours}/bias", f"{theirs}.bias", bias_kind


def _block(ours: str, theirs: str, width: int, heads: int) -> Iterator[tuple]:
    yield from _norm(f"{ours}/ln_1", f"{theirs}.layer_norm1")
    yield from _norm(f"{ours}/ln_2", f"{theirs}.layer_norm2")
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        per_head = split_heads(width, heads)
        yield from _dense(
            f"{ours}/attn/{name}", f"{theirs}.self_attn.{proj}", per_head, bias_kind=per_head
        )
    yield from _dense(f"{ours}/attn/out", f"{theirs}.self_attn.out_proj", attention_out(heads))
    yield from _dense(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1")
    yield from _dense(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2")


def _tower(ours: str, theirs: str, tower) -> Iterator[tuple]:
    for i in range(tower.depth):
        yield from _block(
            f"{ours}/encoder/block_{i}", f"{theirs}.encoder.layers.{i}", tower.width, tower.heads
        )


def layout_of(options) -> str:
    """'clip' or 'siglip': which transformers model these options are, or a UserError
    naming the option that neither can express."""
    v = options.vision
    layout = "siglip" if v.pool == "map" else "clip"
    wanted = {
        "clip": {
            "vision.pool": "tok", "vision.patch_bias": False, "vision.norm_pre": True,
            "vision.projection": "linear", "vision.projection_bias": False,
            "text.causal": True, "text.pool": "eos", "text.projection": "linear",
            "text.projection_bias": False,
        },
        "siglip": {
            "vision.pool": "map", "vision.patch_bias": True, "vision.norm_pre": False,
            "vision.projection": "none", "text.causal": False, "text.pool": "last",
            "text.projection": "linear", "text.projection_bias": True,
        },
    }[layout]  # fmt: skip
    for tower in ("vision", "text"):
        wanted |= {
            f"{tower}.positions": "learned", f"{tower}.norm": "layernorm",
            f"{tower}.use_bias": True, f"{tower}.qk_norm": False,
        }  # fmt: skip
    wanted["vision.registers"] = 0
    for key, value in wanted.items():
        tower, name = key.split(".")
        have = getattr(getattr(options, tower), name)
        if have != value:
            model = "SiglipModel" if layout == "siglip" else "CLIPModel"
            raise UserError(
                f"model.{key} = {have!r}: transformers' {model} has no such option "
                f"(it needs {value!r}); this model cannot be exported to the hf format"
            )
    for tower in ("vision", "text"):
        act = getattr(options, tower).activation
        if act not in ACTIVATIONS_OUT:
            raise UserError(f"model.{tower}.activation = {act!r} has no transformers equivalent")
    if layout == "siglip" and options.embed_dim != v.width:
        raise UserError("SiglipModel needs model.embed_dim equal to model.vision.width")
    return layout


def entries(
    options, layout: str, naflex: bool = False
) -> list[tuple[str, str, tuple[Callable, Callable]]]:
    """(our parameter, transformers tensor, (to ours, to theirs)) for every parameter.

    ``naflex``: Siglip2Model's tensors (the SigLIP layout with the patch embedding as a
    Linear on flattened patches; every other name and shape is SiglipModel's)."""
    v, t = options.vision, options.text
    vm, tm = "vision_model", "text_model"
    patches = flat_patches(v.patch_size) if naflex else CONV
    out = list(_tower("vision", vm, v)) + list(_tower("text", tm, t))
    out += [
        ("vision/patch_embed/kernel", f"{vm}.embeddings.patch_embedding.weight", patches),
        ("vision/pos_embed", f"{vm}.embeddings.position_embedding.weight", COPY),
        ("text/token_embed/embedding", f"{tm}.embeddings.token_embedding.weight", COPY),
        ("text/pos_embed", f"{tm}.embeddings.position_embedding.weight", COPY),
    ]
    out += _norm("vision/ln_post", f"{vm}.post_layernorm")
    out += _norm("text/ln_final", f"{tm}.final_layer_norm")
    if layout == "clip":
        out += [
            ("vision/class_token", f"{vm}.embeddings.class_embedding", COPY),
            ("logit_scale", "logit_scale", SCALAR_0D),
        ]
        out += _norm("vision/ln_pre", f"{vm}.pre_layrnorm")
        out += _dense("vision_proj", "visual_projection", bias=False)
        out += _dense("text_proj", "text_projection", bias=False)
        return out
    head = f"{vm}.head"
    out += [
        ("vision/patch_embed/bias", f"{vm}.embeddings.patch_embedding.bias", COPY),
        ("vision/map_head/probe", f"{head}.probe", COPY),
        ("logit_scale", "logit_scale", SCALAR),
        ("logit_bias", "logit_bias", SCALAR),
    ]
    out += _dense("vision/map_head/attn/out", f"{head}.attention.out_proj", attention_out(v.heads))
    out += _norm("vision/map_head/ln", f"{head}.layernorm")
    out += _dense("vision/map_head/mlp/fc1", f"{head}.mlp.fc1")
    out += _dense("vision/map_head/mlp/fc2", f"{head}.mlp.fc2")
    out += _dense("text_proj", f"{tm}.head")
    return out


def packed_attention(options) -> list[tuple[str, str, int, tuple[Callable, Callable]]]:
    """The MAP head's q/k/v: thirds of torch's packed in_proj (rows q, then k, then v)."""
    v = options.vision
    kind = split_heads(v.width, v.heads)
    return [
        (f"vision/map_head/attn/{name}/{part}", f"vision_model.head.attention.in_proj_{torch}",
         index, kind)
        for index, name in enumerate(("query", "key", "value"))
        for part, torch in (("kernel", "weight"), ("bias", "bias"))
    ]  # fmt: skip


# ------------------------------------------------------------------- the format
class HuggingFaceFormat:
    """``hf:PATH``: a folder written by transformers' ``save_pretrained``."""

    name = "hf"
    description = "a folder saved by transformers (CLIPModel, SiglipModel)"

    def recognizes(self, path: Path) -> bool:
        return _model_type(path) in ("clip", "siglip")

    def spec_defaults(self, path: Path) -> dict[str, Any]:
        """The run-spec tables that describe this checkpoint: model, loss, tokenizer,
        preprocess (reads JSON only)."""
        config = _read_json(path / "config.json")
        layout = _model_type(path)
        vision_cfg, text_cfg = _tower_configs(config, layout)
        shared_vision = _tower_options(vision_cfg)
        shared_text = _tower_options(text_cfg)
        vision = {
            **shared_vision,
            "image_size": vision_cfg["image_size"],
            "patch_size": vision_cfg["patch_size"],
        }
        text = {
            **shared_text,
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
            "model": {
                "architecture": "clip",
                "embed_dim": embed_dim,
                "vision": vision,
                "text": text,
            },
            "loss": loss,
            "tokenizer": _tokenizer_defaults(path, layout),
            "preprocess": _preprocess_defaults(path, layout),
        }

    def read_params(self, path: Path, spec, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(flat parameters named our way, our name -> their tensor name)."""
        options = spec.model
        layout = layout_of(options)  # the spec may not change what the tensors compute
        params, names = {}, {}
        for ours, theirs, (to_ours, _) in entries(options, layout):
            params[ours] = convert(tensors, theirs, to_ours)
            names[ours] = theirs
        if layout == "siglip":
            for ours, theirs, index, (to_ours, _) in packed_attention(options):
                third = np.split(tensor(tensors, theirs), 3, axis=0)[index]
                params[ours] = convert({theirs: third}, theirs, to_ours)
                names[ours] = theirs
        used = set(names.values())
        unused = sorted(k for k in tensors if k not in used and not IGNORED.match(k))
        return finish_import(params, spec, unused, f"{path / 'config.json'}"), names

    def check_export(self, spec) -> None:
        """A UserError naming the option transformers cannot express, before any restore."""
        layout_of(spec.model)

    def write(
        self, params: dict[str, np.ndarray], spec, tokenizer_file: Path | None, out: Path
    ) -> None:
        """Export: model.safetensors + config.json + tokenizer + processor files in ``out``."""
        from clip_jax.models.hf_export import write_folder

        write_folder(params, spec, tokenizer_file, out)


HF_FORMAT = HuggingFaceFormat()


# -------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON: {exc}") from None


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    data = _read_json(config)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in ("clip", "siglip"):
        raise UserError(
            f"{config}: model_type {model_type!r} is not supported (clip or siglip; SigLIP 2 "
            "checkpoints in the siglip layout load as siglip)"
        )
    return model_type


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


def _resample(config: dict, file: Path) -> int:
    """PIL's resample code: 3 bicubic (transformers' default), 2 bilinear; no other."""
    resample = config.get("resample", 3)
    if resample not in (2, 3):
        raise UserError(f"{file}: resample {resample!r} is not supported (2 bilinear, 3 bicubic)")
    return resample


def _preprocess_defaults(path: Path, layout: str) -> dict[str, Any]:
    file = path / "preprocessor_config.json"
    config = _read_json(file) if file.is_file() else {}
    siglip = layout == "siglip"
    half = (0.5, 0.5, 0.5)
    crop = config.get("do_center_crop", not siglip)
    return {
        "mean": list(config.get("image_mean", half if siglip else CLIP_MEAN)),
        "std": list(config.get("image_std", half if siglip else CLIP_STD)),
        "resize": "crop" if crop else "squash",
        "interpolation": "bilinear" if _resample(config, file) == 2 else "bicubic",
    }
