"""What every pipeline shares: prompt encoding, the denoiser for a request, one `denoise()`
generator that yields each step, and decoding. txt2img, img2img and inpainting differ only in
the starting latents, the sigma slice and the denoiser wrapper (see txt2img.py, img2img.py,
inpaint.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoints import Components
from ..models.unet import sdxl_label_vector
from ..checkpoints.formats import read_json
from ..memory.plan import MemoryPlan
from ..memory.tiling import should_tile, tiled_decode, tiled_encode
from ..sampling import (CFGDenoiser, EpsDenoiser, SamplerSpec, SamplerStep, VDenoiser, get_sigmas_discrete,
                        init_noise_sigma, scaled_linear_alphas_cumprod)
from .prompts import encode_prompt_pair, encode_prompt_plain
from .request import GenerationRequest


@dataclass
class Conditioning:
    """Text conditioning for one image, (1, T, C); pooled (1, P) for SDXL."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled_cond: torch.Tensor | None
    pooled_uncond: torch.Tensor | None


def encode_prompt(parts: Components, request: GenerationRequest) -> Conditioning:
    if request.prompt_syntax == "plain":
        # diffusers' "no negative prompt" is None (SDXL then guides against zeros, its
        # force_zeros_for_empty_prompt); ours is "", so "" must read as None to match it.
        encode, negative, options = encode_prompt_plain, request.negative_prompt or None, {}
    else:
        encode, negative, options = encode_prompt_pair, request.negative_prompt, {"pad": "none"}
    with torch.inference_mode(), parts.in_use(*parts.text_encoders):
        cond, uncond, pooled_cond, pooled_uncond = encode(
            parts.tokenizers, parts.text_encoders, parts.config.prompt_encodings,
            request.prompt, negative, clip_skip=request.clip_skip, **options)
    return Conditioning(cond, uncond, pooled_cond, pooled_uncond)


@dataclass(frozen=True)
class Schedule:
    """How the model's timesteps are spaced: its diffusers scheduler config when it has one,
    else SD's original setting ("leading", offset 1: the SD1.5/SDXL configs and A1111's DDIM)."""

    spacing: str = "leading"
    steps_offset: int = 1

    @classmethod
    def of(cls, parts: Components) -> "Schedule":
        path = Path(parts.source) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            return cls()
        config = read_json(path)
        return cls(spacing=config.get("timestep_spacing", "leading"), steps_offset=int(config.get("steps_offset", 1)))

    def sigmas(self, spec: SamplerSpec, karras: bool, steps: int) -> torch.Tensor:
        """The sampler's sigma schedule over SD's scaled-linear training schedule (steps + 1 values)."""
        return get_sigmas_discrete(scaled_linear_alphas_cumprod(), steps, spacing=self.spacing,
                                   steps_offset=self.steps_offset, karras=karras, family=spec.family)

    def init_sigma(self, sigmas: torch.Tensor, spec: SamplerSpec) -> float:
        """What pure noise is scaled by for txt2img (diffusers' `init_noise_sigma`)."""
        return init_noise_sigma(sigmas, spacing=self.spacing, family=spec.family)


def _unet_call(unet):
    """Adapt the UNet (a module, or a function with its signature) to the sampling contract
    `model(x_in, t, **cond)`. `concat` (9-channel inpainting: mask + masked-image latents) is
    appended after c_in scaling, as diffusers does."""
    def call(x_in: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, y: torch.Tensor | None = None,
             concat: torch.Tensor | None = None) -> torch.Tensor:
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        return unet(x_in, t, context, y=y)
    return call


def _channels_last(unet):
    """The UNet (in place: its 4-D weights) called with a channels_last input. (Moving the weights
    through host memory into an emptied cache instead left balanced's reserve as it was: H100
    session 6 run 7, docs/BENCHMARKS.md.)"""
    unet.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        # The output back in NCHW (a 64 KiB copy at 512x512): else the latents, and with them the
        # VAE's decode, would turn channels_last too (a conv follows its input's layout).
        return unet(x.contiguous(memory_format=torch.channels_last), t, context, y=y).contiguous()
    return forward


def model_call(parts: Components, cuda_graphs: bool = False, compile: bool = False, graphs_per_run: bool = False,
               channels_last: bool = False):
    """The UNet as `model(x_in, t, **cond)`: eager or compiled (speed/compile.py), and replayed from
    CUDA graphs or not (the caller keeps the object across runs, so that a graph is captured, and
    the UNet compiled, once per signature; `graphs_per_run`: captured after an eager first call
    and released when the caller ends each run, `GraphedModel.end_run`)."""
    unet = parts.unet
    if compile:
        from ..speed.compile import compile_unet
        unet = compile_unet(parts.unet)
    elif channels_last:
        unet = _channels_last(parts.unet)
    call = _unet_call(unet)
    if cuda_graphs:
        from ..speed import GraphedModel
        return GraphedModel(call, per_run=graphs_per_run)
    return call


