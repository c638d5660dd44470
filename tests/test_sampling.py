"""The sampling layer: schedules and samplers against diffusers' schedulers (test-only dependency),
convergence on a model whose exact answer is known, the wrappers, the name resolver, bad input.

Parity runs diffusers the way StableDiffusionPipeline does (noise * init_noise_sigma,
scale_model_input, step with the same CPU generator) and ours the way a pipeline of ours does
(get_sigmas_discrete + init_noise_sigma + EpsDenoiser/VDenoiser + sample_*), from the same seed,
on a deterministic toy eps/v model; final latents agree within 1e-4 of their max abs.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pocketdiffusion.errors import PocketDiffusionError  # noqa: E402
from pocketdiffusion.sampling import (  # noqa: E402
    SAMPLERS,
    CFGDenoiser,
    EpsDenoiser,
    MaskedDenoiser,
    NonFiniteLatentsError,
    VDenoiser,
    discrete_timesteps,
    get_sigmas_discrete,
    get_sigmas_karras,
    init_noise_sigma,
    model_sigmas,
    resolve_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sampler_spec,
    scaled_linear_alphas_cumprod,
    sigma_to_t,
    t_to_sigma,
)

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
PARITY = 1e-4
ALPHAS = scaled_linear_alphas_cumprod()
# A fixed smooth "clean image" for the toy data distribution, (1, 4, 8, 8).
_grid = torch.linspace(-1, 1, 8)
_wave = torch.sin(3 * _grid)[:, None] * torch.cos(2 * _grid)[None, :]  # (8, 8)
TARGET = torch.stack([_wave * (c + 1) / 2 for c in range(4)])[None]
DATA_STD = 0.5


def _alpha_at(t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at (fractional) timesteps t, linearly interpolated, shaped (B, 1, 1, 1)."""
    t = t.to(torch.float64).clamp(0, 999)
    low = t.floor().long()
    high = (low + 1).clamp(max=999)
    a = ALPHAS.double()
    return (a[low] + (t - low) * (a[high] - a[low])).float().reshape(-1, 1, 1, 1)


