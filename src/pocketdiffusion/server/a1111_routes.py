"""`/sdapi/v1/...`: the endpoints AUTOMATIC1111's API clients call, answering in A1111's shapes
(modules/api/api.py): a generation returns `{images, parameters, info}` once its job is done;
`progress` reports the running job with its latest preview; `interrupt` stops it after the
current step (the interrupted request answers 200 with no images and `"interrupted": true`)."""
from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .. import __version__
from ..pipelines.metadata import format_parameters, parse_parameters
from ..pipelines.pipeline import A1111_SAMPLER_NAMES
from .a1111_request import (OPTION_CLIP_SKIP, OPTION_MODEL, A1111Generation, Img2ImgRequest, Txt2ImgRequest,
                            to_generation)
from .codec import decode_image, png_base64
from .errors import RequestError
from .jobs import Job
from .state import ServerState


class A1111Images(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its A1111 'parameters' text chunk")
    parameters: dict[str, Any] = Field(description="the request as received (images left out)")
    info: str = Field(description="JSON text: seeds, sizes, infotexts, warnings, interrupted")


class PngInfoRequest(BaseModel):
    image: str = Field(description="a base64 image (a data: URL prefix is allowed)")


class PngInfoResponse(BaseModel):
    info: str = Field(description="the raw A1111 'parameters' text, empty if the image has none")
    items: dict[str, Any]
    parameters: dict[str, Any]


def a1111_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible API"])
    limits = state.settings.limits

    async def generate(body: A1111Generation, request: Request) -> dict[str, Any]:
        generation, model, warnings = to_generation(body, state.models, state.current_model, limits)
        job = state.queue.submit(Job(generation, model, warnings=warnings))
        await state.wait_for(job, request)
        if job.state == "failed":
            raise RequestError(job.error or "the job failed", status=job.error_status or 500)
        images = []
        if job.state == "done" and body.send_images:
            images = [png_base64(image, params) for image, params in zip(job.result.images, job.result.parameters)]
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": images, "parameters": parameters, "info": json.dumps(_info(job, body))}

    @router.post("/txt2img", response_model=A1111Images, summary="Generate images from a prompt")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(body, request)

    @router.post("/img2img", response_model=A1111Images,
                 summary="Rework init_images[0]; with a mask, repaint where it is white (inpainting)")
    async def img2img(body: Img2ImgRequest, request: Request):
        return await generate(body, request)

    @router.get("/progress", summary="The running job's progress and latest preview")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        running = state.queue.running()
        job = running[0] if running else None
        job_count = len(running) + state.queue.waiting()
        current = None
        if job is not None and job.preview is not None and not skip_current_image:
            current = png_base64(job.preview)
        eta = job.eta() if job is not None else None
        return {
            "progress": job.progress() if job else 0.0,
            "eta_relative": eta or 0.0,
            "state": {"skipped": False, "interrupted": bool(job and job.cancel_requested),
                      "job": f"task({job.id})" if job else "", "job_count": job_count,
                      "job_timestamp": _timestamp(job.created) if job else "0", "job_no": 0,
                      "sampling_step": job.step if job else 0, "sampling_steps": job.total if job else 0},
            "current_image": current,
            "textinfo": f"step {job.step}/{job.total}" if job else None,
        }

    @router.post("/interrupt", summary="Stop the running job after its current step")
    async def interrupt() -> dict[str, Any]:
        for job in state.queue.running():
            job.cancel()
        return {}

    @router.get("/samplers", summary="The samplers, by A1111 name")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": a1111, "aliases": [ours], "options": {}} for ours, a1111 in A1111_SAMPLER_NAMES.items()]

    @router.get("/schedulers", summary="The schedules a sampler can run over")
    async def schedulers() -> list[dict[str, Any]]:
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    @router.get("/sd-models", summary="The models this server offers")
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None,
                 "filename": str(state.models.ref(name).path), "config": None} for name in state.models.names()]

    @router.get("/options", summary="The options A1111 clients read")
    async def get_options() -> dict[str, Any]:
        return {OPTION_MODEL: state.current_model, OPTION_CLIP_SKIP: 1, "samples_format": "png"}

    @router.post("/options", summary=f"Set options; '{OPTION_MODEL}' picks the model of later requests")
    async def set_options(options: dict[str, Any]) -> dict[str, Any]:
        warnings = [f"{key} ignored: pocketdiffusion does not have this option" for key in options
                    if key != OPTION_MODEL]
        if OPTION_MODEL in options:
            state.current_model = state.models.check(options[OPTION_MODEL])
        return {"warnings": warnings}

    @router.post("/png-info", response_model=PngInfoResponse, summary="The generation parameters stored in an image")
    async def png_info(body: PngInfoRequest):
        image = decode_image(body.image, "image", limits.max_side)
        items = {key: value for key, value in getattr(image, "text", {}).items() if isinstance(value, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}

    return router


def _info(job: Job, body: A1111Generation) -> dict[str, Any]:
    """A1111's `Processed.js()` fields (those clients read), plus `warnings` and `interrupted`."""
    request, result = job.request, job.result
    seeds = result.seeds if result else ([request.seed] if request.seed is not None else [-1])
    params = result.parameters if result else []
    width, height = (int(v) for v in params[0]["Size"].split("x")) if params else (request.width, request.height)
    count = len(seeds)
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": params[0]["Sampler"] if params else body.sampler_name,
        "cfg_scale": request.cfg, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": job.model, "sd_model_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.mode != "txt2img" else None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [format_parameters(p) for p in params], "styles": body.styles or [],
        "job_timestamp": _timestamp(job.created), "clip_skip": request.clip_skip or 1,
        "is_using_inpainting_conditioning": False, "version": f"pocketdiffusion {__version__}",
        "warnings": job.warnings, "interrupted": job.state == "cancelled",
    }


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))
