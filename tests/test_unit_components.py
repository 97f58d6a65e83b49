"""Spec -> components for the built-in losses: ``loss.name`` and the loss table's options
reach the function the trainer calls (``components(spec).loss``), whose value on tiny
embeddings matches the float64 numpy references of test_losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.plugins import get_registry
from clip_jax.spec import validate
from tests.test_losses import embeddings, np_sigmoid, np_softmax

BUILTIN_LOSSES = {"softmax", "sigmoid", "chunked_sigmoid"}


def loss_of(name: str, **options):
    return components(validate({"loss": {"name": name, **options}})).loss


def test_the_builtin_losses_are_registered():
    assert set(get_registry().names("loss")) >= BUILTIN_LOSSES


@pytest.mark.parametrize(
    ("options", "log_scale", "max_temperature"),
    [({}, math.log(1 / 0.07), 100.0), ({"max_temperature": 20.0}, math.log(50.0), 20.0)],
)
def test_softmax_from_the_spec(options, log_scale, max_temperature):
    loss = loss_of("softmax", init_temperature=7.0, **options)
    assert loss.init_temperature == 7.0 and loss.init_bias is None
    img, txt = embeddings(10, batch=8, dim=8, aligned=1.0)
    value = float(jax.jit(loss.fn)(img, txt, jnp.float32(log_scale), jnp.float32(0.0)))
    # with max_temperature=20 the scale 50 is clamped: the reference clamps too
    expected = np_softmax(img, txt, log_scale, max_temperature)[0]
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    if options:
        unclamped = np_softmax(img, txt, log_scale, 1000.0)[0]
        assert abs(value - unclamped) > 1e-3  # the option made the difference


@pytest.mark.parametrize("name", ["sigmoid", "chunked_sigmoid"])
def test_sigmoid_losses_from_the_spec(name):
    """The chunked loss is built with the spec's layout (dp over the 8 devices): the
    batch is split into 8 blocks of 2 and passed round the ring."""
    loss = loss_of(name, init_temperature=5.0, init_bias=-3.0)
    assert (loss.init_temperature, loss.init_bias) == (5.0, -3.0)
    img, txt = embeddings(11, batch=16, dim=8, aligned=2.0)
    log_scale, bias = math.log(5.0), -3.0
    value = float(jax.jit(loss.fn)(img, txt, jnp.float32(log_scale), jnp.float32(bias)))
    np.testing.assert_allclose(value, np_sigmoid(img, txt, log_scale, bias)[0], rtol=1e-5)


def test_the_chunked_loss_takes_the_mesh_from_the_sharding_table():
    """Built for a 4 x 1 x 2 mesh (batch over 4 devices): a global batch of 12 splits
    over its 4 batch devices (not over the 8 of the dp default), one of 6 does not."""
    spec = validate(
        {
            "loss": {"name": "chunked_sigmoid"},
            "sharding": {"strategy": "tp", "mesh": {"model": 2}},
        }
    )
    comps = components(spec)
    assert comps.layout.batch_divisor == 4
    fn = jax.jit(comps.loss.fn)
    img, txt = embeddings(12, batch=12, dim=8, aligned=1.0)
    value = float(fn(img, txt, jnp.float32(1.0), jnp.float32(-1.0)))
    np.testing.assert_allclose(value, np_sigmoid(img, txt, 1.0, -1.0)[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"mesh given has shape \(4, 1, 2\)"):
        fn(img[:6], txt[:6], jnp.float32(1.0), jnp.float32(-1.0))


def test_the_bpe_tokenizer_from_the_spec_frames_texts_to_the_models_context_length(tmp_path):
    """``model.text.context_length`` and the ``[tokenizer]`` options reach the tokenizer
    the trainer builds; a saved one (the run folder's copy) is loaded, not retrained."""
    spec = validate(
        {
            "model": {"text": {"context_length": 12}},
            "tokenizer": {"name": "bpe", "vocab_size": 300, "lowercase": False, "pad_id": 0},
        }
    )
    captions = ["a Red circle", "a blue square", "two red triangles"] * 4
    tokenizer = components(spec).tokenizer(captions=captions)
    ids = tokenizer(["a Red circle", "a red circle"])
    assert ids.shape == (2, 12) and ids.dtype == np.int32
    assert not np.array_equal(ids[0], ids[1])  # lowercase = false keeps the case
    assert tokenizer.vocab_size <= 300
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = components(spec).tokenizer(saved=tmp_path / "tokenizer.json", captions=["zzz"])
    np.testing.assert_array_equal(loaded(["a Red circle"]), ids[:1])
