"""Noise schedules: the SD model's discrete sigmas, the sigma sequences samplers walk, and the
log-sigma <-> timestep interpolation of k-diffusion's `DiscreteSchedule`.

Everything here is in k-diffusion's "variance exploding" space: x = x0 + sigma * eps, with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod). The model sees x / sqrt(sigma^2 + 1).

Our seeds are meant to be diffusers-compatible, and diffusers' scheduler classes do not agree
with each other on where the timesteps go. A *family* names which class's convention a sigma
sequence follows:

- ``"euler"``: EulerDiscreteScheduler (also Heun, EulerAncestral, DPMSolverSDE): fractional
  "linspace" timesteps, sigmas linearly interpolated over t (`np.interp`), Karras sigmas spanning
  the interpolated range, fractional timesteps for Karras sigmas.
- ``"ddim"``: DDIMScheduler: the same as "euler" but integer "linspace" timesteps.
- ``"dpmsolver"``: DPMSolverMultistepScheduler and UniPCMultistepScheduler: ``steps + 1`` points,
  the lowest dropped, Karras sigmas spanning the model's whole range, timesteps rounded.
- ``"lcm"``: LCMScheduler: a subset of the 50-step distillation grid (999, 979, ..., 19).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULE_FAMILIES = ("euler", "ddim", "dpmsolver", "lcm")
FINAL_SIGMAS = ("zero", "sigma_min")

Spacing = Literal["leading", "trailing", "linspace"]
Family = Literal["euler", "ddim", "dpmsolver", "lcm"]


def scaled_linear_alphas_cumprod(
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """SD's "scaled_linear" betas -> alphas_cumprod, (num_train_timesteps,) float32.

    Computed exactly as diffusers does (linspace of sqrt(beta) in float32, squared, cumprod in
    float32) so that the sigmas below are bit-identical to diffusers' schedulers.
    """
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    _check_steps(num_train_timesteps, "num_train_timesteps")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The model's sigma at each training timestep, ascending in t, float32."""
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 values (one per training timestep)")
    ac = alphas_cumprod.to(torch.float32)
    if not bool(((ac > 0) & (ac < 1)).all()):
        raise ValueError("alphas_cumprod values must lie strictly between 0 and 1")
    return ((1 - ac) / ac) ** 0.5


def discrete_timesteps(
    steps: int,
    *,
    spacing: Spacing = "leading",
    steps_offset: int = 1,
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
    family: Family = "euler",
    original_inference_steps: int = 50,
) -> np.ndarray:
    """The descending timesteps a diffusers scheduler of `family` visits for `steps` steps.

    Ports `set_timesteps` of diffusers' EulerDiscreteScheduler / DDIMScheduler /
    DPMSolverMultistepScheduler / LCMScheduler (diffusers 0.42), including their float32 and
    rounding details; see "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Lin et al. 2023, Table 2 for the three spacings. `spacing` is ignored by "lcm".
    """
    _check_steps(steps, "steps")
    _check_choice(spacing, TIMESTEP_SPACINGS, "timestep spacing")
    _check_choice(family, SCHEDULE_FAMILIES, "schedule family")
    n_train = num_train_timesteps
    if steps > n_train:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {n_train} training timesteps")
    if family == "lcm":
        # LCMScheduler.set_timesteps: a subset of the distillation grid k-1, 2k-1, ..., n_train-1.
        if not 1 <= steps <= original_inference_steps <= n_train:
            raise ValueError(f"LCM takes 1..{original_inference_steps} steps, got {steps}")
        k = n_train // original_inference_steps
        origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        return origin[picks].astype(np.float64)
    if spacing == "trailing":
        ratio = n_train / steps
        return (np.arange(n_train, 0, -ratio).round() - 1).astype(np.float64)
    if family == "dpmsolver":
        # steps + 1 points, the lowest (t = 0 or the offset) dropped.
        if spacing == "linspace":
            return np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.float64)
        ratio = n_train // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "linspace":
        timesteps = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1]
        return (timesteps.round() if family == "ddim" else timesteps).astype(np.float64)
    ratio = n_train // steps
    return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + steps_offset


