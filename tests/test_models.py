"""The CLIP two-tower model: shapes, normalised embeddings, pooling, sizes, axis names."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.clip import build_clip
from clip_jax.models.text import TextTower
from clip_jax.spec import validate

BATCH = 3


def tiny_spec(**model):
    return validate({"model": {"preset": "tiny", **model}})


TINY = tiny_spec().model


def inputs(options, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    size = options.vision.image_size
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    tokens = np.zeros((batch, options.text.context_length), np.int32)
    for row in range(batch):
        length = 3 + row
        tokens[row, :length] = rng.integers(3, options.text.vocab_size, size=length)
        tokens[row, 0], tokens[row, length - 1] = 1, 2  # start / end of text
    return jnp.asarray(images), jnp.asarray(tokens)


@pytest.fixture(scope="module")
def tiny_shapes():
    """(model, boxed abstract variables) of the tiny preset: shapes only, nothing computed."""
    spec = tiny_spec()
    model = build_clip(spec.model, 10.0, -10.0)
    images, tokens = inputs(spec.model)
    return model, jax.eval_shape(model.init, jax.random.key(0), images, tokens)


def random_params(shapes, seed=0):
    """Concrete parameters for abstract ones. Filled here in numpy: compiling the model's
    own initialisers costs seconds per test file, and these tests are about the forward
    pass (initial values are checked apart, in test_logit_scale_and_bias_init)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "logit_scale":
            return jnp.float32(math.log(10.0))
        if name == "logit_bias":
            return jnp.float32(-10.0)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(scale=0.05, size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, images, tokens, outputs): the tiny preset with a logit bias."""
    spec = tiny_spec()
    model = build_clip(spec.model, 10.0, -10.0)
    images, tokens = inputs(spec.model)
    variables = random_params(jax.eval_shape(model.init, jax.random.key(0), images, tokens))
    outputs = jax.jit(model.apply)(variables, images, tokens)
    return model, variables, images, tokens, outputs


def test_output_shapes_and_unit_norm(tiny):
    model, _, _, _, (img, txt, log_scale, bias) = tiny
    embed = TINY.embed_dim
    assert img.shape == (BATCH, embed)
    assert txt.shape == (BATCH, embed)
    assert img.dtype == txt.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)
    assert log_scale.shape == () and bias.shape == ()
    np.testing.assert_allclose(float(log_scale), math.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(float(bias), -10.0)
    # different inputs, different embeddings
    assert not np.allclose(img[0], img[1], atol=1e-3)
    assert not np.allclose(txt[0], txt[1], atol=1e-3)


def test_tiny_preset_parameter_shapes(tiny_shapes):
    model, variables = tiny_shapes
    o = TINY
    params = nn.unbox(variables)["params"]
    assert params["text"]["token_embed"]["embedding"].shape == (o.text.vocab_size, o.text.width)
    assert params["text"]["pos_embed"].shape == (o.text.context_length, o.text.width)
    patches = (o.vision.image_size // o.vision.patch_size) ** 2
    assert params["vision"]["pos_embed"].shape == (patches + 1, o.vision.width)
    assert params["vision"]["class_token"].shape == (o.vision.width,)
    assert params["vision_proj"]["kernel"].shape == (o.vision.width, o.embed_dim)
    assert params["text_proj"]["kernel"].shape == (o.text.width, o.embed_dim)
    assert len([k for k in params["vision"]["encoder"] if k.startswith("block_")]) == 3
    assert len([k for k in params["text"]["encoder"] if k.startswith("block_")]) == 2


def test_bias_param_only_with_init_bias(tiny_shapes):
    model, variables = tiny_shapes
    assert "logit_bias" in variables["params"]
    images, tokens = inputs(TINY, batch=1)
    no_bias = build_clip(TINY, 1 / 0.07, None)
    shapes = jax.eval_shape(no_bias.init, jax.random.key(0), images, tokens)["params"]
    assert "logit_bias" not in shapes
    assert "logit_scale" in shapes
    assert set(shapes) == set(variables["params"]) - {"logit_bias"}


def scalars(module):
    return module.logit_scale, (module.logit_bias if module.init_bias is not None else None)


@pytest.mark.parametrize(("temperature", "bias"), [(10.0, -10.0), (1 / 0.07, None), (3.0, 2.5)])
def test_logit_scale_and_bias_init(tiny, temperature, bias):
    # only the scalars are initialised (the towers' parameters are created when called)
    model = build_clip(TINY, temperature, bias)
    (scale, got_bias), variables = model.init_with_output(jax.random.key(0), method=scalars)
    assert set(variables["params"]) == {"logit_scale"} | ({"logit_bias"} if bias else set())
    np.testing.assert_allclose(float(scale), math.log(temperature), rtol=1e-6)
    if bias is None:
        assert got_bias is None
    else:
        np.testing.assert_allclose(float(got_bias), bias)


@pytest.mark.slow
def test_no_bias_model_returns_zero_bias():
    # the smallest model there is: this test is about the bias, not the towers
    spec = validate(
        {
            "model": {
                "embed_dim": 8,
                "vision": {"image_size": 8, "patch_size": 8, "width": 8, "depth": 1, "heads": 1},
                "text": {"vocab_size": 8, "context_length": 4, "width": 8, "depth": 1, "heads": 1},
            }
        }
    )
    images, tokens = inputs(spec.model, batch=2)
    no_bias = build_clip(spec.model, 1 / 0.07, None)
    variables = random_params(jax.eval_shape(no_bias.init, jax.random.key(0), images, tokens))
    assert "logit_bias" not in variables["params"]
    img, txt, _, bias = jax.jit(no_bias.apply)(variables, images, tokens)
    assert float(bias) == 0.0
    assert img.shape == txt.shape == (2, 8)


def test_clip_b32_parameter_count():
    spec = validate({"model": {"preset": "clip-b32"}})
    model = build_clip(spec.model, 1 / 0.07, None)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    assert count == 151_277_313  # open_clip ViT-B-32


def test_logical_axis_names(tiny_shapes):
    _, variables = tiny_shapes
    specs = nn.get_partition_spec(variables)["params"]
    flat_specs = jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    names = {name for spec in flat_specs for name in spec if name}
    assert {"embed", "vocab", "mlp", "heads", "kv", "proj"} <= names
    assert tuple(specs["text"]["token_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["vision_proj"]["kernel"]) == ("embed", "proj")
    # every parameter with at least one dimension carries one name per dimension
    boxed = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(boxed) > 20
    for path, leaf in boxed:
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        if value.ndim:
            assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
            assert len(leaf.names) == value.ndim, jax.tree_util.keystr(path)
            assert any(leaf.names), jax.tree_util.keystr(path)


def test_gap_and_tok_pooling(tiny):
    _, _, images, tokens, (img, _, _, _) = tiny
    for pool, extra in (("tok", 1), ("gap", 0)):
        spec = tiny_spec(vision={"pool": pool})
        model = build_clip(spec.model, 1 / 0.07, None)
        variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))
        vision = variables["params"]["vision"]
        patches = (spec.model.vision.image_size // spec.model.vision.patch_size) ** 2
        assert vision["pos_embed"].shape == (patches + extra, spec.model.vision.width)
        assert ("class_token" in vision) == (pool == "tok")
        out = jax.eval_shape(model.apply, variables, images, tokens)
        assert out[0].shape == img.shape


# ----------------------------------------------------------------------- text pooling
@pytest.fixture(scope="module")
def text_params():
    """The tiny preset's text tower with one block (half the compile time of two)."""
    options = tiny_spec(text={"depth": 1}).model.text
    tokens = jnp.ones((1, options.context_length), jnp.int32)
    shapes = jax.eval_shape(TextTower(options).init, jax.random.key(0), tokens)
    return options, random_params(shapes, seed=1)


