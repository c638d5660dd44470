"""Images across HTTP: base64 (with or without a `data:` URL prefix, as A1111 clients send
either) to PIL with the server's limits, and PIL to PNG bytes carrying A1111's `parameters`
text, as A1111's API returns them (so a saved response reads back with `png-info`)."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ..pipelines.metadata import PNG_PARAMETERS_KEY, format_parameters
from .errors import RequestError


def decode_image(data: Any, name: str, max_side: int) -> Image.Image:
    """The image in `data` (base64 text) or a 400 naming the field `name` and what is wrong.
    The size is checked from the header, before any pixel is decoded (a 100000x100000 PNG is
    a few KB of zeros: decoding first would be the attack)."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{name}: expected a base64-encoded image (PNG, JPEG or WebP), got "
                           f"{'an empty string' if data == '' else type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{name}: not valid base64 ({error})") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise RequestError(f"{name}: the {len(raw)} bytes are not an image this server reads "
                           "(PNG, JPEG, WebP, BMP, GIF)") from None
    width, height = image.size
    if width > max_side or height > max_side:
        raise RequestError(f"{name}: the image is {width}x{height}; this server takes images up to "
                           f"{max_side} pixels a side", status=413)
    if width < 1 or height < 1:
        raise RequestError(f"{name}: the image is empty ({width}x{height})")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"{name}: a truncated or corrupt image ({error})") from None
    return image


def png_bytes(image: Image.Image, params: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of `image`, with `format_parameters(params)` as its `parameters` chunk if given."""
    info = None
    if params is not None:
        info = PngInfo()
        info.add_text(PNG_PARAMETERS_KEY, format_parameters(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image: Image.Image, params: dict[str, Any] | None = None) -> str:
    return base64.b64encode(png_bytes(image, params)).decode("ascii")