def toy_eps(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The exact eps-predictor for data ~ N(mean, DATA_STD^2) per element, plus a small nonlinear
    error so the solvers' orders matter. `context` (B, 1) shifts the mean (for guidance)."""
    a = _alpha_at(t)
    mean = TARGET + (0 if context is None else context.reshape(-1, 1, 1, 1))
    eps = (1 - a).sqrt() * (x_in - a.sqrt() * mean) / (a * DATA_STD**2 + 1 - a)
    return eps + 0.1 * torch.tanh(x_in) * torch.cos(t.float().reshape(-1, 1, 1, 1) / 150)


def toy_v(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) * eps - sqrt(1 - a) * x0 for the same toy."""
    a = _alpha_at(t)
    eps = toy_eps(x_in, t)
    x0 = (x_in - (1 - a).sqrt() * eps) / a.sqrt()
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def run_diffusers(scheduler, steps: int, seed: int, model=toy_eps, step_kwargs=None) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop (batch of 2, no guidance)."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    kwargs = dict(step_kwargs or {})
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = gen
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.reshape(1).expand(SHAPE[0]))
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours(name: str, steps: int, seed: int, *, spacing="leading", karras=None, model=toy_eps, v=False,
             final_sigma="zero", **opts) -> torch.Tensor:
    spec, named_karras = sampler_spec(name)
    karras = bool(named_karras) if karras is None else karras
    sigmas = get_sigmas_discrete(ALPHAS, steps, spacing=spacing, karras=karras, family=spec.family,
                                 final_sigma=final_sigma)
    denoiser = (VDenoiser if v else EpsDenoiser)(model, ALPHAS, quantize=spec.quantize_timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen) * init_noise_sigma(sigmas, spacing=spacing, family=spec.family)
    return spec.sample(denoiser, x, sigmas, generator=gen, **opts)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _sched(cls, **kw):
    return getattr(diffusers, cls)(**SD15, steps_offset=1, **kw)


# (id, diffusers scheduler factory, steps, seed, our sampler name, our options)
PARITY_CASES = [
    *[(f"euler-{sp}-karras{k}",
       lambda sp=sp, k=k: _sched("EulerDiscreteScheduler", timestep_spacing=sp, use_karras_sigmas=k),
       20, 0, "euler", dict(spacing=sp, karras=k))
      for sp in ("leading", "linspace", "trailing") for k in (False, True)],
    *[(f"euler_a-{sp}", lambda sp=sp: _sched("EulerAncestralDiscreteScheduler", timestep_spacing=sp), 20, 3,
       "Euler a", dict(spacing=sp)) for sp in ("leading", "trailing")],
    *[(f"heun-karras{k}", lambda k=k: _sched("HeunDiscreteScheduler", timestep_spacing="leading", use_karras_sigmas=k),
       10, 0, "heun", dict(karras=k)) for k in (False, True)],
    ("ddim-eta0", lambda: _sched("DDIMScheduler", set_alpha_to_one=False, clip_sample=False), 20, 0, "DDIM", {}),
    *[(f"dpmpp_2m-{sp}-karras{k}-{n}", lambda sp=sp, k=k: _sched(
        "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=sp,
        use_karras_sigmas=k), n, 0, "dpmpp_2m", dict(spacing=sp, karras=k))
      for sp in ("leading", "linspace") for k in (False, True) for n in (8, 25)],
    *[(f"dpmpp_2m_sde-karras{k}", lambda k=k: _sched("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++",
                                                      timestep_spacing="leading", use_karras_sigmas=k), 20, 7,
       "dpmpp_2m_sde", dict(karras=k)) for k in (False, True)],
    *[(f"unipc-karras{k}-{n}", lambda k=k: _sched("UniPCMultistepScheduler", timestep_spacing="leading",
                                                   use_karras_sigmas=k), n, 0, "UniPC", dict(karras=k))
      for k in (False, True) for n in (5, 20)],
    ("unipc-order3", lambda: _sched("UniPCMultistepScheduler", timestep_spacing="leading", solver_order=3), 12, 0,
     "unipc", dict(order=3)),
    *[(f"lcm-{n}", lambda: getattr(diffusers, "LCMScheduler")(**SD15, set_alpha_to_one=False), n, 2, "LCM", {})
      for n in (4, 8)],
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_final_latents_match_diffusers(case):
    _, make_scheduler, steps, seed, name, opts = case
    ref = run_diffusers(make_scheduler(), steps, seed)
    ours = run_ours(name, steps, seed, **opts)
    assert rel_err(ours, ref) <= PARITY, rel_err(ours, ref)


def test_v_prediction_euler_matches_diffusers():
    ref = run_diffusers(_sched("EulerDiscreteScheduler", timestep_spacing="leading", prediction_type="v_prediction"),
                        20, 1, model=toy_v)
    ours = run_ours("euler", 20, 1, model=toy_v, v=True)
    assert rel_err(ours, ref) <= PARITY


def test_ddim_with_eta_matches_diffusers_noise_for_noise():
    ref = run_diffusers(_sched("DDIMScheduler", set_alpha_to_one=False, clip_sample=False), 15, 5,
                        step_kwargs={"eta": 0.7})
    assert rel_err(run_ours("ddim", 15, 5, eta=0.7), ref) <= PARITY


@pytest.mark.parametrize("steps", [8, 20])  # diffusers' lower_order_final applies below 15 steps
def test_dpmpp_2m_sigma_min_final_matches_lower_order_final(steps):
    scheduler = _sched("DPMSolverMultistepScheduler", timestep_spacing="leading", final_sigmas_type="sigma_min")
    ref = run_diffusers(scheduler, steps, 0)
    ours = run_ours("dpmpp_2m", steps, 0, final_sigma="sigma_min")
    # diffusers returns the variance-preserving sample at sigma_min; ours is x at sigma_min.
    sigma_min = float(model_sigmas(ALPHAS)[0])
    assert rel_err(ours / math.sqrt(1 + sigma_min**2), ref) <= PARITY
    if steps < 15:  # the rule matters: a second-order last step lands elsewhere
        second_order = run_ours("dpmpp_2m", steps, 0, final_sigma="sigma_min", lower_order_final=False)
        assert rel_err(second_order / math.sqrt(1 + sigma_min**2), ref) > 10 * PARITY


def test_unipc_bh1_matches_diffusers():
    # diffusers' bh1 turns a last step into sigma 0 into NaN (B(h) = -h = -inf), so end at sigma_min.
    scheduler = _sched("UniPCMultistepScheduler", timestep_spacing="leading", solver_type="bh1",
                       final_sigmas_type="sigma_min")
    ref = run_diffusers(scheduler, 10, 0)
    ours = run_ours("unipc", 10, 0, variant="bh1", final_sigma="sigma_min")
    assert rel_err(ours / math.sqrt(1 + float(model_sigmas(ALPHAS)[0]) ** 2), ref) <= PARITY
    assert torch.isfinite(run_ours("unipc", 10, 0, variant="bh1")).all()


def test_cfg_denoiser_matches_diffusers_guidance():
    """StableDiffusionPipeline's guidance (one batch [uncond, cond], eps_u + s (eps_c - eps_u))."""
    cond, uncond, scale, steps = torch.tensor([[0.6], [-0.3]]), torch.zeros(2, 1), 7.5, 15
    scheduler = _sched("EulerDiscreteScheduler", timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(SHAPE, generator=gen)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = toy_eps(x_in, t.reshape(1).expand(4), context=torch.cat([uncond, cond])).chunk(2)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    sigmas = get_sigmas_discrete(ALPHAS, steps)
    denoiser = CFGDenoiser(EpsDenoiser(toy_eps, ALPHAS), {"context": cond}, {"context": uncond}, scale)
    ours = sample_euler(denoiser, noise * init_noise_sigma(sigmas), sigmas)
    assert rel_err(ours, x) <= PARITY


# ---- schedules against diffusers' own tables -------------------------------------------------

def test_alphas_cumprod_and_sigmas_are_diffusers_bit_for_bit():
    scheduler = _sched("EulerDiscreteScheduler")
    assert torch.equal(ALPHAS, scheduler.alphas_cumprod)
    assert torch.equal(model_sigmas(ALPHAS), ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("family,cls", [
    ("euler", "EulerDiscreteScheduler"), ("dpmsolver", "DPMSolverMultistepScheduler"),
    ("dpmsolver", "UniPCMultistepScheduler"),
])
def test_sigmas_and_timesteps_match_diffusers(family, cls, spacing, karras):
    scheduler = _sched(cls, timestep_spacing=spacing, use_karras_sigmas=karras)
    scheduler.set_timesteps(13)
    ours = get_sigmas_discrete(ALPHAS, 13, spacing=spacing, karras=karras, family=family)
    assert torch.allclose(ours, scheduler.sigmas.float(), rtol=1e-6, atol=0), (ours, scheduler.sigmas)
    t = sigma_to_t(ours[:-1].double(), model_sigmas(ALPHAS).double().log(), quantize=family != "euler")
    assert torch.allclose(t, scheduler.timesteps.double(), atol=2e-3)  # what the model is fed
    if not karras:
        assert torch.equal(torch.from_numpy(discrete_timesteps(13, spacing=spacing, family=family)),
                           scheduler.timesteps.double())


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_and_lcm_timesteps_match_diffusers(spacing):
    ddim = _sched("DDIMScheduler", timestep_spacing=spacing)
    ddim.set_timesteps(7)
    assert discrete_timesteps(7, spacing=spacing, family="ddim").tolist() == ddim.timesteps.tolist()
    lcm = getattr(diffusers, "LCMScheduler")(**SD15)
    for steps in (1, 4, 6, 50):
        lcm.set_timesteps(steps)
        assert discrete_timesteps(steps, family="lcm").tolist() == lcm.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_init_noise_sigma_matches_diffusers_in_our_space(spacing):
    euler = _sched("EulerDiscreteScheduler", timestep_spacing=spacing)
    euler.set_timesteps(10)
    sigmas = get_sigmas_discrete(ALPHAS, 10, spacing=spacing)
    assert init_noise_sigma(sigmas, spacing=spacing) == pytest.approx(float(euler.init_noise_sigma), rel=1e-6)
    # Variance-preserving schedulers start from unit noise on x / sqrt(sigma^2 + 1).
    dpm = get_sigmas_discrete(ALPHAS, 10, spacing=spacing, family="dpmsolver")
    assert init_noise_sigma(dpm, spacing=spacing, family="dpmsolver") == pytest.approx(
        math.sqrt(float(dpm[0]) ** 2 + 1))


def test_karras_sigmas_and_log_sigma_interpolation():
    sigmas = get_sigmas_karras(10, 0.03, 14.6)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-2].item() == pytest.approx(0.03)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    log_sigmas = model_sigmas(ALPHAS).log()
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 999.0])
    assert torch.allclose(sigma_to_t(t_to_sigma(t, log_sigmas), log_sigmas), t, atol=1e-3)
    assert torch.allclose(t_to_sigma(torch.tensor([3.0]), log_sigmas), model_sigmas(ALPHAS)[3:4], rtol=1e-6)
    assert sigma_to_t(t_to_sigma(torch.tensor([41.7]), log_sigmas), log_sigmas, quantize=True).item() == 42


