"""Denoiser wrappers: everything a sampler calls is `denoiser(x, sigma) -> denoised x0`.

A model here is any callable `model(x_in, t, **cond) -> eps or v` (a UNet, a compiled graph, a
test function). The wrappers hold no knowledge of what it is: they scale the input, turn sigma
into the model's timestep and its output into x0 (k-diffusion `external.py`), batch classifier-free
guidance, and blend an inpainting mask.
https://github.com/crowsonkb/k-diffusion/blob/master/k_diffusion/external.py
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .schedules import model_sigmas, sigma_to_t

Denoiser = Callable[..., torch.Tensor]


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so per-sample scalings broadcast over x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _sigma_batch(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Validate and broadcast sigma to (B,) on x's device. A Python number becomes a fill kernel on
    the device: `torch.as_tensor(number, device="cuda")` would be a blocking host-to-device copy,
    a sync per step that starves the GPU while the next UNet call is being launched."""
    _check_x(x)
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},) to match x, got {tuple(sigma.shape)}")
    return sigma


def _check_x(x: object) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError(f"x must be a floating-point tensor (B, C, ...), got {_describe(x)}")


def _scalar(sigma: torch.Tensor | float) -> float | None:
    """sigma as a Python float when it is one number for the whole batch given as a number (what
    the samplers pass), else None. On that path the wrappers work out c_in, c_out and the model
    timestep on the host: a step then launches ~3 kernels around the model instead of ~30, which
    matters when the model call is a replayed CUDA graph and the step is GPU-bound."""
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma):
        return float(sigma)
    return None


def _call_inner(inner, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
    """Call a wrapped denoiser: a float sigma as it is if it takes one, else as a (B,) tensor."""
    if isinstance(sigma, float) and not getattr(inner, "takes_float_sigma", False):
        sigma = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
    return inner(x, sigma, **cond)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


class _DiscreteDDPMDenoiser:
    """Shared part of k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser."""

    takes_float_sigma = True  # samplers may pass sigma as a Python float (see _scalar)

    def __init__(self, model: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor, *, quantize: bool = False):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_in, t, **cond), got {type(model).__name__}")
        self.model = model
        self.sigmas = model_sigmas(alphas_cumprod)  # (T,) ascending in t
        self.log_sigmas = self.sigmas.log()
        self.quantize = bool(quantize)
        self._log_sigmas_on: dict[torch.device, torch.Tensor] = {}
        self._t_cache: dict[float, float] = {}

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_of(self, sigma: float) -> float:
        """`sigma_to_t` of one number, on the host (cached: a schedule's sigmas repeat)."""
        t = self._t_cache.get(sigma)
        if t is None:
            value = torch.tensor([sigma], dtype=torch.float32)
            t = self._t_cache[sigma] = float(sigma_to_t(value, self.log_sigmas, quantize=self.quantize)[0])
        return t

    def _timesteps(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.full((x.shape[0],), self.t_of(sigma), device=x.device, dtype=torch.float32)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model timestep for sigma: log-sigma interpolation, or the nearest step if `quantize`."""
        table = self._log_sigmas_on.get(sigma.device)
        if table is None:  # one copy per device, not one transfer per step
            table = self._log_sigmas_on[sigma.device] = self.log_sigmas.to(sigma.device)
        return sigma_to_t(sigma, table, quantize=self.quantize)

    def _run_model(self, x: torch.Tensor, sigma: torch.Tensor | float, c_in: torch.Tensor | float,
                   cond: dict) -> torch.Tensor:
        t = self._timesteps(x, sigma) if isinstance(sigma, float) else self.sigma_to_t(sigma)
        out = self.model(x * c_in, t, **cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"the model returned {_describe(out)}; expected a tensor shaped like x {tuple(x.shape)}")
        return out.to(x.dtype)


class EpsDenoiser(_DiscreteDDPMDenoiser):
    """An eps-prediction model (SD 1.x, SD2-base, SDXL) as a denoiser: x0 = x - sigma * eps(x * c_in, t).

    c_in = 1 / sqrt(sigma^2 + 1) maps our x = x0 + sigma * eps onto the model's
    variance-preserving input; t = sigma_to_t(sigma). `quantize=True` feeds the nearest integer
    timestep, as diffusers' DDIM / DPM-Solver / UniPC / LCM schedulers do (see
    `SamplerSpec.quantize_timesteps`). Extra keyword arguments go to the model unchanged.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        scalar = _scalar(sigma)
        if scalar is not None:
            _check_x(x)
            eps = self._run_model(x, scalar, 1 / (scalar**2 + 1) ** 0.5, cond)
            return torch.add(x, eps, alpha=-scalar)
        sigma = _sigma_batch(x, sigma)
        s = _append_dims(sigma, x.ndim).to(x.dtype)
        c_in = 1 / (s**2 + 1) ** 0.5
        eps = self._run_model(x, sigma, c_in, cond)
        return x - s * eps  # c_out = -sigma, c_skip = 1


