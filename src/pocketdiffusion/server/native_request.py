"""The native job API's request body: `GenerationRequest`'s own fields (see its docs), images as
base64, plus `outpaint` margins and a `model` name. Unlike the A1111 endpoints, unknown fields
are an error (422): this API is ours, and a misspelt option silently ignored is a wrong picture."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipelines.outpaint import OUTPAINT_MASK_BLUR, extend_canvas
from ..pipelines.request import GenerationRequest, InvalidRequest
from .codec import decode_image
from .errors import RequestError
from .limits import check_canvas, check_request
from .models import ModelList
from .settings import Limits

IMG2IMG_STRENGTH = 0.75  # the Python API's defaults: edit() 0.75, inpaint()/outpaint() 1.0
INPAINT_STRENGTH = 1.0
INPAINT_MASK_BLUR = 4


class Outpaint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    left: int = Field(0, ge=0)
    right: int = Field(0, ge=0)
    top: int = Field(0, ge=0)
    bottom: int = Field(0, ge=0)


class JobRequest(BaseModel):
    """txt2img without `init_image`; img2img with it; inpainting with `mask` (white = repaint)
    too; outpainting with `init_image` and `outpaint` margins (the server builds the canvas and
    its mask)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 7.5
    sampler: str = Field("euler", description="ours ('dpmpp_2m') or A1111's ('DPM++ 2M Karras'); "
                                              "see /sdapi/v1/samplers")
    seed: int | None = Field(0, description="null picks a random seed (reported in the result); image i uses seed + i")
    width: int | None = Field(None, description="a multiple of 8; null: the model's native size or the image's")
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int | None = None
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    init_image: str | None = Field(None, description="base64 image to rework (img2img, inpainting, outpainting)")
    strength: float | None = Field(None, description="0 keeps the image, 1 repaints; default 0.75, or 1.0 with a "
                                                     "mask or outpaint")
    resize_mode: Literal["just_resize", "crop", "fill"] = "just_resize"
    mask: str | None = Field(None, description="base64 mask, white (or opaque) = repaint")
    mask_blur: int | None = Field(None, description="default 4, or 0 for outpainting")
    inpaint_only_masked: bool = False
    only_masked_padding: int = 32
    inpainting_fill: Literal["original", "latent_noise"] | None = Field(
        None, description="default original, or latent_noise for outpainting")
    outpaint: Outpaint | None = None
    model: str | None = Field(None, description="a model name of /api/v1/models; null: the server's current model")


def to_generation(body: JobRequest, models: ModelList, current_model: str,
                  limits: Limits) -> tuple[GenerationRequest, str]:
    model = models.check(body.model or current_model)
    fields: dict[str, Any] = body.model_dump(exclude={"init_image", "mask", "outpaint", "model", "strength",
                                                      "mask_blur", "inpainting_fill"})
    init = decode_image(body.init_image, "init_image", limits.max_side) if body.init_image is not None else None
    mask = decode_image(body.mask, "mask", limits.max_side) if body.mask is not None else None
    painting = mask is not None or body.outpaint is not None
    if body.outpaint is not None:
        if init is None:
            raise RequestError("outpaint: needs init_image, the picture to extend")
        if mask is not None:
            raise RequestError("outpaint: the server makes the mask of the new area; send no mask with it")
        try:
            init, mask = extend_canvas(init, **body.outpaint.model_dump())
        except InvalidRequest as error:
            raise RequestError(str(error)) from None
        check_canvas(init, "outpaint", limits)
    fields.update(init_image=init, mask=mask,
                  strength=_default(body.strength, INPAINT_STRENGTH if painting else IMG2IMG_STRENGTH),
                  mask_blur=_default(body.mask_blur, OUTPAINT_MASK_BLUR if body.outpaint else INPAINT_MASK_BLUR),
                  inpainting_fill=_default(body.inpainting_fill, "latent_noise" if body.outpaint else "original"))
    return check_request(GenerationRequest(**fields), limits), model


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