def build_denoiser(parts: Components, request: GenerationRequest, conditioning: Conditioning, batch: int,
                   width: int, height: int, spec: SamplerSpec, concat: torch.Tensor | None = None,
                   model_call=None):
    """eps/v denoiser + classifier-free guidance for a batch of `batch` images. `model_call`:
    the UNet call to use (`model_call()`'s result), the eager UNet by default."""
    unet = parts.unet
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    wrapper = VDenoiser if parts.config.prediction == "v" else EpsDenoiser
    model = wrapper(model_call or _unet_call(unet), scaled_linear_alphas_cumprod().to(device),
                    quantize=spec.quantize_timesteps)

    def side(context: torch.Tensor, pooled: torch.Tensor | None) -> dict[str, Any]:
        out: dict[str, Any] = {"context": context.to(device, dtype).expand(batch, -1, -1)}
        if parts.config.unet.adm_in_channels is not None:
            out["y"] = sdxl_label_vector(pooled.to(device, dtype), _time_ids(request, width, height, device)
                                         ).expand(batch, -1)
        if concat is not None:
            out["concat"] = concat
        return out

    cond = side(conditioning.cond, conditioning.pooled_cond)
    if request.cfg == 1.0:
        return CFGDenoiser(model, cond, None, 1.0)  # no guidance: the conditional call alone
    uncond = side(conditioning.uncond, conditioning.pooled_uncond)
    same_length = cond["context"].shape[1] == uncond["context"].shape[1]
    # A1111 runs prompts of different chunk counts through the UNet in two passes; so do we.
    return CFGDenoiser(model, cond, uncond, request.cfg, batched=same_length)


def _time_ids(request: GenerationRequest, width: int, height: int, device) -> torch.Tensor:
    original = request.original_size or (height, width)
    target = request.target_size or (height, width)
    return torch.tensor([[*original, *request.crop_top_left, *target]], dtype=torch.float32, device=device)


def denoise(spec: SamplerSpec, denoiser, x: torch.Tensor, sigmas: torch.Tensor,
            generators: list[torch.Generator]) -> Iterator[SamplerStep]:
    """The one denoising loop: a SamplerStep per step; stopping the iteration cancels. Noise-drawing
    samplers draw each image's noise from its own generator. The caller advances it under
    inference mode (Run does, one step at a time, so the mode never spans its yields)."""
    return spec.steps(denoiser, x, sigmas, generator=generators)


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (seed, seed+1, ...), as diffusers is called with a list of
    `torch.Generator("cpu").manual_seed(s)`; CPU so that a seed gives the same picture on any device."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """Each image's (1, C, h, w) slice from its own generator (diffusers' randn_tensor)."""
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)


def encode_images(parts: Components, pixels: torch.Tensor, generators: list[torch.Generator] | None,
                  plan: MemoryPlan | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents; sampled with each image's generator as diffusers'
    `retrieve_latents(vae.encode(image), generator)` does, or the mean when generators is None.
    Images above the plan's `vae_tile_above` pixels are encoded in blended tiles."""
    vae = parts.vae
    plan = plan or MemoryPlan()
    tiled = should_tile(pixels.shape[-2] * pixels.shape[-1], plan.vae_tile_above)
    with torch.inference_mode(), parts.in_use(vae.encoder, vae.quant_conv):
        device, dtype = next(vae.encoder.parameters()).device, next(vae.encoder.parameters()).dtype
        latents = []
        for i in range(pixels.shape[0]):
            image = pixels[i:i + 1].to(device, dtype)
            g = generators[i] if generators is not None else None
            if tiled:
                f = vae.downscale
                latents.append(tiled_encode(vae, image, tile=plan.vae_tile * f, overlap=plan.vae_tile_overlap * f,
                                            generator=g, sample=g is not None))
            else:
                latents.append(vae.encode_latents(image, generator=g, sample=g is not None))
        return torch.cat(latents) * vae.scaling_factor


def decode_latents(parts: Components, latents: torch.Tensor, plan: MemoryPlan | None = None) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) pixels in about [-1, 1], one image at a time (peak memory);
    above the plan's `vae_tile_above` pixels in blended tiles, so the decoder never holds a
    full-resolution activation."""
    vae = parts.vae
    dtype = next(vae.parameters()).dtype
    plan = plan or MemoryPlan()
    f = vae.downscale
    tiled = should_tile(latents.shape[-2] * latents.shape[-1] * f * f, plan.vae_tile_above)
    with torch.inference_mode(), parts.in_use(vae.decoder, vae.post_quant_conv):
        out = []
        for i in range(latents.shape[0]):
            z = latents[i:i + 1].to(dtype) / vae.scaling_factor
            out.append(tiled_decode(vae, z, tile=plan.vae_tile, overlap=plan.vae_tile_overlap) if tiled
                       else vae.decode(z))
        return torch.cat(out)
