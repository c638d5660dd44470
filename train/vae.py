"""Stage 1: the autoencoder (AutoencoderKL with SHAPES.vae) on rendered scenes.

Loss: L1 + 0.5 * MSE on pixels, plus a tiny KL term (1e-6 times the mean per-latent-element KL
of the posterior to N(0, 1)), on a reconstruction of a posterior *sample*, as LDM's
AutoencoderKL trains (https://github.com/CompVis/latent-diffusion/blob/main/ldm/models/autoencoder.py).
No perceptual or GAN loss: flat colours and sharp edges are what the data has, and L1 keeps
edges crisp. At the end the latent scaling factor is measured (1 / std of the latents, SD's
recipe for its 0.18215) and the reconstruction PSNR is measured on a held-out batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketdiffusion.config import SHAPES
from pocketdiffusion.data import shapes
from pocketdiffusion.data.classify import score
from pocketdiffusion.models.vae import AutoencoderKL

from .common import (SceneBatch, Settings, ShapesStream, autocast, fixed_batch,
                     load_checkpoint, make_optimizer, render_on_device, restore_state, run_loop,
                     save_checkpoint, stage_payload, stage_record, stream_batches)

STAGE_STREAM = 1        # data stream id of this stage (each stage draws different scenes)
ROUNDTRIP_SEED = 777   # dataset seed offset of the round-trip check's pictures
EVAL_STREAM = 900       # held-out batch for PSNR: never drawn by a training stream
LATENT_STAT_STREAM = 901


@dataclass(frozen=True)
class VAEHyper:
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    mse_weight: float = 0.5
    kl_weight: float = 1e-6
    grad_clip: float | None = 1.0
    edge_weight: float = 4.0         # extra weight of the pixels on outlines (see edge_weights)
    latent_stat_images: int = 2048   # images whose latents set the scaling factor
    eval_images: int = 64            # held-out images for the PSNR
    roundtrip_images: int = 256      # held-out captioned pictures graded after a round trip


@dataclass
class VAEOutcome:
    vae: AutoencoderKL        # fp32, eval mode, on the device; its config holds the scaling factor
    scaling_factor: float
    psnr: float
    record: dict              # for train_log.json


def edge_weights(images: torch.Tensor, extra: float) -> torch.Tensor:
    """(B, 1, H, W): 1 + `extra` on the pixels within one pixel of an outline (where the 3x3
    neighbourhood spans a colour step), else 1. Outlines are a few percent of the pixels, but the
    shape of an object is all in them: with a plain per-pixel loss the autoencoder rounded small
    stars into circles (the classifier read 86% of shapes right after a round trip)."""
    span = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # local max - local min
    outline = (span.amax(dim=1, keepdim=True) > 0.2).float()
    return 1.0 + extra * outline


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, hyper: VAEHyper) -> torch.Tensor:
    mean, logvar = vae.encode(images)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # a posterior sample
    recon = vae.decode(z).float()
    error = recon - images
    per_pixel = error.abs() + hyper.mse_weight * error.square()
    if hyper.edge_weight:
        weights = edge_weights(images.float(), hyper.edge_weight)
        reconstruction = (per_pixel * weights).mean() / weights.mean()
    else:
        reconstruction = per_pixel.mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()  # KL(q(z|x) || N(0, I)) per element
    return reconstruction + hyper.kl_weight * kl


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, settings: Settings, images: int) -> tuple[float, float]:
    """(mean, std) over every element of the posterior means of `images` held-out scenes."""
    total, total_sq, count = 0.0, 0.0, 0
    chunk = min(256, images)
    for index in range((images + chunk - 1) // chunk):
        batch = fixed_batch(chunk, settings.seed, LATENT_STAT_STREAM + 1000 * index, settings)
        with autocast(settings):
            mean, _ = vae.encode(_pixels(batch, settings))
        mean = mean.double()
        total += mean.sum().item()
        total_sq += mean.square().sum().item()
        count += mean.numel()
    center = total / count
    return center, math.sqrt(max(total_sq / count - center * center, 1e-24))


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of fp32 reconstructions from the posterior mean."""
    recon = vae.decode(vae.encode(images)[0]).float().clamp(-1, 1)
    mse = ((recon - images) / 2).square().flatten(1).mean(dim=1)  # [-1, 1] -> [0, 1] scale
    return float((10 * torch.log10(1.0 / mse.clamp(min=1e-10))).mean())