class VDenoiser(_DiscreteDDPMDenoiser):
    """A v-prediction model (SD 2.x 768-v) as a denoiser (Salimans & Ho 2022, "Progressive
    Distillation"): x0 = x * c_skip + v(x * c_in, t) * c_out with c_skip = 1 / (sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        scalar = _scalar(sigma)
        if scalar is not None:
            _check_x(x)
            c_in = 1 / (scalar**2 + 1) ** 0.5
            v = self._run_model(x, scalar, c_in, cond)
            return torch.add(x * c_in**2, v, alpha=-scalar * c_in)
        sigma = _sigma_batch(x, sigma)
        s = _append_dims(sigma, x.ndim).to(x.dtype)
        c_in = 1 / (s**2 + 1) ** 0.5
        v = self._run_model(x, sigma, c_in, cond)
        return x * c_in**2 + v * (-s * c_in)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale * (D_c - D_u).

    `cond` / `uncond` are keyword-argument dicts for the inner denoiser (hence the model): e.g.
    ``{"context": text_embeddings}`` or SDXL's ``{"context": ..., "y": pooled_and_time_ids}``.
    With `batched` (the default) both halves run in one call of batch 2B: every tensor value is
    concatenated ``[uncond, cond]`` along dim 0 (diffusers' order), nested dicts / lists / tuples
    recursively; any other value (None, numbers, strings) must be equal in both and is passed
    once. `batched=False` runs two calls of batch B, halving the activations' peak memory.
    With scale == 1 the unconditional half is skipped entirely. Guiding x0 equals guiding eps or v,
    since x0 is affine in the model output with weights summing to one.
    """

    takes_float_sigma = True  # samplers may pass sigma as a Python float (see _scalar)

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None,
        scale: float,
        *,
        batched: bool = True,
    ):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, sigma, **cond), got {type(denoiser).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
        if not isinstance(cond, Mapping):
            raise TypeError(f"cond must be a dict of model keyword arguments, got {type(cond).__name__}")
        if uncond is None and scale != 1:
            raise ValueError(f"guidance scale {scale} needs an uncond dict (only scale 1 runs without one)")
        if uncond is not None:
            if not isinstance(uncond, Mapping):
                raise TypeError(f"uncond must be a dict of model keyword arguments, got {type(uncond).__name__}")
            if set(cond) != set(uncond):
                raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.denoiser = denoiser
        self.cond, self.uncond = dict(cond), None if uncond is None else dict(uncond)
        self.scale = float(scale)
        self.batched = bool(batched)
        # Concatenated once (and checked now, naming the bad key) rather than at every step.
        use_both = batched and uncond is not None and self.scale != 1.0
        self._both = _concat_cond(self.uncond, self.cond, "cond") if use_both else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        scalar = _scalar(sigma)
        sigma = _sigma_batch(x, sigma) if scalar is None else scalar
        if self.scale == 1.0:
            return _call_inner(self.denoiser, x, sigma, **self.cond)
        if self.batched:
            both = _call_inner(self.denoiser, torch.cat([x, x]),
                               sigma if scalar is not None else torch.cat([sigma, sigma]), **self._both)
            uncond_out, cond_out = both.chunk(2)  # each (B, C, H, W)
        else:
            uncond_out = _call_inner(self.denoiser, x, sigma, **self.uncond)
            cond_out = _call_inner(self.denoiser, x, sigma, **self.cond)
        return uncond_out + (cond_out - uncond_out) * self.scale


def _concat_cond(uncond: Any, cond: Any, path: str) -> Any:
    """Concatenate two condition structures along the batch dim ([uncond, cond])."""
    if isinstance(cond, torch.Tensor) or isinstance(uncond, torch.Tensor):
        if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)):
            raise TypeError(f"{path}: a tensor in one of cond/uncond but {type(uncond).__name__} in the other")
        if cond.ndim == 0 or cond.shape != uncond.shape:
            raise ValueError(
                f"{path}: cond and uncond tensors must have the same shape with a batch dim, "
                f"got {tuple(cond.shape)} and {tuple(uncond.shape)}"
            )
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(cond) != set(uncond):
            raise ValueError(f"{path}: cond and uncond must be dicts with the same keys")
        return {k: _concat_cond(uncond[k], cond[k], f"{path}.{k}") for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(cond) != len(uncond):
            raise ValueError(f"{path}: cond and uncond must be sequences of the same length")
        return type(cond)(_concat_cond(u, c, f"{path}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is not uncond and cond != uncond:
        raise ValueError(f"{path}: non-tensor values must be equal in cond and uncond, got {uncond!r} and {cond!r}")
    return cond


class MaskedDenoiser:
    """Inpainting by latent blending, for any (non-inpainting) model. Convention: mask = 1 means
    *repaint* (the sampler's latents), mask = 0 means *keep* the original.

    Before each model call the kept region of x is replaced by `original + noise * sigma` (the
    original latents noised to the current level, with one fixed `noise` so the kept region stays
    coherent from step to step, as diffusers' legacy inpainting and ComfyUI do), and the kept
    region of the returned x0 is the original itself, so a schedule that ends at sigma 0 returns
    exactly `original` where mask == 0. `mask` broadcasts against x: (B or 1, 1 or C, H, W),
    values in [0, 1] (fractional values feather the seam).
    """

    takes_float_sigma = True  # samplers may pass sigma as a Python float (see _scalar)

    def __init__(self, denoiser: Denoiser, original: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x, sigma, **cond), got {type(denoiser).__name__}")
        for name, t in (("original", original), ("mask", mask), ("noise", noise)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
        if noise.shape != original.shape or original.ndim < 2:
            raise ValueError(
                f"original and noise must both be (B, C, H, W) latents of one shape, "
                f"got {tuple(original.shape)} and {tuple(noise.shape)}"
            )
        try:
            torch.broadcast_shapes(mask.shape, original.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast against latents {tuple(original.shape)}; "
                "expected (B or 1, 1 or C, H, W) at latent resolution"
            ) from None
        if mask.ndim != original.ndim:
            raise ValueError(f"mask must have {original.ndim} dims like the latents, got shape {tuple(mask.shape)}")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError("mask values must lie in [0, 1] (1 = repaint, 0 = keep)")
        self.denoiser, self.original, self.mask, self.noise = denoiser, original, mask, noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        scalar = _scalar(sigma)
        sigma = _sigma_batch(x, sigma) if scalar is None else scalar
        if x.shape != self.original.shape:
            raise ValueError(f"x {tuple(x.shape)} does not match the original latents {tuple(self.original.shape)}")
        mask = self.mask.to(x.device, x.dtype)
        original = self.original.to(x.device, x.dtype)
        level = scalar if scalar is not None else _append_dims(sigma, x.ndim).to(x.dtype)
        noised = original + self.noise.to(x.device, x.dtype) * level
        x = torch.lerp(noised, x, mask)  # mask * x + (1 - mask) * noised
        denoised = _call_inner(self.denoiser, x, sigma, **cond)
        return torch.lerp(original, denoised, mask)
