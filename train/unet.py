"""Stage 2: the text encoder and the UNet, both from scratch, trained together.

The objective is SD's (https://github.com/CompVis/stable-diffusion, ldm/models/diffusion/ddpm.py):
eps-prediction under the scaled-linear schedule (betas 0.00085..0.012, 1000 steps), uniform
integer timesteps, latents = posterior mean of the frozen VAE times its scaling factor, and the
conditioning is the text encoder's last hidden layer after its final layer norm (PromptEncoding's
default, what SD1 reads). 10% of captions become "" so classifier-free guidance has an
unconditional model. Two common additions, both switchable:
- min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): weight min(SNR, 5) / SNR per sample; converges several times faster.
- noise offset 0.1 (N. Guttenberg, "Diffusion with Offset Noise", 2023): a per-channel constant
  added to the noise, so the model learns the picture's mean colour (here: the flat background)
  from the prompt rather than from the faint signal left at t = 999.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketdiffusion.config import SHAPES
from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.unet import UNetModel
from pocketdiffusion.models.vae import AutoencoderKL
from pocketdiffusion.sampling.schedules import scaled_linear_alphas_cumprod

from .common import (EMA, SceneBatch, Settings, ShapesStream, autocast, load_checkpoint,
                     make_optimizer, render_on_device, restore_state, run_loop, save_checkpoint, stage_payload,
                     stage_record, stream_batches)

STAGE_STREAM = 2


@dataclass(frozen=True)
class UNetHyper:
    batch_size: int = 256
    lr: float = 3e-4
    warmup_steps: int = 200
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0   # None: plain MSE on eps
    noise_offset: float = 0.1           # 0: plain Gaussian noise


@dataclass
class UNetOutcome:
    text_encoder: CLIPTextModel   # the EMA weights, eval mode, on the device
    unet: UNetModel               # the EMA weights, eval mode, on the device
    record: dict


# ---- the diffusion objective (shared with inpaint.py) ---------------------------------------------

class NoiseSchedule:
    """SD's training schedule on the device: noisy latents, eps targets and min-SNR weights."""

    def __init__(self, device: torch.device, *, min_snr_gamma: float | None, noise_offset: float):
        self.alphas_cumprod = scaled_linear_alphas_cumprod().to(device)  # (1000,)
        self.min_snr_gamma, self.noise_offset = min_snr_gamma, noise_offset

    def noised(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents (B, C, h, w) -> (noisy latents, timesteps (B,), eps target, loss weights (B,))."""
        batch = latents.shape[0]
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(batch, latents.shape[1], 1, 1, device=latents.device)
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), device=latents.device)
        ac = self.alphas_cumprod[t]  # (B,)
        noisy = ac.sqrt()[:, None, None, None] * latents + (1 - ac).sqrt()[:, None, None, None] * noise
        if self.min_snr_gamma is None:
            weights = torch.ones_like(ac)
        else:
            snr = ac / (1 - ac)
            weights = snr.clamp(max=self.min_snr_gamma) / snr
        return noisy, t, noise, weights

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        per_sample = (prediction.float() - target).square().flatten(1).mean(dim=1)  # (B,)
        return (weights * per_sample).mean()


def encode_text(text_encoder: CLIPTextModel, tokens: torch.Tensor) -> torch.Tensor:
    """text_encoder(tokens)[0] (last layer, final layer norm) without CLIPTextModel's input check,
    which reads the ids' min and max to the host: a GPU sync every step. The ids here come from
    our own tokenizer. Same code path as clip.py's forward (test_training checks equality)."""
    text = text_encoder.text_model
    x = text.embeddings(tokens)  # (B, T, C)
    length = tokens.shape[1]
    causal_mask = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype,
                             device=x.device).triu_(1)  # (T, T): position i sees positions <= i
    for block in text.encoder.layers:
        x = block(x, causal_mask)
    return text.final_layer_norm(x)


def frozen_encoder(vae: AutoencoderKL, settings: Settings) -> AutoencoderKL:
    """A frozen copy of the VAE for encoding training images: bf16 weights on CUDA (no per-step
    weight casts), fp32 on the CPU."""
    dtype = torch.bfloat16 if settings.cuda else torch.float32
    return copy.deepcopy(vae).to(dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def scaled_latents(encoder: AutoencoderKL, images: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Posterior means times the scaling factor, fp32: what the UNet denoises."""
    dtype = next(encoder.parameters()).dtype
    return encoder.encode(images.to(dtype))[0].float() * scaling_factor


# ---- the stage -------------------------------------------------------------------------------------

def train_text_unet(settings: Settings, hyper: UNetHyper, seconds: float, *, vae: AutoencoderKL,
                    checkpoint: Path, resume: Path | None = None, extend: bool = False) -> UNetOutcome:
    """Train (or continue, or reload a finished) text encoder + UNet for `seconds` of wall-clock time.
    `vae` is the trained autoencoder, its config carrying the scaling factor."""
    payload = load_checkpoint(resume)
    state = restore_state(payload, extend)
    models = nn.ModuleDict({"text_encoder": CLIPTextModel(SHAPES.text_encoders[0]),
                            "unet": UNetModel(SHAPES.unet)}).to(settings.device)
    if payload is not None:
        models.load_state_dict(payload["models"])
    ema = EMA(models, hyper.ema_decay)
    if payload is not None:
        ema.model.load_state_dict(payload["ema"])
    if state.done:
        print(f"[unet] reusing the finished stage from {resume} ({state.step} steps)", flush=True)
        return UNetOutcome(ema.model["text_encoder"], ema.model["unet"], stage_record(state))

    optimizer = make_optimizer(models.parameters(), hyper.lr, settings)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
    encoder = frozen_encoder(vae, settings)
    scaling_factor = vae.config.scaling_factor
    schedule = NoiseSchedule(settings.device, min_snr_gamma=hyper.min_snr_gamma, noise_offset=hyper.noise_offset)
    stream = ShapesStream(hyper.batch_size, settings.seed, STAGE_STREAM * 10**9 + state.step, size=settings.size,
                          captions=True, caption_dropout=hyper.caption_dropout)
    batches = stream_batches(stream, settings)
    text_encoder, unet = models["text_encoder"], models["unet"]

    def loss_fn(batch: SceneBatch) -> torch.Tensor:
        with autocast(settings):
            latents = scaled_latents(encoder, render_on_device(batch, settings.size), scaling_factor)
            noisy, t, target, weights = schedule.noised(latents)
            prediction = unet(noisy, t, encode_text(text_encoder, batch.tokens))
        return schedule.loss(prediction, target, weights)

    def save() -> None:
        save_checkpoint(checkpoint, stage_payload(models, optimizer, state, ema))

    models.train()
    run_loop("unet", state=state, seconds=seconds, hyper=hyper, optimizer=optimizer, loss_fn=loss_fn,
             batches=batches, settings=settings, ema=ema, save=save)
    del batches
    save()
    print(f"[unet] done: {state.step} steps in {state.seconds:.1f} s", flush=True)
    return UNetOutcome(ema.model["text_encoder"], ema.model["unet"], stage_record(state))
