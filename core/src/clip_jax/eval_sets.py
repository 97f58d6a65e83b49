"""Evaluating a model on any labelled set: what ``clipctl eval RUN --data ... --classes ...`` does.

The run's own validation split is the default. ``data`` names any tfrecord shards with an
image and an integer label (captions optional: retrieval needs them), ``classes`` a class
names + templates file or a bundled set (``imagenet``: OpenAI's 1000 names and 80
prompts), so an ImageNet tfrecord set evaluates with the standard recipe. The linear probe
fits a logistic regression on the frozen embeddings of the run's training shards (or
``probe_train``) and tests on the evaluation set's. A run with a classification head
also gets the head's accuracy (``head_top1``/``head_top5``, on labels the head can score),
and a captioning run its caption metrics (``caption_*``, when the set has captions), as
its own evaluation (``train.trainer.run_evaluation``) reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_jax.errors import UserError

log = logging.getLogger("clip_jax.eval_sets")  # notes: what was skipped, and why


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


def embed_set(
    model,
    files: Sequence[str],
    keys: EvalSet,
    limit: int | None,
    head_scores: Callable | None = None,
    caption_images: Callable | None = None,
    caption_examples: int = 256,
) -> dict[str, Any]:
    """Unit-norm image embeddings, labels and captions of up to ``limit`` examples; with
    ``head_scores`` (``evaluate.head_scorer``) the head's scores of the labelled batches,
    with ``caption_images`` the generated captions of the first ``caption_examples``."""
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
    images, labels, captions, scores, generated = [], [], [], [], []
    for batch in pipeline.iterate(dataset):
        images.append(model.encode_images(batch.images))
        if caption_images is not None and len(generated) < caption_examples:
            generated += caption_images(batch.images)
        captions += batch.captions
        if batch.labels is not None:
            labels.append(batch.labels)
            if head_scores is not None:
                scores.append(head_scores(batch))
        if limit and len(captions) >= limit:
            break
    if not captions:
        raise UserError(f"no readable examples in {files[0]}{' ...' if len(files) > 1 else ''}")
    n = min(len(captions), limit or len(captions))
    return {
        "images": np.concatenate(images)[:n],
        "labels": np.concatenate(labels)[:n] if labels else None,
        "captions": captions[:n],
        "head_scores": np.concatenate(scores)[:n] if scores else None,
        "generated": generated[: min(n, caption_examples)],
    }


def first_record_keys(files: Sequence[str], record_format: Any = None) -> list[str] | None:
    """The feature names of the first record of ``files[0]``, read with the set's own
    reader; None when it cannot be read (the pipeline then says what it finds)."""
    from clip_jax.data.formats import TFRECORD
    from clip_jax.data.tf_setup import import_tf

    try:
        for record, _ in (record_format or TFRECORD).records(files[0]):
            example = import_tf().train.Example.FromString(record)
            return sorted(example.features.feature)
    except Exception:  # noqa: BLE001 - a diagnosis only: the pipeline reports real errors
        return None
    return None


def check_keys(eval_set: EvalSet) -> None:
    """Refuse, naming the option, an image or caption feature the first record lacks:
    every record without it would be dropped (as TensorFlow parse errors), leaving
    "no readable examples" and no hint of which key is wrong."""
    keys = first_record_keys(eval_set.files, eval_set.record_format)
    if not keys:
        return
    where = f"the first record of {eval_set.files[0]} has: {', '.join(keys)}"
    if eval_set.image_key not in keys:
        raise UserError(
            f"the records have no image feature {eval_set.image_key!r} ({where})",
            key="--image-key",
        )
    if eval_set.caption_key and eval_set.caption_key not in keys:
        raise UserError(
            f"the records have no caption feature {eval_set.caption_key!r} ({where}; "
            "--caption-key '' reads none)",
            key="--caption-key",
        )


def evaluate_model(
    model,
    eval_set: EvalSet,
    probe_files: Sequence[str] = (),
    max_examples: int | None = None,
    probe_examples: int = 10_000,
    require_labels: bool = False,
) -> dict[str, Any]:
    """Zero-shot top-1/5 (with classes), retrieval (with captions), linear probe (with
    ``probe_files``), a classification head's accuracy (with labels it can score) and a
    captioning run's caption metrics (with captions) on one evaluation set.

    ``require_labels``: the caller named classes or a label key, so a set without a
    single label under ``eval_set.label_key`` is a mistake, not a set to skip zero-shot on.
    """
    from clip_jax.evaluate import (
        caption_class_accuracy,
        caption_match,
        class_embeddings,
        head_accuracy,
        head_scorer,
        retrieval,
        zero_shot,
    )

    check_keys(eval_set)
    comps = model.comps
    head = head_scorer(comps, model.params, model.tokenizer, model.spec.eval.batch_size)
    if head is not None and comps.head.tower == "text" and not eval_set.caption_key:
        log.warning("head accuracy skipped: the text head scores captions, and none are read")
        head = None
    captioning = "captioning" in (comps.model.aux or {}) and bool(eval_set.caption_key)
    found = embed_set(
        model, eval_set.files, eval_set, max_examples, head, model.caption if captioning else None
    )
    results: dict[str, Any] = {"examples": len(found["captions"])}
    labels = found["labels"]
    known = labels >= 0 if labels is not None else None
    if require_labels and (labels is None or not known.any()):
        raise UserError(
            f"no example of {eval_set.name} has a label under {eval_set.label_key!r}: name "
            "the records' integer label feature",
            key="--label-key",
        )
    if labels is not None and known.any() and not eval_set.classes:
        log.warning("zero-shot skipped: no class names; pass --classes FILE (or imagenet)")
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
    scores = found["head_scores"]
    if scores is not None and known.any():
        if labels[known].max() < scores.shape[1]:
            results |= head_accuracy(scores[known], labels[known])
        else:
            log.warning(
                "head accuracy skipped: the data has label %d, the head %d classes",
                int(labels[known].max()),
                scores.shape[1],
            )
    if found["generated"] and any(found["captions"]):
        made = found["generated"]
        results |= caption_match(made, found["captions"])
        if eval_set.classes and labels is not None:
            results |= caption_class_accuracy(made, labels, eval_set.classes)
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


@dataclass
class EvalInputs:
    """What ``--data``, ``--classes`` and ``--probe-data`` name, read before the model
    loads, so that a glob matching nothing or a missing classes file fails at once."""

    files: list[str] | None = None  # None: the run's validation split
    name: str | None = None
    classes: tuple[list[str], list[str]] | None = None  # (names, templates)
    probe_files: list[str] | None = None  # None: the run's training shards


def read_inputs(
    data: str | Sequence[str] | None = None,
    classes: str | None = None,
    probe_data: str | Sequence[str] | None = None,
) -> EvalInputs:
    from clip_jax.data.classes import load_classes
    from clip_jax.data.pipeline import expand_files

    inputs = EvalInputs()
    for option, patterns in (("--data", data), ("--probe-data", probe_data)):
        if not patterns:
            continue
        try:
            files = expand_files(patterns)
        except FileNotFoundError as exc:
            raise UserError(f"{option}: {exc}") from None
        if option == "--data":
            # The glob itself: a folder name ("validation", "val") would file another
            # set's results under the run's own split, or two sets under one name.
            inputs.files = files
            inputs.name = patterns if isinstance(patterns, str) else ",".join(map(str, patterns))
        else:
            inputs.probe_files = files
    if classes:
        inputs.classes = load_classes(classes)
    return inputs


def run_eval_set(
    model,
    inputs: EvalInputs | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
) -> EvalSet:
    """The evaluation set: the run's validation split, or ``inputs.files`` read with the
    run's keys unless overridden."""
    inputs = inputs or EvalInputs()
    keys = model.spec.data  # the run's record keys; its data source only when needed
    names: list[str] = []
    templates = ["a photo of a {}."]
    record_format = None  # --data: TFRecord shards
    if inputs.files is None:
        source = model.comps.data
        record_format = source.record_format
        if not source.validation_files:
            raise UserError("the run has no validation split: pass --data GLOB")
        files, name = list(source.validation_files), "validation"
        names, templates = list(source.classes), list(source.templates)
    else:
        files, name = inputs.files, inputs.name or ",".join(inputs.files)
    if inputs.classes:
        names, templates = inputs.classes
    return EvalSet(
        files=files,
        image_key=image_key or keys.image_key,
        caption_key=caption_key if caption_key is not None else keys.caption_key,
        label_key=label_key or keys.label_key,
        classes=list(names),
        templates=list(templates),
        name=name,
        record_format=record_format,
    )
