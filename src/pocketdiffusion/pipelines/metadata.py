"""Generation parameters as AUTOMATIC1111's "infotext", the de-facto standard other tools read.

An infotext is the text A1111 stores in a PNG's `parameters` chunk and shows under each image:

    a red circle, (masterpiece:1.2)
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768

Writing it the way A1111 does means A1111, Forge, ComfyUI loaders, Civitai and image viewers
read our images' settings back; reading it means "reuse the settings of this image" works on
images made by any of them.

Ported from AUTOMATIC1111/stable-diffusion-webui (v1.10):
  - `format_parameters`: modules/processing.py `create_infotext` and modules/infotext_utils.py
    `quote`;
  - `parse_parameters`: modules/infotext_utils.py `parse_generation_parameters`, without the UI
    defaults it fills in for its own widgets (Hires, Mask mode, RNG, ...), styles and hypernets.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import IO, Any, Union

from PIL import Image, UnidentifiedImageError

from pocketdiffusion import __version__
from pocketdiffusion.errors import PocketDiffusionError

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]

INFOTEXT_VERSION = f"pocketdiffusion {__version__}"
"""The `Version` value we write (A1111 writes its git tag there, e.g. `v1.10.1`)."""

PNG_PARAMETERS_KEY = "parameters"  # the tEXt/iTXt key A1111 writes and reads

# The fields `create_infotext` writes, in its order. Keys a caller adds that are not here
# (A1111's `extra_generation_params`: Mask blur, Hires upscale, Lora hashes, ...) follow
# `Tiling` in the caller's order; `Version` and `User` always come last, as in A1111.
_A1111_LEADING_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
    "Face restoration", "Size", "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA",
    "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
_A1111_TRAILING_KEYS = ("Version", "User")
_PROMPT_KEYS = ("Prompt", "Negative prompt")

# https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/v1.10.1/modules/infotext_utils.py#L16
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_KEY = re.compile(r"\w[\w \-/]+")
_NEGATIVE_PROMPT_PREFIX = "Negative prompt:"
# A1111 only treats the last line as parameters when it holds at least this many fields.
_MIN_PARAMETER_FIELDS = 3


class ImageMetadataError(PocketDiffusionError, ValueError):
    """An image (or file) that holds no readable generation parameters."""


def _quote(value: Any) -> str:
    """A1111's `quote()`: JSON-quote a value that would otherwise break the `key: value, ` line.

    A1111 quotes on `,`, `:` and newline. We also quote on `"` and on leading/trailing spaces:
    A1111 writes those raw and then reads them back changed (`"x"` unquotes to `x`, spaces are
    eaten by its regex), so quoting them is the only way to round-trip; A1111 reads ours fine.
    """
    text = str(value)
    needs_quotes = any(c in text for c in ',:\n"') or text != text.strip()
    return json.dumps(text, ensure_ascii=False) if needs_quotes else text


def _unquote(text: str) -> str:
    """A1111's `unquote()`: undo `_quote`, leaving text that is not valid JSON as it was."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _size_text(key: str, value: Any) -> Any:
    """Accept `Size` as (width, height) as well as A1111's "WxH" text."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(
                f"{key!r} must be 'WIDTHxHEIGHT' or a (width, height) pair of ints, got {value!r}"
            )
        return f"{value[0]}x{value[1]}"
    return value


def _merge_split_pairs(fields: dict[str, Any]) -> dict[str, Any]:
    """Rejoin `Size-1`/`Size-2` (what `parse_parameters` produces) into `Size: WxH`.

    So that a parsed dict can be edited and formatted again; applies to every `K-1`/`K-2` pair,
    because A1111's parser splits every `WxH` value (`Seed resize from`, `Hires resize`, ...).
    """
    merged: dict[str, Any] = {}
    for key, value in fields.items():
        base = key[:-2]
        if key.endswith("-1") and f"{base}-2" in fields and base not in fields:
            merged[base] = f"{value}x{fields[f'{base}-2']}"
        elif key.endswith("-2") and f"{base}-1" in fields and base not in fields:
            continue  # written with its -1 partner
        else:
            merged[key] = value
    return merged


def _ordered_fields(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    """Fields in `create_infotext`'s order: its fixed keys, then extras, then Version/User."""
    leading = [(k, fields[k]) for k in _A1111_LEADING_KEYS if k in fields]
    trailing = [(k, fields[k]) for k in _A1111_TRAILING_KEYS if k in fields]
    known = set(_A1111_LEADING_KEYS) | set(_A1111_TRAILING_KEYS)
    extras = [(k, v) for k, v in fields.items() if k not in known]
    return leading + extras + trailing


def _is_default_clip_skip(value: Any) -> bool:
    """A1111 writes `Clip skip` only when it is above 1 (and its parser defaults it to 1)."""
    try:
        return int(str(value)) <= 1
    except ValueError:
        return False


