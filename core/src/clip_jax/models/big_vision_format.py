"""The ``clip`` architecture in big_vision's layout: ``big_vision:FILE.npz`` (import).

big_vision's two-towers SigLIP checkpoints are flat ``.npz`` files of Flax parameters
(``params/img/...``, ``params/txt/...``, ``params/t``, ``params/b``; the ``params/`` prefix
is optional). They carry no config, so the model is read off the tensor shapes:

- image tower: patch size and width from ``img/embedding/kernel`` (p, p, 3, D); image size
  from the position table ``img/pos_embedding`` (1, N, D) as sqrt(N) x p; depth from the
  blocks (``Transformer/encoderblock_{i}``, or one ``Transformer/encoderblock`` with the
  blocks stacked on a leading axis, as ``scan=True`` saves them); heads and head size from
  the query kernel (D, heads, head_dim); MLP size from ``MlpBlock_0/Dense_0/kernel``.
  ``MAPHead_0`` is our MAP head (SigLIP's image embedding); a ``head`` Dense after it is
  a linear projection with bias.
- text tower: vocabulary and width from ``txt/Embed_0/embedding``, context length from
  ``txt/pos_embedding``, the blocks under ``txt/Encoder_0``, ``txt/head`` the projection.
  Bidirectional, nothing masked, read at the last position (big_vision's default
  ``pool_type = "last"``; the pooling is not in the file).
- ``t`` is the log temperature (our ``logit_scale``), ``b`` the sigmoid loss's bias.

big_vision's blocks are Flax already: query/key/value kernels (D, H, K), out (H, K, D),
LayerNorm eps 1e-6, tanh-approximated GELU; the conversion is mostly a renaming.
Preprocessing as SigLIP's: squash to size, bilinear, mean = std = 0.5. The tokenizer is
not in the file: ``spiece.model`` (or ``sentencepiece.model``, or ``FILE``'s stem +
``.model``) beside the file is used, else ``tokenizer.json``; without either, the spec
must name one (``tokenizer.path``).

numpy only: shapes come from the ``.npy`` headers inside the archive, tensors are read
with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax.errors import UserError
from clip_jax.models.hf_import import tokenizer_pad_id
from clip_jax.models.weight_layout import finish_import

_BLOCK_PARTS = (  # (ours, theirs) inside one encoder block
    ("ln_1/scale", "LayerNorm_0/scale"),
    ("ln_1/bias", "LayerNorm_0/bias"),
    ("ln_2/scale", "LayerNorm_1/scale"),
    ("ln_2/bias", "LayerNorm_1/bias"),
    *(
        (f"attn/{name}/{part}", f"MultiHeadDotProductAttention_0/{name}/{part}")
        for name in ("query", "key", "value", "out")
        for part in ("kernel", "bias")
    ),
    *(
        (f"mlp/fc{i + 1}/{part}", f"MlpBlock_0/Dense_{i}/{part}")
        for i in range(2)
        for part in ("kernel", "bias")
    ),
)
_MAP_PARTS = (
    ("probe", "probe"),
    ("ln/scale", "LayerNorm_0/scale"),
    ("ln/bias", "LayerNorm_0/bias"),
    *((ours, theirs) for ours, theirs in _BLOCK_PARTS if ours.startswith(("attn", "mlp"))),
)
_TOKENIZER_FILES = ("spiece.model", "sentencepiece.model")


def _rows(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1, w.shape[-1])


def _scalar(w: np.ndarray) -> np.ndarray:
    if w.size != 1:
        raise ValueError("not a scalar")
    return w.reshape(())


def _copy(w: np.ndarray) -> np.ndarray:
    return w


# ------------------------------------------------------------------- the format
class BigVisionFormat:
    """``big_vision:FILE.npz``: a big_vision two-towers (SigLIP) parameter file."""

    name = "big_vision"
    description = "a big_vision SigLIP .npz (the model is read from its tensor shapes)"

    def recognizes(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".npz"

    def spec_defaults(self, path: Path) -> dict[str, Any]:
        """The run-spec tables the file's tensor shapes imply (reads the array headers only)."""
        shapes = _strip(npz_shapes(path))
        model, loss = _model_tables(shapes, path)
        return {
            "model": model,
            "loss": loss,
            "tokenizer": _tokenizer_defaults(path),
            "preprocess": {
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "resize": "squash",
                "interpolation": "bilinear",
            },
        }

    def read_tensors(self, path: Path) -> dict[str, np.ndarray]:
        """Every array of the file, keys without the ``params/`` prefix (data only)."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                tensors = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"{path} is not a readable .npz file of arrays: {exc}") from None
        return _strip(tensors)

    def read_params(self, path: Path, spec, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(flat parameters named our way, our name -> their tensor name)."""
        options = spec.model
        if options.vision.pool != "map":
            raise UserError(
                f"model.vision.pool = {options.vision.pool!r}: big_vision SigLIP checkpoints "
                "pool images with their MAP head ('map')"
            )
        params, names, used = {}, {}, set()
        for ours, theirs, index, to_ours in _entries(options, tensors):
            params[ours] = _convert(tensors, theirs, index, to_ours)
            names[ours] = theirs if index is None else f"{theirs}[{index}]"
            used.add(theirs)
        extra = "txt/Encoder_0/pos_embedding"  # old checkpoints: a second table, to be added
        if extra in tensors:
            params["text/pos_embed"] = params["text/pos_embed"] + _convert(
                tensors, extra, None, _rows
            )
            used.add(extra)
        unused = sorted(
            k for k in tensors if k not in used and k.split("/")[0] in ("img", "txt", "t", "b")
        )
        return finish_import(params, spec, unused, f"the tensor shapes of {path}"), names

    def write(self, params, spec, tokenizer_file, out: Path) -> None:
        raise UserError(
            "exporting to the big_vision format is not supported yet (export to hf instead)"
        )


