"""NaFlex: images at native aspect ratio as padded patch sequences, through the same
ViT weights as square images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models.naflex import NaflexImages, grid_for, pad_batch, resample_positions
from clip_jax.models.vit import VisionTower
from clip_jax.schemas import VisionOptions

PATCH, SIDE = 8, 4  # a 32 px square image is a 4 x 4 grid


def tower(pool: str, registers: int = 0) -> VisionTower:
    return VisionTower(
        VisionOptions(
            width=32, depth=2, heads=4, image_size=PATCH * SIDE, patch_size=PATCH,
            pool=pool, registers=registers,
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("height", "width", "budget"), [(100, 300, 64), (300, 100, 64), (50, 50, 16), (10, 900, 9)]
)
def test_the_grid_keeps_the_aspect_ratio_within_the_budget(height, width, budget):
    rows, cols = grid_for(height, width, PATCH, budget)
    assert 1 <= rows * cols <= budget
    assert (rows + 1) * (cols + 1) > budget  # no larger grid of that shape would fit
    if min(rows, cols) > 2:
        assert abs(rows / cols - height / width) / (height / width) < 0.35


def test_the_grid_fills_the_budget_as_siglip2_does():
    assert grid_for(64, 32, PATCH, 16) == (5, 3)  # 15 of 16, where keeping 2:1 gives 10
    assert grid_for(32, 32, PATCH, 16) == (4, 4)
    assert grid_for(1, 1, 16, 256) == (7, 7)  # the search's largest scale, 100


@pytest.mark.slow  # importing transformers takes seconds
def test_the_grid_is_transformers_siglip2_grid():
    processor = pytest.importorskip(
        "transformers.models.siglip2.image_processing_pil_siglip2",
        reason="transformers (Siglip2) is not installed",
    )
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in hw) for hw in rng.integers(1, 4000, (400, 2))]
    for height, width in [*shapes, (1, 100_000), (224, 224), (480, 640)]:
        for patch, budget in [(16, 256), (8, 16), (14, 729), (16, 1024)]:
            pixels = processor.get_image_size_for_max_num_patches(height, width, patch, budget)
            assert grid_for(height, width, patch, budget) == tuple(p // patch for p in pixels)


@pytest.mark.parametrize(
    "grid",
    [(2, 2), (3, 7)] + [pytest.param(g, marks=pytest.mark.slow) for g in [(1, 3), (9, 2), (16, 1)]],
)
def test_resampling_is_big_vision_s_antialiased_bilinear_resize(grid):
    """big_vision's NaFlex ViT resizes its table with jax.image.scale_and_translate
    (bilinear, antialias=True); transformers' Siglip2 does the same in torch."""
    table = jax.random.normal(jax.random.key(1), (SIDE, SIDE, 6))
    rows, cols = grid
    ours = resample_positions(table, jnp.array([grid]), rows * cols + 3)[0]
    reference = jax.image.scale_and_translate(
        table, (rows, cols, 6), (0, 1), jnp.array([rows / SIDE, cols / SIDE]),
        jnp.zeros(2), method="bilinear", antialias=True, precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    np.testing.assert_allclose(ours[: rows * cols], reference.reshape(-1, 6), atol=1e-6)
    assert np.all(ours[rows * cols :] == 0)


def test_resampling_to_the_tables_own_grid_is_the_table():
    table = jax.random.normal(jax.random.key(0), (SIDE, SIDE, 6))
    out = resample_positions(table, jnp.array([[SIDE, SIDE], [2, 3]]), SIDE * SIDE)
    np.testing.assert_array_equal(out[0], table.reshape(-1, 6))
    assert np.all(out[1, 6:] == 0) and not np.all(out[1, :6] == 0)


@pytest.mark.parametrize(
    ("pool", "registers"),
    [
        pytest.param("tok", 0, marks=pytest.mark.slow),  # the mixed batch's test stays fast
        pytest.param("gap", 0, marks=pytest.mark.slow),
        pytest.param("map", 2, marks=pytest.mark.slow),
    ],
)
def test_a_square_image_gives_the_square_paths_embedding(pool, registers):
    model = tower(pool, registers)
    image = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(image))
    apply = jax.jit(model.apply)
    square = apply(params, jnp.asarray(image))
    flex = apply(params, pad_batch([image[0]], PATCH, SIDE * SIDE + 5))
    np.testing.assert_allclose(flex, square, atol=1e-5)


@pytest.mark.parametrize(
    ("pool", "registers"),
    [
        ("tok", 0),
        pytest.param("gap", 0, marks=pytest.mark.slow),
        pytest.param("map", 2, marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow  # compiles the ViT three times
def test_a_mixed_batch_equals_its_images_one_by_one(pool, registers):
    model = tower(pool, registers)
    rng = np.random.default_rng(1)
    shapes = [(2, 6), (5, 3), (3, 3)]  # grids (rows, columns): wide, tall, square
    images = [rng.normal(size=(r * PATCH, c * PATCH, 3)).astype(np.float32) for r, c in shapes]
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    apply = jax.jit(model.apply)
    batch = apply(params, pad_batch(images, PATCH, 16))
    for i, image in enumerate(images):
        alone = apply(params, pad_batch([image], PATCH, 24))  # other padding too
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)
    assert isinstance(pad_batch(images, PATCH, 16), NaflexImages)
