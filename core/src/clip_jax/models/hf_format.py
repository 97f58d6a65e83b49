"""The ``clip`` architecture in Hugging Face's layout: transformers' CLIPModel and SiglipModel.

Both directions live here, with the architecture that owns the parameter names, so no
generic code names a parameter. numpy only (safetensors' numpy reader, never torch, no
jax): reading a config or converting tensors is cheap and safe anywhere.

- CLIP: patch conv without bias, class token, learned positions with a class slot,
  ln_pre, causal text read at its end token, bias-free projections.
- SigLIP (and SigLIP 2 checkpoints published in the same layout): patch bias, no class
  token, MAP head (torch's packed ``in_proj``) whose output is the image embedding,
  bidirectional text read at its last position with nothing masked, a text head with bias.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax.errors import UserError
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

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*position_ids$")


# ------------------------------------------------------------------ tensor layouts
# Each kind converts one torch tensor to our layout (``in``) and back (``out``).
def _heads(width: int, heads: int) -> tuple[Callable, Callable]:
    """q/k/v projections: torch (H*K, D) <-> ours (D, H, K); biases (H*K) <-> (H, K)."""
    return (
        lambda w: w.T.reshape(width, heads, -1) if w.ndim == 2 else w.reshape(heads, -1),
        lambda k: k.reshape(width, -1).T if k.ndim == 3 else k.reshape(-1),
    )


_LINEAR = (lambda w: w.T, lambda k: k.T)  # torch (out, in) <-> flax (in, out)
_COPY = (lambda w: w, lambda k: k)
_SCALAR = (lambda w: w.reshape(()), lambda k: np.reshape(k, (1,)))
_SCALAR_0D = (lambda w: w.reshape(()), lambda k: np.reshape(k, ()))
_CONV = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def _attention_out(heads: int) -> tuple[Callable, Callable]:
    """out_proj: torch (D, H*K) <-> ours (H, K, D)."""
    return (
        lambda w: w.T.reshape(heads, -1, w.shape[0]),
        lambda k: k.reshape(-1, k.shape[-1]).T,
    )


def _norm(ours: str, theirs: str, bias: bool = True) -> Iterator[tuple]:
    yield f"{ours}/scale", f"{theirs}.weight", _COPY
    if bias:
        yield f"{ours}/bias", f"{theirs}.bias", _COPY


def _dense(
    ours: str, theirs: str, kind=_LINEAR, bias: bool = True, bias_kind=_COPY
) -> Iterator[tuple]:
    yield f"{ours}/kernel", f"{theirs}.weight", kind
    if bias:
        yield f"{ours}/bias", f"{theirs}.bias", bias_kind


def _block(ours: str, theirs: str, width: int, heads: int) -> Iterator[tuple]:
    yield from _norm(f"{ours}/ln_1", f"{theirs}.layer_norm1")
    yield from _norm(f"{ours}/ln_2", f"{theirs}.layer_norm2")
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        per_head = _heads(width, heads)
        yield from _dense(
            f"{ours}/attn/{name}", f"{theirs}.self_attn.{proj}", per_head, bias_kind=per_head
        )
    yield from _dense(f"{ours}/attn/out", f"{theirs}.self_attn.out_proj", _attention_out(heads))
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


def entries(options, layout: str) -> list[tuple[str, str, tuple[Callable, Callable]]]:
    """(our parameter, transformers tensor, (to ours, to theirs)) for every parameter."""
    v, t = options.vision, options.text
    vm, tm = "vision_model", "text_model"
    out = list(_tower("vision", vm, v)) + list(_tower("text", tm, t))
    out += [
        ("vision/patch_embed/kernel", f"{vm}.embeddings.patch_embedding.weight", _CONV),
        ("vision/pos_embed", f"{vm}.embeddings.position_embedding.weight", _COPY),
        ("text/token_embed/embedding", f"{tm}.embeddings.token_embedding.weight", _COPY),
        ("text/pos_embed", f"{tm}.embeddings.position_embedding.weight", _COPY),
    ]
    out += _norm("vision/ln_post", f"{vm}.post_layernorm")
    out += _norm("text/ln_final", f"{tm}.final_layer_norm")
    if layout == "clip":
        out += [
            ("vision/class_token", f"{vm}.embeddings.class_embedding", _COPY),
            ("logit_scale", "logit_scale", _SCALAR_0D),
        ]
        out += _norm("vision/ln_pre", f"{vm}.pre_layrnorm")
        out += _dense("vision_proj", "visual_projection", bias=False)
        out += _dense("text_proj", "text_projection", bias=False)
        return out
    head = f"{vm}.head"
    out += [
        ("vision/patch_embed/bias", f"{vm}.embeddings.patch_embedding.bias", _COPY),
        ("vision/map_head/probe", f"{head}.probe", _COPY),
        ("logit_scale", "logit_scale", _SCALAR),
        ("logit_bias", "logit_bias", _SCALAR),
    ]
    out += _dense("vision/map_head/attn/out", f"{head}.attention.out_proj", _attention_out(v.heads))
    out += _norm("vision/map_head/ln", f"{head}.layernorm")
    out += _dense("vision/map_head/mlp/fc1", f"{head}.mlp.fc1")
    out += _dense("vision/map_head/mlp/fc2", f"{head}.mlp.fc2")
    out += _dense("text_proj", f"{tm}.head")
    return out


def _packed_attention(options) -> list[tuple[str, str, int, tuple[Callable, Callable]]]:
    """The MAP head's q/k/v: thirds of torch's packed in_proj (rows q, then k, then v)."""
    v = options.vision
    kind = _heads(v.width, v.heads)
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
        layout = "siglip" if options.vision.pool == "map" else "clip"
        params, names = {}, {}
        for ours, theirs, (to_ours, _) in entries(options, layout):
            params[ours] = _convert(tensors, theirs, to_ours)
            names[ours] = theirs
        if layout == "siglip":
            for ours, theirs, index, (to_ours, _) in _packed_attention(options):
                third = np.split(_tensor(tensors, theirs), 3, axis=0)[index]
                params[ours] = _convert({theirs: third}, theirs, to_ours)
                names[ours] = theirs
        init_bias = getattr(spec.loss, "init_bias", None)
        if "logit_bias" not in params and init_bias is not None:  # a sigmoid loss on CLIP
            params["logit_bias"] = np.asarray(init_bias, np.float32)
        used = set(names.values())
        unused = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
        if unused:
            raise UserError(
                f"{path}: tensor {unused[0]} ({len(unused)} unused in all) has no place in the "
                "model its config.json describes"
            )
        return _stack_scanned(params, options), names

    def write(
        self, params: dict[str, np.ndarray], spec, tokenizer_file: Path | None, out: Path
    ) -> None:
        """Export: model.safetensors + config.json + tokenizer + processor files in ``out``."""
        from safetensors.numpy import save_file

        options = spec.model
        layout = layout_of(options)
        params = _unstack_scanned(dict(params), options)
        tensors = {}
        for ours, theirs, (_, to_theirs) in entries(options, layout):
            if ours == "logit_bias" and ours not in params:  # trained without a bias
                params[ours] = np.zeros((), np.float32)
            tensors[theirs] = np.array(to_theirs(np.asarray(params[ours], np.float32)))
        if layout == "siglip":
            packed: dict[str, list] = {}
            for ours, theirs, _, (_, to_theirs) in _packed_attention(options):
                packed.setdefault(theirs, []).append(
                    to_theirs(np.asarray(params[ours], np.float32))
                )
            tensors |= {k: np.concatenate(v, axis=0) for k, v in packed.items()}
        out.mkdir(parents=True, exist_ok=True)
        eos = _write_tokenizer(spec, tokenizer_file, out, layout, tensors)
        save_file(
            {k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
            out / "model.safetensors",
        )
        config = _config(options, layout, eos)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "preprocessor_config.json").write_text(
            json.dumps(_processor_config(spec, layout), indent=2)
        )


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
    model_type = _read_json(config).get("model_type")
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
        pad = 0 if layout == "clip" else _pad_id(path)
        return {"name": "bpe", "path": str(path / "tokenizer.json"), "pad_id": pad}
    raise UserError(
        f"{path} has no tokenizer (tokenizer.json, or spiece.model for SigLIP): save the "
        "model's tokenizer with it (tokenizer.save_pretrained(PATH))"
    )


def _pad_id(path: Path) -> int:
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
        "interpolation": "bilinear"
        if config.get("resample", 2 if siglip else 3) == 2
        else "bicubic",
    }


def _tensor(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name}, which its config.json implies")
    return np.asarray(tensors[name], np.float32)


def _convert(tensors: dict[str, np.ndarray], name: str, to_ours: Callable) -> np.ndarray:
    tensor = _tensor(tensors, name)
    try:
        return to_ours(tensor)
    except ValueError:
        raise UserError(
            f"tensor {name} of shape {tensor.shape} does not fit the model its config.json "
            "describes"
        ) from None


_BLOCK = re.compile(r"^(.*)/encoder/block_(\d+)/(.*)$")


def _stack_scanned(params: dict[str, np.ndarray], options) -> dict[str, np.ndarray]:
    """Per-block parameters stacked on a leading axis for towers with ``scan_layers``."""
    out, stacks = {}, {}
    for name, value in params.items():
        match = _BLOCK.match(name)
        tower = match and getattr(options, match.group(1), None)
        if tower is not None and tower.scan_layers:
            key = f"{match.group(1)}/encoder/blocks/{match.group(3)}"
            stacks.setdefault(key, {})[int(match.group(2))] = value
        else:
            out[name] = value
    for key, layers in stacks.items():
        out[key] = np.stack([layers[i] for i in range(len(layers))])
    return out


def _unstack_scanned(params: dict[str, np.ndarray], options) -> dict[str, np.ndarray]:
    out = {}
    for name, value in params.items():
        head, sep, rest = name.partition("/encoder/blocks/")
        if sep:
            for i, layer in enumerate(np.asarray(value)):
                out[f"{head}/encoder/block_{i}/{rest}"] = layer
        else:
            out[name] = value
    return out


# -------------------------------------------------------------------- writing
def _config(options, layout: str, eos: int | None) -> dict[str, Any]:
    v, t = options.vision, options.text

    def tower(o) -> dict[str, Any]:
        return {
            "hidden_size": o.width,
            "intermediate_size": o.mlp_dim or int(o.width * o.mlp_ratio),
            "num_hidden_layers": o.depth,
            "num_attention_heads": o.heads,
            "hidden_act": ACTIVATIONS_OUT[o.activation],
            "layer_norm_eps": o.norm_eps,
            "attention_dropout": 0.0,
        }

    vision = {**tower(v), "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3}
    text = {**tower(t), "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length}
    if eos is not None:
        text |= {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": t.pad_id or 0}
    if layout == "clip":
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": options.embed_dim,
            "vision_config": {**vision, "model_type": "clip_vision_model"},
            "text_config": {**text, "model_type": "clip_text_model"},
        }
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "vision_config": {**vision, "model_type": "siglip_vision_model", "vision_use_head": True},
        "text_config": {
            **text,
            "model_type": "siglip_text_model",
            "projection_size": options.embed_dim,
        },
    }


def _processor_config(spec, layout: str) -> dict[str, Any]:
    pre, size = spec.preprocess, spec.model.vision.image_size
    processor = "SiglipProcessor" if layout == "siglip" else "CLIPProcessor"
    common = {
        "processor_class": processor,
        "do_resize": True,
        "resample": 3 if pre.interpolation == "bicubic" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }
    if pre.resize == "crop":
        return {
            **common,
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
        }
    return {
        **common,
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": size, "width": size},
    }


def _write_tokenizer(
    spec, tokenizer_file: Path | None, out: Path, layout: str, tensors
) -> int | None:
    """Copy the run's tokenizer into ``out``; returns the end-of-text id transformers should use.

    transformers' CLIP reads the text at the first end-of-text token, except for an id of
    2, which it treats as an old config and replaces by the argmax of the ids. Our BPE's
    end token is id 2, so the export swaps it with the tokenizer's last id, in the
    tokenizer and in the token embedding rows alike.
    """
    if tokenizer_file is None:
        return None
    text = spec.model.text
    if spec.tokenizer.name == "sentencepiece":
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        return None
    vocab = json.loads(Path(tokenizer_file).read_text())
    eos = _end_token_id(vocab)
    if layout == "clip" and eos == 2:
        last = _max_id(vocab)
        _swap_ids(vocab, 2, last)
        table = tensors["text_model.embeddings.token_embedding.weight"]
        table[[2, last]] = table[[last, 2]]
        eos = last
    (out / "tokenizer.json").write_text(json.dumps(vocab, ensure_ascii=False))
    pad = text.pad_id if text.pad_id is not None else 0
    tokens = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    pad_token = tokens.get(pad) or _token_of(vocab, pad)
    eos_token = tokens.get(eos) or _token_of(vocab, eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": text.context_length,
        "pad_token": pad_token,
        "eos_token": eos_token,
        "padding_side": "right",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return eos


def _end_token_id(vocab: dict) -> int | None:
    """The id the post-processor appends last (the end-of-text token)."""
    post = vocab.get("post_processor") or {}
    single = post.get("single") or []
    for piece in reversed(single):
        special = piece.get("SpecialToken")
        if special:
            return int(post["special_tokens"][special["id"]]["ids"][0])
    for key in ("sep", "eos"):
        if key in post:
            return int(post[key][1])
    return None


def _max_id(vocab: dict) -> int:
    ids = list(vocab["model"]["vocab"].values()) + [t["id"] for t in vocab.get("added_tokens", [])]
    return max(ids)


def _token_of(vocab: dict, token_id: int) -> str | None:
    for token, i in vocab["model"]["vocab"].items():
        if i == token_id:
            return token
    return None


def _swap_ids(vocab: dict, a: int, b: int) -> None:
    """Exchange two ids everywhere a tokenizer.json names ids."""

    def swap(i: int) -> int:
        return b if i == a else a if i == b else i

    model = vocab["model"]["vocab"]
    vocab["model"]["vocab"] = {token: swap(i) for token, i in model.items()}
    for token in vocab.get("added_tokens", []):
        token["id"] = swap(token["id"])
    post = vocab.get("post_processor") or {}
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [swap(i) for i in special["ids"]]
    padding = vocab.get("padding")
    if padding:
        padding["pad_id"] = swap(padding["pad_id"])
