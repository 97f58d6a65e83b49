"""The ``clip`` architecture in Hugging Face's layout: transformers' CLIPModel and SiglipModel.

The tensor mapping lives here, with the architecture that owns the parameter names, so
no generic code names a parameter; ``hf_import`` reads the folder's configs into a run
spec, ``hf_export`` writes them. numpy only (no torch, no jax): reading a config or
converting tensors is cheap and safe anywhere.

- CLIP: patch conv without bias, class token, learned positions with a class slot,
  ln_pre, causal text read at its end token, bias-free projections.
- SigLIP (and SigLIP 2 checkpoints published in the same layout): patch bias, no class
  token, MAP head (torch's packed ``in_proj``) whose output is the image embedding,
  bidirectional text read at its last position with nothing masked, a text head with bias.
  Siglip2Model (NaFlex): the same tensors but the patch embedding, a Linear on
  flattened patches; a NaFlex run exports as one, and one imports as a NaFlex run.
"""

from __future__ import annotations

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

ACTIVATIONS_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


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
    model = "SiglipModel" if layout == "siglip" else "CLIPModel"
    problems = []  # every one at once: a user fixes them in one go, not one per try
    for key, value in wanted.items():
        tower, name = key.split(".")
        have = getattr(getattr(options, tower), name)
        if have != value:
            problems.append(f"model.{key} = {have!r} (it needs {value!r})")
    for tower in ("vision", "text"):
        act = getattr(options, tower).activation
        if act not in ACTIVATIONS_OUT:
            problems.append(f"model.{tower}.activation = {act!r} (no transformers equivalent)")
    if layout == "siglip" and options.embed_dim != v.width:
        problems.append(f"model.embed_dim = {options.embed_dim} (it needs model.vision.width)")
    if problems:
        raise UserError(
            f"this model cannot be exported to the hf format: transformers' {model} has no "
            f"such options: {'; '.join(problems)}"
        )
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
    description = "a folder saved by transformers (CLIPModel, SiglipModel, Siglip2Model)"

    def recognizes(self, path: Path) -> bool:
        from clip_jax.models.hf_import import model_type

        return model_type(path) is not None

    def spec_defaults(self, path: Path) -> dict[str, Any]:
        """The run-spec tables that describe this checkpoint: model, loss, tokenizer,
        preprocess (reads JSON only)."""
        from clip_jax.models.hf_import import spec_defaults

        return spec_defaults(path)

    def read_params(self, path: Path, spec, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(flat parameters named our way, our name -> their tensor name)."""
        from clip_jax.models.hf_import import model_type

        options = spec.model
        layout = layout_of(options)  # the spec may not change what the tensors compute
        naflex = model_type(path) == "siglip2"  # its patch embedding is a Linear
        params, names = {}, {}
        for ours, theirs, (to_ours, _) in entries(options, layout, naflex=naflex):
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
