"""Scanned layers keep the program size flat in depth; remat changes memory, not results."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.losses import sigmoid_loss
from clip_jax.models.clip import build_clip
from clip_jax.schemas import SigmoidOptions
from clip_jax.spec import validate

SMALL = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 3, "heads": 2},
    "text": {"vocab_size": 300, "context_length": 8, "width": 32, "depth": 3, "heads": 2},
}


def model_for(vision_only: dict | None = None, **tower_options):
    raw = {
        "model": {
            **SMALL,
            "vision": {**SMALL["vision"], **tower_options, **(vision_only or {})},
            "text": {**SMALL["text"], **tower_options},
        }
    }
    spec = validate(raw)
    return spec, build_clip(spec.model, 10.0, -10.0)


def inputs(spec):
    rng = np.random.default_rng(0)
    v, t = spec.model.vision, spec.model.text
    images = rng.normal(size=(4, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = rng.integers(3, 300, size=(4, t.context_length)).astype(np.int32)
    tokens[:, -2:] = 0
    return jnp.asarray(images), jnp.asarray(tokens)


def loss_and_grads(model, params, images, tokens):
    loss = sigmoid_loss(SigmoidOptions()).fn

    def f(p):
        return loss(*model.apply({"params": p}, images, tokens))

    return jax.jit(jax.value_and_grad(f))(params)


def test_scanned_program_does_not_grow_with_depth():
    sizes = {}
    for depth in (2, 12):
        spec, model = model_for(scan_layers=True, depth=depth)
        images, tokens = inputs(spec)
        abstract = jax.eval_shape(
            lambda i, t, m=model: m.init(jax.random.key(0), i, t), images, tokens
        )
        jaxpr = jax.make_jaxpr(lambda p, i, t, m=model: m.apply(p, i, t))(abstract, images, tokens)
        sizes[depth] = len(jaxpr.jaxpr.eqns)
    assert sizes[2] == sizes[12]


@pytest.mark.slow
def test_scan_computes_what_the_loop_computes():
    spec, loop = model_for()
    images, tokens = inputs(spec)
    params = nn.unbox(loop.init(jax.random.key(0), images, tokens)["params"])
    _, scanned = model_for(scan_layers=True)

    def stacked(encoder):  # block_0..block_2 -> one tree with a leading layers axis
        blocks = [encoder.pop(f"block_{i}") for i in range(3)]
        encoder["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        return encoder

    scanned_params = jax.tree.map(lambda x: x, params)
    for tower in ("vision", "text"):
        scanned_params[tower]["encoder"] = stacked(dict(scanned_params[tower]["encoder"]))
    expected = loop.apply({"params": params}, images, tokens)
    got = scanned.apply({"params": scanned_params}, images, tokens)
    for a, b in zip(got[:2], expected[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_remat_policies_change_nothing_in_the_numbers():
    scan = True  # the combination large models use; the loop form shares the policies
    results = {}
    for policy in ("none", "minimal", "full"):
        spec, model = model_for(remat=policy, scan_layers=scan)
        images, tokens = inputs(spec)
        params = nn.unbox(model.init(jax.random.key(0), images, tokens)["params"])
        results[policy] = loss_and_grads(model, params, images, tokens)
    for policy in ("minimal", "full"):
        value, grads = results[policy]
        np.testing.assert_allclose(value, results["none"][0], rtol=1e-6)
        jax.tree.map(
            # recomputing reassociates float sums: equal to float32 rounding
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            grads,
            results["none"][1],
        )


@pytest.mark.slow
def test_map_pooling_and_registers_train_forward_and_backward():
    spec, plain = model_for()
    images, tokens = inputs(spec)
    base = nn.unbox(plain.init(jax.random.key(0), images, tokens)["params"])
    spec, model = model_for(vision_only={"pool": "map", "registers": 4})
    params = nn.unbox(model.init(jax.random.key(0), images, tokens)["params"])
    assert params["vision"]["registers"].shape == (4, 32)
    assert "map_head" in params["vision"] and "map_head" not in base["vision"]
    img_emb, txt_emb, _, _ = model.apply({"params": params}, images, tokens)
    assert img_emb.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(img_emb, axis=-1), 1.0, rtol=1e-5)
    value, grads = loss_and_grads(model, params, images, tokens)
    assert np.isfinite(value)
    assert float(jnp.abs(grads["vision"]["registers"]).sum()) > 0  # registers are used
    assert float(jnp.abs(grads["vision"]["map_head"]["probe"]).sum()) > 0
