"""NaFlex on the data path: tf.data makes fixed-shape patch sequences of images at their
native aspect ratio; they reach the devices, the evaluators and ``clip_jax.load``."""

import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_jax.data import naflex
from clip_jax.data.pipeline import iterate, make_dataset
from clip_jax.data.shards import serialize, write_shard
from clip_jax.evaluate import at_budget, padded_encoder
from clip_jax.models.naflex import NaflexImages, grid_for, patchify
from clip_jax.schemas import PreprocessOptions
from clip_jax.spec import SpecError, load_spec
from tests.conftest import QUICKSTART

PATCH, BUDGET = 8, 16  # the tiny preset's patch; its 32 px square is a 4 x 4 grid
SHAPES = [(20, 60), (60, 20), (32, 32), (5, 200), (47, 33), (300, 90)]  # (height, width)
NAFLEX = PreprocessOptions(resize="naflex", max_patches=BUDGET)


def png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory) -> str:
    """One tfrecord shard of random images, one per shape of SHAPES, labelled by index."""
    records = [serialize(f"{i}", png(*shape, i), f"image {i}", i) for i, shape in enumerate(SHAPES)]
    path = tmp_path_factory.mktemp("mixed") / "00000.tfrecord"
    write_shard(path, records)
    return str(path)


def test_the_tf_grid_is_grid_for_for_every_shape():
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    shapes = SHAPES + [(1, 100_000), (100_000, 1), (7, 7), (1, 1), (224, 225), (999, 1000)]
    heights, widths = (tf.constant(side, tf.int32) for side in zip(*shapes, strict=True))
    for budget in (1, 3, 16, 256):
        grids = tf.map_fn(
            lambda hw, budget=budget: tf.stack(naflex.grid(tf, hw[0], hw[1], 16, budget)),
            tf.stack([heights, widths], 1),
        )
        got = [tuple(g) for g in grids.numpy().tolist()]
        assert got == [grid_for(h, w, 16, budget) for h, w in shapes], budget


def test_eval_batches_have_fixed_shapes_and_masks_for_mixed_aspect_ratios(mixed_shard):
    dataset = make_dataset(
        [mixed_shard], image_size=32, batch_size=4, train=False, preprocess=NAFLEX, patch_size=8
    )
    first, last = iterate(dataset)  # 4 + 2: the remainder kept, as on the square path
    for batch, rows in ((first, 4), (last, 2)):
        assert isinstance(batch.images, NaflexImages)
        patches, grid, valid = batch.images
        assert patches.shape == (rows, BUDGET, PATCH * PATCH * 3) and patches.dtype == np.float32
        assert grid.shape == (rows, 2) and grid.dtype == np.int32
        assert valid.shape == (rows, BUDGET) and valid.dtype == bool
    grids = np.concatenate([first.images.grid_Bx2, last.images.grid_Bx2])
    assert [tuple(g) for g in grids] == [grid_for(h, w, PATCH, BUDGET) for h, w in SHAPES]
    for batch in (first, last):
        count_B = batch.images.grid_Bx2.prod(1)
        expected = np.arange(BUDGET)[None] < count_B[:, None]  # the first rows x cols patches
        np.testing.assert_array_equal(batch.images.valid_BxN, expected)
        assert not batch.images.patches_BxNxP[~expected].any()  # padding is zeros
        assert np.abs(batch.images.patches_BxNxP[expected]).max() > 0.5


def test_the_patch_layout_is_patchify_s(mixed_shard):
    from clip_jax.data.pipeline import decode_image
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    dataset = make_dataset(
        [mixed_shard], image_size=32, batch_size=8, train=False, preprocess=NAFLEX, patch_size=8
    )
    (batch,) = iterate(dataset)
    for i, shape in enumerate(SHAPES):
        image = decode_image(tf, png(*shape, i))
        pixels = naflex.resized(tf, image, NAFLEX, PATCH, BUDGET).numpy()
        flat = patchify(pixels, PATCH)
        np.testing.assert_array_equal(batch.images.patches_BxNxP[i, : len(flat)], flat)


