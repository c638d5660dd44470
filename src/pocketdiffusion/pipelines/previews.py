"""Step previews: a picture of the current estimate, cheap enough to show every step."""
from __future__ import annotations

import torch
from PIL import Image

from ..checkpoints import Components
from ..config import VAEConfig
from .base import decode_latents
from .images import to_pil

# Latent channel -> RGB, the linear fit A1111 uses for its "Approx cheap" live preview
# (modules/sd_vae_approx.py cheap_approximation). Rows are latent channels.
CHEAP_RGB = {
    "sd": [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    "sdxl": [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
             [-0.3730, -0.2499, -0.2088]],
}


class Previewer:
    """denoised latents (B, 4, h, w) -> small PIL images. SD1/SD2/SDXL use the linear latent->RGB
    approximation (no VAE call, latent resolution); other models (the small embedded one) decode
    with their VAE, which is cheap for them."""

    def __init__(self, parts: Components):
        self.parts = parts
        family = parts.config.family
        # The fit is of Stable Diffusion's VAE: a model of an SD family with its own small VAE
        # (the embedded one is SD2-shaped) has other latents, and its VAE is cheap to run.
        vae, sd_vae = parts.config.vae, VAEConfig()
        stable_diffusion_vae = (vae.ch, vae.ch_mult) == (sd_vae.ch, sd_vae.ch_mult)
        self.coefficients = CHEAP_RGB["sdxl" if family == "sdxl" else "sd"] \
            if family in ("sd1", "sd2", "sdxl") and stable_diffusion_vae else None

    def __call__(self, denoised: torch.Tensor) -> list[Image.Image]:
        with torch.inference_mode():
            if self.coefficients is None:
                return to_pil(decode_latents(self.parts, denoised))
            coefficients = torch.tensor(self.coefficients, device=denoised.device, dtype=torch.float32)
            rgb = torch.einsum("blhw,lr->brhw", denoised.float(), coefficients)  # (B, 3, h, w) in ~[-1, 1]
            return to_pil(rgb)
