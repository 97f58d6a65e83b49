"""tf.data over record shards (img2dataset / DataComp layout) -> numpy batches.

Shards are TFRecord files unless a ``record_format`` says otherwise (``data.formats``).

Evaluation reads its files in order, unshuffled. Training streams are built by
``data.stream`` (one per logical reader, resumable in constant time); ``make_dataset``
with ``train=True`` gives one such stream, as a lone reader would read it. Every record
carries its position in its stream; records that fail to parse or decode are dropped
and counted from the gaps in those positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clip_jax.data.formats import TFRECORD, RecordFormat, ShardError, TfrecordFormat
from clip_jax.data.naflex import as_images
from clip_jax.data.tf_setup import import_tf
from clip_jax.errors import PathError
from clip_jax.schemas import CLIP_MEAN, CLIP_STD, PreprocessOptions

if TYPE_CHECKING:
    from clip_jax.models.naflex import NaflexImages

# CLIP's normalisation constants, the default of every run's [preprocess].
MEAN_RGB = np.array(CLIP_MEAN, dtype=np.float32)
STD_RGB = np.array(CLIP_STD, dtype=np.float32)


@dataclass
class Batch:
    # B x H x W x 3 float32, normalised; with preprocess.resize = "naflex", a NaflexImages
    # of numpy arrays (B x max_patches x P patches, B x 2 grids, B x max_patches flags)
    images: np.ndarray | NaflexImages
    captions: list[str]
    labels: np.ndarray | None  # B int64, or None when the records carry no label
    next_position: int  # position in the record stream after this batch
    skipped: int  # records dropped so far (corrupt or undecodable)


class NoFilesMatch(PathError, FileNotFoundError):
    """A glob or path that names no file (still a FileNotFoundError for older callers)."""


def expand_files(patterns: str | Sequence[str], key: str | None = None) -> list[str]:
    """Globs or paths (local or gs://) -> sorted list of existing files.

    ``key`` is the spec key the patterns came from, so that the error says what to fix.
    """
    tf = import_tf()
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for pattern in patterns:
        matched = tf.io.gfile.glob(pattern)
        if not matched:
            raise NoFilesMatch(
                f"no files match {pattern!r}: check the path, or write the shards first",
                key=key,
            )
        files += matched
    return sorted(set(files))


def decode_image(tf, image_bytes):
    """HxWx3 uint8 from JPEG, PNG, WebP, GIF or BMP bytes."""
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def resize_image(tf, image, image_size: int, pre: PreprocessOptions):
    """uint8 HxWx3 -> float32 size x size x 3 on 0..1 (bicubic may overshoot it slightly).

    Shards written at the model's size (img2dataset with ``image_size`` = the model's,
    the embedded synthetic set) skip the resize: at scale 1 it returns its input bit for
    bit, yet its antialiased kernel costs 0.15 ms even on a 32 px image. With the crop
    below, this halves the quickstart pipeline's CPU (77 -> 39 ms per batch of 256) and
    gives 2.2x the images per CPU-second on 224 px shards (bench/data_throughput.py
    --source-size 224)."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    hw = tf.shape(image)[:2]
    if pre.resize == "squash":
        target = tf.constant([image_size, image_size], tf.int32)
    else:
        shape = tf.cast(hw, tf.float32)
        target = tf.cast(tf.math.ceil(shape * (image_size / tf.reduce_min(shape))), tf.int32)
    image = tf.cond(
        tf.reduce_all(hw == target),
        lambda: image,
        lambda: tf.image.resize(image, target, method=pre.interpolation, antialias=True),
    )
    if pre.resize == "squash":
        return image
    # The centre crop as one slice: both sides are >= image_size here, so it is what
    # tf.image.resize_with_crop_or_pad does, without its dozen shape checks per image.
    offset = (tf.shape(image)[:2] - image_size) // 2
    return tf.slice(image, tf.concat([offset, [0]], 0), [image_size, image_size, -1])


def normalize_image(tf, image, pre: PreprocessOptions):
    """(clip(image, 0, 1) - mean) / std, per channel."""
    # The per-channel constants are broadcast to the image's shape first: TensorFlow's
    # implicit broadcast of a 3-vector over HxWx3 is slow, a same-shape subtract and
    # divide are vectorised. Same arithmetic, bit-identical pixels, half the CPU time
    # (0.75 -> 0.36 ms per 224 px image; bench/data_throughput.py).
    shape = tf.shape(image)
    mean = tf.broadcast_to(np.asarray(pre.mean, np.float32), shape)
    std = tf.broadcast_to(np.asarray(pre.std, np.float32), shape)
    return (tf.clip_by_value(image, 0.0, 1.0) - mean) / std


def _preprocess(tf, image_bytes, image_size: int, pre: PreprocessOptions, patch_size=None):
    """Encoded bytes -> the model's input: a size x size x 3 image, or with NaFlex a dict
    of fixed-shape patch features (``data.naflex``)."""
    image = decode_image(tf, image_bytes)
    if pre.resize == "naflex":
        from clip_jax.data import naflex

        if not patch_size:
            raise ValueError("preprocess.resize = 'naflex' needs the model's patch size")
        return naflex.example(
            tf, image, pre, patch_size, naflex.budget(pre, image_size, patch_size)
        )
    image = tf.ensure_shape(resize_image(tf, image, image_size, pre), (image_size, image_size, 3))
    return normalize_image(tf, image, pre)


