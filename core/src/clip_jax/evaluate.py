"""Evaluators: zero-shot classification, image-text retrieval and (for a run with a
classification head) the head's accuracy on a validation split.

They take two encoding callables (numpy in, L2-normalised numpy embeddings out), so the
trainer, ``clipctl eval`` and ``clip_jax.load`` all share one implementation.

Retrieval counts a hit when a retrieved caption is *the same text* as the query's own
caption. On web data captions are nearly unique and this equals the usual
index-matching recall; on the embedded dataset many images share a caption, and
index matching would punish the model for ranking equally correct captions first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from operator import itemgetter
from typing import Any

import numpy as np

EncodeImages = Callable[[np.ndarray], np.ndarray]
EncodeTexts = Callable[[Sequence[str]], np.ndarray]


def padded_encoder(fn: Callable, params: object, batch_size: int) -> Callable:
    """Encode any number of rows with one compiled shape (pad the last batch). Rows are
    an array (padded with zeros) or a NamedTuple of arrays, NaFlex images, padded with
    copies of the last row: an image of all padding would have no valid patch, and its
    pooling would divide by zero. The padding's outputs are dropped either way."""

    def encode(rows: Any) -> np.ndarray:
        out = []
        tree = hasattr(rows, "_fields")
        total = len(rows[0]) if tree else len(rows)
        for start in range(0, total, batch_size):
            chunk = _leaves(itemgetter(slice(start, start + batch_size)), rows)
            pad = batch_size - min(batch_size, total - start)
            if pad:
                chunk = _leaves(partial(_pad, pad=pad, edge=tree), chunk)
            out.append(np.asarray(fn(params, chunk))[: batch_size - pad])
        return np.concatenate(out)

    return encode


def _leaves(fn: Callable, rows: Any) -> Any:
    """``fn`` on an array, or on each array of a NamedTuple of them (``NaflexImages``)."""
    if hasattr(rows, "_fields"):
        return type(rows)(*(fn(np.asarray(leaf)) for leaf in rows))
    return fn(rows)


def _pad(rows: np.ndarray, pad: int, edge: bool) -> np.ndarray:
    extra = np.repeat(rows[-1:], pad, 0) if edge else np.zeros((pad, *rows.shape[1:]), rows.dtype)
    return np.concatenate([rows, extra])


def head_scorer(comps: Any, params: object, tokenizer: Any, batch_size: int) -> Callable | None:
    """A batch (``pipeline.Batch``) -> its classification head's scores (N x classes), or
    None for a run without a classification head. An image head scores the batch's
    images, a text head its captions. What ``evaluate(head_scores=...)`` and
    ``clip_jax.eval_sets`` score the head with."""
    if comps.classifier is None:
        return None
    classify = padded_encoder(comps.classifier, params, batch_size)
    if comps.head.tower == "text":
        return lambda batch: classify(tokenizer(batch.captions))
    return lambda batch: classify(batch.images)


BUDGET_METRICS = ("zero_shot_", "retrieval_")  # what eval.max_patches measures again


def at_budget(results: dict, budget: int) -> dict:
    """Zero-shot and retrieval metrics named for the NaFlex patch budget they were
    measured at (``zero_shot_top1@64``), to sit beside the run's own."""
    return {
        f"{k}@{budget}": v
        for k, v in results.items()
        if k.startswith(BUDGET_METRICS) and "@" not in k
    }


