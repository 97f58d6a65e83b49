"""The embedded dataset and the tf.data pipeline: written, read back, resumed, skipped."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import synth_writer, synthetic
from clip_jax.data.pipeline import (
    MEAN_RGB,
    STD_RGB,
    expand_files,
    iterate,
    make_dataset,
    normalize_image,
    read_captions,
    resize_image,
)
from clip_jax.data.shards import serialize, write_shard
from clip_jax.errors import UserError
from clip_jax.schemas import PreprocessOptions

SEED = 0  # the conftest fixture writes the default seed
IMAGE_SIZE = 32


def files(root, split):
    return expand_files(str(root / split / "*.tfrecord"))


def batches(paths, **kwargs):
    kwargs.setdefault("image_size", IMAGE_SIZE)
    kwargs.setdefault("batch_size", 64)
    start = kwargs.get("start_position", 0)
    return iterate(make_dataset(paths, **kwargs), start_position=start)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------ the generator
def test_make_example_is_deterministic():
    a = synthetic.make_example(3, 17, IMAGE_SIZE)
    b = synthetic.make_example(3, 17, IMAGE_SIZE)
    assert a == b
    assert synthetic.make_example(3, 18, IMAGE_SIZE)[0] != a[0]
    assert synthetic.make_example(4, 17, IMAGE_SIZE)[0] != a[0]


def test_examples_are_jpegs_with_matching_captions():
    colours_seen, shapes_seen = set(), set()
    for index in range(200):
        image, caption, label = synthetic.make_example(SEED, index, IMAGE_SIZE)
        decoded = Image.open(io.BytesIO(image))
        assert decoded.format == "JPEG"
        assert decoded.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert decoded.mode == "RGB"
        colour, shape = synthetic.CLASSES[label].split()
        assert f"{colour} {shape}" in caption
        colours_seen.add(colour)
        shapes_seen.add(shape)
    assert colours_seen == set(synthetic.COLOURS)
    assert shapes_seen == set(synthetic.SHAPES)


def test_classes():
    assert len(synthetic.CLASSES) == 16
    assert len(set(synthetic.CLASSES)) == 16
    assert all("{}" in template for template in synthetic.PROMPT_TEMPLATES)


# ------------------------------------------------------------------- written shards
def test_folder_layout(synthetic_dir):
    assert len(files(synthetic_dir, "train")) >= 1
    assert len(files(synthetic_dir, "validation")) >= 1
    classes = json.loads((synthetic_dir / "classes.json").read_text())
    assert len(classes["classes"]) == 16
    assert classes["classes"] == synthetic.CLASSES
    assert classes["templates"] == synthetic.PROMPT_TEMPLATES
    settings = json.loads((synthetic_dir / "dataset.json").read_text())
    assert settings == synth_writer.settings(1024, 256, IMAGE_SIZE, SEED)


def test_record_features_are_img2dataset_style(synthetic_dir):
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    records = list(tf.data.TFRecordDataset(files(synthetic_dir, "validation")).take(5))
    seed = SEED + synth_writer.VALIDATION_SEED_OFFSET
    for index, record in enumerate(records):
        example = tf.train.Example.FromString(record.numpy())
        feature = example.features.feature
        assert set(feature) == {"key", "jpg", "txt", "label"}
        image, caption, label = synthetic.make_example(seed, index, IMAGE_SIZE)
        assert feature["key"].bytes_list.value[0] == f"{index:09d}".encode()
        assert feature["jpg"].bytes_list.value[0] == image
        assert feature["txt"].bytes_list.value[0] == caption.encode()
        assert list(feature["label"].int64_list.value) == [label]


def test_validation_split_reads_back(synthetic_dir):
    seed = SEED + synth_writer.VALIDATION_SEED_OFFSET
    expected = [synthetic.make_example(seed, i, IMAGE_SIZE) for i in range(256)]
    got = list(batches(files(synthetic_dir, "validation"), train=False, label_key="label"))
    assert [len(b.captions) for b in got] == [64, 64, 64, 64]
    assert [c for b in got for c in b.captions] == [e[1] for e in expected]
    labels = np.concatenate([b.labels for b in got])
    assert labels.dtype == np.int64
    assert labels.tolist() == [e[2] for e in expected]
    assert got[-1].next_position == 256
    assert all(b.skipped == 0 for b in got)

    first = got[0].images
    assert first.shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert first.dtype == np.float32
    # the pixels are the JPEG's (same size: no resampling), normalised with CLIP's constants
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    for i in (0, 1, 37):
        pixels = tf.io.decode_image(expected[i][0], channels=3).numpy() / np.float32(255)
        np.testing.assert_allclose(first[i], (pixels - MEAN_RGB) / STD_RGB, atol=1e-5)
        # and close to another decoder's reading (JPEG decoders differ by a few levels)
        pillow = np.asarray(Image.open(io.BytesIO(expected[i][0])), np.float32) / 255
        diff = np.abs(first[i] * STD_RGB + MEAN_RGB - pillow)
        assert diff.mean() < 3 / 255 and diff.max() < 24 / 255
    assert abs(float(first.mean())) < 2
    # images differ from each other
    assert not np.allclose(first[0], first[1])


def test_train_split_is_disjoint_from_validation(synthetic_dir):
    train_images = {synthetic.make_example(SEED, i, IMAGE_SIZE)[0] for i in range(64)}
    seed = SEED + synth_writer.VALIDATION_SEED_OFFSET
    validation = {synthetic.make_example(seed, i, IMAGE_SIZE)[0] for i in range(64)}
    assert not train_images & validation


def test_eval_batches_keep_the_remainder(synthetic_dir):
    got = list(batches(files(synthetic_dir, "validation"), train=False, batch_size=100))
    assert [len(b.captions) for b in got] == [100, 100, 56]
    assert got[-1].labels is None  # no label key asked for


def test_read_captions(synthetic_dir):
    captions = list(read_captions(files(synthetic_dir, "train"), "txt", 10))
    assert captions == [synthetic.make_example(SEED, i, IMAGE_SIZE)[1] for i in range(10)]


# ------------------------------------------------------------------ train stream
def test_train_stream_is_seeded_and_repeats(synthetic_dir):
    paths = files(synthetic_dir, "train")
    a = take(batches(paths, train=True, seed=5, shuffle_buffer=256), 2)
    b = take(batches(paths, train=True, seed=5, shuffle_buffer=256), 2)
    c = take(batches(paths, train=True, seed=6, shuffle_buffer=256), 2)
    assert a[0].captions == b[0].captions and a[1].captions == b[1].captions
    assert a[0].captions != c[0].captions
    np.testing.assert_array_equal(a[1].images, b[1].images)
    assert a[1].next_position == 128
    # shuffled, not file order
    in_order = [synthetic.make_example(SEED, i, IMAGE_SIZE)[1] for i in range(64)]
    assert a[0].captions != in_order
    # it repeats past the end of the 1024 records, in full batches
    stream = batches(paths, train=True, seed=5, shuffle_buffer=64, batch_size=400)
    got = take(stream, 3)
    assert [len(b.captions) for b in got] == [400, 400, 400]
    assert got[-1].next_position == 1200


@pytest.mark.parametrize(
    "position",
    [
        37,
        pytest.param(128, marks=pytest.mark.slow),
        pytest.param(1024 + 37, marks=pytest.mark.slow),
    ],
)
def test_resume_from_position(synthetic_dir, position):
    paths = files(synthetic_dir, "train")
    kwargs = {"train": True, "seed": 3, "shuffle_buffer": 128, "batch_size": 64}
    stream = [c for b in take(batches(paths, **kwargs), position // 64 + 2) for c in b.captions]
    resumed = next(batches(paths, start_position=position, **kwargs))
    assert resumed.captions == stream[position : position + 64]
    assert resumed.next_position == position + 64
    assert resumed.skipped == 0


# ---------------------------------------------------------------- corrupt records
@pytest.fixture(scope="module")
def shard_with_corrupt_records(tmp_path_factory):
    """[good0, bad image, good1, not a proto, good2, good3, bad image, good4]."""
    good = [synthetic.make_example(11, i, 24) for i in range(5)]
    records = [serialize(f"{i:09d}", *example) for i, example in enumerate(good)]
    bad_image = serialize("bad-image", b"\xff\xd8 definitely not a jpeg", "a broken image", 1)
    not_proto = b"\x00\x01 this is not a tf.train.Example \xfe"
    ordered = [
        records[0],
        bad_image,
        records[1],
        not_proto,
        records[2],
        records[3],
        bad_image,
        records[4],
    ]
    path = tmp_path_factory.mktemp("corrupt") / "00000.tfrecord"
    assert write_shard(path, ordered) == 8
    return str(path), [example[1] for example in good]


def test_corrupt_records_are_skipped_and_counted(shard_with_corrupt_records):
    path, captions = shard_with_corrupt_records
    got = list(batches([path], train=False, batch_size=2, image_size=16, label_key="label"))
    assert [c for b in got for c in b.captions] == captions
    assert [b.next_position for b in got] == [3, 6, 8]
    assert [b.skipped for b in got] == [1, 2, 3]
    assert all(b.images.shape[1:] == (16, 16, 3) for b in got)
    assert np.isfinite(np.concatenate([b.images for b in got])).all()


def test_corrupt_records_in_the_train_stream(shard_with_corrupt_records):
    path, captions = shard_with_corrupt_records
    # a shuffle window of one epoch (8 records): the first batch is its 5 good records
    stream = batches([path], train=True, seed=0, batch_size=5, image_size=16, shuffle_buffer=8)
    first, second = take(stream, 2)
    assert sorted(first.captions) == sorted(captions)
    assert second.next_position - first.next_position >= 5
    # every 8 records of the stream hold 3 bad ones
    assert second.skipped == second.next_position - 10


def test_resize_and_crop_other_sizes(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # any encoding tf can decode
    path = tmp_path / "png.tfrecord"
    write_shard(path, [serialize("k", buffer.getvalue(), "a red rectangle")])
    (batch,) = batches([str(path)], train=False, image_size=16)
    assert batch.images.shape == (1, 16, 16, 3)
    red = (np.array([1.0, 0.0, 0.0], np.float32) - MEAN_RGB) / STD_RGB
    np.testing.assert_allclose(batch.images[0], np.broadcast_to(red, (16, 16, 3)), atol=1e-3)


@pytest.mark.parametrize(
    "pre", [PreprocessOptions(), PreprocessOptions(mean=(0.5, 0.25, 0.1), std=(0.3, 0.7, 0.9))]
)
def test_normalisation_is_bit_identical_to_the_broadcasting_formula(pre):
    """normalize_image broadcasts its constants itself, for speed; no pixel may move."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    rng = np.random.default_rng(0)
    for shape in [(224, 224, 3), (7, 5, 3)]:
        image = rng.uniform(-0.1, 1.1, shape).astype(np.float32)  # bicubic overshoots 0..1
        formula = lambda x: (tf.clip_by_value(x, 0.0, 1.0) - mean) / std  # noqa: E731
        ours = lambda x: normalize_image(tf, x, pre)  # noqa: E731
        # eagerly and inside tf.data (graph-optimised), as the pipeline runs it
        np.testing.assert_array_equal(ours(image).numpy(), formula(image).numpy())
        in_graph = [
            next(tf.data.Dataset.from_tensors(image).map(fn).as_numpy_iterator())
            for fn in (ours, formula)
        ]
        np.testing.assert_array_equal(*in_graph)


