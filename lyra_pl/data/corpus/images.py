"""Tiny synthetic images: one colored shape on a plain background, maybe a printed word.

Each image answers three questions by construction (its color, its shape, its word), so the
labels are exact. Size, position, background and a small color jitter are random, so no two
renderings are alike and validation images are never training images.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

from lyra_pl.data.corpus.text import COLORS, SHAPES

RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 155, 55), "blue": (35, 70, 215),
    "yellow": (235, 205, 25), "purple": (135, 45, 175), "orange": (245, 130, 25),
}
BACKGROUNDS = ((250, 250, 250), (232, 232, 232), (248, 242, 228), (226, 234, 242),
               (238, 238, 226))
assert set(RGB) == set(COLORS)


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled font: the same glyphs on every machine, no system fonts needed.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def render_image(color: str, shape: str, word: str | None, rng: random.Random,
                 size: int = 84) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one ``color`` ``shape`` (one of ``SHAPES``), with
    ``word`` printed in dark gray under it when given."""
    if color not in RGB or shape not in SHAPES:
        raise ValueError(f"unknown color {color!r} or shape {shape!r}")
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    # The shape's box: the top ~65% when a word goes below it, anywhere otherwise.
    area = round(size * 0.66) if word else size
    side = rng.randint(round(area * 0.45), round(area * 0.8))
    x0 = rng.randint(2, size - side - 2)
    y0 = rng.randint(2, max(2, area - side - 2))
    x1, y1 = x0 + side, y0 + side
    fill = tuple(min(255, max(0, c + rng.randint(-18, 18))) for c in RGB[color])
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    if word:
        font = _font(round(size * 0.22))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        tx = rng.randint(1, max(1, size - (right - left) - 1)) - left
        ty = size - (bottom - top) - rng.randint(2, 5) - top
        draw.text((tx, ty), word, fill=(30, 30, 30), font=font)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