def class_embeddings(
    encode_texts: EncodeTexts, classes: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """One unit vector per class: the mean of its prompt embeddings (CLIP's ensembling)."""
    prompts = [template.format(name) for name in classes for template in templates]
    emb_PxD = encode_texts(prompts).reshape(len(classes), len(templates), -1)
    mean_CxD = emb_PxD.mean(axis=1)
    return mean_CxD / np.linalg.norm(mean_CxD, axis=-1, keepdims=True)


def zero_shot(img_emb_NxD: np.ndarray, labels_N: np.ndarray, class_emb_CxD: np.ndarray) -> dict:
    scores_NxC = img_emb_NxD @ class_emb_CxD.T
    top_NxK = np.argsort(-scores_NxC, axis=1)[:, :5]
    hits_NxK = top_NxK == labels_N[:, None]
    return {
        "zero_shot_top1": float(hits_NxK[:, 0].mean()),
        "zero_shot_top5": float(hits_NxK.any(axis=1).mean()),
        "zero_shot_classes": int(class_emb_CxD.shape[0]),
    }


def retrieval(img_emb_NxD: np.ndarray, txt_emb_NxD: np.ndarray, captions: Sequence[str]) -> dict:
    _, caption_ids_N = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    scores_NxN = img_emb_NxD @ txt_emb_NxD.T
    results = {}
    for name, scores in (("i2t", scores_NxN), ("t2i", scores_NxN.T)):
        top_NxK = np.argsort(-scores, axis=1)[:, :10]
        hits_NxK = caption_ids_N[top_NxK] == caption_ids_N[:, None]
        for k in (1, 5, 10):
            results[f"retrieval_{name}_r{k}"] = float(hits_NxK[:, :k].any(axis=1).mean())
    return results


def head_accuracy(scores_NxC: np.ndarray, labels_N: np.ndarray) -> dict:
    """A classification head's top-1 (and top-5, with at least 5 classes) accuracy."""
    top_NxK = np.argsort(-scores_NxC, axis=1)[:, :5]
    hits_NxK = top_NxK == labels_N[:, None]
    results = {"head_top1": float(hits_NxK[:, 0].mean())}
    if scores_NxC.shape[1] >= 5:
        results["head_top5"] = float(hits_NxK.any(axis=1).mean())
    return results


def evaluate(
    batches: Iterable,
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    classes: Sequence[str] = (),
    templates: Sequence[str] = ("a photo of a {}.",),
    zero_shot_enabled: bool = True,
    retrieval_enabled: bool = True,
    max_examples: int | None = None,
    head_scores: Callable[[object], np.ndarray] | None = None,
    caption_images: Callable[[np.ndarray], list[str]] | None = None,
    caption_examples: int = 256,
) -> dict:
    """Run the enabled evaluators over validation batches (``pipeline.Batch`` objects).

    ``head_scores``: a batch -> its classification head's scores (N x classes); the
    head's accuracy is measured on the examples that have a label.
    ``caption_images``: images -> generated captions (a captioning term's decoder),
    compared with the reference captions of the first ``caption_examples`` examples.
    """
    img, txt, labels, captions, scores, generated = [], [], [], [], [], []
    for batch in batches:
        img.append(encode_images(batch.images))
        if caption_images is not None and len(generated) < caption_examples:
            generated += caption_images(batch.images)
        captions += batch.captions
        if retrieval_enabled:
            txt.append(encode_texts(batch.captions))
        if batch.labels is not None:
            labels.append(batch.labels)
            if head_scores is not None:
                scores.append(head_scores(batch))
        if max_examples and len(captions) >= max_examples:
            break
    if not captions:
        raise ValueError("the validation split is empty")
    limit = min(len(captions), max_examples or len(captions))
    img_emb_NxD = np.concatenate(img)[:limit]
    results: dict = {"examples": limit}
    if zero_shot_enabled and classes and labels:
        labels_N = np.concatenate(labels)[:limit]
        known = labels_N >= 0
        class_emb = class_embeddings(encode_texts, classes, templates)
        results |= zero_shot(img_emb_NxD[known], labels_N[known], class_emb)
    if retrieval_enabled:
        results |= retrieval(img_emb_NxD, np.concatenate(txt)[:limit], captions[:limit])
    if scores:
        labels_N = np.concatenate(labels)[:limit]
        known = labels_N >= 0
        results |= head_accuracy(np.concatenate(scores)[:limit][known], labels_N[known])
    if generated:
        made = generated[: min(limit, caption_examples)]
        results |= caption_match(made, captions)
        if classes and labels:
            results |= caption_class_accuracy(made, np.concatenate(labels), classes)
    return results


def caption_class_accuracy(
    generated: Sequence[str], labels_N: np.ndarray, classes: Sequence[str]
) -> dict:
    """Share of generated captions that name their image's class and no other class:
    what a caption gets right when the references' wording varies at random (the
    embedded dataset's "a picture of a ..." / "an image of a ...")."""
    names = [f" {name.lower()} " for name in classes]
    right, counted = 0, 0
    for made, label in zip(generated, labels_N, strict=False):
        if label < 0:
            continue
        text = f" {' '.join(made.lower().split())} "
        named = [i for i, name in enumerate(names) if name in text]
        right += named == [label]
        counted += 1
    return {"caption_class_accuracy": right / counted} if counted else {}


def caption_match(generated: Sequence[str], references: Sequence[str]) -> dict:
    """Exact match (case and surrounding spaces ignored) and word-level accuracy of
    generated captions against the references, position by position."""
    same, words, hits = 0, 0, 0
    for made, reference in zip(generated, references, strict=False):
        made_words, ref_words = made.lower().split(), reference.lower().split()
        same += made_words == ref_words
        words += len(ref_words)
        hits += sum(a == b for a, b in zip(made_words, ref_words, strict=False))
    return {
        "caption_exact_match": same / max(len(generated), 1),
        "caption_word_accuracy": hits / max(words, 1),
    }
