"""Starting from another run's parameters, at another resolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.errors import UserError
from clip_jax.inference import load
from clip_jax.models.clip import build_clip
from clip_jax.models.vit import sincos2d
from clip_jax.run_folder import RunFolder
from clip_jax.spec import load_spec, validate
from clip_jax.train.trainer import train
from clip_jax.train.warm_start import fit_params, resample_positions
from tests.conftest import QUICKSTART


def tiny(size: int, pool: str):
    spec = validate({"model": {"preset": "tiny", "vision": {"image_size": size, "pool": pool}}})
    return build_clip(spec.model, 10.0, None)


@pytest.mark.parametrize("pool", ["tok", "gap"])
@pytest.mark.slow
def test_resampled_positions_keep_the_outputs_at_a_new_size(pool):
    """A flat image at 32 px and the same image at 64 px (4x the patches) embed alike once
    the positions are resampled; without positions they do not."""
    small, large = tiny(32, pool), tiny(64, pool)
    image = jnp.ones((1, 32, 32, 3)) * jnp.array([0.3, -0.5, 0.8])
    image64 = jax.image.resize(image, (1, 64, 64, 3), "bilinear")
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = nn.unbox(jax.jit(small.init)(jax.random.key(0), image, tokens)["params"])
    prefix = 1 if pool == "tok" else 0
    positions = params["vision"]["pos_embed"].at[prefix:].set(0.5 * sincos2d(4, 4, 128))
    params["vision"]["pos_embed"] = positions  # smooth, like trained ones
    target = jax.eval_shape(lambda: nn.unbox(large.init(jax.random.key(0), image64, tokens)))
    resized = fit_params(params, target["params"], prefix)
    assert resized["vision"]["pos_embed"].shape == (prefix + 64, 128)
    np.testing.assert_array_equal(resized["vision"]["pos_embed"][:prefix], positions[:prefix])

    def embed(model, p, img):
        return jax.jit(model.apply, static_argnames="method")(
            {"params": p}, img, method="encode_images"
        )[0]

    before = embed(small, params, image)
    after = embed(large, resized, image64)
    resized["vision"]["pos_embed"] = jnp.zeros_like(resized["vision"]["pos_embed"])
    no_positions = embed(large, resized, image64)
    assert float(before @ after) > 0.99
    assert float(before @ no_positions) < 0.95


def test_same_size_is_untouched_and_bad_shapes_are_named():
    table = np.random.default_rng(0).normal(size=(17, 8)).astype(np.float32)
    np.testing.assert_allclose(resample_positions(table, 17, 1), table, atol=1e-6)
    with pytest.raises(UserError, match="not square"):
        resample_positions(table, 13, 1)
    source = {"text": {"w": np.zeros((4, 2))}, "vision": {"pos_embed": table}}
    target = {"text": {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)},
              "vision": {"pos_embed": jax.ShapeDtypeStruct((17, 8), jnp.float32)}}  # fmt: skip
    with pytest.raises(UserError, match=r"text/w: the checkpoint's shape \(4, 2\)"):
        fit_params(source, target, 1)


@pytest.mark.slow
def test_fine_tune_at_a_higher_resolution_from_a_run(small_run, tmp_path):
    base = load_spec(QUICKSTART, small_run + ["train.steps=5", "train.checkpoint_every=5"])
    train(base)
    tuned_dir = tmp_path / "tuned"
    tuned = load_spec(
        QUICKSTART,
        small_run
        + [
            "train.steps=2",
            "train.checkpoint_every=2",
            f"train.init_from={base.run.output_dir}",
            "model.vision.image_size=64",
            "tokenizer.vocab_size=400",  # ignored: the token embeddings mean base's ids
            f"run.output_dir={tuned_dir}",
        ],
    )
    train(tuned)
    assert f"parameters from {base.run.output_dir}" in (tuned_dir / "run.log").read_text()
    assert RunFolder(tuned_dir).status()["state"] == "finished"
    base_tokenizer = RunFolder(base.run.output_dir).tokenizer.read_text()
    assert RunFolder(tuned_dir).tokenizer.read_text() == base_tokenizer

    # the base run used at 64 px: its positions resampled at load time
    model = load(base.run.output_dir, image_size=64)
    assert model.spec.model.vision.image_size == 64
    images = np.random.default_rng(0).uniform(-1, 1, size=(3, 64, 64, 3)).astype(np.float32)
    embeddings = model.encode_images(images)
    assert embeddings.shape == (3, base.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
