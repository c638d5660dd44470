"""Writing result images: PNGs that carry their generation parameters, named like A1111's.

A PNG is written atomically (a temp file in the same folder, fsync, then a rename), so a crash,
a full disk or Ctrl-C mid-save never leaves a half-written image under the final name, and an
existing file is never overwritten unless asked.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pocketdiffusion.pipelines.metadata import PNG_PARAMETERS_KEY, format_parameters

_SLUG_MAX_CHARS = 60
_COUNTER_DIGITS = 5
# A1111's counter prefix: `00012-...`. Five digits at least, so that names such as
# `2024-05-01.png` in the same folder are not taken for counters.
_RE_COUNTER = re.compile(rf"^(\d{{{_COUNTER_DIGITS},}})-")
_RE_UNSAFE_RUN = re.compile(r"[^\w\-]+")  # anything but letters, digits, '_' and '-'


def save_png(
    image: Image.Image, params: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write `image` to `path` as a PNG whose `parameters` chunk is `format_parameters(params)`.

    Like A1111 (modules/images.py `save_image_with_geninfo`), the text goes in through
    `PngInfo.add_text`: a tEXt chunk, or iTXt when it is not Latin-1. The parent folder is
    created if missing. Raises FileExistsError if `path` exists and `overwrite` is False.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"save_png writes PNG files; the path must end in '.png', got '{target}'")
    if target.is_dir():
        raise IsADirectoryError(f"'{target}' is a folder; expected the path of the PNG file to write")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"'{target}' already exists; pass overwrite=True to replace it, or pick another name"
        )

    png_info = PngInfo()
    png_info.add_text(PNG_PARAMETERS_KEY, format_parameters(params))  # bad params fail before any file exists
    target.parent.mkdir(parents=True, exist_ok=True)

    temp = _create_temp_file(target)
    try:
        with open(temp, "wb") as f:
            try:
                image.save(f, format="PNG", pnginfo=png_info)
            except OSError as exc:
                if not str(exc).startswith("cannot write mode"):
                    raise  # a real I/O error (disk full, ...): keep it as it is
                raise ValueError(
                    f"a {image.mode} image cannot be stored as PNG; convert it to RGB or RGBA"
                ) from exc
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        _move_into_place(temp, target, overwrite)
    except BaseException:  # KeyboardInterrupt too: never leave the temp file behind
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def _create_temp_file(target: Path) -> Path:
    """An empty, new, hidden file next to `target` (same filesystem, so the rename is atomic).

    Created with mode 0o666 like `open()` would, so the umask applies and the final image gets
    the usual permissions (tempfile.mkstemp would make it private, 0o600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temp, flags, 0o666))
            return temp
        except FileExistsError:
            continue  # a leftover from another process with the same random suffix: pick another


def _move_into_place(temp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, target)
        return
    # A hard link fails if `target` appeared since our check, so two writers never clobber
    # each other; the rename fallback is for filesystems without hard links (FAT, some mounts).
    raced = FileExistsError(f"'{target}' already exists (created while saving); pick another name")
    try:
        os.link(temp, target)
    except FileExistsError:
        raise raced from None
    except OSError:
        if target.exists():
            raise raced from None
        os.replace(temp, target)
        return
    temp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); a power cut could otherwise forget the new name."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the file itself is synced
            os.fsync(fd)
    finally:
        os.close(fd)


def prompt_slug(prompt: str, max_chars: int = _SLUG_MAX_CHARS) -> str:
    """A filesystem-safe slug of the prompt's first words: `a red circle, 4k` -> `a_red_circle_4k`.

    Runs of anything but letters (any script), digits, '_' and '-' become one '_'; cut at a word
    boundary to at most `max_chars`.
    """
    slug = _RE_UNSAFE_RUN.sub("_", prompt).strip("_-")
    if len(slug) <= max_chars:
        return slug
    cut = slug[: max_chars + 1]
    boundary = cut.rfind("_")
    slug = cut[:boundary] if boundary > 0 else slug[:max_chars]  # one long word: cut it
    return slug.strip("_-")


def next_output_path(folder: str | os.PathLike[str], seed: int, prompt: str, ext: str = "png") -> Path:
    """The next free A1111-style output name in `folder`: `00012-42-a_red_circle_on.png`.

    The counter is 1 + the highest counter already in the folder (00000 in an empty one), as
    A1111's `get_next_sequence_number`; the folder is created if missing. The name is free now;
    `save_png(..., overwrite=False)` still refuses it if another writer takes it first.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be the resolved seed, an int >= 0, got {seed!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
    extension = ext.lstrip(".") if isinstance(ext, str) else ""
    if not extension.isalnum():
        raise ValueError(f"ext must be a file extension such as 'png', got {ext!r}")

    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"'{out}' is a file; expected the output folder")
    out.mkdir(parents=True, exist_ok=True)
    counters = [int(m.group(1)) for name in os.listdir(out) if (m := _RE_COUNTER.match(name))]
    counter = max(counters, default=-1) + 1
    slug = prompt_slug(prompt)
    while True:
        stem = f"{counter:0{_COUNTER_DIGITS}d}-{seed}" + (f"-{slug}" if slug else "")
        candidate = out / f"{stem}.{extension}"
        if not candidate.exists():
            return candidate
        counter += 1