# ---- convergence on a model with a known exact answer ----------------------------------------

def _gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact x0 estimate for data ~ N(TARGET, DATA_STD^2)."""
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return TARGET + (x - TARGET) * DATA_STD**2 / (DATA_STD**2 + s2)


def _ode_solution(noise: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """The probability-flow ODE solved exactly from x = noise * sigma_max down to sigma_min, then
    the jump to x0 that every sampler takes on its last step (sigma_min -> 0)."""
    x = TARGET + (noise * sigma_max - TARGET) * math.sqrt((DATA_STD**2 + sigma_min**2) / (DATA_STD**2 + sigma_max**2))
    return _gaussian_denoiser(x, torch.tensor([sigma_min]))


# 4x the steps should cut the error ~4x for first-order solvers, ~16x for second-order ones.
@pytest.mark.parametrize("name,min_gain", [("euler", 3), ("ddim", 3), ("heun", 12), ("dpmpp_2m", 12), ("unipc", 12)])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name, min_gain):
    spec, _ = sampler_spec(name)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 40):
        sigmas = get_sigmas_karras(steps, 0.03, 14.6)
        out = spec.sample(_gaussian_denoiser, noise * 14.6, sigmas, final_alpha_cumprod=1.0) if name == "ddim" \
            else spec.sample(_gaussian_denoiser, noise * 14.6, sigmas)
        errors.append(rel_err(out, _ode_solution(noise, 14.6, 0.03)))
    assert errors[0] / errors[1] >= min_gain and errors[1] < 0.05, errors


@pytest.mark.parametrize("name,opts", [("euler_a", {}), ("dpmpp_2m_sde", {}), ("dpmpp_sde", {}), ("ddim", {"eta": 1.0}),
                                       ("euler", {"s_churn": 10.0})])
def test_stochastic_samplers_sample_the_data_distribution(name, opts):
    spec, _ = sampler_spec(name)
    shape = (64, 4, 8, 8)
    gen = torch.Generator().manual_seed(1)
    sigmas = get_sigmas_karras(200, 0.03, 14.6)  # enough for the first-order ones' variance to settle
    x = spec.sample(_gaussian_denoiser, torch.randn(shape, generator=gen) * 14.6, sigmas, generator=gen, **opts)
    residual = x - TARGET  # should be N(0, DATA_STD^2) elementwise
    assert residual.mean().abs() < 0.02
    assert residual.std().item() == pytest.approx(DATA_STD, rel=0.04)


def test_lcm_lands_on_the_target():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = get_sigmas_discrete(ALPHAS, 4, family="lcm")
    out = SAMPLERS["lcm"].sample(_gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert (out - TARGET).std() < DATA_STD and (out - TARGET).mean().abs() < 0.2


def test_samplers_are_reproducible_and_callbacks_see_every_step():
    sigmas = get_sigmas_discrete(ALPHAS, 6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 14.6
    denoiser = EpsDenoiser(toy_eps, ALPHAS)
    for spec in SAMPLERS.values():
        seen = []
        out = spec.sample(denoiser, x, sigmas, generator=torch.Generator().manual_seed(9),
                          callback=lambda i, xi, d, s: seen.append((i, xi, s)))
        again = spec.sample(denoiser, x, sigmas, generator=torch.Generator().manual_seed(9))
        assert torch.equal(out, again), spec.name
        assert [i for i, _, _ in seen] == list(range(6)) and torch.equal(seen[-1][1], out)
        assert [s for _, _, s in seen] == pytest.approx(sigmas[:-1].tolist())
        steps = list(spec.steps(denoiser, x, sigmas, generator=torch.Generator().manual_seed(9)))
        assert torch.equal(steps[-1].x, out) and steps[2].index == 2


# ---- wrappers -------------------------------------------------------------------------------

def test_eps_denoiser_scales_input_and_feeds_the_timestep():
    calls = []

    def model(x_in, t, **cond):
        calls.append((x_in, t, cond))
        return torch.ones_like(x_in)

    sigma = model_sigmas(ALPHAS)[[500, 41]]  # (2,)
    x = torch.full(SHAPE, 3.0)
    out = EpsDenoiser(model, ALPHAS)(x, sigma, context="c")
    x_in, t, cond = calls[0]
    assert torch.allclose(x_in[:, 0, 0, 0], 3.0 / (sigma**2 + 1) ** 0.5)
    assert torch.allclose(t, torch.tensor([500.0, 41.0]), atol=1e-3) and cond == {"context": "c"}
    assert torch.allclose(out[:, 0, 0, 0], 3.0 - sigma)


def test_cfg_denoiser_batches_nested_cond_and_matches_unbatched():
    seen = []

    def inner(x, sigma, context, extra, flag):
        seen.append((x.shape[0], context, extra, flag))
        return x * 0.5 + context.reshape(-1, 1, 1, 1) + extra["y"].reshape(-1, 1, 1, 1)

    cond = {"context": torch.tensor([1.0, 2.0]), "extra": {"y": torch.tensor([0.1, 0.2])}, "flag": True}
    uncond = {"context": torch.tensor([-1.0, -2.0]), "extra": {"y": torch.tensor([0.0, 0.0])}, "flag": True}
    x, sigma = torch.randn(SHAPE), torch.tensor([2.0, 2.0])
    batched = CFGDenoiser(inner, cond, uncond, 5.0)(x, sigma)
    assert seen[0][0] == 4 and seen[0][1].tolist() == [-1.0, -2.0, 1.0, 2.0] and seen[0][3] is True
    unbatched = CFGDenoiser(inner, cond, uncond, 5.0, batched=False)(x, sigma)
    assert torch.allclose(batched, unbatched)
    seen.clear()
    CFGDenoiser(inner, cond, uncond, 1.0)(x, sigma)
    assert len(seen) == 1 and seen[0][0] == 2  # scale 1: the cond half alone


def test_masked_denoiser_keeps_the_unmasked_region_and_repaints_the_rest():
    original = TARGET.expand(SHAPE).clone() * 2
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1  # repaint the centre
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    seen = []

    def inner(x, sigma):
        seen.append((x.clone(), float(sigma[0])))
        return _gaussian_denoiser(x, sigma)

    sigmas = get_sigmas_discrete(ALPHAS, 8)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * float(sigmas[0])
    out = sample_euler(MaskedDenoiser(inner, original, mask, noise), start, sigmas)
    keep = mask.expand(SHAPE) == 0
    assert torch.allclose(out[keep], original[keep], atol=1e-5)
    assert (out[~keep] - original[~keep]).abs().mean() > 0.1
    x_seen, sigma_seen = seen[3]  # the kept region is the original noised to the current sigma
    assert torch.allclose(x_seen[keep], (original + noise * sigma_seen)[keep], atol=1e-5)


# ---- names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected,karras", [
    ("euler", "euler", None), ("Euler", "euler", None), ("EULER A", "euler_a", None), ("euler_a", "euler_a", None),
    ("Heun", "heun", None), ("DDIM", "ddim", None), ("DPM++ 2M", "dpmpp_2m", False),
    ("dpm++ 2m karras", "dpmpp_2m", True), ("DPM++ 2M SDE", "dpmpp_2m_sde", False),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", True), ("DPM++ SDE", "dpmpp_sde", False),
    ("DPM++  SDE Karras", "dpmpp_sde", True), ("UniPC", "unipc", None), ("LCM", "lcm", None),
    ("dpmpp_2m", "dpmpp_2m", None), ("dpmpp_2m_sde", "dpmpp_2m_sde", None), ("dpmpp_sde", "dpmpp_sde", None),
])
def test_resolve_sampler_accepts_our_names_and_a1111s(name, expected, karras):
    fn, use_karras = resolve_sampler(name)
    assert fn is SAMPLERS[expected].sample and use_karras is karras


def test_unknown_sampler_lists_the_accepted_names():
    with pytest.raises(ValueError, match="unknown sampler 'DPM2 a'.*'dpm\\+\\+ 2m karras'.*'euler a'"):
        resolve_sampler("DPM2 a")
    with pytest.raises(TypeError):
        resolve_sampler(None)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "20"])
def test_bad_step_counts_are_rejected(steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        get_sigmas_discrete(ALPHAS, steps)
    with pytest.raises(ValueError, match="must be a positive integer"):
        get_sigmas_karras(steps, 0.03, 14.6)


def test_bad_schedule_options_are_rejected():
    with pytest.raises(ValueError, match="unknown timestep spacing 'lead'"):
        get_sigmas_discrete(ALPHAS, 10, spacing="lead")
    with pytest.raises(ValueError, match="unknown schedule family"):
        get_sigmas_discrete(ALPHAS, 10, family="pndm")
    with pytest.raises(ValueError, match="cannot exceed"):
        get_sigmas_discrete(ALPHAS, 1001)
    with pytest.raises(ValueError, match="LCM takes 1..50 steps"):
        discrete_timesteps(60, family="lcm")
    with pytest.raises(ValueError, match="repeats sigma_min"):
        get_sigmas_discrete(ALPHAS, 10, karras=True, family="dpmsolver", final_sigma="sigma_min")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        get_sigmas_karras(10, 14.6, 0.03)


@pytest.mark.parametrize("sigmas,match", [
    ([1.0], "at least 2"), ([1.0, 2.0, 0.0], "strictly decreasing"), ([2.0, -1.0, 0.0], "positive"),
    ([2.0, float("nan"), 0.0], "finite"), ([[2.0, 1.0]], "1-D"),
])
def test_bad_sigmas_are_rejected(sigmas, match):
    with pytest.raises(ValueError, match=match):
        sample_euler(_gaussian_denoiser, torch.zeros(SHAPE), sigmas)


def test_non_finite_latents_name_the_step():
    sigmas = get_sigmas_discrete(ALPHAS, 6)
    bad = torch.zeros(SHAPE)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLatentsError, match="before step 1"):
        sample_dpmpp_2m(_gaussian_denoiser, bad, sigmas)
    calls = []

    def blows_up_at_third_call(x, sigma):
        calls.append(1)
        return x * float("inf") if len(calls) == 3 else _gaussian_denoiser(x, sigma)

    with pytest.raises(NonFiniteLatentsError, match="after step 3 of 6") as info:
        sample_euler(blows_up_at_third_call, torch.zeros(SHAPE), sigmas)
    assert isinstance(info.value, PocketDiffusionError)


def test_bad_arguments_get_clear_errors():
    sigmas = get_sigmas_discrete(ALPHAS, 4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="draws noise: pass generator"):
        sample_euler_ancestral(_gaussian_denoiser, x, sigmas)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        sample_euler_ancestral(_gaussian_denoiser, x, sigmas, generator=42)
    with pytest.raises(TypeError, match="floating-point tensor"):
        sample_euler(_gaussian_denoiser, x.long(), sigmas)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        sample_euler("unet", x, sigmas)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        sample_ddim(_gaussian_denoiser, x, sigmas, final_alpha_cumprod=1.5)
    with pytest.raises(ValueError, match="model returned .* expected a tensor shaped like x"):
        EpsDenoiser(lambda x_in, t: x_in[:, :3], ALPHAS)(x, sigmas[0])
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        EpsDenoiser(toy_eps, ALPHAS)(x, torch.ones(3))
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(_gaussian_denoiser, {"context": x}, {"ctx": x}, 7.0)
    with pytest.raises(ValueError, match="context: cond and uncond tensors must have the same shape"):
        CFGDenoiser(_gaussian_denoiser, {"context": torch.ones(2, 77)}, {"context": torch.ones(2, 76)}, 7.0)
    with pytest.raises(ValueError, match="finite number"):
        CFGDenoiser(_gaussian_denoiser, {}, {}, float("nan"))
    with pytest.raises(ValueError, match="does not broadcast"):
        MaskedDenoiser(_gaussian_denoiser, x, torch.ones(1, 1, 16, 16), x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaskedDenoiser(_gaussian_denoiser, x, torch.full((1, 1, 8, 8), 255.0), x)
