"""Pixels in: decoding image bytes and fitting any image to an encoder's square input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can read (truncated, wrong format, empty)."""


def decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # PIL opens lazily: a truncated file only fails when the pixels are read
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UndecodableImage(f"undecodable image ({exc!r})") from exc
    return image.convert("RGB")


def fit_square(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and centre-crop: uint8 [size, size, 3].

    The encoders of the paper all take square inputs (224 or 256 px); centre-cropping keeps the
    aspect ratio, as their own preprocessing does.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
