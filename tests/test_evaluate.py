"""The evaluators on hand-made embeddings: zero-shot, retrieval recall@1/5/10, head accuracy."""

import numpy as np
import pytest

from clip_jax.evaluate import head_accuracy, retrieval, zero_shot


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_retrieval_recall_at_1_5_10():
    """Image i's own caption is ranked at position rank[i]: recall@k counts rank < k."""
    n = 12
    rng = np.random.default_rng(0)
    captions = [f"caption {i}" for i in range(n)]
    ranks = np.array([0, 0, 1, 3, 4, 5, 7, 9, 10, 11, 2, 6])
    txt = unit(rng.normal(size=(n, 64)))
    img = np.zeros((n, 64))
    for i, rank in enumerate(ranks):
        # scores against the other texts descend with their index order; ours sits at `rank`
        others = [j for j in range(n) if j != i]
        order = others[:rank] + [i] + others[rank:]
        weights = np.linspace(1.0, 0.1, n)
        img[i] = sum(w * txt[j] for w, j in zip(weights, order, strict=True))
    scores = unit(img) @ txt.T
    measured = np.argsort(-scores, axis=1).tolist()
    got_ranks = np.array([row.index(i) for i, row in enumerate(measured)])
    results = retrieval(unit(img), txt, captions)
    for k in (1, 5, 10):
        assert results[f"retrieval_i2t_r{k}"] == pytest.approx((got_ranks < k).mean())
    assert (
        results["retrieval_i2t_r1"] <= results["retrieval_i2t_r5"] <= results["retrieval_i2t_r10"]
    )
    assert results["retrieval_i2t_r10"] < 1.0  # some captions sit past position 10


def test_retrieval_counts_equal_captions_as_hits():
    emb = unit(np.eye(3))
    results = retrieval(emb, unit(np.eye(3)[[1, 0, 2]]), ["a", "a", "b"])
    assert results["retrieval_i2t_r1"] == 1.0  # images 0 and 1 share the caption "a"


def test_zero_shot_and_head_accuracy():
    classes = unit(np.eye(4))
    images = unit(np.eye(4)[[0, 1, 2, 3, 0]] + 0.1)
    labels = np.array([0, 1, 2, 3, 1])
    results = zero_shot(images, labels, classes)
    assert results["zero_shot_top1"] == pytest.approx(0.8)
    assert results["zero_shot_classes"] == 4
    head = head_accuracy(np.eye(6)[[0, 1, 2, 3, 4, 0]], np.array([0, 1, 2, 3, 4, 5]))
    assert head["head_top1"] == pytest.approx(5 / 6)
