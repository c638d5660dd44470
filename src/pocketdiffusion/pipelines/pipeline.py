"""`Pipeline`: the product surface over one loaded model. `run(request)` is the iterator form
(one `Step` per denoising step; stop iterating to cancel); `generate`, `edit`, `inpaint` and
`outpaint` are the one-call forms returning PIL images."""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..checkpoints import Components
from ..sampling import sampler_spec
from .base import Schedule, build_denoiser, denoise, encode_prompt, make_generators
from .img2img import prepare_img2img
from .inpaint import prepare_inpaint
from .previews import Previewer
from .request import GenerationRequest, InvalidRequest, Result, Step
from .stages import Prepared, Setup
from .txt2img import prepare_txt2img

A1111_SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "ddim": "DDIM",
                       "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE",
                       "unipc": "UniPC", "lcm": "LCM"}
PREPARE = {"txt2img": prepare_txt2img, "img2img": prepare_img2img, "inpaint": prepare_inpaint}


class Run:
    """One request in progress. Iterate it for `Step`s; after the last one `result` is set.
    Stopping the iteration early cancels the run (no result)."""

    def __init__(self, pipe: "Pipeline", request: GenerationRequest):
        request.validate()
        self.pipe, self.request = pipe, request
        try:
            self.spec, karras = sampler_spec(request.sampler)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        self.karras = bool(karras)
        self.width, self.height = pipe.output_size(request)
        self.first_seed = request.seed if request.seed is not None else random.randrange(2 ** 32)
        self.result: Result | None = None

    @property
    def total_steps(self) -> int:
        """Denoising steps of the whole run (all batches); img2img runs only its strength's share."""
        return len(self._sigmas_for_mode()) * self.request.batch_count

    def _sigmas_for_mode(self) -> list[int]:
        from .img2img import strength_start
        steps = self.request.steps
        start = 0 if self.request.mode == "txt2img" else strength_start(steps, self.request.strength)
        return list(range(start, steps))

    def __iter__(self) -> Iterator[Step]:
        pipe, request = self.pipe, self.request
        parts = pipe.parts
        conditioning = encode_prompt(parts, request)
        sigmas = pipe.schedule.sigmas(self.spec, self.karras, request.steps)
        images, seeds = [], []
        index, total = 0, self.total_steps
        for batch in range(request.batch_count):
            batch_seeds = [self.first_seed + batch * request.batch_size + i for i in range(request.batch_size)]
            setup = Setup(parts, request, self.spec, pipe.schedule, sigmas, batch_seeds, make_generators(batch_seeds),
                          self.width, self.height)
            with torch.inference_mode():
                prepared: Prepared = PREPARE[request.mode](setup)
            denoiser = build_denoiser(parts, request, conditioning, len(batch_seeds), self.width, self.height,
                                      self.spec, concat=prepared.concat)
            if prepared.wrap is not None:
                denoiser = prepared.wrap(denoiser)
            x = prepared.x
            if len(prepared.sigmas) > 1:
                for sampler_step in denoise(self.spec, denoiser, x, prepared.sigmas, setup.generators[0]):
                    x = sampler_step.x
                    yield Step(index=index, total=total, batch=batch, latents=x, denoised=sampler_step.denoised,
                               sigma=float(sampler_step.sigma), _preview=pipe.previewer)
                    index += 1
            with torch.inference_mode():
                images += prepared.finish(x)
            seeds += batch_seeds
        self.result = Result(images=images, seeds=seeds,
                             parameters=[self.pipe.infotext(request, s, self.width, self.height) for s in seeds],
                             request=request)

    def wait(self) -> Result:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Pipeline:
    """A loaded model ready to generate. Build it with `pocketdiffusion.load(...)`."""

    def __init__(self, parts: Components, name: str | None = None):
        self.parts = parts
        self.name = name or parts.source
        self.previewer = Previewer(parts)
        self.schedule = Schedule.of(parts)

    @property
    def config(self):
        return self.parts.config

    def output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(width, height) the model works at: the request's, else the init image's rounded down to
        a multiple of 8 (img2img / plain inpainting), else the model's native size."""
        native = self.parts.config.native_size
        if request.width is not None and request.height is not None:
            return request.width, request.height
        source = request.init_image if request.mode != "txt2img" and not request.inpaint_only_masked else None
        if source is None:
            return request.width or native, request.height or native
        w, h = source.size
        if w < 8 or h < 8:
            raise InvalidRequest(f"the init image is {w}x{h}: at least 8x8 pixels are needed")
        return request.width or w // 8 * 8, request.height or h // 8 * 8

    def run(self, request: GenerationRequest) -> Run:
        """The iterator form: `for step in pipe.run(req): ...`, then `run.result`."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"run() takes a GenerationRequest, got {type(request).__name__}")
        return Run(self, request)

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 30, cfg: float = 7.5,
                 sampler: str = "euler", seed: int | None = 0, width: int | None = None,
                 height: int | None = None, **options: Any) -> list[Image.Image]:
        """txt2img. `options`: any other GenerationRequest field (batch_size, clip_skip, ...)."""
        return self._call(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                          sampler=sampler, seed=seed, width=width, height=height, **options)

    def edit(self, image: Image.Image, prompt: str, strength: float = 0.75, **options: Any) -> list[Image.Image]:
        """img2img: rework `image` toward `prompt`; strength 0 keeps it, 1 repaints it fully."""
        _require_image(image, "image")
        return self._call(init_image=image, prompt=prompt, strength=strength, **options)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, strength: float = 1.0,
                **options: Any) -> list[Image.Image]:
        """Repaint where `mask` is white (or, for an RGBA mask, where it is opaque)."""
        _require_image(image, "image")
        _require_image(mask, "mask")
        return self._call(init_image=image, mask=mask, prompt=prompt, strength=strength, **options)

    def outpaint(self, image: Image.Image, prompt: str, *, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, **options: Any) -> list[Image.Image]:
        """Extend the canvas by the given pixels on each side and paint the new area."""
        from .outpaint import extend_canvas
        _require_image(image, "image")
        canvas, mask = extend_canvas(image, left=left, right=right, top=top, bottom=bottom)
        options.setdefault("inpainting_fill", "latent_noise")
        return self.inpaint(canvas, mask, prompt, **options)

    def _call(self, **fields: Any) -> list[Image.Image]:
        try:
            request = GenerationRequest(**fields)
        except TypeError as e:
            raise TypeError(f"{e}; see GenerationRequest for the accepted options") from None
        return self.run(request).wait().images

    def infotext(self, request: GenerationRequest, seed: int, width: int, height: int) -> dict[str, Any]:
        """A1111's infotext fields for one image (metadata.format_parameters)."""
        spec, karras = sampler_spec(request.sampler)
        params: dict[str, Any] = {
            "Prompt": request.prompt, "Negative prompt": request.negative_prompt,
            "Steps": request.steps, "Sampler": A1111_SAMPLER_NAMES[spec.name],
            "Schedule type": "Karras" if karras else None, "CFG scale": request.cfg, "Seed": seed,
            "Size": f"{width}x{height}", "Model": self.name,
            "Denoising strength": request.strength if request.mode != "txt2img" else None,
            "Clip skip": request.clip_skip,
            "Mask blur": request.mask_blur if request.mode == "inpaint" else None,
            "Inpaint area": "Only masked" if request.mode == "inpaint" and request.inpaint_only_masked else None,
            "Version": f"pocketdiffusion {__version__}",
        }
        return params


def _require_image(value: Any, name: str) -> None:
    if not isinstance(value, Image.Image):
        raise TypeError(f"{name} must be a PIL image, got {type(value).__name__}")
