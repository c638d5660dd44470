"""The per-batch state the three pipelines share (`Setup`) and what each prepares (`Prepared`):
starting latents, the sigma slice, an optional denoiser wrapper and the finishing step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from ..checkpoints import Components
from ..memory.plan import MemoryPlan
from ..sampling import SamplerSpec
from .base import Schedule, decode_latents, draw_noise
from .images import to_pil
from .request import GenerationRequest


@dataclass
class Setup:
    parts: Components
    request: GenerationRequest
    spec: SamplerSpec
    schedule: Schedule
    sigmas: torch.Tensor  # the full schedule for request.steps (steps + 1 values, last 0)
    seeds: list[int]
    generators: list[torch.Generator]
    width: int
    height: int
    plan: MemoryPlan = field(default_factory=MemoryPlan)

    @property
    def device(self) -> torch.device:
        return next(self.parts.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parts.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.parts.vae.downscale
        return self.parts.vae.latent_channels, self.height // f, self.width // f

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        return draw_noise(generators, self.latent_shape, self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return to_pil(decode_latents(self.parts, latents, self.plan))


@dataclass
class Prepared:
    x: torch.Tensor  # starting latents (B, C, h, w), already noised to sigmas[0]
    sigmas: torch.Tensor  # the slice of the schedule to run
    finish: Callable[[torch.Tensor], list[Image.Image]]  # final latents -> images
    concat: torch.Tensor | None = None  # 9-channel inpainting: mask + masked-image latents
    wrap: Callable | None = None  # denoiser -> denoiser (latent mask blending)
