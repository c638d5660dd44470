"""Samplers: free functions over `denoiser(x, sigma) -> x0`, the k-diffusion shape.

    x = sample_euler(denoiser, x, sigmas, *, callback=None, generator=None, **opts)

x is in k-diffusion's variance-exploding space (x = x0 + sigma * eps), `sigmas` descend to the
final level (usually 0), `callback(step_index, x, denoised, sigma)` runs after each step with the
new latents, the step's x0 estimate and the step's starting sigma. Every sampler is written as a
generator of `SamplerStep`s (`sample_euler.steps(...)`), so a pipeline can iterate it and cancel
by stopping; `sample_*` just drains it.

Randomness comes only from `generator` (a CPU torch.Generator, or a list of them with one per
image of the batch, each drawing its image's slice as diffusers' `randn_tensor` does): noise is drawn on the CPU in
float32 with `torch.randn(shape, generator=generator)` and moved to x's device and dtype, exactly
as diffusers' `randn_tensor` does with a CPU generator, so results do not depend on the device
and match diffusers' schedulers seed for seed.
Ported from https://github.com/crowsonkb/k-diffusion/blob/master/k_diffusion/sampling.py; where
diffusers differs from k-diffusion by design we follow diffusers and say so in the docstring.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import PocketDiffusionError
from .schedules import SD_BETA_START

# diffusers' DDIMScheduler(set_alpha_to_one=False) ends on alphas_cumprod[0] = 1 - beta_start,
# the same for every SD model (1.x, 2.x, XL).
SD_FINAL_ALPHA_CUMPROD = 1.0 - SD_BETA_START

Callback = Callable[[int, torch.Tensor, torch.Tensor, float], None]


class NonFiniteLatentsError(PocketDiffusionError, FloatingPointError):
    """Sampling produced NaN or inf (fp16 overflow, a broken model, a bad guidance scale)."""


FINITE_CHECK_EVERY = 8  # GPU: read the NaN/inf flags once per this many steps


class SamplerStep(NamedTuple):
    index: int  # 0-based step number
    x: torch.Tensor  # latents after the step, at sigmas[index + 1]
    denoised: torch.Tensor  # the model's x0 estimate at sigmas[index]
    sigma: float  # sigmas[index]


class _Walk:
    """Validated sampler inputs and the helpers every sampler loop shares."""

    def __init__(self, name, denoiser, x, sigmas, generator, check_finite, needs_noise):
        self.name = name
        if not callable(denoiser):
            raise TypeError(f"{name}: denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            got = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name}: x must be a floating-point tensor (B, C, H, W), got {got}")
        self.sigmas = _sigma_list(name, sigmas)
        self.steps = len(self.sigmas) - 1
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) and g.device.type == "cpu"
                                             for g in generators):
            raise TypeError(
                f"{name}: generator must be a CPU torch.Generator or a list of them, one per image "
                f"(noise is drawn on the CPU), got {generator!r}"
            )
        if isinstance(generator, (list, tuple)) and len(generator) != x.shape[0]:
            raise ValueError(f"{name}: {len(generator)} generators for a batch of {x.shape[0]}: pass one per image")
        self.generator, self.denoiser, self.check_finite = generator, denoiser, bool(check_finite)
        self.float_sigma = bool(getattr(denoiser, "takes_float_sigma", False))
        self._finite: list[torch.Tensor] = []  # per-step isfinite flags not yet gathered (see _check_finite)
        self._in_flight: list[tuple[int, torch.Tensor, Any]] = []  # CUDA: (first step, pinned flags, event)
        if needs_noise:
            self.require_generator()
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteLatentsError(f"{name}: the initial latents x contain NaN or inf (before step 1)")

    def require_generator(self) -> None:
        if self.generator is None:
            raise ValueError(
                f"{self.name} with these options draws noise: pass generator=torch.Generator().manual_seed(seed)"
            )

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        # Our denoiser wrappers take the step's sigma as a Python float and work out its scalings
        # and timestep on the host instead of in ~30 tiny GPU kernels per step (denoisers.py);
        # any other denoiser gets k-diffusion's (B,) tensor.
        if self.float_sigma:
            return self.denoiser(x, float(sigma))
        return self.denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32))

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        if isinstance(self.generator, (list, tuple)):  # one generator per image, as diffusers and A1111 draw it
            noise = torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32)
                               for g in self.generator])
        else:
            noise = torch.randn(like.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(like.device, like.dtype)

    def step(self, i: int, x: torch.Tensor, denoised: torch.Tensor) -> SamplerStep:
        if self.check_finite:
            self._check_finite(i, x)
        return SamplerStep(i, x, denoised, self.sigmas[i])

    def _check_finite(self, i: int, x: torch.Tensor) -> None:
        """Raise naming the first step whose latents hold NaN or inf. On the CPU each step is checked
        at once. On a GPU the per-step flags stay on the device and are gathered every
        FINITE_CHECK_EVERY steps and at the last step; on CUDA they then travel to pinned host
        memory behind an event and are read once the event has passed, so checking never stalls
        the launch queue (a sync every 8 steps left the GPU idle while the host launched the next
        step). The error still names the right step, and never comes after the last step."""
        self._finite.append(torch.isfinite(x).all())
        last = i == self.steps - 1
        if x.device.type != "cpu" and not last and len(self._finite) < FINITE_CHECK_EVERY:
            self._read_landed_flags(wait=False)
            return
        first, stacked = i + 1 - len(self._finite), torch.stack(self._finite)
        self._finite = []
        if x.device.type != "cuda":
            self._raise_if_bad(first, stacked.tolist())
            return
        host = torch.empty(stacked.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        self._in_flight.append((first, host, landed))
        self._read_landed_flags(wait=last)

    def _read_landed_flags(self, wait: bool) -> None:
        while self._in_flight and (wait or self._in_flight[0][2].query()):
            first, host, landed = self._in_flight.pop(0)
            landed.synchronize()
            self._raise_if_bad(first, host.tolist())

    def _raise_if_bad(self, first: int, flags: list[bool]) -> None:
        if all(flags):
            return
        self._in_flight = []
        bad = first + flags.index(False)
        raise NonFiniteLatentsError(
            f"{self.name}: NaN or inf in the latents after step {bad + 1} of {self.steps} "
            f"(sigma {self.sigmas[bad]:.4g} -> {self.sigmas[bad + 1]:.4g}); with fp16 weights this is usually "
            "an overflow: try bf16 or fp32, or a lower guidance scale"
        )


def _sigma_list(name: str, sigmas) -> list[float]:
    """sigmas (tensor or sequence, any device) -> Python floats, checked once: a loop over floats
    needs no device sync per step and computes step coefficients in float64."""
    try:
        values = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{name}: sigmas must be a 1-D sequence of at least 2 noise levels (one step), got {sigmas!r}")
    out = values.tolist()
    if not all(math.isfinite(s) for s in out) or min(out[:-1]) <= 0 or out[-1] < 0:
        raise ValueError(f"{name}: sigmas must be finite and positive (the last may be 0), got {out}")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name}: sigmas must be strictly decreasing, got {out}")
    return out


def _drain(steps: Iterator[SamplerStep], x: torch.Tensor, callback: Callback | None) -> torch.Tensor:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(step_index, x, denoised, sigma), got {type(callback).__name__}")
    for step in steps:
        x = step.x
        if callback is not None:
            callback(step.index, step.x, step.denoised, step.sigma)
    return x


def _sampler(steps_fn: Callable[..., Iterator[SamplerStep]]) -> Callable[..., torch.Tensor]:
    """sample_X(denoiser, x, sigmas, *, callback=None, generator=None, **opts) -> x over X_steps."""

    def sample(denoiser, x, sigmas, *, callback: Callback | None = None, generator=None, **opts) -> torch.Tensor:
        return _drain(steps_fn(denoiser, x, sigmas, generator=generator, **opts), x, callback)

    name = steps_fn.__name__.removesuffix("_steps")
    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    sample.__doc__ = (steps_fn.__doc__ or "") + (
        "\n    Returns the final latents; `callback(step_index, x, denoised, sigma)` runs after each step."
        f"\n    `sample_{name}.steps(...)` (same options, no callback) yields each `SamplerStep` instead.\n"
    )
    sample.steps = steps_fn
    return sample


def _ancestral(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): deterministic target and fresh-noise level of an ancestral step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _churn(walk, x, sigma, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 "churn": raise sigma to sigma_hat by adding fresh noise."""
    gamma = min(s_churn / walk.steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + walk.noise(x) * (s_noise * (sigma_hat**2 - sigma**2) ** 0.5)
    return x, sigma_hat


def euler_steps(denoiser, x, sigmas, *, generator=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0, check_finite=True) -> Iterator[SamplerStep]:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design
    Space of Diffusion-Based Generative Models", Algorithm 2; with s_churn > 0 its stochastic
    variant). Matches diffusers' EulerDiscreteScheduler (eps and v prediction) for s_churn = 0.
    """
    walk = _Walk("euler", denoiser, x, sigmas, generator, check_finite, needs_noise=s_churn > 0)
    for i in range(walk.steps):
        x, sigma_hat = _churn(walk, x, walk.sigmas[i], s_churn, s_tmin, s_tmax, s_noise)
        denoised = walk.denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        x = x + d * (walk.sigmas[i + 1] - sigma_hat)
        yield walk.step(i, x, denoised)


def euler_ancestral_steps(denoiser, x, sigmas, *, generator=None, eta=1.0, s_noise=1.0,
                          check_finite=True) -> Iterator[SamplerStep]:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to the next sigma
    (k-diffusion `sample_euler_ancestral`, after Karras et al. 2022 and Song et al. 2021 "Score-Based
    Generative Modeling through SDEs"). Matches diffusers' EulerAncestralDiscreteScheduler seed for
    seed with eta = 1 (diffusers also draws noise on the last step, which changes nothing).
    """
    walk = _Walk("euler_ancestral", denoiser, x, sigmas, generator, check_finite, needs_noise=eta > 0 and s_noise > 0)
    for i in range(walk.steps):
        sigma, sigma_next = walk.sigmas[i], walk.sigmas[i + 1]
        denoised = walk.denoise(x, sigma)
        sigma_down, sigma_up = _ancestral(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + walk.noise(x) * (s_noise * sigma_up)
        yield walk.step(i, x, denoised)


def heun_steps(denoiser, x, sigmas, *, generator=None, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
               s_noise=1.0, check_finite=True) -> Iterator[SamplerStep]:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2): an Euler step, then the
    trapezoid correction with a second model call; the last step into sigma 0 is plain Euler.
    Two model calls per step. Matches diffusers' HeunDiscreteScheduler.
    """
    walk = _Walk("heun", denoiser, x, sigmas, generator, check_finite, needs_noise=s_churn > 0)
    for i in range(walk.steps):
        x, sigma_hat = _churn(walk, x, walk.sigmas[i], s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = walk.sigmas[i + 1]
        denoised = walk.denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - walk.denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        yield walk.step(i, x, denoised)


def ddim_steps(denoiser, x, sigmas, *, generator=None, eta=0.0, final_alpha_cumprod=SD_FINAL_ALPHA_CUMPROD,
               check_finite=True) -> Iterator[SamplerStep]:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12) over sigmas.

    In sigma space a DDIM step is x0 + sigma_down * eps_hat (+ sigma_up * noise for eta > 0), i.e.
    an ancestral Euler step with DDIM's own eta. Differs from k-diffusion by design, to match
    diffusers' DDIMScheduler(set_alpha_to_one=False) as SD's config uses it: the last step does
    not reach sigma 0 but alphas_cumprod[0] (`final_alpha_cumprod`; 1.0 gives the clean x0), and
    returns that variance-preserving sample sqrt(a) * x0 + sqrt(1 - a) * eps, which is what
    diffusers hands to the VAE. Use with `get_sigmas_discrete(..., family="ddim")`; parity with
    diffusers holds for "leading" spacing (for the others diffusers steps to t - 1000 // steps,
    which is not its own next timestep).
    """
    if not 0 < final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
    walk = _Walk("ddim", denoiser, x, sigmas, generator, check_finite, needs_noise=eta > 0)
    targets = list(walk.sigmas)
    final_scale = 1.0
    final_sigma = ((1 - final_alpha_cumprod) / final_alpha_cumprod) ** 0.5
    if targets[-1] == 0 and targets[-2] > final_sigma > 0:
        targets[-1], final_scale = final_sigma, final_alpha_cumprod**0.5
    for i in range(walk.steps):
        sigma, sigma_next = targets[i], targets[i + 1]
        denoised = walk.denoise(x, sigma)
        sigma_down, sigma_up = _ancestral(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + walk.noise(x) * sigma_up
        if i == walk.steps - 1 and final_scale != 1.0:
            x = x * final_scale
        yield walk.step(i, x, denoised)


def dpmpp_2m_steps(denoiser, x, sigmas, *, generator=None, lower_order_final=True,
                   check_finite=True) -> Iterator[SamplerStep]:
    """DPM-Solver++(2M), the multistep second-order solver of Lu et al. 2022 ("DPM-Solver++: Fast
    Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2), in log-sigma time.

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    with `get_sigmas_discrete(..., family="dpmsolver")`: the first step is first order; a step
    into sigma 0 returns x0 (k-diffusion and diffusers' final_sigmas_type="zero" agree; that is
    A1111's "DPM++ 2M Karras" with karras=True). Differs from k-diffusion by design when the
    schedule ends above 0 (diffusers' final_sigmas_type="sigma_min"): like diffusers'
    `lower_order_final`, runs of fewer than 15 steps take a first-order last step.
    """
    walk = _Walk("dpmpp_2m", denoiser, x, sigmas, generator, check_finite, needs_noise=False)
    old_denoised, h_last = None, 0.0
    for i in range(walk.steps):
        sigma, sigma_next = walk.sigmas[i], walk.sigmas[i + 1]
        denoised = walk.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # lambda = -log(sigma)
            last_first_order = lower_order_final and i == walk.steps - 1 and walk.steps < 15
            if old_denoised is None or last_first_order:
                target = denoised
            else:
                r = h_last / h
                target = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (sigma_next / sigma) - target * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        yield walk.step(i, x, denoised)


def dpmpp_2m_sde_steps(denoiser, x, sigmas, *, generator=None, eta=1.0, s_noise=1.0, lower_order_final=True,
                       check_finite=True) -> Iterator[SamplerStep]:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", the SDE variant; midpoint form).

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") seed for
    seed with eta = 1 and `family="dpmsolver"` sigmas. Differs from k-diffusion by design: the
    noise is fresh Gaussian noise from `generator` each step, as in diffusers, instead of
    k-diffusion's Brownian tree (the steps' intervals are disjoint, so the distribution is the
    same). `lower_order_final` as in `sample_dpmpp_2m`.
    """
    walk = _Walk("dpmpp_2m_sde", denoiser, x, sigmas, generator, check_finite, needs_noise=eta > 0 and s_noise > 0)
    old_denoised, h_last = None, 0.0
    for i in range(walk.steps):
        sigma, sigma_next = walk.sigmas[i], walk.sigmas[i + 1]
        denoised = walk.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = x * (sigma_next / sigma * math.exp(-eta_h)) + denoised * decay
            last_first_order = lower_order_final and i == walk.steps - 1 and walk.steps < 15
            if old_denoised is not None and not last_first_order:
                x = x + (denoised - old_denoised) * (0.5 * decay * h / h_last)
            if eta > 0 and s_noise > 0:
                x = x + walk.noise(x) * (sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
            h_last = h
        old_denoised = denoised
        yield walk.step(i, x, denoised)


def dpmpp_sde_steps(denoiser, x, sigmas, *, generator=None, eta=1.0, s_noise=1.0, r=0.5,
                    check_finite=True) -> Iterator[SamplerStep]:
    """DPM-Solver++ SDE (k-diffusion `sample_dpmpp_sde`): the single-step second-order stochastic
    DPM-Solver++ of Lu et al. 2022 with an intermediate point at fraction `r` of the step in
    log-sigma time. Two model calls per step.

    k-diffusion and diffusers (DPMSolverSDEScheduler) draw the two noises of a step from a
    torchsde Brownian tree, where they are correlated (the second interval contains the first).
    We draw the same Brownian increments from `generator` (W(sigma_mid) - W(sigma) and
    W(sigma_next) - W(sigma_mid) independent), so the distribution matches, not the exact values.
    """
    if not 0 < r < 1:
        raise ValueError(f"dpmpp_sde: r must be in (0, 1), got {r}")
    walk = _Walk("dpmpp_sde", denoiser, x, sigmas, generator, check_finite, needs_noise=eta > 0 and s_noise > 0)
    for i in range(walk.steps):
        sigma, sigma_next = walk.sigmas[i], walk.sigmas[i + 1]
        denoised = walk.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised  # the Euler step into sigma 0
        else:
            sigma_mid = sigma * (sigma_next / sigma) ** r  # t + r * h in lambda = -log(sigma)
            down, up = _ancestral(sigma, sigma_mid, eta)
            x_2 = x * (down / sigma) - denoised * (down / sigma - 1)
            z_1 = walk.noise(x) if up > 0 else None
            if z_1 is not None:
                x_2 = x_2 + z_1 * (s_noise * up)
            denoised_2 = walk.denoise(x_2, sigma_mid)
            down, up = _ancestral(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            target = denoised * (1 - fac) + denoised_2 * fac
            x = x * (down / sigma) - target * (down / sigma - 1)
            if up > 0:
                # (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next), sharing the first increment.
                z_2 = walk.noise(x)
                first = z_1 * (sigma - sigma_mid) ** 0.5 if z_1 is not None else 0.0
                z = (first + z_2 * (sigma_mid - sigma_next) ** 0.5) / (sigma - sigma_next) ** 0.5
                x = x + z * (s_noise * up)
        yield walk.step(i, x, denoised)


def unipc_steps(denoiser, x, sigmas, *, generator=None, order=2, variant="bh2", lower_order_final=True,
                check_finite=True) -> Iterator[SamplerStep]:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models"): a multistep UniP predictor plus the UniC corrector, which reuses each
    new model output to refine the point it was evaluated at, at no extra model call.

    Data-prediction form in log-sigma time, ported from diffusers' UniPCMultistepScheduler
    (predict_x0=True, solver_type `variant`, disable_corrector=[]), which it matches with
    `family="dpmsolver"` sigmas: warm-up from first order, `lower_order_final` lowers the order
    over the last steps; a step into sigma 0 returns x0.
    """
    if order not in (1, 2, 3) or variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: order must be 1, 2 or 3 and variant 'bh1' or 'bh2', got {order}, {variant!r}")
    walk = _Walk("unipc", denoiser, x, sigmas, generator, check_finite, needs_noise=False)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in walk.sigmas]
    outputs: list[torch.Tensor] = []  # model x0 outputs, newest last
    last_x, last_order = None, 0
    for i in range(walk.steps):
        denoised = walk.denoise(x, walk.sigmas[i])
        if walk.sigmas[i + 1] == 0:
            x = denoised  # any order, from any x: x_next = (0 / sigma) * x + x0
            yield walk.step(i, x, denoised)
            continue
        if last_x is not None:  # UniC: correct x_i with the output just computed there
            x = _unipc_update(last_x, outputs, lambdas, i - 1, i, last_order, variant, model_t=denoised)
        outputs = (outputs + [denoised])[-order:]
        this_order = min(order, walk.steps - i) if lower_order_final else order
        this_order = min(this_order, i + 1)  # warm-up: as many outputs as we have
        last_x, last_order = x, this_order
        x = _unipc_update(x, outputs, lambdas, i, i + 1, this_order, variant)  # UniP predictor
        yield walk.step(i, x, denoised)


