"""Stage 3: the 9-channel inpainting UNet, fine-tuned from the base UNet.

As SD-inpainting was made (https://github.com/runwayml/stable-diffusion, "sd-v1-5-inpainting":
"5 additional input channels ... zero-initialized after restoring the non-inpainting
checkpoint"): the UNet input is cat([noisy latents, mask, masked-image latents]) (diffusers'
StableDiffusionInpaintPipeline order; the mask at latent resolution by nearest sampling, 1 =
repaint; the masked image = image * (mask < 0.5)), and the first convolution's 5 new input
channels start at zero, so training starts from the base model's behaviour. Masks come from
`shapes.random_mask`; 25% of samples are fully masked so the model still generates from scratch
(what a pipeline's txt2img with an inpainting model feeds it), and 10% of captions are "".
The text encoder and the VAE are the base model's, frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.unet import UNetModel
from pocketdiffusion.models.vae import AutoencoderKL

from .common import (EMA, SceneBatch, Settings, ShapesStream, autocast, load_checkpoint,
                     make_optimizer, masks_on_device, render_on_device, restore_state, run_loop, save_checkpoint,
                     stage_payload, stage_record, stream_batches)
from .unet import NoiseSchedule, encode_text, frozen_encoder, scaled_latents

STAGE_STREAM = 3
FIRST_CONV = "input_blocks.0.0.weight"  # (model_channels, in_channels, 3, 3)


@dataclass(frozen=True)
class InpaintHyper:
    batch_size: int = 256
    lr: float = 2e-4
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    full_mask_fraction: float = 0.25
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.1


@dataclass
class InpaintOutcome:
    unet: UNetModel   # the EMA weights, eval mode, on the device
    record: dict


def inpainting_unet_from(base: UNetModel) -> UNetModel:
    """A 9-input-channel UNet holding `base`'s weights, the 5 extra input channels zero."""
    unet = UNetModel(replace(base.config, in_channels=9)).to(next(base.parameters()).device)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    first = weights[FIRST_CONV]
    widened = first.new_zeros(first.shape[0], 9, *first.shape[2:])
    widened[:, : first.shape[1]] = first
    weights[FIRST_CONV] = widened
    unet.load_state_dict(weights)
    return unet


@torch.no_grad()
def inpaint_conditioning(encoder: AutoencoderKL, images: torch.Tensor, masks: torch.Tensor,
                         scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W), masks (B, 1, H, W) with 1 = repaint -> (latents (B, 4, h, w),
    extra UNet input cat([mask at latent size, masked-image latents]) (B, 5, h, w))."""
    masked = images * (masks < 0.5)
    both = scaled_latents(encoder, torch.cat([images, masked]), scaling_factor)  # one encoder pass
    latents, masked_latents = both.chunk(2)
    # Nearest, as the pipelines downsample the mask (pipelines/images.py latent_mask).
    latent_masks = F.interpolate(masks, size=latents.shape[-2:])
    return latents, torch.cat([latent_masks, masked_latents], dim=1)


def train_inpaint(settings: Settings, hyper: InpaintHyper, seconds: float, *, vae: AutoencoderKL,
                  text_encoder: CLIPTextModel, base_unet: UNetModel, checkpoint: Path,
                  resume: Path | None = None, extend: bool = False) -> InpaintOutcome:
    """Train (or continue, or reload a finished) inpainting UNet for `seconds` of wall-clock time."""
    payload = load_checkpoint(resume)
    state = restore_state(payload, extend)
    unet = inpainting_unet_from(base_unet)
    if payload is not None:
        unet.load_state_dict(payload["models"])
    ema = EMA(unet, hyper.ema_decay)
    if payload is not None:
        ema.model.load_state_dict(payload["ema"])
    if state.done:
        print(f"[inpaint] reusing the finished stage from {resume} ({state.step} steps)", flush=True)
        return InpaintOutcome(ema.model, stage_record(state))

    optimizer = make_optimizer(unet.parameters(), hyper.lr, settings)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
    encoder = frozen_encoder(vae, settings)
    text_encoder = text_encoder.eval().requires_grad_(False)
    scaling_factor = vae.config.scaling_factor
    schedule = NoiseSchedule(settings.device, min_snr_gamma=hyper.min_snr_gamma, noise_offset=hyper.noise_offset)
    stream = ShapesStream(hyper.batch_size, settings.seed, STAGE_STREAM * 10**9 + state.step, size=settings.size,
                          captions=True, caption_dropout=hyper.caption_dropout, masks=True,
                          full_mask_fraction=hyper.full_mask_fraction)
    batches = stream_batches(stream, settings)

    def loss_fn(batch: SceneBatch) -> torch.Tensor:
        with autocast(settings):
            latents, extra = inpaint_conditioning(encoder, render_on_device(batch, settings.size),
                                                  masks_on_device(batch), scaling_factor)
            with torch.no_grad():
                context = encode_text(text_encoder, batch.tokens)
            noisy, t, target, weights = schedule.noised(latents)
            prediction = unet(torch.cat([noisy, extra], dim=1), t, context)  # diffusers' channel order
        return schedule.loss(prediction, target, weights)

    def save() -> None:
        save_checkpoint(checkpoint, stage_payload(unet, optimizer, state, ema))

    unet.train()
    run_loop("inpaint", state=state, seconds=seconds, hyper=hyper, optimizer=optimizer, loss_fn=loss_fn,
             batches=batches, settings=settings, ema=ema, save=save)
    del batches
    save()
    print(f"[inpaint] done: {state.step} steps in {state.seconds:.1f} s", flush=True)
    return InpaintOutcome(ema.model, stage_record(state))
