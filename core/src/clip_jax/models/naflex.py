"""NaFlex (SigLIP 2): images at their native aspect ratio, as a variable number of patches.

Each image is resized so that its patch grid keeps the aspect ratio (to a patch per
side) and holds at most ``max_patches`` patches, cut into patches, and padded to
``max_patches`` with a mask: one compiled shape per budget whatever the images' shapes.
Grid and position resampling are SigLIP 2's (big_vision; transformers' Siglip2), so an
exported model gets the inputs it trained on. The learned position table of the square
grid is resampled (bilinearly, antialiased) to each image's own grid, which is
computed from the grid sizes as data, so a batch of mixed shapes needs no per-image
program. The patches keep the order ``(row, column, channel)`` inside a patch, the
layout of the square path's patch convolution kernel, so both paths share parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class NaflexImages(NamedTuple):
    """A batch of images as padded patch sequences (a pytree: passes through jit)."""

    patches_BxNxP: jax.Array  # P = patch * patch * channels, zero where not valid
    grid_Bx2: jax.Array  # int32 (rows, columns) of each image's patch grid
    valid_BxN: jax.Array  # bool: the first rows * columns patches are the image's


# The scale search of big_vision's NaFlex preprocessing (and transformers' Siglip2 image
# processor): bisect [1e-6, 100] until the interval is under 1e-5 wide, which is always
# exactly 24 halvings (100 / 2**23 > 1e-5 > 100 / 2**24, far beyond float64 rounding).
SCALE_LOW, SCALE_HIGH, SCALE_STEPS = 1e-6, 100.0, 24


def grid_for(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The patch grid SigLIP 2 gives an image: the largest scale whose grid, each side
    rounded up to whole patches (at least one), holds at most ``max_patches`` patches.

    The same float64 bisection as big_vision's and transformers' (``data.naflex.grid``
    repeats it in TensorFlow), so an exported model's processor picks the grid the model
    trained on. Rounding up fills the budget (a 2:1 image gets 5 x 3 of 16, not 5 x 2),
    at the cost of stretching the aspect ratio by up to one patch per side.
    """
    if max_patches < 1:
        raise ValueError("max_patches must be at least 1")

    def cells(scale: float, length: int) -> int:
        return max(1, math.ceil(length * scale / patch))

    low, high = SCALE_LOW, SCALE_HIGH
    for _ in range(SCALE_STEPS):
        mid = (low + high) / 2
        if cells(mid, height) * cells(mid, width) <= max_patches:
            low = mid
        else:
            high = mid
    return cells(low, height), cells(low, width)


def patchify(image_HxWxC: np.ndarray, patch: int) -> np.ndarray:
    """(rows * columns, patch * patch * C) patches of an image whose sides are whole patches."""
    height, width, channels = image_HxWxC.shape
    rows, cols = height // patch, width // patch
    if rows * patch != height or cols * patch != width:
        raise ValueError(f"{height}x{width} is not a whole number of {patch}px patches")
    grid = image_HxWxC.reshape(rows, patch, cols, patch, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * cols, patch * patch * channels)


def pad_batch(images: list[np.ndarray], patch: int, max_patches: int) -> NaflexImages:
    """Images already resized to whole-patch sides (``grid_for``) -> one padded batch."""
    size = patch * patch * images[0].shape[-1]
    patches = np.zeros((len(images), max_patches, size), np.float32)
    grid = np.zeros((len(images), 2), np.int32)
    valid = np.zeros((len(images), max_patches), bool)
    for i, image in enumerate(images):
        flat = patchify(image, patch)
        if len(flat) > max_patches:
            raise ValueError(f"image {i} has {len(flat)} patches, the budget is {max_patches}")
        patches[i, : len(flat)], valid[i, : len(flat)] = flat, True
        grid[i] = image.shape[0] // patch, image.shape[1] // patch
    return NaflexImages(jnp.asarray(patches), jnp.asarray(grid), jnp.asarray(valid))


def as_patch_row(patches_BxNxP: jax.Array, patch: int) -> jax.Array:
    """Patches laid side by side as a one-patch-high image (B, patch, N * patch, C): the
    square path's patch convolution then embeds each patch with the same kernel."""
    batch, count, size = patches_BxNxP.shape
    channels = size // (patch * patch)
    cells = patches_BxNxP.reshape(batch, count, patch, patch, channels)
    return cells.transpose(0, 2, 1, 3, 4).reshape(batch, patch, count * patch, channels)


def resample_positions(table_GxGxD: jax.Array, grid_Bx2: jax.Array, count: int) -> jax.Array:
    """(B, count, D): the square table resized to each image's grid, patches row by row;
    zeros past an image's patches. A grid equal to the table's gives the table itself.

    Bilinear with antialiasing (a triangle filter widened by the shrink factor when a
    side shrinks), half-pixel centres: big_vision's ``scale_and_translate`` and
    transformers' Siglip2 resize, so an exported model embeds as it trained. Each patch
    is a weighted sum of table cells, one product of (B, count, G*G) weights with the
    table, since every image has a grid of its own.
    """
    side = table_GxGxD.shape[0]
    index_N = jnp.arange(count)
    rows_Bx1, cols_Bx1 = grid_Bx2[:, 0:1], grid_Bx2[:, 1:2]
    row_BxN = index_N[None] // jnp.maximum(cols_Bx1, 1)
    col_BxN = index_N[None] % jnp.maximum(cols_Bx1, 1)
    source_G = jnp.arange(side, dtype=jnp.float32)

    def weights(i_BxN, n_Bx1):  # (B, count, G): output cell i of n, over the table's G
        shrink_Bx1 = side / jnp.maximum(n_Bx1, 1).astype(jnp.float32)
        centre_BxN = (i_BxN + 0.5) * shrink_Bx1 - 0.5
        width_Bx1x1 = jnp.maximum(shrink_Bx1, 1.0)[..., None]
        tent_BxNxG = 1.0 - jnp.abs(source_G - centre_BxN[..., None]) / width_Bx1x1
        tent_BxNxG = jnp.maximum(tent_BxNxG, 0.0)
        return tent_BxNxG / tent_BxNxG.sum(-1, keepdims=True)

    rows_BxNxG, cols_BxNxG = weights(row_BxN, rows_Bx1), weights(col_BxN, cols_Bx1)
    cells_BxNxGG = (rows_BxNxG[..., :, None] * cols_BxNxG[..., None, :]).reshape(
        *row_BxN.shape, side * side
    )
    table_GGxD = table_GxGxD.reshape(side * side, -1).astype(jnp.float32)
    out_BxNxD = jnp.einsum("bnc,cd->bnd", cells_BxNxGG, table_GGxD, precision="highest")
    inside_BxN = index_N[None] < rows_Bx1 * cols_Bx1
    return jnp.where(inside_BxN[..., None], out_BxNxD, 0.0).astype(table_GxGxD.dtype)
