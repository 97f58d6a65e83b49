"""Helpers for testing a component: what a plugin's own tests (and ours) build on.

- ``tiny_spec(workdir)``: a spec dict for a seconds-long CPU run (a tiny CLIP, a small
  copy of the embedded dataset written under ``workdir``, two steps);
- ``run_tiny_training(workdir, overrides, sections, plugin=module)``: train that run for
  real, with one component swapped in through ``overrides`` (``["loss.name=my_loss"]``)
  or whole replaced tables (``sections={"model": {"architecture": "mine"}}``); the
  ``TinyRun`` it returns holds the final evaluation and the training losses;
- ``registered(plugin)``: a plugin module registered for a ``with`` block (validating a
  spec that names its component, without installing the package);
- ``write_tiny_dataset(folder)``: the tiny run's data (captioned shapes as tfrecord
  shards, ``train/``, ``validation/``, ``classes.json``, ``TINY_CLASSES`` labels);
- ``paired_embeddings`` and ``synthetic_batch``: fixed inputs for a loss or a model.

Importing this module imports neither jax nor tensorflow: the run does, when called.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# Small enough for a test on two CPU cores: two steps, a 1-layer 32 px ViT and a
# 1-layer text tower, 64 training images. The global batch (16) splits over 1, 2, 4, 8
# or 16 devices, so the run works on a laptop and under simulated multi-device tests.
TINY_SPEC: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0},
    "model": {
        "architecture": "clip",
        "preset": "tiny",
        "embed_dim": 32,
        "vision": {"width": 64, "depth": 1, "heads": 2},
        "text": {"width": 64, "depth": 1, "heads": 2},
    },
    "loss": {"name": "softmax"},
    "optimizer": {"name": "adamw", "learning_rate": 1e-3, "warmup_steps": 1},
    "train": {"steps": 2, "batch_size": 16, "log_every": 1, "checkpoint_every": 2},
    "data": {"source": "synthetic", "train_examples": 64, "validation_examples": 16},
    "tokenizer": {"name": "bpe", "vocab_size": 300},
    "eval": {"every": 0, "batch_size": 16},
}


TINY_CLASSES = 16  # the embedded dataset's classes: 4 colours x 4 shapes, labels 0..15


def tiny_spec(workdir: str | Path) -> dict[str, Any]:
    """``TINY_SPEC`` with its run folder and data under ``workdir`` (a test's tmp_path)."""
    spec = copy.deepcopy(TINY_SPEC)
    root = Path(workdir)
    spec["run"]["output_dir"] = str(root / "run")
    spec["data"]["dir"] = str(root / "data")
    return spec


@dataclass(frozen=True)
class TinyRun:
    """What a tiny training left: its run folder, final evaluation and train losses."""

    run_dir: Path
    results: dict[str, Any]
    losses: list[float]


def run_tiny_training(
    workdir: str | Path,
    overrides: Iterable[str] = (),
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    plugin: ModuleType | object | None = None,
    plugin_name: str | None = None,
) -> TinyRun:
    """Train ``tiny_spec(workdir)`` for real (run folder, checkpoint, evaluation):
    ``sections`` replace whole tables, then ``overrides`` (``key.path=value`` strings,
    as on the command line) apply. ``plugin``: see ``registered``."""
    from clip_jax.spec import apply_overrides, validate
    from clip_jax.train.trainer import train

    raw = {**tiny_spec(workdir), **copy.deepcopy(dict(sections or {}))}
    with registered(plugin, plugin_name):
        spec = validate(apply_overrides(raw, overrides))
        results = train(spec, stream=io.StringIO())
    run_dir = Path(spec.run.output_dir)
    return TinyRun(run_dir, results, train_losses(run_dir))


@contextmanager
def registered(plugin: ModuleType | object | None, name: str | None = None) -> Iterator[None]:
    """``plugin`` (a module with hook implementations) registered inside the block,
    unless an installed entry point already loads it: a plugin's tests then pass both
    before and after ``pip install -e``. None registers nothing."""
    from clip_jax import plugins

    if plugin is None or _installed(plugin):
        yield
        return
    name = name or getattr(plugin, "__name__", "test-plugin")
    plugins.register_plugin(plugin, name)
    try:
        yield
    finally:
        plugins.unregister_plugin(name)


def _installed(plugin: object) -> bool:
    """Whether an entry point of the ``clip_jax`` group names this module."""
    module = getattr(plugin, "__name__", None)
    return any(ep.value == module for ep in md.entry_points(group="clip_jax"))


def write_tiny_dataset(folder: str | Path) -> Path:
    """The tiny run's data in ``folder`` (written once, reused after): the embedded
    dataset's captioned shapes as img2dataset-style tfrecord shards (``jpg``, ``txt``,
    ``label``)."""
    from clip_jax.data.synth_writer import write_synthetic

    data = TINY_SPEC["data"]
    write_synthetic(
        folder, data["train_examples"], data["validation_examples"], image_size=32, workers=1
    )
    return Path(folder)


def train_losses(run_dir: str | Path) -> list[float]:
    """The ``loss`` of every training record in a run folder's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]


def paired_embeddings(
    batch: int = 8, dim: int = 16, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(img_emb_BxD, txt_emb_BxD), L2-normalised float32, row i of each describing the
    same example (the text is the image plus ``noise``): a good loss is lower on these
    than on the same rows shuffled."""
    rng = np.random.default_rng(seed)
    img_emb_BxD = rng.standard_normal((batch, dim)).astype(np.float32)
    txt_emb_BxD = img_emb_BxD + noise * rng.standard_normal((batch, dim)).astype(np.float32)
    return _normalize(img_emb_BxD), _normalize(txt_emb_BxD)


def _normalize(x_BxD: np.ndarray) -> np.ndarray:
    return x_BxD / np.linalg.norm(x_BxD, axis=-1, keepdims=True)


def synthetic_batch(
    batch: int = 4,
    image_size: int = 32,
    context_length: int = 16,
    vocab_size: int = 300,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A model's inputs: ``images`` (BxHxWx3 float32, normalised as the pipeline makes
    them), ``tokens`` (BxL int32, padded with 0 after a random length) and ``labels``."""
    rng = np.random.default_rng(seed)
    images_BxHxWxC = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    tokens_BxL = rng.integers(1, vocab_size, (batch, context_length), dtype=np.int32)
    lengths_B = rng.integers(2, context_length + 1, batch)
    tokens_BxL[np.arange(context_length)[None, :] >= lengths_B[:, None]] = 0
    labels_B = rng.integers(0, 2, batch, dtype=np.int32)
    return {"images": images_BxHxWxC, "tokens": tokens_BxL, "labels": labels_B}