def _unipc_update(x, outputs, lambdas, src, dst, order, variant, model_t=None):
    """One UniP predictor (model_t None) or UniC corrector update of x from step `src` to `dst`.

    diffusers `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` with alpha_t divided out
    (sigma space). `outputs` ends with the model output at `src`, older ones before it; the
    corrector's `model_t` is the output evaluated at the predicted point `dst`.
    """
    m0, history = outputs[-1], outputs[:-1]
    h = lambdas[dst] - lambdas[src]
    rks = [(lambdas[src - k] - lambdas[src]) / h for k in range(1, order)] + [1.0]
    d1s = [(history[-k] - m0) / rks[k - 1] for k in range(1, order)]
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_matrix = np.array([[rk ** (j - 1) for rk in rks] for j in range(1, order + 1)])  # (order, order)
    x_t = x * math.exp(-h) - m0 * h_phi_1  # sigma_dst / sigma_src = exp(-h)
    if model_t is None:
        if order == 1:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(r_matrix[:-1, :-1], np.array(b[:-1])).tolist()
        return x_t - sum(d * rho for d, rho in zip(d1s, rhos)) * b_h
    rhos = [0.5] if order == 1 else np.linalg.solve(r_matrix, np.array(b)).tolist()
    correction = sum((d * rho for d, rho in zip(d1s, rhos[:-1])), (model_t - m0) * rhos[-1])
    return x_t - correction * b_h


