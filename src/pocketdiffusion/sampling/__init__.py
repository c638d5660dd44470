"""The sampling layer: noise schedules, denoiser wrappers and samplers (k-diffusion style).

It knows nothing of UNets or prompts: a model is any `model(x_in, t, **cond)` callable, and a
sampler walks `denoiser(x, sigma) -> x0` down a sigma schedule. A typical txt2img run:

    spec, karras = sampler_spec("DPM++ 2M Karras")
    alphas_cumprod = scaled_linear_alphas_cumprod()
    sigmas = get_sigmas_discrete(alphas_cumprod, 30, karras=bool(karras), family=spec.family)
    denoiser = CFGDenoiser(EpsDenoiser(unet, alphas_cumprod, quantize=spec.quantize_timesteps),
                           cond={"context": text}, uncond={"context": empty}, scale=7.5)
    x = torch.randn(shape, generator=gen) * init_noise_sigma(sigmas, family=spec.family)
    latents = spec.sample(denoiser, x, sigmas, generator=gen)   # or: for step in spec.steps(...)
"""
from .denoisers import CFGDenoiser, EpsDenoiser, MaskedDenoiser, VDenoiser
from .registry import SAMPLERS, SamplerSpec, resolve_sampler, sampler_spec
from .samplers import (
    NonFiniteLatentsError,
    SamplerStep,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_unipc,
)
from .schedules import (
    discrete_timesteps,
    get_sigmas_discrete,
    get_sigmas_karras,
    init_noise_sigma,
    model_sigmas,
    scaled_linear_alphas_cumprod,
    sigma_to_t,
    t_to_sigma,
)

__all__ = [
    "SAMPLERS",
    "CFGDenoiser",
    "EpsDenoiser",
    "MaskedDenoiser",
    "NonFiniteLatentsError",
    "SamplerSpec",
    "SamplerStep",
    "VDenoiser",
    "discrete_timesteps",
    "get_sigmas_discrete",
    "get_sigmas_karras",
    "init_noise_sigma",
    "model_sigmas",
    "resolve_sampler",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_unipc",
    "sampler_spec",
    "scaled_linear_alphas_cumprod",
    "sigma_to_t",
    "t_to_sigma",
]
