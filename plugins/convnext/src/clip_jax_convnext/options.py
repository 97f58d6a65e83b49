"""The spec tables of ``convnext_clip``: pydantic only, so validating a spec stays fast.

clip-jax reads three keys of any architecture's options: ``vision.image_size`` (the data
pipeline's image size), ``text.context_length`` and ``text.vocab_size`` (the
tokenizer). ``embed_dim`` and the towers' ``projection``/``projection_bias`` are what
``clip_jax.models.clip.two_tower`` needs. Everything else is this plugin's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clip_jax.schemas import Options, TextOptions


class ConvNextOptions(Options):
    image_size: int = Field(224, ge=16, le=4096)
    depths: list[int] = Field([3, 3, 9, 3], min_length=1, description="blocks per stage")
    dims: list[int] = Field([96, 192, 384, 768], min_length=1, description="channels per stage")
    kernel_size: int = Field(7, ge=1, le=31, description="depthwise convolution size (odd)")
    mlp_ratio: float = Field(4.0, gt=0)
    layer_scale_init: float = Field(1e-6, ge=0, description="0 disables layer scale")
    dtype: Literal["float32", "bfloat16"] = "float32"
    projection: Literal["linear", "none"] = "linear"
    projection_bias: bool = False

    @model_validator(mode="after")
    def _check(self) -> ConvNextOptions:
        if len(self.depths) != len(self.dims):
            raise ValueError(
                f"depths ({len(self.depths)} stages) and dims ({len(self.dims)}) must match"
            )
        stride = 4 * 2 ** (len(self.dims) - 1)  # stem 4, then 2 per later stage
        if self.image_size % stride:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of {stride} "
                f"(stem stride 4 x 2 per stage after the first)"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size ({self.kernel_size}) must be odd")
        return self


class ConvNextClipOptions(Options):
    """A ConvNeXt (Liu et al. 2022) image tower and clip-jax's text tower."""

    preset: str | None = None
    embed_dim: int = Field(512, ge=1)
    vision: ConvNextOptions = ConvNextOptions()
    text: TextOptions = TextOptions()

    @model_validator(mode="after")
    def _check(self) -> ConvNextClipOptions:
        if self.vision.projection == "none" and self.vision.dims[-1] != self.embed_dim:
            raise ValueError(
                f"vision.projection = 'none' needs vision.dims[-1] ({self.vision.dims[-1]}) "
                f"== embed_dim ({self.embed_dim})"
            )
        if self.text.projection == "none" and self.text.width != self.embed_dim:
            raise ValueError(
                f"text.projection = 'none' needs text.width ({self.text.width}) "
                f"== embed_dim ({self.embed_dim})"
            )
        return self


_TINY_TEXT = {"vocab_size": 1024, "context_length": 16, "width": 128, "depth": 2, "heads": 4}

PRESETS = {
    # The quickstart's size: `clipctl run templates/quickstart.toml model.architecture=convnext_clip`
    "tiny": {
        "embed_dim": 128,
        "vision": {"image_size": 32, "depths": [1, 1, 2], "dims": [32, 64, 128]},
        "text": _TINY_TEXT,
    },
    # ConvNeXt-T (28.6M image-tower parameters) with open_clip's text tower.
    "convnext-tiny": {
        "embed_dim": 1024,
        "vision": {"image_size": 224, "depths": [3, 3, 9, 3], "dims": [96, 192, 384, 768]},
        "text": {"vocab_size": 49408, "context_length": 77, "width": 512, "heads": 8, "depth": 12},
    },
}
