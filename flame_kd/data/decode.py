"""Images decoded as they are: 8-bit modes through Pillow's own conversion, 16-bit and float
greyscale (thermal cameras write them) scaled to 8 bits by each image's own range, as a thermal
viewer's automatic gain does; Pillow's ``convert("RGB")`` would clip them to 255 everywhere."""

from __future__ import annotations

import numpy as np
from PIL import Image

EIGHT_BIT = {"1": "1-bit", "L": "8-bit grey", "P": "8-bit palette", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
             "LA": "8-bit grey+alpha", "PA": "8-bit palette+alpha", "RGBX": "8-bit RGB", "CMYK": "8-bit CMYK",
             "YCbCr": "8-bit YCbCr", "LAB": "8-bit Lab", "HSV": "8-bit HSV"}
DEEP = {"I;16": "16-bit grey", "I;16L": "16-bit grey", "I;16B": "16-bit grey", "I;16N": "16-bit grey",
        "I": "32-bit integer grey", "F": "32-bit float grey"}


class UnsupportedImage(ValueError):
    """An image mode flame-kd cannot turn into 8-bit frames faithfully."""


def describe(mode: str) -> str:
    """How an image of ``mode`` is decoded: "8-bit RGB", "16-bit grey (I;16), scaled by each image's range"."""
    if mode in EIGHT_BIT:
        return EIGHT_BIT[mode]
    if mode in DEEP:
        return f"{DEEP[mode]} ({mode}), scaled to 8 bits by each image's min..max"
    return f"unsupported mode {mode}"


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image of ``im``; a deep greyscale image is scaled by its own min..max first
    (a flat image becomes black). Raises ``UnsupportedImage`` for any other mode."""
    if im.mode in EIGHT_BIT:
        return im.convert("RGB")
    if im.mode not in DEEP:
        raise UnsupportedImage(f"image mode {im.mode} is not supported (8-bit modes, or 16/32-bit and float grey)")
    values = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise UnsupportedImage(f"a {DEEP[im.mode]} image with no finite pixel")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = np.where(finite, (values - lo) * (255.0 / (hi - lo) if hi > lo else 0.0), 0.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")
