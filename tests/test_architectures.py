"""The tower options: each sensible combination builds, runs forward and backward with the
right shapes; nonsense combinations are refused by validation with the key named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.losses import sigmoid_loss
from clip_jax.models.clip import build_clip
from clip_jax.models.layers import rotate
from clip_jax.models.vit import sincos2d
from clip_jax.schemas import SigmoidOptions
from clip_jax.spec import SpecError, validate

EMBED = 16
VISION = {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "heads": 4}
TEXT = {"vocab_size": 300, "context_length": 8, "width": 32, "depth": 2, "heads": 4}


def random_params(model, images, tokens, seed=0):
    """Parameters filled in numpy from the abstract shapes: compiling each combination's
    initialisers would double these tests' time, and they are about forward/backward."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens))

    def fill(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(scale=0.1, size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def spec_for(vision=None, text=None, **model):
    raw = {
        "model": {
            "embed_dim": EMBED,
            "vision": {**VISION, **(vision or {})},
            "text": {**TEXT, **(text or {})},
            **model,
        }
    }
    return validate(raw)


def batch(spec, size=3):
    rng = np.random.default_rng(0)
    v, t = spec.model.vision, spec.model.text
    images = rng.normal(size=(size, v.image_size, v.image_size, 3)).astype(np.float32)
    tokens = rng.integers(3, 300, size=(size, t.context_length)).astype(np.int32)
    tokens[0, 5:] = 0  # one padded caption
    return jnp.asarray(images), jnp.asarray(tokens)


COMBINATIONS = {  # together, every option value of both towers at least once
    "siglip-like": (
        {"pool": "map", "patch_bias": True, "norm_pre": False, "activation": "gelu_tanh"},
        {"causal": False, "pool": "last", "activation": "gelu_tanh", "projection_bias": True},
    ),
    "sincos2d-rmsnorm-qknorm-nobias": (
        {
            "positions": "sincos2d",
            "pool": "gap",
            "registers": 2,
            "norm": "rmsnorm",
            "qk_norm": True,
            "use_bias": False,
        },
        {"norm": "rmsnorm", "qk_norm": True, "use_bias": False, "positions": "rotary"},
    ),
    "swiglu-text-map": (
        {"activation": "swiglu", "mlp_dim": 40},
        {"activation": "swiglu", "mlp_ratio": 2.5, "pool": "map", "causal": False},
    ),
    "projection-none-gelu-mean": (
        {"width": EMBED, "heads": 2, "projection": "none", "activation": "gelu"},
        {"pool": "mean", "causal": False},
    ),
    "dropout-scan-remat-bf16": (
        {"dropout": 0.1, "scan_layers": True, "remat": "full", "dtype": "bfloat16"},
        {
            "dropout": 0.1,
            "scan_layers": True,
            "remat": "minimal",
            "positions": "rotary",
            "pool": "first",
            "causal": False,
        },
    ),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
@pytest.mark.slow
def test_combination_trains_forward_and_backward(name):
    vision, text = COMBINATIONS[name]
    spec = spec_for(vision, text)
    model = build_clip(spec.model, 10.0, -10.0)
    images, tokens = batch(spec)
    params = random_params(model, images, tokens)["params"]
    loss_fn = sigmoid_loss(SigmoidOptions()).fn

    def loss(p, rng):
        out = model.apply({"params": p}, images, tokens, train=True, rngs={"dropout": rng})
        return loss_fn(*out), out[:2]

    (value, (img, txt)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params, jax.random.key(1)
    )
    assert img.shape == txt.shape == (3, EMBED)
    assert np.isfinite(float(value))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms))
    # every tower parameter learns (a disconnected option would leave zeros)
    for tower in ("vision", "text"):
        tower_norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads[tower])]
        assert sum(n > 0 for n in tower_norms) >= 0.9 * len(tower_norms), tower


