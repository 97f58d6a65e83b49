"""Layer decay's rules on hand-made parameter names, shapes and forward order (no model
to build or compile), plus one abstract trace of a real model for the forward order:
the fast counterpart of test_param_groups' layer-decay test on the CLIP model."""

import jax
import numpy as np
import optax
import pytest

from clip_jax.components import components
from clip_jax.spec import validate
from clip_jax.train import param_groups

D = 0.5

# A tower "vis" of 3 numbered blocks, with an embedding used before them and a norm
# after; a scanned tower "txt" of 2 layers; and parameters of no tower.
SHAPES = {
    "vis/embed": (4, 8),
    "vis/enc/block_0/w": (8, 8),
    "vis/enc/block_1/w": (8, 8),
    "vis/enc/block_2/w": (8, 8),
    "vis/norm": (8,),
    "txt/embed": (10, 8),
    "txt/enc/blocks/w": (2, 8, 8),
    "txt/enc/blocks/b": (2, 8),
    "txt/unused": (8,),  # never read by the forward pass: counted as after the blocks
    "proj": (8, 4),
    "logit_scale": (),
}
ORDER = {
    "vis/embed": 0,
    "vis/enc/block_0/w": 1,
    "vis/enc/block_1/w": 2,
    "vis/enc/block_2/w": 3,
    "vis/norm": 4,
    "txt/embed": 5,
    "txt/enc/blocks/w": 6,
    "txt/enc/blocks/b": 6,
    "proj": 7,
    "logit_scale": 8,
}


def train_options(**train):
    return validate({"train": train}).train


def test_find_towers_numbered_and_scanned():
    towers = param_groups.find_towers(SHAPES)
    assert towers == {
        ("vis", "enc"): param_groups.Tower(("vis",), ("vis", "enc"), 3, False),
        ("txt", "enc"): param_groups.Tower(("txt",), ("txt", "enc"), 2, True),
    }
    # a "blocks" container whose leaves disagree on the layer count is no stack
    assert param_groups.find_towers({"a/blocks/w": (2, 3), "a/blocks/b": (3,)}) == {}


def test_layer_scales_block_i_of_l_gets_d_to_the_l_minus_i():
    scales = param_groups.layer_scales(SHAPES, D, ORDER)
    assert scales["vis/enc/block_0/w"] == D**3
    assert scales["vis/enc/block_2/w"] == D**1
    assert scales["vis/embed"] == D**4  # used before the blocks: one step further down
    assert scales["vis/norm"] == 1.0  # after the blocks
    for name in ("txt/enc/blocks/w", "txt/enc/blocks/b"):  # one scale per stacked layer
        stacked = scales[name]
        assert stacked.shape == (2,) + (1,) * (len(SHAPES[name]) - 1)
        np.testing.assert_array_equal(stacked.ravel(), [D**2, D**1])
    assert scales["txt/embed"] == D**3
    assert scales["txt/unused"] == 1.0
    assert scales["proj"] == scales["logit_scale"] == 1.0


def test_lr_scales_multiply_layer_decay_by_the_first_matching_pattern_and_freeze_wins():
    options = train_options(
        layer_decay=D, lr_scale={"vis/enc/.*": 0.1, "vis/.*": 3.0}, freeze=["proj"]
    )
    scales = param_groups.lr_scales(SHAPES, options, ORDER)
    assert scales["vis/enc/block_0/w"] == pytest.approx(0.1 * D**3)
    assert scales["vis/embed"] == pytest.approx(3.0 * D**4)  # the first match only
    assert scales["proj"] == 0.0
    assert scales["logit_scale"] == 1.0


def test_wrap_applies_the_scales_per_layer_of_a_stack():
    """SGD at lr 1 on unit gradients: each update is minus its scale."""
    options = train_options(layer_decay=D, lr_scale={"txt/.*": 0.1})
    tx = param_groups.wrap(optax.sgd(1.0), options, lambda: ORDER)
    grads = {name: np.ones(shape, np.float32) for name, shape in SHAPES.items()}
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
    stacked = np.asarray(updates["txt/enc/blocks/w"])
    np.testing.assert_allclose(stacked[0], -0.1 * D**2, rtol=1e-6)
    np.testing.assert_allclose(stacked[1], -0.1 * D**1, rtol=1e-6)
    np.testing.assert_allclose(updates["vis/enc/block_1/w"], -(D**2), rtol=1e-6)
    np.testing.assert_allclose(updates["vis/norm"], -1.0)


def test_wrap_needs_the_order_only_for_layer_decay():
    with pytest.raises(ValueError, match="forward order"):
        param_groups.wrap(optax.sgd(1.0), train_options(layer_decay=D))
    called = []
    param_groups.wrap(optax.sgd(1.0), train_options(lr_scale={"a": 2.0}), lambda: called.append(1))
    assert called == []  # no layer decay: the model is never traced


def test_forward_order_of_a_real_model_puts_embeddings_before_blocks_before_heads():
    spec = validate(
        {
            "model": {
                "embed_dim": 8,
                "vision": {"image_size": 8, "patch_size": 4, "width": 8, "depth": 1, "heads": 1},
                "text": {"vocab_size": 8, "context_length": 4, "width": 8, "depth": 1, "heads": 1},
            }
        }
    )
    order = param_groups.forward_order(components(spec).model, spec)
    for tower, embed in (("vision", "vision/patch_embed/kernel"), ("text", "text/pos_embed")):
        block = min(v for k, v in order.items() if k.startswith(f"{tower}/encoder/block_0/"))
        assert order[embed] < block
        assert block < order[f"{tower}_proj/kernel"]