def test_the_training_streams_give_one_naflex_batch_of_all_readers(mixed_shard, tmp_path):
    from clip_jax.data.readers import Readers
    from clip_jax.schemas import RecordKeys

    other = tmp_path / "00001.tfrecord"
    write_shard(other, [serialize("x", png(10, 40, 9), "another image", 0)])
    keys = RecordKeys(readers=2, shuffle_buffer=4)
    readers = Readers(
        [mixed_shard, str(other)], keys, image_size=32, global_batch=6, seed=0,
        preprocess=NAFLEX, patch_size=PATCH,
    )  # fmt: skip
    try:
        batch = next(readers)
    finally:
        readers.close()
    patches, grid, valid = batch.images
    assert patches.shape == (6, BUDGET, PATCH * PATCH * 3) and grid.shape == (6, 2)
    np.testing.assert_array_equal(valid.sum(1), grid.prod(1))
    assert grid_for(10, 40, PATCH, BUDGET) in [tuple(g) for g in grid[3:]]  # reader 1's image


def test_naflex_needs_the_model_s_patch_size(mixed_shard):
    dataset = make_dataset([mixed_shard], image_size=32, batch_size=4, train=False)
    assert next(iterate(dataset)).images.shape == (4, 32, 32, 3)  # the square path as before
    with pytest.raises(ValueError, match="patch size"):
        make_dataset([mixed_shard], image_size=32, batch_size=4, train=False, preprocess=NAFLEX)


def test_the_padded_encoder_pads_naflex_rows_with_real_images():
    seen = []

    def fn(params, images):
        seen.append(images)
        assert images.valid_BxN[:, 0].all()  # no row without a valid patch
        return images.patches_BxNxP.sum((1, 2))[:, None] * params

    rows = NaflexImages(
        np.arange(5 * 4 * 2, dtype=np.float32).reshape(5, 4, 2),
        np.ones((5, 2), np.int32),
        np.eye(5, 4, dtype=bool) | np.eye(5, 4, k=-4, dtype=bool) | True,
    )
    out = padded_encoder(fn, 2.0, 4)(rows)
    np.testing.assert_array_equal(out[:, 0], rows.patches_BxNxP.sum((1, 2)) * 2.0)
    assert [len(s.grid_Bx2) for s in seen] == [4, 4]  # one compiled shape


def test_metrics_at_a_budget_are_named_for_it():
    results = {"examples": 8, "zero_shot_top1": 0.5, "retrieval_i2t_r1": 0.25, "head_top1": 1.0}
    assert at_budget(results, 64) == {"zero_shot_top1@64": 0.5, "retrieval_i2t_r1@64": 0.25}
    assert at_budget({"zero_shot_top1@4": 0.1}, 16) == {}  # never named twice


def test_images_of_any_shape_become_one_padded_batch():
    from clip_jax.data.images import naflex_images

    arrays = [np.full((h, w, 3), 200, np.uint8) for h, w in SHAPES]
    patches, grid, valid = naflex_images(arrays, PATCH, BUDGET, NAFLEX)
    assert patches.shape == (len(SHAPES), BUDGET, PATCH * PATCH * 3)
    assert [tuple(g) for g in np.asarray(grid)] == [
        grid_for(h, w, PATCH, BUDGET) for h, w in SHAPES
    ]
    np.testing.assert_array_equal(np.asarray(valid).sum(1), np.asarray(grid).prod(1))
    grey = (200 / 255 - np.asarray(NAFLEX.mean)) / np.asarray(NAFLEX.std)
    np.testing.assert_allclose(np.asarray(patches)[0, 0].reshape(-1, 3)[0], grey, atol=1e-5)


