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
  preset here mirrors (``open_clip_config.MODEL_NAMES``), whatever config files lie beside it.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax.errors import UserError
from clip_jax.models import open_clip_config
from clip_jax.models.weight_layout import (
    CONV,
    COPY,
    IGNORED,
    LINEAR,
    SCALAR,
    attention_out,
    convert,
    finish_import,
    split_heads,
)

CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
            tables, siglip = open_clip_config.named_tables(name)
            preprocess: dict[str, Any] = {}
        else:
            model_cfg, preprocess, source = _read_config(base)
            tables, siglip = open_clip_config.config_tables(model_cfg, source)
        return {
            **tables,
            "tokenizer": open_clip_config.tokenizer_defaults(
                folder, siglip, tables["model"]["text"].get("pad_id")
            ),
            "preprocess": open_clip_config.preprocess_defaults(preprocess, siglip),
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
        items.append(("logit_scale", "logit_scale", SCALAR[0]))
        if "logit_bias" in tensors:
            items.append(("logit_bias", "logit_bias", SCALAR[0]))
        params, names = {}, {}
        for ours, theirs, to_ours in items:
            params[ours] = convert(tensors, theirs, to_ours)
            names[ours] = theirs
        used = set(names.values())
        unused = sorted(k for k in tensors if k not in used and not IGNORED.match(k))
        return finish_import(params, spec, unused, f"the open_clip config of {path}"), names

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
    if name not in open_clip_config.MODEL_NAMES:
        raise UserError(
            f"open_clip model {name!r} is not one this package knows (known: "
            f"{', '.join(open_clip_config.MODEL_NAMES)}); for another model, put its open_clip config JSON "
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
        f"open_clip:{base}#NAME with NAME one of {', '.join(open_clip_config.MODEL_NAMES)}"
    )


# ------------------------------------------------------------------ parameters
def _part(count: int, index: int, kind: Callable) -> Callable:
    """The ``index``-th of ``count`` equal row blocks of a packed tensor, then ``kind``."""
    return lambda w: kind(np.split(w, count, axis=0)[index])


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
