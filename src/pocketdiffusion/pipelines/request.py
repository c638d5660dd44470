"""What a user asks for (`GenerationRequest`), what each denoising step reports (`Step`) and what
comes back (`Result`). The CLI, the Python API and the server all build a GenerationRequest and
iterate a run; nothing else crosses that boundary."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import PocketDiffusionError

RESIZE_MODES = ("just_resize", "crop", "fill")
INPAINT_FILLS = ("original", "latent_noise")
PROMPT_SYNTAXES = ("a1111", "plain")
MAX_SIDE = 8192  # a larger request is a typo, not a picture; 8192^2 latents would not fit anywhere
MAX_BATCH = 64


class InvalidRequest(PocketDiffusionError, ValueError):
    """A request field is out of range or of the wrong kind."""


@dataclass
class GenerationRequest:
    """One generation. Defaults are A1111's/diffusers'. `width`/`height` None = the model's native
    size (or the init image's size for img2img and inpainting)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 7.5
    sampler: str = "euler"  # ours ("dpmpp_2m") or A1111's ("DPM++ 2M Karras")
    seed: int | None = 0  # None = a random seed, reported in the result
    width: int | None = None
    height: int | None = None
    batch_size: int = 1  # images per denoising batch (seed, seed+1, ...)
    batch_count: int = 1  # batches run one after another
    clip_skip: int | None = None  # A1111 "Clip skip": 1 = last layer, 2 = penultimate (SD1 only)
    prompt_syntax: str = "a1111"  # "a1111" weighting/BREAK/chunks, or "plain" (diffusers' encode_prompt)
    # SDXL micro-conditioning; None = (height, width), (0, 0), (height, width) as diffusers does
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    # img2img
    init_image: Image.Image | None = None
    strength: float = 0.75  # diffusers/A1111 meaning: 0.75 runs the last 75% of the schedule
    resize_mode: str = "just_resize"
    # inpainting (mask: white = repaint)
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpaint_only_masked: bool = False  # A1111 "inpaint_full_res": crop the masked box, work at native size
    only_masked_padding: int = 32
    inpainting_fill: str = "original"

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    def with_(self, **changes: Any) -> "GenerationRequest":
        return replace(self, **changes)

    def validate(self) -> None:
        """Raise InvalidRequest naming the field, the value and what is expected."""
        def bad(name: str, expected: str) -> None:
            raise InvalidRequest(f"{name}={_describe(getattr(self, name))}: expected {expected}")

        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string (an empty prompt is allowed: it generates unconditionally)")
        if not _is_int(self.steps) or self.steps <= 0:
            bad("steps", "a whole number >= 1")
        if self.steps > 1000:
            bad("steps", "at most 1000")
        if not _is_number(self.cfg) or not (0 <= self.cfg <= 100):
            bad("cfg", "a number in [0, 100]")
        if not isinstance(self.sampler, str):
            bad("sampler", "a sampler name such as 'euler' or 'DPM++ 2M Karras'")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2 ** 63)):
            bad("seed", "a whole number in [0, 2**63) or None for a random seed")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_int(value) or value <= 0 or value % 8:
                bad(name, "a positive multiple of 8 (the VAE works on 8x8 pixel blocks)")
            if value > MAX_SIDE:
                bad(name, f"at most {MAX_SIDE} pixels")
        for name in ("batch_size", "batch_count"):
            if not _is_int(getattr(self, name)) or not (1 <= getattr(self, name) <= MAX_BATCH):
                bad(name, f"a whole number in [1, {MAX_BATCH}]")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or not (1 <= self.clip_skip <= 12)):
            bad("clip_skip", "a whole number in [1, 12] (1 = last layer)")
        for name, pair in (("original_size", "(height, width)"), ("target_size", "(height, width)"),
                           ("crop_top_left", "(top, left)")):
            value = getattr(self, name)
            if value is None and name != "crop_top_left":
                continue
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)
                    and all(0 <= v <= 4 * MAX_SIDE for v in value)):
                bad(name, f"{pair} in pixels, two whole numbers in [0, {4 * MAX_SIDE}] (SDXL conditioning)")
        if not isinstance(self.inpaint_only_masked, bool):
            bad("inpaint_only_masked", "True or False")
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            bad("prompt_syntax", f"one of {PROMPT_SYNTAXES}")
        if not _is_number(self.strength) or not (0.0 <= self.strength <= 1.0):
            bad("strength", "a number in [0, 1] (0 keeps the image, 1 repaints it fully)")
        if self.resize_mode not in RESIZE_MODES:
            bad("resize_mode", f"one of {RESIZE_MODES}")
        if self.inpainting_fill not in INPAINT_FILLS:
            bad("inpainting_fill", f"one of {INPAINT_FILLS}")
        if not _is_int(self.mask_blur) or not (0 <= self.mask_blur <= 256):
            bad("mask_blur", "a whole number of pixels in [0, 256]")
        if not _is_int(self.only_masked_padding) or not (0 <= self.only_masked_padding <= 1024):
            bad("only_masked_padding", "a whole number of pixels in [0, 1024]")
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                bad(name, f"a PIL image, got {type(value).__name__} (open files with PIL.Image.open)")
        if self.mask is not None:
            if self.init_image is None:
                raise InvalidRequest("a mask was given without an image to inpaint (init_image)")
            if self.mask.size != self.init_image.size:
                raise InvalidRequest(f"mask size {self.mask.size[0]}x{self.mask.size[1]} differs from the "
                                     f"image size {self.init_image.size[0]}x{self.init_image.size[1]}; "
                                     "they must be equal")


def _describe(value: Any) -> str:
    """A short repr for an error message: numbers and text as they are, anything else by type
    (the repr of a 512x512 array or tensor would bury the message)."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80):
        return repr(value)
    if isinstance(value, (tuple, list)) and len(value) <= 4 and all(isinstance(v, (int, float, str)) for v in value):
        return repr(value)
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__}{' of shape ' + str(tuple(shape)) if shape is not None else ''}>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class Step:
    """One denoising step: `index` counts from 0 over the whole run (all batches), `total` steps."""

    index: int
    total: int
    batch: int  # which batch of batch_count
    latents: torch.Tensor  # the current latents (B, C, h, w)
    denoised: torch.Tensor  # the model's current estimate of the clean latents
    sigma: float
    _preview: Callable[[torch.Tensor], list[Image.Image]] = field(repr=False, default=None)

    def preview(self) -> list[Image.Image]:
        """Cheap preview images of the current estimate (decoded at low cost)."""
        return self._preview(self.denoised)


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[dict[str, Any]]  # A1111 infotext fields per image (metadata.format_parameters)
    request: GenerationRequest


REQUEST_FIELDS = tuple(f.name for f in fields(GenerationRequest))