BIG_VISION_FORMAT = BigVisionFormat()


# -------------------------------------------------------------------- reading
def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an .npz, from the .npy headers (no data read)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as file:
                    version = np.lib.format.read_magic(file)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(file)
                    elif version == (2, 0):
                        shape, _, _ = np.lib.format.read_array_header_2_0(file)
                    else:
                        raise ValueError(f"unknown .npy format version {version}")
                shapes[info.filename.removesuffix(".npy")] = tuple(shape)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable .npz file of arrays: {exc}") from None
    return shapes


def _strip(items: dict[str, Any]) -> dict[str, Any]:
    """Keys without the ``params/`` prefix big_vision's saved checkpoints have."""
    if any(k.startswith("params/") for k in items):
        return {k.removeprefix("params/"): v for k, v in items.items() if k.startswith("params/")}
    return dict(items)


def _shape(shapes: dict, key: str, ndim: int, path: Path) -> tuple[int, ...]:
    if key not in shapes:
        raise UserError(f"{path} has no tensor {key}: not a big_vision two-towers checkpoint")
    shape = shapes[key]
    if len(shape) != ndim:
        raise UserError(f"{path}: tensor {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _blocks(shapes: dict, prefix: str, path: Path) -> tuple[str, list[int | None]]:
    """(block key prefix, per-block index into a stacked tensor or None) of a transformer."""
    scanned = f"{prefix}encoderblock/"
    if f"{scanned}LayerNorm_0/scale" in shapes:
        depth = _shape(shapes, f"{scanned}LayerNorm_0/scale", 2, path)[0]
        return scanned, list(range(depth))
    depth = 0
    while f"{prefix}encoderblock_{depth}/LayerNorm_0/scale" in shapes:
        depth += 1
    if not depth:
        raise UserError(f"{path} has no transformer blocks under {prefix}")
    return f"{prefix}encoderblock_{{i}}/", [None] * depth


def _tower(shapes: dict, prefix: str, path: Path) -> dict[str, Any]:
    """depth, heads, mlp_dim of the transformer under ``prefix`` (block 0's shapes)."""
    block, indices = _blocks(shapes, prefix, path)
    first = block.format(i=0)
    lead = 0 if indices[0] is None else 1
    query = _shape(shapes, f"{first}MultiHeadDotProductAttention_0/query/kernel", 3 + lead, path)
    mlp = _shape(shapes, f"{first}MlpBlock_0/Dense_0/kernel", 2 + lead, path)
    width, heads, head_dim = query[lead:]
    if heads * head_dim != width:
        raise UserError(
            f"{path}: {prefix} query kernels {query[lead:]}: heads x head size must be the width "
            "(our attention has no other head size)"
        )
    return {"depth": len(indices), "heads": heads, "mlp_dim": mlp[-1], "width": width}


def _model_tables(shapes: dict, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    patch, patch_w, channels, width = _shape(shapes, "img/embedding/kernel", 4, path)
    if patch != patch_w or channels != 3:
        raise UserError(f"{path}: img/embedding/kernel {(patch, patch_w, channels, width)}: "
                        "square RGB patches expected")  # fmt: skip
    if "img/MAPHead_0/probe" not in shapes:
        pool = "a class token" if "img/cls" in shapes else "average pooling"
        raise UserError(
            f"{path}: an image tower with {pool} is not supported (SigLIP's MAP head only)"
        )
    if "img/pos_embedding" not in shapes:
        raise UserError(f"{path}: no img/pos_embedding (fixed sincos positions are not supported)")
    count = math.prod(_shape(shapes, "img/pos_embedding", 3, path)[:2])
    grid = math.isqrt(count)
    if grid * grid != count:
        raise UserError(f"{path}: img/pos_embedding has {count} positions, not a square grid")
    vision = {
        **_tower(shapes, "img/Transformer/", path),
        "image_size": grid * patch,
        "patch_size": patch,
        "patch_bias": "img/embedding/bias" in shapes,
        "norm_pre": False,
        "pool": "map",
        "positions": "learned",
    }
    if vision["width"] != width:
        raise UserError(f"{path}: img/embedding/kernel width {width} differs from the blocks'")
    vocab, text_width = _shape(shapes, "txt/Embed_0/embedding", 2, path)
    context = _shape(shapes, "txt/pos_embedding", 3, path)[1]
    text = {
        **_tower(shapes, "txt/Encoder_0/", path),
        "vocab_size": vocab,
        "context_length": context,
        "causal": False,
        "pool": "map" if "txt/MAPHead_0/probe" in shapes else "last",
        "pad_id": None,
        "positions": "learned",
    }
    if text["width"] != text_width:
        raise UserError(
            f"{path}: txt/Embed_0/embedding width {text_width} differs from the blocks'"
        )
    dims = {}
    for name, tower, key in (
        ("image", vision, "img/head/kernel"),
        ("text", text, "txt/head/kernel"),
    ):
        if key in shapes:
            dims[name] = _shape(shapes, key, 2, path)[1]
            tower |= {"projection": "linear", "projection_bias": key[:-6] + "bias" in shapes}
        else:
            dims[name] = tower["width"]
            tower["projection"] = "none"
    if dims["image"] != dims["text"]:
        raise UserError(
            f"{path}: the image embedding ({dims['image']}) and the text embedding "
            f"({dims['text']}) differ in size"
        )
    for tower in (vision, text):
        tower |= {"activation": "gelu_tanh", "norm_eps": 1e-6}
    model = {"architecture": "clip", "embed_dim": dims["image"], "vision": vision, "text": text}
    loss = {"name": "sigmoid"} if "b" in shapes else {"name": "softmax"}
    return model, loss


def _tokenizer_defaults(path: Path) -> dict[str, Any]:
    folder = path.parent
    for candidate in (path.with_suffix(".model"), *(folder / n for n in _TOKENIZER_FILES)):
        if candidate.is_file():
            return {"name": "sentencepiece", "path": str(candidate)}
    if (folder / "tokenizer.json").is_file():
        return {
            "name": "bpe",
            "path": str(folder / "tokenizer.json"),
            "pad_id": tokenizer_pad_id(folder),
        }
    # big_vision ships no tokenizer: the spec must name one (tokenizer.path).
    return {"name": "sentencepiece"}


# ------------------------------------------------------------------ parameters
def _entries(options, tensors) -> Iterator[tuple[str, str, int | None, Callable]]:
    """(our parameter, their tensor, index into a stacked tensor or None, conversion)."""
    v, t = options.vision, options.text
    yield "vision/patch_embed/kernel", "img/embedding/kernel", None, _copy
    if v.patch_bias:
        yield "vision/patch_embed/bias", "img/embedding/bias", None, _copy
    yield "vision/pos_embed", "img/pos_embedding", None, _rows
    yield from _encoder("vision", "img/Transformer/", v.depth, tensors)
    yield "vision/ln_post/scale", "img/Transformer/encoder_norm/scale", None, _copy
    yield "vision/ln_post/bias", "img/Transformer/encoder_norm/bias", None, _copy
    for ours, theirs in _MAP_PARTS:
        yield f"vision/map_head/{ours}", f"img/MAPHead_0/{theirs}", None, _copy
    yield "text/token_embed/embedding", "txt/Embed_0/embedding", None, _copy
    yield "text/pos_embed", "txt/pos_embedding", None, _rows
    yield from _encoder("text", "txt/Encoder_0/", t.depth, tensors)
    yield "text/ln_final/scale", "txt/Encoder_0/encoder_norm/scale", None, _copy
    yield "text/ln_final/bias", "txt/Encoder_0/encoder_norm/bias", None, _copy
    if t.pool == "map":
        for ours, theirs in _MAP_PARTS:
            yield f"text/map_head/{ours}", f"txt/MAPHead_0/{theirs}", None, _copy
    for ours, prefix, tower in (("vision_proj", "img", v), ("text_proj", "txt", t)):
        if tower.projection == "linear":
            yield f"{ours}/kernel", f"{prefix}/head/kernel", None, _copy
            if tower.projection_bias:
                yield f"{ours}/bias", f"{prefix}/head/bias", None, _copy
    yield "logit_scale", "t", None, _scalar
    if "b" in tensors:
        yield "logit_bias", "b", None, _scalar


def _encoder(tower: str, prefix: str, depth: int, tensors) -> Iterator[tuple]:
    scanned = f"{prefix}encoderblock/LayerNorm_0/scale" in tensors
    for i in range(depth):
        block = f"{prefix}encoderblock/" if scanned else f"{prefix}encoderblock_{i}/"
        for ours, theirs in _BLOCK_PARTS:
            yield (
                f"{tower}/encoder/block_{i}/{ours}",
                f"{block}{theirs}",
                i if scanned else None,
                _copy,
            )


def _convert(
    tensors: dict[str, np.ndarray], name: str, index: int | None, to_ours: Callable
) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"the checkpoint has no tensor {name}, which the model implies")
    tensor = np.asarray(tensors[name], np.float32)
    if index is not None:
        if tensor.ndim == 0 or tensor.shape[0] <= index:
            raise UserError(
                f"tensor {name} of shape {tensor.shape} does not stack the model's blocks"
            )
        tensor = tensor[index]
    try:
        return np.asarray(to_ours(tensor), np.float32)
    except ValueError:
        raise UserError(
            f"tensor {name} of shape {tensor.shape} does not fit the model its shapes describe"
        ) from None
