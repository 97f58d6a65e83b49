"""The embedded dataset: captioned images of coloured shapes, fully determined by a seed.

Each image holds one shape; its caption composes size, colour, shape and position
("a small red circle in the top left"), sometimes leaving size or position out so that
short prompts are in-distribution too. The zero-shot classes are colour x shape.
Drawing is done at 4x and downsampled, so edges are anti-aliased like real photos.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.28, "large": 0.5}  # shape extent as a fraction of the image side
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
PROMPT_TEMPLATES = ["a {}", "a picture of a {}", "an image of a {}"]
_CAPTION_TEMPLATES = [
    "a {size} {colour} {shape} in the {position}",
    "a picture of a {size} {colour} {shape} in the {position}",
    "a {colour} {shape} in the {position}",
    "a {size} {colour} {shape}",
    "an image of a {colour} {shape}",
    "a {colour} {shape}",
]
_SUPERSAMPLE = 4


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0, 2.094, 4.189)]
        draw.polygon(pts, fill=fill)
    else:  # cross
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def make_example(seed: int, index: int, image_size: int) -> tuple[bytes, str, int]:
    """(JPEG bytes, caption, class id) of example ``index`` for ``seed``."""
    rng = np.random.default_rng([seed, index])
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    big = image_size * _SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (big, big), background)
    jitter = rng.integers(-25, 26, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    px, py = POSITIONS[position]
    offset = rng.uniform(-0.06, 0.06, size=2) * big
    radius = SIZES[size] * big / 2 * rng.uniform(0.9, 1.1)
    _draw(ImageDraw.Draw(image), shape, px * big + offset[0], py * big + offset[1], radius, fill)
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(
        -8, 9, size=(image_size, image_size, 3)
    )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    template = str(rng.choice(_CAPTION_TEMPLATES))
    caption = template.format(size=size, colour=colour, shape=shape, position=position)
    return buffer.getvalue(), caption, CLASSES.index(f"{colour} {shape}")
