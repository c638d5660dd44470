"""`Pipeline`: the product surface over one loaded model. `run(request)` is the iterator form
(one `Step` per denoising step; stop iterating to cancel); `generate`, `edit`, `inpaint` and
`outpaint` are the one-call forms returning PIL images."""
from __future__ import annotations

import contextlib
import difflib
import random
import warnings
from typing import Any, Iterator

import torch
from PIL import Image

from .. import __version__
from ..checkpoints import Components
from ..memory.plan import MemoryFallbackWarning, MemoryPlan, is_out_of_memory, lower_plan
from ..sampling import SamplerStep, sampler_spec
from .base import Schedule, build_denoiser, denoise, encode_images, encode_prompt, make_generators, model_call
from .img2img import prepare_img2img, strength_start
from .inpaint import prepare_inpaint
from .outpaint import OUTPAINT_MASK_BLUR, extend_canvas
from .previews import Previewer
from .request import MAX_SIDE, REQUEST_FIELDS, GenerationRequest, InvalidRequest, Result, Step
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
        # A copy: changing the caller's request while this run goes on must not change the run.
        self.pipe, self.request = pipe, request.with_()
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
        """Denoising steps of the whole run (all batches): img2img and inpainting run only their
        strength's share of `steps` (the same slice their prepare_* functions take)."""
        steps = self.request.steps
        start = 0 if self.request.mode == "txt2img" else strength_start(steps, self.request.strength)
        return (steps - start) * self.request.batch_count

    def __iter__(self) -> Iterator[Step]:
        """Runs the request, yielding a Step per denoising step. Inference mode is on only while
        our code runs, never across a yield: the caller's loop body (a progress bar, a preview,
        a cancel button) runs in whatever mode it had."""
        pipe, request = self.pipe, self.request
        self.result = None
        retried = False
        while True:  # at most twice: an out-of-memory is retried once on the next lower plan
            try:
                with torch.inference_mode():
                    conditioning = encode_prompt(pipe.parts, request)
                    sigmas = pipe.schedule.sigmas(self.spec, self.karras, request.steps)
                break
            except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
                retried = self._fall_back(error, retried)
        images, seeds = [], []
        steps_per_batch = self.total_steps // request.batch_count
        for batch in range(request.batch_count):
            batch_seeds = [self.first_seed + batch * request.batch_size + i for i in range(request.batch_size)]
            while True:
                try:
                    images += yield from self._batch(batch, batch_seeds, conditioning, sigmas,
                                                     batch * steps_per_batch)
                    break
                except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
                    retried = self._fall_back(error, retried)  # then the batch starts again
            seeds += batch_seeds
        self.result = Result(images=images, seeds=seeds,
                             parameters=[self.pipe.infotext(request, s, self.width, self.height) for s in seeds],
                             request=request)

    def _batch(self, batch: int, batch_seeds: list[int], conditioning, sigmas, first_index: int):
        """One batch: yields its Steps, returns its images."""
        pipe, request, parts = self.pipe, self.request, self.pipe.parts
        setup = Setup(parts, request, self.spec, pipe.schedule, sigmas, batch_seeds, make_generators(batch_seeds),
                      self.width, self.height, pipe.plan)
        with torch.inference_mode():
            prepared: Prepared = PREPARE[request.mode](setup)
            concat = prepared.concat
            if concat is None and parts.config.is_inpainting:
                concat = everything_masked_concat(setup)
            denoiser = build_denoiser(parts, request, conditioning, len(batch_seeds), self.width, self.height,
                                      self.spec, concat=concat, model_call=pipe.model_call)
            if prepared.wrap is not None:
                denoiser = prepared.wrap(denoiser)
        x, index = prepared.x, first_index
        try:
            if len(prepared.sigmas) > 1:
                for sampler_step in _outside_inference_mode(
                        denoise(self.spec, denoiser, x, prepared.sigmas, setup.generators)):
                    x = sampler_step.x
                    yield Step(index=index, total=self.total_steps, batch=batch, latents=x,
                               denoised=sampler_step.denoised, sigma=float(sampler_step.sigma),
                               _preview=pipe.previewer)
                    index += 1
        finally:  # also when cancelled or failed: per-run graphs keep no memory past the steps
            end_run = getattr(pipe.model_call, "end_run", None)  # a GraphedModel's
            if end_run is not None:
                end_run()
        # fast's kept graphs lend their pool to the decode (speed/cuda_graphs.py): it returns host images
        lend_pool = getattr(pipe.model_call, "lend_pool", contextlib.nullcontext)
        with torch.inference_mode(), lend_pool():
            return prepared.finish(x)

    def _fall_back(self, error: Exception, retried: bool) -> bool:
        """Re-raise `error` unless it is the run's first out-of-memory and a lower plan exists;
        else switch the pipeline to that plan, say so in one line, and return True."""
        lower = lower_plan(self.pipe.plan)
        if retried or lower is None or not is_out_of_memory(error):
            raise error
        previous = self.pipe.plan
        self.pipe.use_plan(lower)
        warnings.warn(f"out of memory with memory={previous.mode!r}"
                      f"{'' if previous.vae_tile_above != 0 else ' (VAE tiled)'}; retrying once with "
                      f"memory={lower.mode!r}{' and the VAE tiled' if lower.vae_tile_above == 0 else ''}",
                      MemoryFallbackWarning, stacklevel=3)
        return True

    def wait(self) -> Result:
        """Run to the end (or return the result of a run that already finished)."""
        if self.result is None:
            for _ in self:
                pass
        assert self.result is not None
        return self.result


