"""Outpainting: a larger canvas whose new border is masked for inpainting."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .request import InvalidRequest

MASK_OVERLAP = 8  # repaint this many pixels of the old image too, so the seam is painted over
CANVAS_MULTIPLE = 8  # the VAE works on 8x8 pixel blocks


OUTPAINT_MASK_BLUR = 0  # the mask fades across the overlap itself; a Gaussian blur would reach the kept area


def canvas_sides(width: int, height: int, *, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0) -> dict[str, int]:
    """The pixels actually added on each side of a width x height image: the requested ones, plus
    up to 7 more so the canvas is a multiple of 8 (the model then works at the canvas's own size
    and no original pixel is resampled). The extra goes to the right/bottom, or to the left/top
    when only those are extended, so only sides the caller asked to grow are painted. The
    original sits at (left, top) of the result."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"outpaint {name}={value!r}: expected a whole number of pixels >= 0")
    if not any(sides.values()):
        raise InvalidRequest("outpaint needs at least one of left, right, top, bottom > 0")
    for before, after, size in (("left", "right", width), ("top", "bottom", height)):
        extra = -(sides[before] + size + sides[after]) % CANVAS_MULTIPLE
        sides[after if sides[after] or not sides[before] else before] += extra
    return sides


def extend_canvas(image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0,
                  bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image placed on a canvas grown by `canvas_sides(...)`, and the
    inpainting mask (white = paint).

    The new area is pre-filled by stretching the edge pixels, so the model starts from matching
    colours. The mask is white over the new area and fades linearly to black across the
    `MASK_OVERLAP` pixels of the original next to it: the seam is painted over and blended, and
    every original pixel beyond the overlap is kept bit for bit when the mask is used unblurred
    (mask_blur=OUTPAINT_MASK_BLUR, as `Pipeline.outpaint` does).
    """
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
    h, w = rgb.shape[:2]
    sides = canvas_sides(w, h, left=left, right=right, top=top, bottom=bottom)
    left, right, top, bottom = sides["left"], sides["right"], sides["top"], sides["bottom"]
    canvas = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")

    # The kept rectangle: the original minus the overlap on each extended side.
    o = MASK_OVERLAP
    keep_x0, keep_x1 = left + (o if left else 0), left + w - (o if right else 0)
    keep_y0, keep_y1 = top + (o if top else 0), top + h - (o if bottom else 0)
    xs, ys = np.arange(canvas.shape[1]), np.arange(canvas.shape[0])
    dx = np.maximum(np.maximum(keep_x0 - xs, xs - (keep_x1 - 1)), 0)  # (W,) pixels outside the rectangle
    dy = np.maximum(np.maximum(keep_y0 - ys, ys - (keep_y1 - 1)), 0)  # (H,)
    distance = np.maximum(dy[:, None], dx[None, :])  # (H, W) chessboard distance to the kept rectangle
    alpha = np.clip(distance / (o + 1), 0.0, 1.0)  # 0 kept, (0, 1) across the overlap, 1 on the new area
    mask = np.round(alpha * 255).astype(np.uint8)
    return Image.fromarray(canvas), Image.fromarray(mask)