def lcm_steps(denoiser, x, sigmas, *, generator=None, check_finite=True) -> Iterator[SamplerStep]:
    """Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing
    High-Resolution Images with Few-Step Inference", Algorithm 1): jump to the x0 estimate, then
    re-noise it to the next sigma with fresh noise. For LCM-distilled models (or LCM-LoRA), with
    `get_sigmas_discrete(..., family="lcm")` and 2-8 steps. Matches diffusers' LCMScheduler seed
    for seed up to its boundary-condition scalings c_skip = 0.25 / ((10 t)^2 + 0.25), which are
    below 1e-5 at every timestep of its schedule (t >= 19) and so left out.
    """
    walk = _Walk("lcm", denoiser, x, sigmas, generator, check_finite, needs_noise=False)
    if any(s > 0 for s in walk.sigmas[1:]):  # every step but one into sigma 0 re-noises
        walk.require_generator()
    for i in range(walk.steps):
        denoised = walk.denoise(x, walk.sigmas[i])
        sigma_next = walk.sigmas[i + 1]
        x = denoised + walk.noise(denoised) * sigma_next if sigma_next > 0 else denoised
        yield walk.step(i, x, denoised)


sample_euler = _sampler(euler_steps)
sample_euler_ancestral = _sampler(euler_ancestral_steps)
sample_heun = _sampler(heun_steps)
sample_ddim = _sampler(ddim_steps)
sample_dpmpp_2m = _sampler(dpmpp_2m_steps)
sample_dpmpp_2m_sde = _sampler(dpmpp_2m_sde_steps)
sample_dpmpp_sde = _sampler(dpmpp_sde_steps)
sample_unipc = _sampler(unipc_steps)
sample_lcm = _sampler(lcm_steps)
