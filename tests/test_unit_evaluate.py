"""The evaluators' pieces on hand-made inputs with known answers, no model: padded
batches, prompt ensembling, top-5 and text-to-image recall, and ``evaluate``'s
bookkeeping over validation batches (unlabelled rows, ``max_examples``, switches)."""

from types import SimpleNamespace

import numpy as np
import pytest

from clip_jax.evaluate import (
    class_embeddings,
    evaluate,
    head_accuracy,
    padded_encoder,
    retrieval,
    zero_shot,
)


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


# ------------------------------------------------------------------ padded_encoder
@pytest.mark.parametrize(("rows", "batch_size"), [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_padded_encoder_pads_the_last_batch_and_drops_the_padding(rows, batch_size):
    seen = []

    def fn(params, chunk):
        seen.append(chunk.copy())
        return chunk[:, :2] * params  # row-wise, so padding cannot leak into real rows

    x = np.arange(1, rows * 3 + 1, dtype=np.float32).reshape(rows, 3)
    out = padded_encoder(fn, 10.0, batch_size)(x)

    np.testing.assert_array_equal(out, x[:, :2] * 10.0)
    assert out.dtype == np.float32
    # One compiled shape: every call sees exactly batch_size rows, of the input's dtype.
    assert all(chunk.shape == (batch_size, 3) and chunk.dtype == x.dtype for chunk in seen)
    assert len(seen) == -(-rows // batch_size)
    pad = len(seen) * batch_size - rows
    np.testing.assert_array_equal(np.concatenate(seen)[:rows], x)  # real rows, in order
    np.testing.assert_array_equal(np.concatenate(seen)[rows:], np.zeros((pad, 3)))


def test_padded_encoder_keeps_trailing_dimensions_and_integer_dtypes():
    """Tokens are int32 (N, L): the padding rows are int32 zeros of the same length."""
    seen = []

    def fn(params, tokens):
        seen.append(tokens)
        return tokens.sum(axis=1, keepdims=True).astype(np.float32)

    tokens = np.arange(5 * 7, dtype=np.int32).reshape(5, 7)
    out = padded_encoder(fn, None, 4)(tokens)
    assert out.shape == (5, 1)
    np.testing.assert_array_equal(out[:, 0], tokens.sum(axis=1))
    assert [t.shape for t in seen] == [(4, 7), (4, 7)]
    assert seen[1].dtype == np.int32
    np.testing.assert_array_equal(seen[1][1:], 0)


# ----------------------------------------------------------------- class_embeddings
def test_class_embeddings_average_each_class_over_its_templates_in_class_order():
    """Prompts are built class-major ("cat" with every template, then "dog"...); each
    class gets the normalised mean of its own prompts' embeddings."""
    vectors = {
        "a cat": [1.0, 0.0, 0.0],
        "the cat": [0.0, 1.0, 0.0],
        "a dog": [0.0, 0.0, 1.0],
        "the dog": [0.0, 0.0, 1.0],
    }
    calls = []

    def encode_texts(prompts):
        calls.append(list(prompts))
        return np.array([vectors[p] for p in prompts])

    emb = class_embeddings(encode_texts, ["cat", "dog"], ["a {}", "the {}"])
    assert calls == [["a cat", "the cat", "a dog", "the dog"]]  # one call, class-major
    np.testing.assert_allclose(emb, [[2**-0.5, 2**-0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)


# ---------------------------------------------------------------------- evaluators
def test_zero_shot_top5_counts_a_label_anywhere_in_the_five_best():
    """Seven classes; image i's true class is ranked at position rank[i]."""
    classes = np.eye(7)
    ranks = [0, 1, 4, 5, 6]
    images, labels = [], []
    for i, rank in enumerate(ranks):
        label = i
        others = [c for c in range(7) if c != label]
        order = others[:rank] + [label] + others[rank:]
        images.append(np.linspace(1.0, 0.1, 7)[np.argsort(order)])  # score descends with order
        labels.append(label)
    results = zero_shot(unit(images), np.array(labels), classes)
    assert results["zero_shot_top1"] == pytest.approx(1 / 5)  # only rank 0
    assert results["zero_shot_top5"] == pytest.approx(3 / 5)  # ranks 0, 1, 4
    assert results["zero_shot_classes"] == 7


def test_text_to_image_recall_is_measured_from_the_texts_side():
    """Both images prefer text 0, but each text prefers its own image: i2t r@1 is 1/2,
    t2i r@1 is 1 (scoring t2i on the untransposed matrix would give 1/2)."""
    img = unit([[1.0, 0.0], [0.9, 0.1]])
    txt = unit([[1.0, 0.0], [0.0, 1.0]])
    results = retrieval(img, txt, ["x", "y"])
    assert results["retrieval_i2t_r1"] == pytest.approx(1 / 2)
    assert results["retrieval_t2i_r1"] == pytest.approx(1.0)
    assert results["retrieval_i2t_r5"] == results["retrieval_t2i_r10"] == 1.0  # only 2 rows


def test_head_accuracy_reports_top5_only_with_five_classes_or_more():
    scores = np.array([[0.1, 0.9, 0.0, 0.0], [0.8, 0.1, 0.05, 0.05]])
    assert head_accuracy(scores, np.array([1, 1])) == {"head_top1": 0.5}
    scores = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], dtype=float)
    results = head_accuracy(scores, np.array([4, 0]))  # ranks 4 (in top 5) and 5 (not)
    assert results == {"head_top1": 0.0, "head_top5": 0.5}


# ----------------------------------------------------------------------- evaluate()
DIM = 4
# Four classes, each an axis; captions name the class.
CLASSES = ["red", "green", "blue", "black"]


def encode_images(images):
    return unit(images)


def encode_texts(texts):
    """A caption or prompt points along its class's axis (prompts: "a photo of a red.")."""
    out = []
    for text in texts:
        hits = [i for i, name in enumerate(CLASSES) if name in text]
        out.append(np.eye(DIM)[hits[0]])
    return np.array(out)


def make_batch(labels, wrong=()):
    """Images point at their label's axis, except rows in ``wrong`` (next class)."""
    labels = np.array(labels)
    classes = [(int(label) + (i in wrong)) % DIM for i, label in enumerate(labels)]
    images = np.eye(DIM)[classes] + 0.01
    captions = [f"a {CLASSES[c]} shape" for c in classes]
    return SimpleNamespace(images=images, captions=captions, labels=labels)


def test_evaluate_skips_unlabelled_rows_for_zero_shot_but_not_for_retrieval():
    batches = [make_batch([0, 1, 2]), make_batch([3, -1, -1], wrong={0})]
    results = evaluate(batches, encode_images, encode_texts, classes=CLASSES)
    assert results["examples"] == 6
    # Labelled: 4 rows, the last one wrong. Unlabelled rows (-1) are left out: counted
    # as misses they would give 3/6.
    assert results["zero_shot_top1"] == pytest.approx(3 / 4)
    assert results["zero_shot_classes"] == 4
    # Retrieval uses every row; each image's caption names its own (shown) class.
    assert results["retrieval_i2t_r1"] == 1.0


def test_evaluate_stops_at_max_examples_and_cuts_the_last_batch():
    batches = iter([make_batch([0, 1, 2]), make_batch([3, 0, 1], wrong={1, 2}), make_batch([2])])
    results = evaluate(batches, encode_images, encode_texts, classes=CLASSES, max_examples=4)
    assert results["examples"] == 4
    assert results["zero_shot_top1"] == 1.0  # the two wrong rows (5, 6) are past the limit
    assert next(batches).labels.tolist() == [2]  # the third batch was never read


def test_evaluate_switches_and_head_scores():
    encoded = []

    def counting_texts(texts):
        encoded.append(list(texts))
        return encode_texts(texts)

    batch = make_batch([0, 1, -1, 3])
    results = evaluate(
        [batch], encode_images, counting_texts, classes=CLASSES, retrieval_enabled=False
    )
    assert not any(k.startswith("retrieval") for k in results)
    assert len(encoded) == 1 and encoded[0][0] == "a photo of a red."  # prompts only
    results = evaluate(
        [batch], encode_images, encode_texts, classes=CLASSES, zero_shot_enabled=False
    )
    assert not any(k.startswith("zero_shot") for k in results)
    assert "retrieval_t2i_r1" in results
    # No class names: no zero-shot even when enabled.
    assert "zero_shot_top1" not in evaluate([batch], encode_images, encode_texts)
    # A head's scores: accuracy on the labelled rows only (row 2 is unlabelled).
    scores = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    results = evaluate([batch], encode_images, encode_texts, head_scores=lambda b: scores)
    assert results["head_top1"] == pytest.approx(2 / 3)


def test_evaluate_on_an_empty_split_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate([], encode_images, encode_texts, classes=CLASSES)


def test_captions_are_scored_by_exact_match_words_and_the_class_they_name():
    from clip_jax.evaluate import caption_class_accuracy, caption_match

    made = ["a red cross", "A small blue  square", "a red square and a blue square", "nothing"]
    references = ["a red cross", "a blue square", "a blue square", "a red cross"]
    scores = caption_match(made, references)
    assert scores["caption_exact_match"] == 0.25
    # word by word: 3/3, then a=a (1 of 3), a/a red/blue square/square (2 of 3), 0 of 3
    assert scores["caption_word_accuracy"] == (3 + 1 + 2 + 0) / 12
    classes = ["red cross", "blue square", "red square"]
    labels = np.array([0, 1, 1, -1])  # two classes named: wrong; unlabelled: not counted
    assert caption_class_accuracy(made, labels, classes) == {"caption_class_accuracy": 2 / 3}