def _outside_inference_mode(steps: Iterator[SamplerStep]) -> Iterator[SamplerStep]:
    """Advance `steps` under inference mode, one step at a time, and yield each step outside it.
    Closing (a `break` in the caller's loop) closes `steps` under inference mode too, so a
    context manager inside it that saved "on" restores "on" inside ours, not in the caller."""
    try:
        while True:
            with torch.inference_mode():
                step = next(steps, None)
            if step is None:
                return
            yield step
    finally:
        with torch.inference_mode():
            steps.close()


def everything_masked_concat(setup: Setup) -> torch.Tensor:
    """The extra UNet input of a 9-channel inpainting model used for txt2img or img2img: "the whole
    picture is masked" (mask 1, the masked image all grey), as A1111 does (modules/processing.py
    `txt2img_image_conditioning`; img2img's `inpainting_image_conditioning` without a mask is the
    same with its default inpainting_mask_weight 1). The grey image is encoded by its mean (A1111
    samples it from the global RNG; the mean keeps seeds reproducible). (B, 1 + C, h, w)."""
    grey = torch.zeros(1, 3, setup.height, setup.width)  # 0.5 grey in [0, 1] is 0 in [-1, 1]
    latents = encode_images(setup.parts, grey, None, setup.plan).to(setup.dtype)  # (1, C, h, w)
    batch = len(setup.seeds)
    mask = torch.ones(batch, 1, *latents.shape[2:], device=latents.device, dtype=latents.dtype)
    return torch.cat([mask, latents.expand(batch, -1, -1, -1)], dim=1)


class Pipeline:
    """A loaded model ready to generate. Build it with `pocketdiffusion.load(...)`."""

    def __init__(self, parts: Components, name: str | None = None, plan: MemoryPlan | None = None):
        self.parts = parts
        self.name = name or parts.source
        self.plan = plan or MemoryPlan()
        self.previewer = Previewer(parts)
        self.schedule = Schedule.of(parts)
        self.model_call = self._model_call()

    def _model_call(self):
        """The UNet call the denoisers use: compiled and/or from CUDA graphs when the plan asks and
        the UNet is on CUDA (kept here, across runs), else eager."""
        on_cuda = next(self.parts.unet.parameters()).device.type == "cuda"
        return model_call(self.parts, cuda_graphs=self.plan.cuda_graphs and on_cuda,
                          compile=self.plan.compile and on_cuda, graphs_per_run=self.plan.graphs_per_run,
                          channels_last=self.plan.channels_last and on_cuda)

    def use_plan(self, plan: MemoryPlan) -> None:
        """Switch to another memory plan in place (quantizing the UNet if it asks for int8)."""
        if plan.quantize_unet:
            from ..memory.quant import quantize_
            quantize_(self.parts.unet)
        self.plan = plan
        self.model_call = self._model_call()  # graphs of the old weights must not replay
        if next(self.parts.unet.parameters()).device.type == "cuda":
            torch.cuda.empty_cache()

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
        if (request.width is None and w > MAX_SIDE) or (request.height is None and h > MAX_SIDE):
            raise InvalidRequest(f"the init image is {w}x{h}: larger than {MAX_SIDE} pixels a side; pass a "
                                 "smaller width and height to work at (the image is resized to them)")
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
        """Extend the canvas by the given pixels on each side (rounded up to a multiple of 8, see
        `outpaint.canvas_sides`) and paint the new area; the original sits at (left, top) and is
        kept bit for bit beyond the 8-pixel seam that blends it into the new area."""
        _require_image(image, "image")
        canvas, mask = extend_canvas(image, left=left, right=right, top=top, bottom=bottom)
        options.setdefault("inpainting_fill", "latent_noise")
        options.setdefault("mask_blur", OUTPAINT_MASK_BLUR)
        return self.inpaint(canvas, mask, prompt, **options)

    def _call(self, **fields: Any) -> list[Image.Image]:
        unknown = [name for name in fields if name not in REQUEST_FIELDS]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, REQUEST_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"unknown option {name!r}{hint}; the options are GenerationRequest's fields: "
                            + ", ".join(REQUEST_FIELDS))
        return self.run(GenerationRequest(**fields)).wait().images

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