def test_naflex_batches_go_to_the_devices_leaf_by_leaf():
    from clip_jax.components import components
    from clip_jax.data.readers import LocalBatch
    from clip_jax.train.prefetch import device_batches

    layout = components(load_spec(QUICKSTART)).layout
    images = NaflexImages(
        np.zeros((8, BUDGET, 192), np.float32),
        np.ones((8, 2), np.int32),
        np.ones((8, BUDGET), bool),
    )
    batch = LocalBatch(images, ["a"] * 8, None, np.zeros((1, 10), np.int64))
    prepared = device_batches(layout, lambda texts: np.zeros((len(texts), 4), np.int32))(batch)
    placed = prepared.inputs[0]
    assert isinstance(placed, NaflexImages)
    for leaf, host in zip(placed, images, strict=True):
        assert leaf.shape == host.shape and leaf.sharding == layout.batch_sharding(host.ndim)


# ----------------------------------------------------------------------------- spec
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.vision.positions=sincos2d"], "model.vision.positions"),
        (["model.vision.patch_dropout=0.5"], "model.vision.patch_dropout"),
        (["preprocess.max_patches=0"], "preprocess.max_patches"),
        (["eval.max_patches=[16, 0]"], "eval.max_patches.1"),
    ],
)
def test_a_spec_that_cannot_run_naflex_names_the_key(overrides, key):
    with pytest.raises(SpecError) as error:
        load_spec(QUICKSTART, ["preprocess.resize=naflex", *overrides])
    assert error.value.key == key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("preprocess.max_patches=64", "preprocess.max_patches"),
        ("eval.max_patches=[4]", "preprocess.resize"),
    ],
)
def test_naflex_keys_without_naflex_are_errors(override, key):
    with pytest.raises(SpecError, match="naflex|NaFlex") as error:
        load_spec(QUICKSTART, [override])
    assert error.value.key == key


def test_the_cli_refuses_naflex_without_learned_positions_with_exit_2():
    from clipctl.cli import cli

    args = [
        "validate",
        str(QUICKSTART),
        "preprocess.resize=naflex",
        "model.vision.positions=sincos2d",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: model.vision.positions: ")


def test_the_default_budget_is_the_square_grid_s():
    spec = load_spec(QUICKSTART, ["preprocess.resize=naflex"])
    assert spec.preprocess.max_patches is None
    assert naflex.budget(spec.preprocess, 32, naflex.patch_size_of(spec)) == 16


# ------------------------------------------------------------------------- training
@pytest.mark.slow  # trains, evaluates at two budgets and loads the run: about 25 s
def test_a_naflex_run_trains_evaluates_at_two_budgets_and_encodes_any_shape(tmp_path):
    import json

    import clip_jax
    from clip_jax.testing import run_tiny_training

    run = run_tiny_training(
        tmp_path,
        ["preprocess.resize=naflex", "preprocess.max_patches=12", "eval.max_patches=[4, 12]"],
    )
    assert len(run.losses) == 2 and np.isfinite(run.losses).all()
    for budget in (4, 12):
        for key in ("zero_shot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
            assert 0.0 <= run.results[f"{key}@{budget}"] <= 1.0
    assert run.results["zero_shot_top1@12"] == run.results["zero_shot_top1"]  # its own budget
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if '"validation"' in line][-1]
    assert {"zero_shot_top1@4", "zero_shot_top1@12"} <= set(logged)

    model = clip_jax.load(run.run_dir)
    arrays = [
        np.random.default_rng(i).integers(0, 256, (*s, 3), np.uint8) for i, s in enumerate(SHAPES)
    ]
    together = model.encode_images(arrays)
    alone = np.concatenate([model.encode_images(a) for a in arrays])
    assert together.shape == (len(SHAPES), 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding never leaks
    finer = model.encode_images(arrays[:2], max_patches=40)
    assert finer.shape == (2, 32) and not np.allclose(finer, together[:2], atol=1e-3)