@torch.no_grad()
def roundtrip_grades(vae: AutoencoderKL, settings: Settings, images: int) -> dict[str, float]:
    """The classifier's accuracy (data/classify.py) on held-out captioned pictures after an
    encode/decode round trip: the ceiling the UNet's prompt following can reach."""
    pictures, captions, _ = shapes.dataset(images, seed=settings.seed + ROUNDTRIP_SEED, size=settings.size)
    x = torch.from_numpy(pictures).to(settings.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    decoded = torch.cat([vae.decode(vae.encode(part)[0]).float() for part in x.split(64)])
    decoded = ((decoded.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return score([shapes.parse_caption(c) for c in captions], list(decoded))


def _pixels(batch: SceneBatch, settings: Settings) -> torch.Tensor:
    images = render_on_device(batch, settings.size)
    if settings.channels_last and settings.cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def with_scaling_factor(vae: AutoencoderKL, factor: float) -> AutoencoderKL:
    """The same module with `factor` in its config (what the pipeline and the export read)."""
    vae.config = replace(vae.config, scaling_factor=factor)
    return vae


def train_vae(settings: Settings, hyper: VAEHyper, seconds: float, *, checkpoint: Path,
              resume: Path | None = None, extend: bool = False) -> VAEOutcome:
    """Train (or continue, or reload a finished) VAE for `seconds` of wall-clock time."""
    payload = load_checkpoint(resume)
    state = restore_state(payload, extend)
    vae = AutoencoderKL(SHAPES.vae).to(settings.device)
    if payload is not None:
        vae.load_state_dict(payload["models"])
    if settings.channels_last and settings.cuda:
        vae = vae.to(memory_format=torch.channels_last)
    if state.done:  # finished in an earlier run: reuse it as it is
        metrics = payload["metrics"]
        print(f"[vae] reusing the finished stage from {resume} ({state.step} steps)", flush=True)
        return VAEOutcome(with_scaling_factor(vae.eval(), metrics["scaling_factor"]), metrics["scaling_factor"],
                          metrics["psnr"], stage_record(state, **metrics))

    optimizer = make_optimizer(vae.parameters(), hyper.lr, settings)
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
    stream = ShapesStream(hyper.batch_size, settings.seed, STAGE_STREAM * 10**9 + state.step, size=settings.size)
    batches = stream_batches(stream, settings)

    def loss_fn(batch: SceneBatch) -> torch.Tensor:
        with autocast(settings):
            return vae_loss(vae, _pixels(batch, settings), hyper)

    def save() -> None:
        save_checkpoint(checkpoint, stage_payload(vae, optimizer, state))

    vae.train()
    run_loop("vae", state=state, seconds=seconds, hyper=hyper, optimizer=optimizer, loss_fn=loss_fn,
             batches=batches, settings=settings, save=save)
    del batches  # stops the data workers
    vae.eval()

    center, std = latent_statistics(vae, settings, hyper.latent_stat_images)
    factor = float(f"{1.0 / std:.5g}")
    held_out = _pixels(fixed_batch(hyper.eval_images, settings.seed, EVAL_STREAM, settings), settings)
    psnr = reconstruction_psnr(vae, held_out)
    grades = roundtrip_grades(vae, settings, hyper.roundtrip_images)
    metrics = {"scaling_factor": factor, "latent_mean": center, "latent_std": std, "psnr": psnr,
               "roundtrip_shape": grades["shape"], "roundtrip_color": grades["color"]}
    save_checkpoint(checkpoint, stage_payload(vae, optimizer, state, **metrics))
    print(f"[vae] done: {state.step} steps, PSNR {psnr:.2f} dB on {hyper.eval_images} held-out images, "
          f"latent mean {center:.4f} std {std:.4f} -> scaling_factor {factor}; after a round trip the "
          f"classifier reads {grades['shape']:.1%} of shapes, {grades['color']:.1%} of colours", flush=True)
    return VAEOutcome(with_scaling_factor(vae, factor), factor, psnr, stage_record(state, **metrics))