def get_sigmas_discrete(
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    spacing: Spacing = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    family: Family = "euler",
    final_sigma: Literal["zero", "sigma_min"] = "zero",
) -> torch.Tensor:
    """The sigmas a sampler walks for `steps` steps, (steps + 1,) float32, the last one final.

    Ports diffusers' `set_timesteps` (EulerDiscreteScheduler for family "euler"; see the module
    docstring for the others): sigmas are `np.interp`-olated linearly over the (possibly
    fractional) timesteps; with `karras` they are replaced by `get_sigmas_karras` over the
    interpolated range ("euler", "ddim") or the model's whole range ("dpmsolver", "lcm").
    `final_sigma` is diffusers' `final_sigmas_type`: 0, or the model's sigma at t = 0.
    https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_euler_discrete.py
    """
    _check_choice(final_sigma, FINAL_SIGMAS, "final_sigma")
    train_sigmas = model_sigmas(alphas_cumprod)
    timesteps = discrete_timesteps(
        steps, spacing=spacing, steps_offset=steps_offset, num_train_timesteps=len(train_sigmas), family=family
    )
    if timesteps.max() > len(train_sigmas) - 1:
        raise ValueError(f"steps_offset {steps_offset} pushes timesteps past {len(train_sigmas) - 1}")
    table = train_sigmas.numpy()  # float32, as diffusers' np.array(sigmas)
    sigmas = np.interp(timesteps, np.arange(len(table)), table)
    if karras:
        low, high = (sigmas[-1], sigmas[0]) if family in ("euler", "ddim") else (table[0], table[-1])
        if final_sigma == "sigma_min" and low == table[0]:
            raise ValueError(
                f"karras=True with final_sigma='sigma_min' repeats sigma_min for family {family!r} "
                "(a zero-length last step); use final_sigma='zero'"
            )
        sigmas = _karras_ramp(len(sigmas), float(low), float(high), 7.0)
    last = float(train_sigmas[0]) if final_sigma == "sigma_min" else 0.0
    return torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models",
    eq. 5) noise levels, n of them plus the final 0: (n + 1,) float32.

    k-diffusion `get_sigmas_karras`; computed in float64 like diffusers' `_convert_to_karras`.
    """
    _check_steps(n, "n")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number, got {rho}")
    sigmas = _karras_ramp(n, sigma_min, sigma_max, rho)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _karras_ramp(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Timestep(s) of `sigma` by linear interpolation in log-sigma over the training schedule.

    k-diffusion `DiscreteSchedule.sigma_to_t` (= diffusers' `_sigma_to_t`); `quantize` rounds to
    the nearest training timestep in log space, which is what diffusers' multistep schedulers do
    when they `round()` the interpolated timestep of a Karras sigma.
    https://github.com/crowsonkb/k-diffusion/blob/master/k_diffusion/external.py
    """
    log_sigmas = log_sigmas.to(sigma.device, sigma.dtype)
    log_sigma = sigma.clamp(min=1e-10).log()
    dists = log_sigma - log_sigmas[:, None]  # (T, N)
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.dtype)
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at (fractional) timestep(s) t, interpolating log-sigma (k-diffusion `t_to_sigma`)."""
    log_sigmas = log_sigmas.to(t.device)
    t = t.float().clamp(0, log_sigmas.shape[0] - 1)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


def init_noise_sigma(sigmas: torch.Tensor, *, spacing: Spacing = "leading", family: Family = "euler") -> float:
    """How much to scale unit noise for txt2img so that seeds match diffusers, in our (VE) space.

    diffusers' Euler-family schedulers use `sigma_max` for "linspace"/"trailing" spacing but
    `sqrt(sigma_max^2 + 1)` for "leading"; the variance-preserving ones (DDIM, DPM-Solver, UniPC,
    LCM) start from unit noise on the scaled sample, which is `sqrt(sigma_max^2 + 1)` here.
    (k-diffusion and A1111 use `sigma_max`; the difference is ~0.2% at SD's sigma_max 14.6.)
    img2img does not use this: it starts from `latents + noise * sigmas[0]`.
    """
    _check_choice(spacing, TIMESTEP_SPACINGS, "timestep spacing")
    _check_choice(family, SCHEDULE_FAMILIES, "schedule family")
    sigma_max = float(torch.as_tensor(sigmas).max())
    if family == "euler" and spacing in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


def _check_steps(steps: object, what: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"{what} must be a positive integer, got {steps!r}")


def _check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