def make_dataset(
    files: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    image_key: str = "jpg",
    caption_key: str | None = "txt",
    label_key: str | None = None,
    train: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    start_position: int = 0,
    preprocess: PreprocessOptions | None = None,
    threads: int = 2,
    record_format: RecordFormat | None = None,
    patch_size: int | None = None,
):
    """A tf.data pipeline yielding (position, image, caption[, label]) batches.

    ``patch_size``: the model's, which ``preprocess.resize = "naflex"`` cuts images into.

    ``threads`` bounds the pipeline's own thread pool (reading, decoding, resizing), so
    that tf.data never competes with JAX for the host's cores; order does not depend on it.
    With ``train``, the stream of a lone logical reader (``data.stream``): shuffled by
    windows of ``shuffle_buffer`` records, repeated; ``start_position`` is found by reading
    record headers (``Readers`` resumes from a full state instead, in constant time).
    """
    record_format = record_format or TFRECORD  # None: TFRecord shards
    if train:
        return _train_stream(
            files,
            image_size=image_size,
            batch_size=batch_size,
            image_key=image_key,
            caption_key=caption_key or "txt",
            label_key=label_key,
            seed=seed,
            window=shuffle_buffer,
            start_position=start_position,
            preprocess=preprocess,
            threads=threads,
            record_format=record_format,
            patch_size=patch_size,
        ).dataset
    tf = import_tf()
    preprocess = preprocess or PreprocessOptions()
    ds = record_dataset(files, record_format).enumerate().skip(start_position)
    features = {image_key: tf.io.FixedLenFeature([], tf.string)}
    if caption_key:  # classification sets (e.g. ImageNet's) have no captions
        features[caption_key] = tf.io.FixedLenFeature([], tf.string)
    if label_key:
        features[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)

    def decode(position, record):
        example = tf.io.parse_single_example(record, features)
        out = {
            "position": position,
            "image": _preprocess(tf, example[image_key], image_size, preprocess, patch_size),
            "caption": example[caption_key] if caption_key else tf.constant(b""),
        }
        if label_key:
            out["label"] = example[label_key]
        return out

    ds = ds.map(decode, num_parallel_calls=threads, deterministic=True)
    ds = ds.ignore_errors()
    ds = ds.batch(batch_size)
    return finish(tf, ds, threads)


def finish(tf, ds, threads: int):
    """A pipeline's last stage, the same for evaluation and training streams: its own
    pool of ``threads``, deterministic order, prefetch of 2 batches, no autotuning (its
    model thread is what a dropped iterator waited for, forever, at the end of a long
    test session of 67 pipelines; maps run on the private pool's threads, where
    autotuning settled)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.deterministic = True
    options.autotune.enabled = False
    return ds.with_options(options).prefetch(2)


def record_dataset(files: Sequence[str], record_format: RecordFormat = TFRECORD):
    """The shards' serialized examples in order, as tf.data strings. A shard that stops
    being readable is named and skipped; TFRecord shards go through TensorFlow's reader."""
    tf = import_tf()
    if isinstance(record_format, TfrecordFormat):
        return tf.data.TFRecordDataset(list(files))

    def records() -> Iterator[bytes]:
        for path in files:
            try:
                for record, _ in record_format.records(path):
                    yield record
            except ShardError as exc:
                logging.getLogger("clip_jax.data").warning("%s; skipping the rest of it", exc)

    return tf.data.Dataset.from_generator(records, output_signature=tf.TensorSpec((), tf.string))


def _train_stream(
    files: Sequence[str],
    *,
    window: int,
    start_position: int,
    record_format: RecordFormat,
    **kwargs,
):
    from clip_jax.data.stream import RawStream, ReaderStream, fresh_state, seek

    state = fresh_state(window, len(files))
    if start_position:
        state[0] = start_position
        raw = RawStream(files, kwargs["seed"], 0, record_format)
        state[1:5] = seek(raw, window, start_position)
    return ReaderStream(
        files, reader=0, window=window, state=state, record_format=record_format, **kwargs
    )


def iterate(dataset, start_position: int = 0) -> Iterator[Batch]:
    """Numpy batches, with the record-stream position and the running skip count."""
    expected, seen = start_position, 0
    for item in dataset.as_numpy_iterator():
        positions = item["position"]
        seen += len(positions)
        expected = int(positions[-1]) + 1
        yield Batch(
            images=as_images(item["image"]),
            captions=[c.decode("utf-8", "replace") for c in item["caption"]],
            labels=item.get("label"),
            next_position=expected,
            skipped=expected - start_position - seen,
        )


def read_captions(
    files: Sequence[str], caption_key: str, limit: int, record_format: RecordFormat = TFRECORD
) -> Iterator[str]:
    """Up to ``limit`` captions, parsing only the caption feature (to train a tokenizer)."""
    tf = import_tf()
    features = {caption_key: tf.io.FixedLenFeature([], tf.string)}
    ds = record_dataset(files, record_format).take(limit)
    ds = ds.map(lambda r: tf.io.parse_single_example(r, features)[caption_key]).ignore_errors()
    for caption in ds.batch(1024).as_numpy_iterator():
        yield from (c.decode("utf-8", "replace") for c in caption)
