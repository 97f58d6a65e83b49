"""train.freeze, train.lr_scale and train.layer_decay: parameter groups for any run."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from clip_jax.components import components
from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder
from clip_jax.spec import SpecError, load_spec, validate
from clip_jax.train import param_groups
from clip_jax.train.checkpoint import Checkpoints
from clip_jax.train.state import param_shapes, state_shardings
from clip_jax.train.trainer import train
from tests.conftest import QUICKSTART

MODEL = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
    "text": {"vocab_size": 64, "context_length": 8, "width": 32, "depth": 2, "heads": 2},
}


def make_spec(train=None, vision=None):
    model = {**MODEL, "vision": {**MODEL["vision"], **(vision or {})}}
    return validate(
        {
            "model": model,
            "optimizer": {"warmup_steps": 0, "learning_rate": 0.01, "weight_decay": 0.1},
            "train": {"batch_size": 8, **(train or {})},
        }
    )


def names_and_shapes(spec):
    shapes = nn.unbox(param_shapes(components(spec).model, spec))
    return {name: leaf.shape for name, leaf in param_groups.named_leaves(shapes)}


def state_bytes(tree) -> tuple[int, int]:
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim > 0]
    return len(leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def flat(params) -> dict[str, np.ndarray]:
    return {n: np.asarray(x) for n, x in param_groups.named_leaves(jax.device_get(params))}


@pytest.mark.slow
def test_frozen_params_stay_bit_identical_and_have_no_optimizer_state():
    """vision frozen, text at lr scale 0: neither moves, the heads do; only vision's
    moments are gone (lr scale 0 keeps its state: freeze is what saves the memory).
    Optimizer steps on the real parameter tree, weight decay on; the end-to-end run
    below does real train steps."""
    spec = make_spec({"freeze": ["vision/.*"], "lr_scale": {"text/.*": 0.0}})
    comps = components(spec)
    tx, _ = comps.optimizer()
    _, abstract, _ = state_shardings(comps.model, tx, comps.layout, spec)
    param_groups.check(spec.train, abstract["params"])

    plain = make_spec()
    plain_tx, _ = components(plain).optimizer()
    _, plain_abstract, _ = state_shardings(comps.model, plain_tx, comps.layout, plain)
    named = param_groups.named_leaves(abstract["params"])
    vision = [x for n, x in named if n.startswith("vision/")]
    _, vision_bytes = state_bytes(vision)
    count, size = state_bytes(abstract["opt_state"])
    plain_count, plain_size = state_bytes(plain_abstract["opt_state"])
    assert (count, size) == (plain_count - 2 * len(vision), plain_size - 2 * vision_bytes)
    # The frozen group holds nothing at all; no moment names a vision parameter.
    frozen_state = abstract["opt_state"][0].inner_states[param_groups.FROZEN]
    assert jax.tree.leaves(frozen_state) == []
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(abstract["opt_state"])]
    assert paths and not any("'vision'" in p for p in paths)

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract["params"])
    before = flat(params)
    opt_state = jax.jit(tx.init)(params)
    assert jax.tree.structure(opt_state) == jax.tree.structure(abstract["opt_state"])

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
        params, opt_state = step(params, opt_state, grads)
    after = flat(params)
    for name, value in before.items():
        if name.startswith(("vision/", "text/")):
            assert after[name].tobytes() == value.tobytes(), name
        else:  # projections, logit scale
            assert not np.array_equal(after[name], value), name


def test_freeze_keeps_the_state_unchanged_when_nothing_is_set():
    spec = make_spec()
    tx, _ = components(spec).optimizer()
    base, _ = components(spec).registry.get("optimizer", "adamw").factory(spec.optimizer, 10)
    params = {"w": np.ones((2, 2), np.float32)}
    same = jax.tree.structure(tx.init(params)) == jax.tree.structure(base.init(params))
    assert same  # old checkpoints keep their structure


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_layer_decay_scales_blocks_embeddings_and_heads(scan):
    spec = make_spec({"layer_decay": 0.5}, {"scan_layers": scan})
    shapes = names_and_shapes(spec)
    order = param_groups.forward_order(components(spec).model, spec)
    scales = param_groups.lr_scales(shapes, spec.train, order)
    d = 0.5
    # Text (depth 2, never scanned): blocks d^(2-i), embeddings d^3, final norm 1.
    assert scales["text/encoder/block_0/attn/query/kernel"] == d**2
    assert scales["text/encoder/block_1/mlp/fc2/bias"] == d**1
    assert scales["text/token_embed/embedding"] == d**3
    assert scales["text/pos_embed"] == d**3
    assert scales["text/ln_final/scale"] == 1.0
    # Vision (depth 2): patch/class/position embeddings and ln_pre d^3, ln_post 1.
    for name in ("vision/patch_embed/kernel", "vision/class_token", "vision/pos_embed"):
        assert scales[name] == d**3, name
    assert scales["vision/ln_pre/scale"] == d**3
    assert scales["vision/ln_post/bias"] == 1.0
    for name in ("vision_proj/kernel", "text_proj/kernel", "logit_scale"):
        assert scales[name] == 1.0, name
    if scan:
        stacked = scales["vision/encoder/blocks/mlp/fc1/kernel"]
        assert stacked.shape == (2, 1, 1)
        np.testing.assert_array_equal(stacked.ravel(), [d**2, d**1])
    else:
        assert scales["vision/encoder/block_0/mlp/fc1/kernel"] == d**2
        assert scales["vision/encoder/block_1/mlp/fc1/kernel"] == d**1

    # The wrapped transformation applies them: SGD at lr 1 on unit gradients -> -scale,
    # per slice of a scanned stack, times a matching lr_scale.
    spec = make_spec({"layer_decay": 0.5, "lr_scale": {"vision/.*": 0.1}}, {"scan_layers": scan})
    tx = param_groups.wrap(optax.sgd(1.0), spec.train, lambda: order)
    grads = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    kernel = "vision/encoder/blocks/attn/query/kernel" if scan else None
    if scan:
        got = np.asarray(updates[kernel])
        np.testing.assert_allclose(got[0], -0.1 * d**2 * np.ones_like(got[0]), rtol=1e-6)
        np.testing.assert_allclose(got[1], -0.1 * d * np.ones_like(got[1]), rtol=1e-6)
    else:
        got = np.asarray(updates["vision/encoder/block_0/attn/query/kernel"])
        np.testing.assert_allclose(got, -0.1 * d**2 * np.ones_like(got), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["vision/pos_embed"]), -0.1 * d**3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["text/ln_final/scale"]), -1.0)


def test_lr_scale_first_matching_pattern_wins():
    spec = make_spec({"lr_scale": {"text/encoder/.*": 0.5, "text/.*": 2.0}})
    scales = param_groups.lr_scales(names_and_shapes(spec), spec.train)
    assert scales["text/encoder/block_0/ln_1/scale"] == 0.5
    assert scales["text/pos_embed"] == 2.0
    assert scales["vision/pos_embed"] == 1.0


def test_a_pattern_that_matches_nothing_is_named():
    params = nn.unbox(param_shapes(components(make_spec()).model, make_spec()))
    spec = make_spec({"freeze": ["vision/.*", "visoin/encoder/.*"]})
    with pytest.raises(UserError, match=r"train\.freeze: 'visoin/encoder/\.\*' matches no"):
        param_groups.check(spec.train, params)
    with pytest.raises(UserError, match=r"train\.lr_scale: 'head/\.\*'"):
        param_groups.check(make_spec({"lr_scale": {"head/.*": 2.0}}).train, params)
    param_groups.check(make_spec({"freeze": ["vision/.*"], "layer_decay": 0.7}).train, params)


def test_invalid_options_are_spec_errors_naming_the_key():
    with pytest.raises(SpecError, match=r"train\.freeze: 'vision/\(' is not a regular expression"):
        make_spec({"freeze": ["vision/("]})
    with pytest.raises(SpecError, match=r"train\.lr_scale: '\*' is not a regular expression"):
        make_spec({"lr_scale": {"*": 1.0}})
    with pytest.raises(SpecError, match=r"train\.lr_scale\.text/\.\*: .*greater than or equal"):
        make_spec({"lr_scale": {"text/.*": -1.0}})
    for bad in (0, 1.5):
        with pytest.raises(SpecError, match=r"train\.layer_decay"):
            make_spec({"layer_decay": bad})


def test_a_run_freezing_nothing_fails_before_training(small_run):
    spec = load_spec(QUICKSTART, small_run + ['train.freeze=["vision/nothing"]', "train.steps=2"])
    with pytest.raises(UserError, match=r"train\.freeze: 'vision/nothing'"):
        train(spec)
    assert not RunFolder(spec.run.output_dir).exists()  # refused before the folder is written


@pytest.mark.slow
def test_a_frozen_run_checkpoints_and_resumes(small_run):
    overrides = ['train.freeze=["vision/encoder/.*"]', "train.layer_decay=0.8"]
    steps = ["train.steps=2", "train.checkpoint_every=1"]
    spec = load_spec(QUICKSTART, small_run + overrides + steps)
    train(spec)
    train(spec)  # finished: restores the last checkpoint with the frozen state's structure
    comps = components(spec)
    tx, _ = comps.optimizer()
    _, abstract, _ = state_shardings(comps.model, tx, comps.layout, spec)
    checkpoints = Checkpoints(RunFolder(spec.run.output_dir).checkpoints, 3, 1)
    first, second = (flat(checkpoints.restore_params(s, abstract)) for s in (1, 2))
    checkpoints.close()
    for name, value in first.items():
        if name.startswith("vision/encoder/"):
            assert second[name].tobytes() == value.tobytes(), name
    assert not np.array_equal(first["vision/pos_embed"], second["vision/pos_embed"])
