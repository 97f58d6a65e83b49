"""Evaluating a model on any labelled set: what ``clipctl eval RUN --data ... --classes ...`` does.

The run's own validation split is the default. ``data`` names any tfrecord shards with an
image and an integer label (captions optional: retrieval needs them), ``classes`` a class
names + templates file or a bundled set (``imagenet``: OpenAI's 1000 names and 80
prompts), so an ImageNet tfrecord set evaluates with the standard recipe. The linear probe
fits a logistic regression on the frozen embeddings of the run's training shards (or
``probe_train``) and tests on the evaluation set's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_jax.errors import UserError


@dataclass
class EvalSet:
    """Where the examples come from and how to read them."""

    files: list[str]
    image_key: str
    caption_key: str | None
    label_key: str | None
    classes: list[str]
    templates: list[str]
    name: str  # "validation" (the run's own split) or the --data glob(s) as given
    record_format: Any = None  # a clip_jax.data.formats.RecordFormat; None: TFRecord


def embed_set(model, files: Sequence[str], keys: EvalSet, limit: int | None) -> dict[str, Any]:
    """Unit-norm image embeddings, labels and captions of up to ``limit`` examples."""
    from clip_jax.data import pipeline
    from clip_jax.data.naflex import patch_size_of

    spec = model.spec
    dataset = pipeline.make_dataset(
        list(files),
        image_size=spec.model.vision.image_size,
        batch_size=spec.eval.batch_size,
        image_key=keys.image_key,
        caption_key=keys.caption_key,
        label_key=keys.label_key,
        train=False,
        preprocess=spec.preprocess,
        record_format=keys.record_format,
        patch_size=patch_size_of(spec),
    )
    images, labels, captions = [], [], []
    for batch in pipeline.iterate(dataset):
        images.append(model.encode_images(batch.images))
        captions += batch.captions
        if batch.labels is not None:
            labels.append(batch.labels)
        if limit and len(captions) >= limit:
            break
    if not captions:
        raise UserError(f"no readable examples in {files[0]}{' ...' if len(files) > 1 else ''}")
    n = min(len(captions), limit or len(captions))
    return {
        "images": np.concatenate(images)[:n],
        "labels": np.concatenate(labels)[:n] if labels else None,
        "captions": captions[:n],
    }


def evaluate_model(
    model,
    eval_set: EvalSet,
    probe_files: Sequence[str] = (),
    max_examples: int | None = None,
    probe_examples: int = 10_000,
) -> dict[str, Any]:
    """Zero-shot top-1/5 (with classes), retrieval (with captions), linear probe (with
    ``probe_files``) on one evaluation set."""
    from clip_jax.evaluate import class_embeddings, retrieval, zero_shot

    found = embed_set(model, eval_set.files, eval_set, max_examples)
    results: dict[str, Any] = {"examples": len(found["captions"])}
    labels = found["labels"]
    known = labels >= 0 if labels is not None else None
    if eval_set.classes and labels is not None and known.any():
        if labels[known].max() >= len(eval_set.classes):
            count = len(eval_set.classes)
            raise UserError(
                f"the data has label {int(labels[known].max())}, but the classes list only "
                f"{count} {'class' if count == 1 else 'classes'} (labels count from 0)",
                key="--classes",
            )
        class_emb = class_embeddings(model.encode_texts, eval_set.classes, eval_set.templates)
        results |= zero_shot(found["images"][known], labels[known], class_emb)
    if eval_set.caption_key and any(found["captions"]):
        texts = model.encode_texts(found["captions"])
        results |= retrieval(found["images"], texts, found["captions"])
    if probe_files:
        if labels is None:
            raise UserError("the linear probe needs labels: set --label-key")
        results |= _probe(model, probe_files, eval_set, found, probe_examples)
    return results


def _probe(model, probe_files, eval_set: EvalSet, test: dict, limit: int) -> dict[str, Any]:
    from clip_jax.linear_probe import linear_probe

    train = embed_set(model, probe_files, eval_set, limit)
    if train["labels"] is None:
        raise UserError("the linear probe's training shards have no labels")
    train_known, test_known = train["labels"] >= 0, test["labels"] >= 0
    if train_known.sum() < 2 or not test_known.any():
        raise UserError(
            "the linear probe needs labelled examples on both sides (--label-key names an "
            "int64 feature the records carry)"
        )
    classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    try:
        return linear_probe(
            train["images"][train_known],
            train["labels"][train_known],
            test["images"][test_known],
            test["labels"][test_known],
            max(classes, len(eval_set.classes)),
        )
    except ValueError as exc:
        raise UserError(f"linear probe: {exc}") from None


def run_eval_set(
    model,
    data: str | Sequence[str] | None = None,
    classes: str | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
) -> EvalSet:
    """The evaluation set: the run's validation split, or ``data`` read with the run's keys
    unless overridden."""
    from clip_jax.data.classes import load_classes
    from clip_jax.data.pipeline import expand_files

    keys = model.spec.data  # the run's record keys; its data source only when needed
    names: list[str] = []
    templates = ["a photo of a {}."]
    record_format = None  # --data: TFRecord shards
    if data is None:
        source = model.comps.data
        record_format = source.record_format
        if not source.validation_files:
            raise UserError("the run has no validation split: pass --data GLOB")
        files, name = list(source.validation_files), "validation"
        names, templates = list(source.classes), list(source.templates)
    else:
        try:
            files = expand_files(data)
        except FileNotFoundError as exc:
            raise UserError(f"--data: {exc}") from None
        # The glob itself: a folder name ("validation", "val") would file another set's
        # results under the run's own split, or two sets under one name.
        name = data if isinstance(data, str) else ",".join(map(str, data))
    if classes:
        names, templates = load_classes(classes)
    return EvalSet(
        files=files,
        image_key=image_key or keys.image_key,
        caption_key=caption_key if caption_key is not None else keys.caption_key,
        label_key=label_key or keys.label_key,
        classes=names,
        templates=templates,
        name=name,
        record_format=record_format,
    )