@pytest.mark.parametrize("resize", ["crop", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_is_bit_identical_to_tensorflows_resize_and_crop(resize, interpolation):
    """resize_image skips the resize for images already at size, and crops with one
    slice: both for speed, and no pixel may move against TensorFlow's own functions."""
    from clip_jax.data.tf_setup import import_tf

    tf = import_tf()
    pre = PreprocessOptions(resize=resize, interpolation=interpolation)

    def reference(image, size):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if resize == "squash":
            return tf.image.resize(image, (size, size), method=interpolation, antialias=True)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        target = tf.cast(tf.math.ceil(shape * size / tf.reduce_min(shape)), tf.int32)
        image = tf.image.resize(image, target, method=interpolation, antialias=True)
        return tf.image.resize_with_crop_or_pad(image, size, size)

    rng = np.random.default_rng(0)
    # at size, one side at size, down- and up-sampling, odd crops
    for height, width, size in [(32, 32, 32), (32, 47, 32), (33, 32, 32), (60, 41, 32),
                                (17, 90, 16), (20, 20, 32), (225, 225, 224)]:  # fmt: skip
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours = resize_image(tf, image, size, pre).numpy()
        assert ours.shape == (size, size, 3)
        np.testing.assert_array_equal(ours, reference(image, size).numpy())
        in_graph = tf.data.Dataset.from_tensors(image).map(
            lambda x, size=size: resize_image(tf, x, size, pre)
        )
        np.testing.assert_array_equal(next(in_graph.as_numpy_iterator()), ours)
    at_size = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        resize_image(tf, at_size, 24, pre).numpy(),
        tf.image.convert_image_dtype(at_size, tf.float32).numpy(),
    )


def test_thread_count_does_not_change_the_stream(synthetic_dir):
    paths = files(synthetic_dir, "train")
    kwargs = {"train": True, "seed": 2, "shuffle_buffer": 128}
    one = take(batches(paths, threads=1, **kwargs), 3)
    two = take(batches(paths, **kwargs), 3)  # the default, 2
    for a, b in zip(one, two, strict=True):
        assert a.captions == b.captions and a.next_position == b.next_position
        np.testing.assert_array_equal(a.images, b.images)


def test_custom_keys(tmp_path):
    image = synthetic.make_example(0, 0, 16)[0]
    path = tmp_path / "keys.tfrecord"
    record = serialize(
        "k", image, "custom caption", 5, image_key="webp", caption_key="caption", label_key="cls"
    )
    write_shard(path, [record])
    (batch,) = batches(
        [str(path)],
        train=False,
        image_size=16,
        image_key="webp",
        caption_key="caption",
        label_key="cls",
    )
    assert batch.captions == ["custom caption"]
    assert batch.labels.tolist() == [5]


def test_expand_files(synthetic_dir, tmp_path):
    train = files(synthetic_dir, "train")
    both = expand_files([str(synthetic_dir / "*" / "*.tfrecord"), train[0]])
    assert both == sorted(both)
    assert len(both) == len(train) + len(files(synthetic_dir, "validation"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_files(str(tmp_path / "*.tfrecord"))
    # a UserError naming the spec key it came from, for the CLI to print
    with pytest.raises(UserError, match=r"^data.train: no files match .*\*.tfrecord"):
        expand_files(str(tmp_path / "*.tfrecord"), "data.train")


# --------------------------------------------------------------------- the writer
def test_writer_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synth_writer.write_synthetic(tmp_path, 8, 8, workers=1)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_writer_reuses_a_complete_folder(synthetic_dir):
    shard = files(synthetic_dir, "train")[0]
    before = os.stat(shard).st_mtime_ns
    settings = synth_writer.write_synthetic(
        synthetic_dir, train_examples=1024, validation_examples=256, workers=1
    )
    assert settings == synth_writer.settings(1024, 256, IMAGE_SIZE, SEED)
    assert os.stat(shard).st_mtime_ns == before


def test_writer_redoes_an_interrupted_or_different_write(tmp_path):
    out = tmp_path / "data"
    synth_writer.write_synthetic(out, train_examples=10, validation_examples=4, workers=1)
    marker = json.loads((out / "dataset.json").read_text())
    assert synth_writer.is_complete(out, marker)
    # an interrupted write leaves a claim: the next call writes it again
    (out / "dataset.json").write_text(json.dumps({**marker, "complete": False}))
    (out / "train" / "00000.tfrecord").write_bytes(b"half a shard")
    assert not synth_writer.is_complete(out, marker)
    synth_writer.write_synthetic(out, train_examples=10, validation_examples=4, workers=1)
    assert synth_writer.is_complete(out, marker)
    got = list(batches(files(out, "train"), train=False))
    assert [c for b in got for c in b.captions] == [
        synthetic.make_example(0, i, IMAGE_SIZE)[1] for i in range(10)
    ]
    # other settings: rewritten to match
    synth_writer.write_synthetic(out, train_examples=6, validation_examples=4, seed=1, workers=1)
    got = list(batches(files(out, "train"), train=False))
    assert [c for b in got for c in b.captions] == [
        synthetic.make_example(1, i, IMAGE_SIZE)[1] for i in range(6)
    ]