def test_options_create_the_parameters_they_describe():
    spec = spec_for(
        {"patch_bias": True, "norm_pre": False, "use_bias": False, "qk_norm": True},
        {
            "positions": "rotary",
            "activation": "swiglu",
            "norm": "rmsnorm",
            "projection": "none",
            "width": EMBED,
            "heads": 2,
        },
    )
    model = build_clip(spec.model, 10.0, None)
    images, tokens = batch(spec)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])
    vision, text = params["vision"], params["text"]
    assert "bias" in vision["patch_embed"] and "ln_pre" not in vision
    block = vision["encoder"]["block_0"]
    assert "bias" not in block["attn"]["query"] and "bias" not in block["mlp"]["fc1"]
    assert block["attn"]["query_norm"]["scale"].shape == (VISION["width"] // VISION["heads"],)
    assert "pos_embed" not in text  # rotary: no table
    assert text["encoder"]["block_0"]["mlp"]["gate"]["kernel"].shape == (EMBED, 4 * EMBED)
    assert set(text["ln_final"]) == {"scale"}  # RMSNorm
    assert "text_proj" not in params and "vision_proj" in params


@pytest.mark.slow
def test_dropout_only_when_training():
    spec = spec_for({"dropout": 0.5}, {"dropout": 0.5})
    plain = build_clip(spec_for().model, 10.0, None)
    model = build_clip(spec.model, 10.0, None)
    images, tokens = batch(spec)
    variables = random_params(model, images, tokens)
    ref = jax.jit(plain.apply)(variables, images, tokens)[0]
    np.testing.assert_allclose(jax.jit(model.apply)(variables, images, tokens)[0], ref, atol=1e-6)

    @jax.jit
    def train_embeddings(rng):
        return model.apply(variables, images, tokens, train=True, rngs={"dropout": rng})[0]

    def train(seed):
        return train_embeddings(jax.random.key(seed))

    assert not np.allclose(train(0), ref, atol=1e-3)
    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1), atol=1e-3)


def test_rotary_attention_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q_1xHxK, k_1xHxK = rng.normal(size=(2, 1, 2, 8)).astype(np.float32)
    length = 12

    def score(i, j):  # q at position i, k at position j
        q = rotate(jnp.zeros((1, length, 2, 8)).at[0, i].set(q_1xHxK[0]))[0, i]
        k = rotate(jnp.zeros((1, length, 2, 8)).at[0, j].set(k_1xHxK[0]))[0, j]
        return np.asarray(jnp.sum(q * k, axis=-1))

    np.testing.assert_allclose(score(2, 5), score(6, 9), rtol=1e-5)
    assert not np.allclose(score(2, 5), score(2, 7), rtol=1e-3)
    # a rotation: norms kept
    x = jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32)
    np.testing.assert_allclose(
        jnp.linalg.norm(rotate(x), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_sincos2d_is_distinct_per_patch_and_bounded():
    table = sincos2d(4, 4, 32)
    assert table.shape == (16, 32)
    assert np.abs(table).max() <= 1.0
    distances = np.linalg.norm(table[:, None] - table[None], axis=-1)
    assert (distances + np.eye(16) > 1e-3).all()


@pytest.mark.parametrize(
    ("model", "key", "words"),
    [
        ({"vision": {"width": 30}}, "model.vision", "divisible by heads"),
        ({"vision": {"image_size": 18}}, "model.vision", "multiple of patch_size"),
        (
            {"vision": {"positions": "sincos2d", "width": 30, "heads": 5}},
            "model.vision",
            "divisible by 4",
        ),
        ({"text": {"positions": "rotary", "width": 36, "heads": 4}}, "model.text", "even head"),
        ({"text": {"pool": "first"}}, "model.text", "first token sees only itself"),
        ({"vision": {"projection": "none"}}, "model", "vision.width (32) must equal embed_dim"),
        ({"text": {"dropout": 1.0}}, "model.text.dropout", "less than 1"),
        ({"vision": {"activation": "relu2"}}, "model.vision.activation", "swiglu"),
        ({"text": {"positions": "sincos2d"}}, "model.text.positions", "rotary"),
        ({"vision": {"pool": "eos"}}, "model.vision.pool", "map"),
    ],
)
def test_invalid_combinations_are_refused(model, key, words):
    with pytest.raises(SpecError) as err:
        spec_for(model.get("vision"), model.get("text"))
    problems = dict(err.value.problems)
    assert key in problems, problems
    assert words in problems[key]
