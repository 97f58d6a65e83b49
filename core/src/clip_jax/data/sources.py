"""Data sources: where a run's training and validation shards and class names come from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from clip_jax.data.formats import TFRECORD, RecordFormat
from clip_jax.data.pipeline import expand_files
from clip_jax.schemas import RecordKeys, SyntheticDataOptions, TfrecordDataOptions


@dataclass
class DataSource:
    train_files: list[str]
    validation_files: list[str]
    keys: RecordKeys
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    # How the shards are read: the streams, evaluation and the tokenizer all ask it.
    record_format: RecordFormat = TFRECORD


def read_classes(path: str | None) -> tuple[list[str], list[str]]:
    """Class names and prompt templates from a classes file (local or gs://), for
    zero-shot evaluation; none without a file."""
    if not path:
        return [], ["a photo of a {}."]
    from clip_jax.data.tf_setup import import_tf

    data = json.loads(import_tf().io.gfile.GFile(path).read())
    return list(data["classes"]), list(data.get("templates", ["a photo of a {}."]))


def tfrecord_source(options: TfrecordDataOptions) -> DataSource:
    """Factory registered as data source ``tfrecord``."""
    validation = expand_files(options.validation, "data.validation") if options.validation else []
    classes, templates = read_classes(options.classes_file)
    train = expand_files(options.train, "data.train")
    return DataSource(train, validation, options, classes, templates)


def synthetic_source(options: SyntheticDataOptions) -> DataSource:
    """Factory registered as data source ``synthetic``: writes the shards when missing."""
    from clip_jax.data.synth_writer import write_synthetic

    root = Path(options.dir)
    write_synthetic(
        root,
        train_examples=options.train_examples,
        validation_examples=options.validation_examples,
        image_size=options.image_size,
        seed=options.seed,
    )
    classes, templates = read_classes(str(root / "classes.json"))
    return DataSource(
        expand_files(str(root / "train" / "*.tfrecord"), "data.dir"),
        expand_files(str(root / "validation" / "*.tfrecord"), "data.dir"),
        options,
        classes,
        templates,
    )
