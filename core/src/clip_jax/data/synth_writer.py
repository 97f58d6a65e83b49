"""``clipctl data synth``: the embedded dataset written as img2dataset-style shards.

Layout: ``train/00000.tfrecord...``, ``validation/00000.tfrecord...`` (or another record
format's shards, e.g. webdataset's ``00000.tar``), ``classes.json``
(class names and prompt templates for zero-shot evaluation) and ``dataset.json`` (the
settings that produced it, so a later run can tell whether it can reuse the folder).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from clip_jax.data import synthetic
from clip_jax.data.formats import TFRECORD, RecordFormat
from clip_jax.errors import PathError

EXAMPLES_PER_SHARD = 2048
MIN_SHARDS = 8  # so that even a small dataset can feed several readers / processes
# Validation examples use a different seed stream, so they never repeat a training image.
VALIDATION_SEED_OFFSET = 1_000_003


class ForeignFolder(PathError, FileExistsError):
    """A folder that holds other files: the synthetic writer never touches it."""


def _render(args: tuple[int, int, int, int]) -> list[tuple[str, bytes, str, int]]:
    """Runs in a worker process: drawing needs only PIL and numpy, never TensorFlow."""
    seed, start, stop, image_size = args
    return [
        (f"{index:09d}", *synthetic.make_example(seed, index, image_size))
        for index in range(start, stop)
    ]


def settings(
    train_examples: int,
    validation_examples: int,
    image_size: int,
    seed: int,
    record_format: RecordFormat = TFRECORD,
) -> dict:
    wanted = {
        "generator": "clip_jax.synthetic/1",
        "train_examples": train_examples,
        "validation_examples": validation_examples,
        "image_size": image_size,
        "seed": seed,
        "classes": synthetic.CLASSES,
    }
    # Only other formats are named, so that folders written before formats existed
    # (all TFRecord) are still recognised and reused.
    if record_format.name != TFRECORD.name:
        wanted["format"] = record_format.name
    return wanted


def is_complete(out_dir: str | Path, wanted: dict) -> bool:
    marker = Path(out_dir) / "dataset.json"
    try:
        return json.loads(marker.read_text()) == wanted
    except (OSError, ValueError):
        return False


def write_synthetic(
    out_dir: str | Path,
    train_examples: int = 20000,
    validation_examples: int = 1024,
    image_size: int = 32,
    seed: int = 0,
    workers: int | None = None,
    record_format: RecordFormat = TFRECORD,
) -> dict:
    """Write (or reuse) the dataset in ``out_dir``, shards in ``record_format``; returns
    its settings."""
    out = Path(out_dir)
    wanted = settings(train_examples, validation_examples, image_size, seed, record_format)
    if is_complete(out, wanted):
        return wanted
    if out.exists() and any(out.iterdir()) and not (out / "dataset.json").exists():
        raise ForeignFolder(
            "exists and was not written by `clipctl data synth`: choose an empty or new folder",
            key=str(out),
        )
    out.mkdir(parents=True, exist_ok=True)
    # Claim the folder first: an interrupted write is recognised as ours and redone.
    (out / "dataset.json").write_text(json.dumps({**wanted, "complete": False}) + "\n")
    jobs = []
    for split, count, split_seed in (
        ("train", train_examples, seed),
        ("validation", validation_examples, seed + VALIDATION_SEED_OFFSET),
    ):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.tfrecord"), *folder.glob(f"*{record_format.suffix}")]:
            old.unlink(missing_ok=True)
        per_shard = min(EXAMPLES_PER_SHARD, -(-count // MIN_SHARDS))
        for shard, start in enumerate(range(0, count, per_shard)):
            stop = min(start + per_shard, count)
            jobs.append(
                (
                    str(folder / f"{shard:05d}{record_format.suffix}"),
                    split_seed,
                    start,
                    stop,
                    image_size,
                )
            )
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    renders = [job[1:] for job in jobs]
    if workers > 1:
        # spawn, not fork: the parent may already run TensorFlow's or JAX's threads.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            examples = pool.map(_render, renders)
            for (path, *_), shard in zip(jobs, examples, strict=True):
                record_format.write_shard(path, shard)
    else:
        for (path, *_), render in zip(jobs, renders, strict=True):
            record_format.write_shard(path, _render(render))
    classes = {"classes": synthetic.CLASSES, "templates": synthetic.PROMPT_TEMPLATES}
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    (out / "dataset.json").write_text(json.dumps(wanted, indent=2) + "\n")
    return wanted
