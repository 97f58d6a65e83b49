"""The ``adamw`` optimizer component as the trainer gets it (``components(spec).optimizer()``):
its learning rate at given steps, and which parameters weight decay reaches."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.spec import validate
from clip_jax.train import param_groups
from clip_jax.train.state import param_shapes

PEAK, END_RATIO, WARMUP, STEPS = 1e-3, 0.1, 10, 110
END = PEAK * END_RATIO

MODEL = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
    "text": {"vocab_size": 64, "context_length": 8, "width": 32, "depth": 1, "heads": 2},
}


def make_spec(steps=STEPS, **optimizer):
    options = {
        "learning_rate": PEAK,
        "warmup_steps": WARMUP,
        "end_learning_rate_ratio": END_RATIO,
        **optimizer,
    }
    return validate({"model": MODEL, "optimizer": options, "train": {"steps": steps}})


def schedule_of(**kwargs):
    _, schedule = components(make_spec(**kwargs)).optimizer()
    return lambda step: float(schedule(step))


# ------------------------------------------------------------------------ schedule
def test_warmup_rises_linearly_from_zero_to_the_peak():
    lr = schedule_of()
    assert lr(0) == 0.0
    assert lr(1) == pytest.approx(PEAK / WARMUP)
    assert lr(5) == pytest.approx(PEAK / 2)
    assert lr(WARMUP) == pytest.approx(PEAK)


@pytest.mark.parametrize(
    ("schedule", "quarter"),
    [
        # a quarter of the way through the decay (step 35 of 10 + 100)
        ("cosine", END + (PEAK - END) * (1 + math.cos(math.pi / 4)) / 2),
        ("linear", PEAK - (PEAK - END) / 4),
        ("constant", PEAK),
    ],
)
def test_decay_after_warmup(schedule, quarter):
    lr = schedule_of(schedule=schedule)
    assert lr(WARMUP) == pytest.approx(PEAK)
    assert lr(WARMUP + 25) == pytest.approx(quarter, rel=1e-5)
    if schedule == "constant":
        assert lr(STEPS) == pytest.approx(PEAK)
    else:  # halfway the two agree; the end is end_learning_rate_ratio x the peak
        assert lr(WARMUP + 50) == pytest.approx((PEAK + END) / 2, rel=1e-5)
        assert lr(STEPS) == pytest.approx(END, rel=1e-5)
        assert lr(STEPS + 50) == pytest.approx(END, rel=1e-5)  # and stays there


def test_no_warmup_starts_at_the_peak_and_warmup_longer_than_the_run_is_cut():
    assert schedule_of(warmup_steps=0)(0) == pytest.approx(PEAK)
    lr = schedule_of(warmup_steps=100, steps=20)  # the warmup is cut to the 20 steps
    assert lr(10) == pytest.approx(PEAK / 2)
    assert lr(20) == pytest.approx(PEAK)


def test_the_schedule_follows_train_steps():
    """Same spec, twice the steps: the decay is stretched over the longer run."""
    short, long = schedule_of(steps=60), schedule_of(steps=110)
    assert short(WARMUP + 25) == pytest.approx((PEAK + END) / 2, rel=1e-5)
    assert long(WARMUP + 50) == pytest.approx((PEAK + END) / 2, rel=1e-5)
    assert short(60) == pytest.approx(END, rel=1e-5) and long(60) > END * 2


# ---------------------------------------------------------------------- weight decay
WD = 0.1


@pytest.fixture(scope="module")
def decay_per_parameter():
    """Three optimizer steps with zero gradients on the tiny model's real parameter
    tree: Adam's part of the update is then 0 and what is left is decoupled weight
    decay, -lr(step) * wd * p. Returns (name -> [update / p per step], lr per step).
    (No gradient clipping: it does nothing to zero gradients, and leaving it out halves
    the compile time.)"""
    spec = make_spec(weight_decay=WD, warmup_steps=2, schedule="constant", clip_grad_norm=0.0)
    comps = components(spec)
    tx, schedule = comps.optimizer()
    shapes = nn.unbox(param_shapes(comps.model, spec))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.uniform(1.0, 2.0, s.shape).astype(s.dtype), shapes)
    zeros = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ratios: dict[str, list[float]] = {}
    for _ in range(3):
        updates, state = update(zeros, state, params)
        for (name, u), (_, p) in zip(
            param_groups.named_leaves(updates), param_groups.named_leaves(params), strict=True
        ):
            ratio = np.asarray(u) / p
            assert np.allclose(ratio, ratio.flat[0], rtol=1e-5), name  # one factor per leaf
            ratios.setdefault(name, []).append(float(ratio.flat[0]))
    return ratios, [float(schedule(step)) for step in range(3)]


def test_weight_decay_reaches_kernels_and_embedding_tables_at_the_scheduled_rate(
    decay_per_parameter,
):
    ratios, lrs = decay_per_parameter
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(PEAK / 2) and lrs[2] == pytest.approx(PEAK)
    decayed = {name for name, r in ratios.items() if any(r)}
    for name in decayed:  # -lr(step) * wd at each step: the update uses the schedule
        np.testing.assert_allclose(ratios[name], [-lr * WD for lr in lrs], rtol=1e-5)
    # Every matrix (and conv / attention kernel) decays, embedding tables included.
    for name in (
        "vision/encoder/block_0/mlp/fc1/kernel",
        "vision/encoder/block_0/attn/query/kernel",  # (width, heads, head_dim)
        "vision/encoder/block_0/attn/out/kernel",
        "vision/patch_embed/kernel",  # (patch, patch, 3, width)
        "vision_proj/kernel",
        "text_proj/kernel",
        "text/token_embed/embedding",
        "text/pos_embed",
        "vision/pos_embed",
    ):
        assert name in decayed, name


def test_weight_decay_leaves_vectors_and_scalars_alone(decay_per_parameter):
    """1-D biases, layer-norm scales and biases, the class token and the logit scale."""
    ratios, _ = decay_per_parameter
    kept = {name for name, r in ratios.items() if not any(r)}
    for name in (
        "logit_scale",
        "vision/class_token",
        "vision/ln_pre/scale",
        "vision/ln_post/bias",
        "vision/encoder/block_0/ln_1/scale",
        "vision/encoder/block_0/mlp/fc1/bias",
        "vision/encoder/block_0/attn/out/bias",
        "text/ln_final/scale",
        "text/encoder/block_0/mlp/fc2/bias",
    ):
        assert name in kept, name
    assert {n for n in ratios if n.endswith(("/scale", "logit_scale"))} <= kept


def test_weight_decay_leaves_attention_projection_biases_alone(decay_per_parameter):
    ratios, _ = decay_per_parameter
    biases = [n for n in ratios if n.endswith("/bias")]
    assert any(n.endswith("attn/query/bias") for n in biases)
    decayed = [n for n in biases if any(ratios[n])]
    assert decayed == []


def test_scanned_layers_keep_biases_and_scales_out_of_weight_decay():
    import jax.numpy as jnp

    from clip_jax.optim import _decay_mask

    blocks = {  # nn.scan stacks each block's parameters on a leading layers axis
        "ln_1": {"scale": jnp.zeros((2, 4)), "bias": jnp.zeros((2, 4))},
        "attn": {"query": {"kernel": jnp.zeros((2, 4, 3, 4)), "bias": jnp.zeros((2, 3, 4))}},
    }
    mask = _decay_mask({"encoder": {"blocks": blocks}, "pos_embed": jnp.zeros((5, 4))})
    assert mask["encoder"]["blocks"]["attn"]["query"] == {"kernel": True, "bias": False}
    assert mask["encoder"]["blocks"]["ln_1"] == {"scale": False, "bias": False}
    assert mask["pos_embed"] is True
