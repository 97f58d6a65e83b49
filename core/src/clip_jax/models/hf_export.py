"""Writing the ``clip`` architecture as a transformers folder (``clipctl export --format hf``).

The tensors, ``config.json``, the run's tokenizer and ``preprocessor_config.json``, so
that ``AutoModel`` and ``AutoProcessor`` load it and give our embeddings. Which model:
CLIPModel or SiglipModel by the layout (``hf_format.layout_of``); a NaFlex run
(``preprocess.resize = "naflex"``) in the SigLIP layout is a Siglip2Model, the one
transformers model that takes images at their native aspect ratio as we do. What those models have no place for
(a classification head, an auxiliary term's parameters, a CLIPModel's missing logit
bias) stays behind with a warning naming its spec key: the towers are exported as trained.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_jax.data.naflex import budget
from clip_jax.models.hf_format import ACTIVATIONS_OUT, entries, layout_of, packed_attention
from clip_jax.models.weight_layout import unstack_scanned

if TYPE_CHECKING:
    from clip_jax.spec import RunSpec

# What the export has to say beyond "written" (``clipctl export`` prints these lines).
log = logging.getLogger("clip_jax.export")


def is_siglip2(spec: RunSpec) -> bool:
    """Whether the export is a Siglip2Model: a NaFlex run in the SigLIP layout. Siglip2
    takes padded patch sequences with their grids and resamples its position table per
    image as our ViT does; a fixed-size SiglipModel would be fed squashed squares instead."""
    return spec.preprocess.resize == "naflex" and layout_of(spec.model) == "siglip"


def write_folder(
    params: dict[str, np.ndarray], spec: RunSpec, tokenizer_file: Path | None, out: Path
) -> None:
    """Export: model.safetensors + config.json + tokenizer + processor files in ``out``."""
    from safetensors.numpy import save_file

    options = spec.model
    layout = layout_of(options)
    siglip2 = is_siglip2(spec)
    _report(spec, siglip2, tokenizer_file is not None)
    _report_dropped(params, spec, "Siglip2Model" if siglip2 else _MODELS[layout])
    params = unstack_scanned(dict(params))
    tensors = {}
    for ours, theirs, (_, to_theirs) in entries(options, layout, naflex=siglip2):
        if ours == "logit_bias" and ours not in params:  # trained without a bias
            params[ours] = np.zeros((), np.float32)
        tensors[theirs] = np.array(to_theirs(np.asarray(params[ours], np.float32)))
    if layout == "siglip":
        packed: dict[str, list] = {}
        for ours, theirs, _, (_, to_theirs) in packed_attention(options):
            packed.setdefault(theirs, []).append(to_theirs(np.asarray(params[ours], np.float32)))
        tensors |= {k: np.concatenate(v, axis=0) for k, v in packed.items()}
    out.mkdir(parents=True, exist_ok=True)
    extra = _siglip2_call_defaults(spec) if siglip2 else {}
    eos = _write_tokenizer(spec, tokenizer_file, out, layout, tensors, extra)
    save_file(
        {k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
        out / "model.safetensors",
    )
    _as_umask_allows(out / "model.safetensors")
    config = _siglip2_config(options, eos) if siglip2 else _config(options, layout, eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor = _siglip2_processor(spec) if siglip2 else _processor_config(spec, layout)
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


_MODELS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# What the parameters of an auxiliary term are, for the warning that drops them.
_AUX_PARTS = {"captioning": "the caption decoder"}


def _report_dropped(params: dict[str, np.ndarray], spec, model: str) -> None:
    """A warning for each trained part the transformers model has no place for. None of
    them changes what the exported towers compute (their embeddings are the run's), so
    the export goes on; the person learns what stayed behind, by its spec key."""
    prefixes = {key.split("/", 1)[0] for key in params}
    if "head" in prefixes:
        head = spec.head
        classes = getattr(head, "num_classes", None)
        sized = f", {classes} classes" if classes is not None else ""
        log.warning(
            "head.name = %r: the head (head/...%s) is not exported (a %s has none, and no "
            "num_labels); the towers are, and the run folder keeps the head",
            head.name, sized, model,
        )  # fmt: skip
    for term in getattr(spec.loss, "aux", None) or []:
        if f"aux_{term.name}" not in prefixes:
            continue
        part = _AUX_PARTS.get(term.name)
        log.warning(
            "loss.aux %s: %s (aux_%s/...) %s not exported (a %s has no such part); "
            "the towers the term trained are, and the run folder keeps it",
            term.name, part or "its parameters", term.name, "is" if part else "are", model,
        )  # fmt: skip
    if "logit_bias" in params and model == "CLIPModel":
        bias = float(np.asarray(params["logit_bias"]).reshape(()))
        log.warning(
            "loss.name = %r: the learned bias (b = %.4g) is not in a CLIPModel, which has "
            "no logit_bias; its logits_per_image is scale x cosine, so add b before the "
            "sigmoid for the run's probabilities. Only the SigLIP layout (model.vision.pool "
            "= 'map', e.g. model.preset = 'siglip-b16') exports as a SiglipModel, which "
            "keeps it: these towers (class token, causal text) are not SiglipModel's",
            spec.loss.name, bias,
        )  # fmt: skip


def _report(spec, siglip2: bool, tokenizer: bool) -> None:
    """The warnings a NaFlex export needs: what a CLIPModel cannot do, and how
    transformers 5 must be told which tokenizer a Siglip2 folder has."""
    if spec.preprocess.resize != "naflex":
        return
    v = spec.model.vision
    if not siglip2:
        side = v.image_size // v.patch_size
        log.warning(
            "preprocess.resize = 'naflex': transformers' CLIPModel has no NaFlex mode, so "
            "this export is the fixed-resolution model: images squashed to %dx%d (its "
            "processor does so), positions at the trained %dx%d grid. Its embeddings are "
            "not the run's native-aspect-ratio ones; a SigLIP-layout run "
            "(model.vision.pool = 'map') exports as a NaFlex Siglip2Model",
            v.image_size, v.image_size, side, side,
        )  # fmt: skip
        return
    if not tokenizer:
        return
    own = "SiglipTokenizer" if spec.tokenizer.name == "sentencepiece" else "PreTrainedTokenizerFast"
    log.warning(
        "Siglip2Model: transformers >= 5 gives every siglip2 folder Gemma's Siglip2Tokenizer, "
        "which this run's tokenizer is not; load the processor with "
        "AutoProcessor.from_pretrained(OUT, tokenizer=%s.from_pretrained(OUT))",
        own,
    )


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
        text |= {"eos_token_id": eos, "bos_token_id": eos}
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


def _siglip2_config(options, eos: int | None) -> dict[str, Any]:
    """SiglipModel's config under Siglip2's names; the vision tower is sized by its
    position table (``num_patches``, a square grid) instead of an image size."""
    siglip = _config(options, "siglip", eos)
    vision = {k: v for k, v in siglip["vision_config"].items() if k != "image_size"}
    side = options.vision.image_size // options.vision.patch_size
    return {
        **siglip,
        "architectures": ["Siglip2Model"],
        "model_type": "siglip2",
        "vision_config": {
            **vision,
            "model_type": "siglip2_vision_model",
            "num_patches": side * side,
        },
        "text_config": {**siglip["text_config"], "model_type": "siglip2_text_model"},
    }


def _common_processor(spec, processor_class: str) -> dict[str, Any]:
    pre = spec.preprocess
    return {
        "processor_class": processor_class,
        "do_resize": True,
        "resample": 3 if pre.interpolation == "bicubic" else 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
    }


def _siglip2_call_defaults(spec) -> dict[str, Any]:
    """tokenizer_config.json entries for Siglip2Processor's calls. The processor passes
    its own defaults (16 px patches, 256 of them, texts padded to 64 tokens) to its image
    processor and tokenizer, over their configs; only the tokenizer's init kwargs come
    before those defaults, so the run's values are written there."""
    v = spec.model.vision
    return {
        "patch_size": v.patch_size,
        "max_num_patches": budget(spec.preprocess, v.image_size, v.patch_size),
        "max_length": spec.model.text.context_length,
    }


def _siglip2_processor(spec) -> dict[str, Any]:
    """Siglip2ImageProcessor: each image resized to at most the run's patch budget,
    keeping its aspect ratio, cut into patches and padded, as the data pipeline does."""
    v = spec.model.vision
    return {
        **_common_processor(spec, "Siglip2Processor"),
        "image_processor_type": "Siglip2ImageProcessor",
        "patch_size": v.patch_size,
        "max_num_patches": budget(spec.preprocess, v.image_size, v.patch_size),
    }


def _processor_config(spec, layout: str) -> dict[str, Any]:
    """A fixed-size processor: CLIP's crop, or a squash to the model's square (the SigLIP
    layout's, and a CLIP-layout NaFlex run's, which CLIPModel can only take square)."""
    pre, size = spec.preprocess, spec.model.vision.image_size
    common = _common_processor(spec, "SiglipProcessor" if layout == "siglip" else "CLIPProcessor")
    if pre.resize == "crop":
        return {
            **common,
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
        }
    if layout == "clip":
        return {
            **common,
            "image_processor_type": "CLIPImageProcessor",
            "size": {"height": size, "width": size},
            "do_center_crop": False,
        }
    return {
        **common,
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": size, "width": size},
    }


def _write_tokenizer(
    spec, tokenizer_file: Path | None, out: Path, layout: str, tensors, extra: dict[str, Any]
) -> int | None:
    """Copy the run's tokenizer into ``out``, ``extra`` added to its tokenizer_config.json;
    returns the end-of-text id transformers should use.

    transformers' CLIP reads the text at the first end-of-text token, except for an id of
    2, which it treats as an old config and replaces by the argmax of the ids. Our BPE's
    end token is id 2, so the export swaps it with the tokenizer's last id, in the
    tokenizer and in the token embedding rows alike.
    """
    if tokenizer_file is None:
        return None
    text = spec.model.text
    if spec.tokenizer.name == "sentencepiece":
        return _write_sentencepiece(spec, tokenizer_file, out, extra)
    vocab = json.loads(Path(tokenizer_file).read_text())
    eos = _end_token_id(vocab)
    pad = getattr(spec.tokenizer, "pad_id", 0)  # what the run's texts were padded with
    if layout == "clip" and eos == 2:
        last = _max_id(vocab)
        _swap_ids(vocab, 2, last)
        table = tensors["text_model.embeddings.token_embedding.weight"]
        table[[2, last]] = table[[last, 2]]
        eos, pad = last, {2: last, last: 2}.get(pad, pad)
    (out / "tokenizer.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokens = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    pad_token = tokens.get(pad) or _token_of(vocab, pad)
    eos_token = tokens.get(eos) or _token_of(vocab, eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": text.context_length,
        "pad_token": pad_token,
        "eos_token": eos_token,
        "padding_side": "right",
        **extra,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return eos


def _write_sentencepiece(spec, tokenizer_file: Path, out: Path, extra: dict[str, Any]) -> None:
    """SigLIP's own tokenizer files: spiece.model and a SiglipTokenizer config, refused
    when the run changed the text handling SiglipTokenizer does."""
    import base64

    from clip_jax.errors import UserError

    saved = json.loads(Path(tokenizer_file).read_text())
    options = saved.get("options", {})
    if not options.get("lowercase", True) or not options.get("canonicalize", True):
        raise UserError(
            "tokenizer.lowercase / tokenizer.canonicalize = false: transformers' "
            "SiglipTokenizer always lowercases and canonicalises; it cannot be exported"
        )
    (out / "spiece.model").write_bytes(base64.b64decode(saved["model_proto"]))
    config = {
        "tokenizer_class": "SiglipTokenizer",
        "model_max_length": spec.model.text.context_length,
        "pad_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        **extra,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return None


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


def _as_umask_allows(path: Path) -> None:
    """safetensors writes through a private temporary file (mode 0600); the weights are
    shared like the export's other files, as the process's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
