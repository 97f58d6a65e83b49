"""NaFlex on the data path: each image at its native aspect ratio, as a padded patch
sequence, made inside tf.data (``preprocess.resize = "naflex"``).

Per example, on the pipeline's threads: the image is resized (antialiased, with the
spec's interpolation) to the grid ``models.naflex.grid_for`` gives it, times the patch
size; normalised like the square path; cut into patches in ``models.naflex.patchify``'s
layout; and padded to the budget with a mask. Every example then has the same shapes
(budget x P patches, a (rows, columns) grid, budget validity flags), so batches
stack and every step compiles to one program, whatever the images' shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_jax.schemas import PreprocessOptions

if TYPE_CHECKING:
    from clip_jax.models.naflex import NaflexImages


def budget(pre: PreprocessOptions, image_size: int, patch_size: int) -> int:
    """The run's patch budget: ``preprocess.max_patches``, else the square grid's count."""
    return pre.max_patches or (image_size // patch_size) ** 2


def patch_size_of(spec: Any) -> int | None:
    """The ViT patch size images are cut into (None for a model without one)."""
    return getattr(getattr(spec.model, "vision", None), "patch_size", None)


def grid(tf, height, width, patch: int, max_patches: int):
    """``models.naflex.grid_for`` in TensorFlow ops: (rows, columns) int32 scalars.

    The same float64 operations in the same order (each correctly rounded in both), so
    the same grid as the model side's Python for any image. The bisection is unrolled:
    a ``tf.while_loop`` costs twice the CPU per image inside tf.data (340 against 160 us).
    """
    from clip_jax.models.naflex import SCALE_HIGH, SCALE_LOW, SCALE_STEPS

    sides = tf.cast(tf.stack([height, width]), tf.float64)
    one = tf.constant(1.0, tf.float64)

    def cells(scale):
        return tf.maximum(one, tf.math.ceil(sides * scale / patch))

    low, high = tf.constant(SCALE_LOW, tf.float64), tf.constant(SCALE_HIGH, tf.float64)
    for _ in range(SCALE_STEPS):
        mid = (low + high) / 2
        fits = tf.reduce_prod(cells(mid)) <= max_patches
        low, high = tf.where(fits, mid, low), tf.where(fits, high, mid)
    rows_cols = tf.cast(cells(low), tf.int32)
    return rows_cols[0], rows_cols[1]


def resized(tf, image_uint8, pre: PreprocessOptions, patch: int, max_patches: int):
    """uint8 HxWx3 -> float32 (rows * patch) x (columns * patch) x 3, normalised."""
    from clip_jax.data.pipeline import normalize_image

    shape = tf.shape(image_uint8)
    rows, cols = grid(tf, shape[0], shape[1], patch, max_patches)
    image = tf.image.convert_image_dtype(image_uint8, tf.float32)
    image = tf.image.resize(
        image, (rows * patch, cols * patch), method=pre.interpolation, antialias=True
    )
    return normalize_image(tf, image, pre)


def example(tf, image_uint8, pre: PreprocessOptions, patch: int, max_patches: int) -> dict:
    """One image's fixed-shape NaFlex features: ``patches`` (max_patches, patch^2 * 3),
    zero past the image's own; ``grid`` (2,) int32 rows and columns; ``valid``."""
    pixels = resized(tf, image_uint8, pre, patch, max_patches)
    shape = tf.shape(pixels)
    rows, cols = shape[0] // patch, shape[1] // patch
    size = patch * patch * 3
    # (row, column, channel) inside a patch, patches row by row: models.naflex.patchify
    cells = tf.reshape(pixels, (rows, patch, cols, patch, 3))
    flat = tf.reshape(tf.transpose(cells, (0, 2, 1, 3, 4)), (rows * cols, size))
    count = rows * cols
    patches = tf.pad(flat, [[0, max_patches - count], [0, 0]])
    return {
        "patches": tf.ensure_shape(patches, (max_patches, size)),
        "grid": tf.ensure_shape(tf.stack([rows, cols]), (2,)),
        "valid": tf.range(max_patches) < count,
    }


def as_images(value: Any) -> np.ndarray | NaflexImages:
    """A pipeline batch's ``image`` entry as the model takes it: the square path's array
    as is, NaFlex features (a dict) as a ``NaflexImages`` of numpy arrays."""
    if not isinstance(value, dict):
        return value
    from clip_jax.models.naflex import NaflexImages

    return NaflexImages(value["patches"], value["grid"].astype(np.int32), value["valid"])


def concat_rows(parts: Sequence[Any]) -> Any:
    """Batches (arrays, or NamedTuples of arrays such as ``NaflexImages``) joined along
    their rows, leaf by leaf."""
    first = parts[0]
    if hasattr(first, "_fields"):
        return type(first)(*(np.concatenate(leaves) for leaves in zip(*parts, strict=True)))
    return np.concatenate(parts)