def text_apply(options, **changes):
    return jax.jit(TextTower(options.model_copy(update=changes)).apply)


def padded(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return jnp.asarray(out)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.slow
def test_eos_pooling_ignores_padding(text_params, causal):
    options, variables = text_params
    apply = text_apply(options, causal=causal, pool="eos")
    rows = [[1, 7, 9, 11, 2], [1, 5, 2], [1, 8, 8, 8, 8, 8, 8, 2]]
    full = apply(variables, padded(rows, options.context_length))
    short = apply(variables, padded(rows, 8))  # the last row has no padding at all
    assert full.shape == (3, options.width)
    np.testing.assert_allclose(full, short, atol=2e-5)
    assert not np.allclose(full[0], full[1], atol=1e-4)


def test_eos_pooling_reads_the_last_token(text_params):
    options, variables = text_params
    rows = [
        [1, 7, 9, 11, 2],
        [1, 7, 9, 12, 2],  # a change just before the end token
        [1, 8, 9, 11, 2],  # a change at the start
        [1, 7, 9, 11, 3],  # a different last token
        [1, 7, 9, 11],  # the same text cut before its end token
    ]
    tokens = padded(rows, options.context_length)
    eos = text_apply(options, causal=True, pool="eos")(variables, tokens)
    # causal: the end token sees every earlier token, so any change up to it matters
    for i in range(1, len(rows)):
        assert not np.allclose(eos[0], eos[i], atol=1e-4), rows[i]
    # "first" pooling under a causal mask only ever sees the first token
    first = text_apply(options, causal=True, pool="first")(variables, tokens)
    for i in range(1, len(rows)):
        np.testing.assert_allclose(first[0], first[i], atol=1e-5)


def test_too_many_tokens_is_an_error(text_params):
    options, variables = text_params
    with pytest.raises(ValueError, match="context_length"):
        TextTower(options).apply(variables, jnp.ones((1, options.context_length + 1), jnp.int32))
