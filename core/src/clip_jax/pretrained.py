"""Published weights as a starting point: ``hf:PATH`` references for init_from and load().

A reference ``FORMAT:PATH`` names a checkpoint in a format that some registered
architecture converts (``formats=`` at registration; the ``clip`` architecture reads
``hf``). This module finds that converter, reads the checkpoint's tensors safely, and
gives the run-spec tables the checkpoint implies (model, loss, tokenizer, preprocess).
Those act like a preset under the user's own tables: the spec may still change the
image size, dtype, remat... and ``clipctl validate`` checks the result without jax.

A checkpoint is data, never code: safetensors files are read as their JSON header and
raw bytes (no torch, bfloat16 included); torch ``.bin`` / ``.pt`` files only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clip_jax.errors import UserError
from clip_jax.plugins import Registry, get_registry

KNOWN_FORMATS = ("hf", "open_clip", "big_vision")


class WeightFormat(Protocol):
    """What an architecture's converter for one external format provides."""

    name: str

    def recognizes(self, path: Path) -> bool: ...

    def spec_defaults(self, path: Path) -> dict[str, Any]: ...

    def read_params(
        self, path: Path, spec: Any, tensors: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]: ...

    def write(
        self, params: dict[str, np.ndarray], spec: Any, tokenizer_file, out: Path
    ) -> None: ...


def parse_ref(ref: str | Path) -> tuple[str, Path] | None:
    """``("hf", Path(...))`` for ``"hf:..."``; None for a run folder path."""
    scheme, sep, rest = str(ref).partition(":")
    if sep and scheme in KNOWN_FORMATS and rest:
        return scheme, Path(rest).expanduser()
    return None


def checkpoint_exists(path: Path) -> bool:
    """Whether a ``FORMAT:PATH`` reference's PATH is there: the file or folder itself,
    or, for ``PATH#NAME`` (a model inside an open_clip folder), the part before ``#``."""
    return path.exists() or Path(str(path).rpartition("#")[0] or path).exists()


def find_format(ref: str, registry: Registry | None = None) -> tuple[str, WeightFormat, Path]:
    """(architecture name, converter, path) for a ``FORMAT:PATH`` reference.

    ``PATH#NAME`` (``open_clip:ckpt.pt#ViT-B-32``): the file or folder is PATH and the
    converter reads NAME off the path it is given.
    """
    parsed = parse_ref(ref)
    if parsed is None:
        raise UserError(f"{ref!r} is not a FORMAT:PATH reference ({', '.join(KNOWN_FORMATS)})")
    scheme, path = parsed
    if not checkpoint_exists(path):
        raise UserError(f"{path} does not exist")
    registry = registry or get_registry()
    readers = [
        (component.name, component.load_format(scheme))
        for component in registry.components.get("architecture", {}).values()
        if scheme in component.formats
    ]
    for name, converter in readers:
        if converter.recognizes(path):
            return name, converter, path
    names = ", ".join(name for name, _ in readers) or "none"
    raise UserError(
        f"no architecture reads {path} as a {scheme!r} checkpoint (architectures with "
        f"{scheme!r} converters: {names})"
    )


def with_defaults(raw: Mapping[str, Any], registry: Registry | None = None) -> dict[str, Any]:
    """``raw`` over the tables its ``train.init_from`` checkpoint implies (if it names one)."""
    train = raw.get("train")
    init_from = train.get("init_from") if isinstance(train, Mapping) else None
    if not isinstance(init_from, str) or parse_ref(init_from) is None:
        return dict(raw)
    if _is_resolved(raw) and not parse_ref(init_from)[1].exists():
        # A run folder's own spec (resumed): complete without the checkpoint it started
        # from, which may be gone; the trainer reads that only for a run with no checkpoint.
        return dict(raw)
    name, converter, path = find_format(init_from, registry)
    try:
        defaults = converter.spec_defaults(path)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a malformed config
        raise UserError(
            f"{path}: its config is not one this reads ({type(exc).__name__}: {exc})"
        ) from None
    defaults["model"] = {**defaults.get("model", {}), "architecture": name}
    from clip_jax.spec import deep_merge

    return deep_merge(defaults, raw)


def _is_resolved(raw: Mapping[str, Any]) -> bool:
    """A spec as the trainer writes it: every table filled in, [preprocess] included."""
    model = raw.get("model")
    return (
        isinstance(model, Mapping)
        and {"architecture", "vision", "text"} <= set(model)
        and isinstance(raw.get("preprocess"), Mapping)
    )


def read_params(ref: str, spec: Any, registry: Registry | None = None) -> tuple[dict, dict]:
    """(nested numpy parameters for ``spec``'s model, our name -> checkpoint tensor name)."""
    _, converter, path = find_format(ref, registry)
    read = getattr(converter, "read_tensors", read_tensors)  # a format's own files (.npz...)
    flat, names = converter.read_params(path, spec, read(path))
    return unflatten(flat), names


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``: the parameter tree Flax builds."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------- checkpoint files
def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file or folder (safetensors, sharded or not; torch files
    only as plain tensors)."""
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_tensors(path / name)
        raise UserError(f"{path} has no model.safetensors (or pytorch_model.bin)")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        tensors: dict[str, np.ndarray] = {}
        folder = path.parent.resolve()
        for shard in sorted(set(index.get("weight_map", {}).values())):
            shard_path = (folder / shard).resolve()
            if folder not in shard_path.parents:
                raise UserError(f"{path}: shard {shard!r} lies outside its folder")
            tensors |= read_tensors(shard_path)
        return tensors
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_torch(path)
    raise UserError(f"{path}: not a checkpoint file (.safetensors, .bin, .pt)")


def _safetensors_dtypes() -> dict[str, Any]:
    import ml_dtypes  # numpy has no bfloat16; jax's own dependency gives it

    return {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }  # fmt: skip


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (the format is a JSON header, then raw bytes),
    bfloat16 included, which safetensors' own numpy reader cannot give."""
    dtypes = _safetensors_dtypes()
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        size = int.from_bytes(data[:8].tobytes(), "little")
        header = json.loads(data[8 : 8 + size].tobytes())
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + size + offset for offset in info["data_offsets"])
            if not 8 + size <= start <= end <= len(data):
                raise ValueError(f"tensor {name} lies outside the file")
            raw = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
            tensors[name] = raw.reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a torch pickle file and torch is not installed; convert it to "
            "safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path}: refused, it is not a file of plain tensors ({type(exc).__name__}); a "
            "checkpoint is read as data only. Convert it to safetensors where you trust it"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UserError(f"{path} does not hold a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
