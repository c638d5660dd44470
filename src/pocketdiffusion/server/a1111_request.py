"""AUTOMATIC1111's API request bodies and their mapping onto `GenerationRequest`.

The field names, meanings and defaults are A1111's (modules/api/models.py, generated from
modules/processing.py `StableDiffusionProcessingTxt2Img/Img2Img`), so a client script written
for A1111 sends the same JSON here. Fields pocketdiffusion has no use for (hires fix, face
restoration, scripts, ...) are accepted and ignored: silently at A1111's default value, with a
warning in the response's `info` otherwise, never a 422, as A1111's own extensions would be."""
from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..cli_from import sampler_with_schedule
from ..pipelines.request import GenerationRequest
from .codec import decode_image
from .errors import RequestError
from .limits import check_request
from .models import ModelList
from .settings import Limits

RANDOM_SEED = -1  # A1111's "pick one"
A1111_RESIZE_MODES = {0: "just_resize", 1: "crop", 2: "fill"}  # 3 = "just resize (latent upscale)"
A1111_FILLS = {1: "original", 2: "latent_noise"}  # 0 = "fill" (blurred colours), 3 = "latent nothing"
# A1111 fields we do not implement, at the value that means "off": ignored without a warning.
QUIET_DEFAULTS: dict[str, Any] = {
    "subseed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "s_noise": 1.0, "hr_scale": 2.0,
    "mask_blur_x": 4, "mask_blur_y": 4, "mask_round": True, "initial_noise_multiplier": 1.0,
    "include_init_images": False, "hr_upscaler": "Latent",
}
SCHEDULES = {"": "Automatic", "automatic": "Automatic", "karras": "Karras"}  # A1111 sends name or label
OPTION_MODEL = "sd_model_checkpoint"  # A1111's option names, in /options and override_settings
OPTION_CLIP_SKIP = "CLIP_stop_at_last_layers"


class A1111Generation(BaseModel):
    """Fields txt2img and img2img share. `width`/`height` left out: the model's native size
    (A1111: 512), or for img2img the init image's."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(RANDOM_SEED, description="-1 picks a random seed; image i uses seed + i")
    sampler_name: str | None = Field(None, description="an A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M'")
    sampler_index: str | None = Field(None, description="older A1111 clients' name for sampler_name")
    scheduler: str | None = Field(None, description="'Automatic' or 'Karras' (A1111 >= 1.9)")
    batch_size: int = 1
    n_iter: int = Field(1, description="batches, one after another")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = Field(
        None, description=f"'{OPTION_MODEL}' (a model name of /sd-models) and '{OPTION_CLIP_SKIP}' apply")
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(A1111Generation):
    pass


class Img2ImgRequest(A1111Generation):
    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    denoising_strength: float = 0.75
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill")
    mask: str | None = Field(None, description="base64 mask, white = repaint; with it img2img inpaints")
    mask_blur: int = 4
    inpainting_fill: int = Field(0, description="1 original, 2 latent noise (0 fill and 3 latent nothing are "
                                                "run as 1 and 2, with a warning)")
    inpaint_full_res: bool = Field(True, description="inpaint only the masked area, at the working size")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, description="1: repaint where the mask is black")


def to_generation(body: A1111Generation, models: ModelList, current_model: str,
                  limits: Limits) -> tuple[GenerationRequest, str, list[str]]:
    """(request, model name, warnings) for an A1111 txt2img or img2img body; RequestError on bad input."""
    warnings = _ignored_fields(body)
    overrides = dict(body.override_settings or {})
    model = models.check(overrides.pop(OPTION_MODEL, None) or current_model)
    clip_skip = overrides.pop(OPTION_CLIP_SKIP, None)
    warnings += [f"override_settings[{key!r}] ignored: pocketdiffusion does not have this option"
                 for key in overrides]
    if body.save_images:
        warnings.append("save_images ignored: the server returns images, it does not write them to disk")
    fields: dict[str, Any] = dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, cfg=body.cfg_scale,
        sampler=_sampler(body, warnings), seed=None if body.seed == RANDOM_SEED else body.seed,
        width=body.width, height=body.height, batch_size=body.batch_size, batch_count=body.n_iter,
        clip_skip=None if clip_skip in (None, 1) else clip_skip)
    if isinstance(body, Img2ImgRequest):
        fields.update(_img2img_fields(body, limits, warnings))
    return check_request(GenerationRequest(**fields), limits), model, warnings


def _sampler(body: A1111Generation, warnings: list[str]) -> str:
    name = body.sampler_name or body.sampler_index or "Euler"
    schedule = body.scheduler or ""
    try:
        return sampler_with_schedule(name, SCHEDULES.get(schedule.lower(), schedule), "the request",
                                     warnings.append)
    except ValueError as error:
        raise RequestError(f"sampler_name: {error}") from None


def _img2img_fields(body: Img2ImgRequest, limits: Limits, warnings: list[str]) -> dict[str, Any]:
    if not body.init_images:
        raise RequestError("init_images: img2img needs at least one base64 image")
    if len(body.init_images) > 1:
        warnings.append(f"init_images: {len(body.init_images)} images sent, the first is used")
    init = decode_image(body.init_images[0], "init_images[0]", limits.max_side)
    resize_mode = A1111_RESIZE_MODES.get(body.resize_mode)
    if resize_mode is None:
        if body.resize_mode != 3:
            raise RequestError(f"resize_mode={body.resize_mode}: expected 0 (just resize), 1 (crop and resize), "
                               "2 (resize and fill) or 3 (latent upscale)")
        warnings.append("resize_mode 3 (latent upscale) is run as 0 (just resize)")
        resize_mode = "just_resize"
    fields: dict[str, Any] = dict(init_image=init, strength=body.denoising_strength, resize_mode=resize_mode)
    if body.mask is None:
        return fields
    mask = decode_image(body.mask, "mask", limits.max_side)
    if body.inpainting_mask_invert:
        mask = _inverted(mask)
    fill = A1111_FILLS.get(body.inpainting_fill)
    if fill is None:
        if body.inpainting_fill not in (0, 3):
            raise RequestError(f"inpainting_fill={body.inpainting_fill}: expected 0 (fill), 1 (original), "
                               "2 (latent noise) or 3 (latent nothing)")
        fill = "original" if body.inpainting_fill == 0 else "latent_noise"
        if "inpainting_fill" in body.model_fields_set:
            warnings.append(f"inpainting_fill {body.inpainting_fill} is run as "
                            f"{1 if fill == 'original' else 2} ({fill.replace('_', ' ')})")
    return fields | dict(mask=mask, mask_blur=body.mask_blur, inpainting_fill=fill,
                         inpaint_only_masked=body.inpaint_full_res,
                         only_masked_padding=body.inpaint_full_res_padding)


def _inverted(mask: Image.Image) -> Image.Image:
    """A1111's `inpainting_mask_invert`: repaint where the mask is black. A brushed RGBA mask
    (opaque = repaint) is inverted in its alpha channel, which is what marks it."""
    if mask.mode in ("RGBA", "LA"):
        return ImageOps.invert(mask.getchannel("A"))
    return ImageOps.invert(mask.convert("L"))


def _ignored_fields(body: BaseModel) -> list[str]:
    warnings = []
    for name, value in (body.model_extra or {}).items():
        if value in (None, False, 0, "", [], {}) or QUIET_DEFAULTS.get(name, object()) == value:
            continue
        warnings.append(f"{name} ignored: pocketdiffusion does not support it")
    return warnings
