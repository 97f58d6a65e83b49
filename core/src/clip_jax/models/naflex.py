"""NaFlex (SigLIP 2): images at their native aspect ratio, as a variable number of patches.

Each image is resized so that its patch grid keeps the aspect ratio and holds at most
``max_patches`` patches, cut into patches, and padded to ``max_patches`` with a mask:
one compiled shape per budget whatever the images' shapes. The learned position table
of the square grid is resampled (bilinearly) to each image's own grid, which is
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


def grid_for(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The largest patch grid with the image's aspect ratio and at most ``max_patches``
    patches (each side at least one patch)."""
    if max_patches < 1:
        raise ValueError("max_patches must be at least 1")
    scale = math.sqrt(max_patches * patch * patch / (height * width))
    rows = max(1, math.floor(height * scale / patch))
    cols = max(1, math.floor(width * scale / patch))
    while rows * cols > max_patches:  # rounding at the one-patch floor can overshoot
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


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
    """(B, count, D): the square table bilinearly resampled to each image's grid, row by
    row (half-pixel centres, as ``jax.image.resize`` without antialiasing); zeros past
    an image's patches. A grid equal to the table's gives the table itself."""
    side = table_GxGxD.shape[0]
    index_N = jnp.arange(count)
    rows_B, cols_B = grid_Bx2[:, 0:1], grid_Bx2[:, 1:2]
    row_BxN, col_BxN = (
        index_N[None] // jnp.maximum(cols_B, 1),
        index_N[None] % jnp.maximum(cols_B, 1),
    )

    def source(i_BxN, n_Bx1):  # centre of cell i of n, in table coordinates, clamped
        x = (i_BxN + 0.5) * side / n_Bx1 - 0.5
        return jnp.clip(x, 0.0, side - 1.0)

    y_BxN, x_BxN = source(row_BxN, rows_B), source(col_BxN, cols_B)
    y0, x0 = jnp.floor(y_BxN).astype(jnp.int32), jnp.floor(x_BxN).astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, side - 1), jnp.minimum(x0 + 1, side - 1)
    wy, wx = (y_BxN - y0)[..., None], (x_BxN - x0)[..., None]
    table = table_GxGxD.astype(jnp.float32)
    top = table[y0, x0] * (1 - wx) + table[y0, x1] * wx
    bottom = table[y1, x0] * (1 - wx) + table[y1, x1] * wx
    out_BxNxD = top * (1 - wy) + bottom * wy
    inside_BxN = index_N[None] < rows_B * cols_B
    return jnp.where(inside_BxN[..., None], out_BxNxD, 0.0).astype(table_GxGxD.dtype)