def format_parameters(params: dict[str, Any]) -> str:
    """The A1111 infotext for `params` (A1111 key names, plus "Prompt" and "Negative prompt").

    Line 1.. the prompt; then `Negative prompt: ...` if it is not empty; then one line of
    `Key: value` fields in A1111's order. Keys whose value is None are left out, as in
    `create_infotext`; "Clip skip" of 1 is left out (A1111's default). `Size` may be "WxH" or
    (width, height). A parsed dict's `Size-1`/`Size-2` are written back as `Size`.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of A1111 field names to values, got {type(params).__name__}")
    prompt = params.get("Prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"params['Prompt'] must be the prompt text (str), got {prompt!r}")
    negative = params.get("Negative prompt") or ""
    if not isinstance(negative, str):
        raise ValueError(f"params['Negative prompt'] must be text (str) or None, got {negative!r}")

    fields: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str) or not _RE_KEY.fullmatch(key):
            raise ValueError(
                f"parameter name {key!r} cannot be written in an infotext: names are 2+ characters,"
                " start with a letter or digit and hold only letters, digits, spaces, '-' and '/'"
            )
        if key in _PROMPT_KEYS or value is None:
            continue
        if key == "Clip skip" and _is_default_clip_skip(value):
            continue
        fields[key] = _size_text(key, value)
    fields = _merge_split_pairs(fields)

    # A1111 writes a field whose value equals its own name as the bare name (`k if k == v`).
    line = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in _ordered_fields(fields))
    if len(_RE_PARAM.findall(line)) < _MIN_PARAMETER_FIELDS:
        raise ValueError(
            f"an infotext needs at least {_MIN_PARAMETER_FIELDS} parameter fields besides the prompts"
            f" (A1111 reads a shorter last line as part of the prompt); got {list(fields)}"
        )
    negative_text = f"\n{_NEGATIVE_PROMPT_PREFIX} {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 infotext into {field: text}, as A1111's `parse_generation_parameters` does.

    Values stay text (A1111 converts them per UI widget). Always returns "Prompt" and
    "Negative prompt"; a `WxH` value becomes `K-1`/`K-2` (`Size-1`: "512", `Size-2`: "768");
    a missing "Clip skip" means 1. A last line with fewer than 3 fields is read as prompt text.
    """
    if not isinstance(text, str):
        raise TypeError(f"infotext must be str, got {type(text).__name__}")
    *lines, last_line = text.strip().split("\n")
    if len(_RE_PARAM.findall(last_line)) < _MIN_PARAMETER_FIELDS:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PROMPT_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _RE_PARAM.findall(last_line):
        # An empty value (`Key: ,`) is kept as ""; A1111 drops that field (its `v[0]` raises).
        value = _unquote(value)
        size = _RE_IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result.setdefault("Clip skip", "1")
    return result


def _open_image(path_or_file: PathOrFile) -> Image.Image:
    if not isinstance(path_or_file, (str, os.PathLike)) and not hasattr(path_or_file, "read"):
        raise TypeError(f"expected an image path or a binary file object, got {type(path_or_file).__name__}")
    try:
        return Image.open(path_or_file)
    except UnidentifiedImageError as exc:
        raise ImageMetadataError(
            f"{_describe(path_or_file)} is not a readable image (not an image at all, or a truncated"
            " or corrupt one); expected a PNG"
        ) from exc
    except IsADirectoryError as exc:
        raise ImageMetadataError(f"{_describe(path_or_file)} is a folder; expected a PNG file") from exc


def _describe(path_or_file: PathOrFile) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return f"'{os.fspath(path_or_file)}'"
    return f"file {getattr(path_or_file, 'name', '<stream>')!r}"


def read_png_infotext(path_or_file: PathOrFile) -> str:
    """The raw `parameters` text of a PNG (tEXt, zTXt or iTXt chunk), exactly as stored.

    A chunk before the pixel data (where A1111 and we write it) is read without decoding the
    pixels, so it is found even in a file whose pixel data is cut off; looking for one after
    the pixel data reads the whole file, and a truncated one is then reported.
    """
    with _open_image(path_or_file) as image:
        where = _describe(path_or_file)
        if image.format != "PNG":
            raise ImageMetadataError(
                f"{where} is a {image.format} image; generation parameters are read from PNG files only"
            )
        # Text chunks before the pixel data are in `info` without decoding the image; `text`
        # also finds chunks after it, but has to read (and so check) the whole file.
        if PNG_PARAMETERS_KEY in image.info:
            return str(image.info[PNG_PARAMETERS_KEY])
        try:
            chunks = dict(image.text)
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise ImageMetadataError(f"{where} is a truncated or corrupt PNG: {exc}") from exc
    if PNG_PARAMETERS_KEY in chunks:
        return str(chunks[PNG_PARAMETERS_KEY])
    comfy = [key for key in ("prompt", "workflow") if key in chunks]
    if comfy:
        raise ImageMetadataError(
            f"{where} has no generation parameters: it holds a ComfyUI node graph"
            f" ({' and '.join(repr(k) for k in comfy)} chunks), not an A1111 'parameters' text"
        )
    found = f" (its text chunks: {sorted(chunks)})" if chunks else ""
    raise ImageMetadataError(
        f"{where} has no generation parameters: no '{PNG_PARAMETERS_KEY}' text chunk{found}"
    )


def read_png_parameters(path_or_file: PathOrFile) -> dict[str, str]:
    """The generation parameters stored in a PNG by us, A1111, Forge or compatible tools."""
    return parse_parameters(read_png_infotext(path_or_file))


_HASH_CHUNK_BYTES = 1 << 20  # checkpoint files are GBs: never read one whole into memory


def model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's "Model hash": the first 10 hex digits of the SHA-256 of the whole file.

    The current A1111 short hash (modules/hashes.py `sha256` + `[0:10]`), the same that
    Civitai lists as "AutoV2"; not the legacy 8-digit hash of a 64 KiB slice.
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"'{file}' is a folder; the model hash is taken of a single model file")
    if not file.is_file():
        raise FileNotFoundError(f"model file '{file}' does not exist")
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()[:10]
