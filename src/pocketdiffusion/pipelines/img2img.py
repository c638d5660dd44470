"""img2img: encode the init image, noise it to the sigma where the strength starts, and run the
rest of the schedule (diffusers/A1111: strength 0.75 runs the last 75% of the steps)."""
from __future__ import annotations

import torch

from .base import encode_images
from .images import resize_image, to_tensor
from .stages import Prepared, Setup


def strength_start(steps: int, strength: float) -> int:
    """Index of the first sigma to run: diffusers' `get_timesteps` (init_timestep =
    min(int(steps * strength), steps); t_start = steps - init_timestep)."""
    return steps - min(int(steps * strength), steps)


def init_pixels(setup: Setup) -> torch.Tensor:
    """The init image resized to the request's size, repeated over the batch: (B, 3, H, W) in [-1, 1]."""
    request = setup.request
    image = resize_image(request.init_image.convert("RGB"), setup.width, setup.height, request.resize_mode)
    return to_tensor(image).repeat(len(setup.seeds), 1, 1, 1)


def noised_start(setup: Setup, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents noised to the strength's starting sigma, the sigma slice). The noise is drawn after
    the VAE sample from the same generators, in diffusers' order."""
    sigmas = setup.sigmas[strength_start(setup.request.steps, setup.request.strength):]
    noise = setup.noise(setup.generators)
    return latents + noise * sigmas[0], sigmas


def prepare_img2img(setup: Setup) -> Prepared:
    latents = encode_images(setup.parts, init_pixels(setup), setup.generators, setup.plan).to(setup.dtype)
    x, sigmas = noised_start(setup, latents)
    return Prepared(x=x, sigmas=sigmas, finish=setup.decode)
