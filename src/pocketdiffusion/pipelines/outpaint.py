"""Outpainting: a larger canvas whose new border is masked for inpainting."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .request import InvalidRequest

MASK_OVERLAP = 8  # repaint this many pixels of the old image too, so the seam is painted over


def extend_canvas(image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0,
                  bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image placed on a canvas grown by the given pixels (each a multiple of 8,
    the new area pre-filled by stretching the edge pixels so the model starts from matching colours)
    and a mask that is white over the new area plus a small overlap."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value % 8:
            raise InvalidRequest(f"outpaint {name}={value!r}: expected a whole number of pixels >= 0, "
                                 "a multiple of 8")
    if not any(sides.values()):
        raise InvalidRequest("outpaint needs at least one of left, right, top, bottom > 0")
    rgb = np.asarray(image.convert("RGB"))
    canvas = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    h, w = rgb.shape[:2]
    o = MASK_OVERLAP
    y0, x0 = top + (o if top else 0), left + (o if left else 0)
    y1, x1 = top + h - (o if bottom else 0), left + w - (o if right else 0)
    mask[y0:max(y0, y1), x0:max(x0, x1)] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
