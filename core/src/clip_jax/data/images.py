"""Images from users (files, PIL images, uint8 arrays) -> the pixels a model expects.

The same ``[preprocess]`` settings as the training pipeline, done with PIL the way
Hugging Face's image processors do it (resize the shorter side, centre crop; or resize
to a square), so a model used here and the same model exported to transformers see the
same pixels. NaFlex runs get each image at its own aspect ratio, as padded patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_jax.errors import UserError
from clip_jax.schemas import PreprocessOptions

if TYPE_CHECKING:
    from clip_jax.models.naflex import NaflexImages


def to_pil(image: Any):
    """A PIL RGB image from a path, a PIL image, or an HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(image, str | Path):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"image {image} does not exist") from None
        except OSError as exc:
            raise UserError(f"image {image} cannot be read: {exc}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise UserError(
            f"an image array must be HxWx3 uint8 (got {array.dtype} {array.shape}); "
            "pass preprocessed float batches as one BxHxWx3 float32 array"
        )
    return Image.fromarray(array, "RGB")


def _pil_steps(options: PreprocessOptions) -> tuple[Any, Any]:
    """PIL's resampling filter for the spec's interpolation, and image -> normalised
    float32 pixels."""
    from PIL import Image

    resample = Image.BICUBIC if options.interpolation == "bicubic" else Image.BILINEAR
    mean = np.asarray(options.mean, np.float32)
    std = np.asarray(options.std, np.float32)
    return resample, lambda pil: (np.asarray(pil, np.float32) / 255.0 - mean) / std


def preprocess(images: Sequence[Any], image_size: int, options: PreprocessOptions) -> np.ndarray:
    """BxHxWx3 float32 model inputs from any mix of paths, PIL images and uint8 arrays."""
    resample, normalize = _pil_steps(options)
    out = []
    for image in images:
        pil = to_pil(image)
        if options.resize == "squash":
            pil = pil.resize((image_size, image_size), resample)
        else:
            width, height = pil.size
            short, long = sorted((width, height))
            resized_long = int(image_size * long / short)  # transformers' rounding
            size = (image_size, resized_long) if width <= height else (resized_long, image_size)
            if size != pil.size:
                pil = pil.resize(size, resample)
            left, top = (pil.size[0] - image_size) // 2, (pil.size[1] - image_size) // 2
            pil = pil.crop((left, top, left + image_size, top + image_size))
        out.append(normalize(pil))
    return np.stack(out) if out else np.zeros((0, image_size, image_size, 3), np.float32)


def naflex_images(
    images: Sequence[Any], patch: int, max_patches: int, options: PreprocessOptions
) -> NaflexImages:
    """NaFlex model inputs from any mix of paths, PIL images and uint8 arrays: each at
    its own aspect ratio, resized to its ``grid_for`` grid, cut into patches, padded."""
    from clip_jax.models.naflex import grid_for, pad_batch

    if not images:
        raise UserError("no images to encode")
    resample, normalize = _pil_steps(options)
    out = []
    for image in images:
        pil = to_pil(image)
        rows, cols = grid_for(pil.size[1], pil.size[0], patch, max_patches)
        out.append(normalize(pil.resize((cols * patch, rows * patch), resample)))  # antialiased
    return pad_batch(out, patch, max_patches)
