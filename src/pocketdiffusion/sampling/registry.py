"""The sampler registry: our names and A1111's, each resolved to a sampler and the diffusers
conventions (schedule family, timestep rounding) that make its seeds match diffusers."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from .samplers import (SamplerStep, sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_sde,
                       sample_euler, sample_euler_ancestral, sample_heun, sample_lcm, sample_unipc)


class SamplerSpec(NamedTuple):
    """A registered sampler and the diffusers conventions that make its seeds match diffusers."""

    name: str  # our canonical name
    sample: Callable[..., torch.Tensor]  # sample_*(denoiser, x, sigmas, *, callback, generator, **opts)
    family: str  # schedules family: pass to get_sigmas_discrete / init_noise_sigma

    @property
    def steps(self) -> Callable[..., Iterator[SamplerStep]]:
        return self.sample.steps

    @property
    def quantize_timesteps(self) -> bool:
        """Whether diffusers feeds this sampler's model integer timesteps (EpsDenoiser(quantize=...))."""
        return self.family != "euler"


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("euler", sample_euler, "euler"),
        SamplerSpec("euler_a", sample_euler_ancestral, "euler"),
        SamplerSpec("heun", sample_heun, "euler"),
        SamplerSpec("ddim", sample_ddim, "ddim"),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "dpmsolver"),
        SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "dpmsolver"),
        SamplerSpec("dpmpp_sde", sample_dpmpp_sde, "euler"),
        SamplerSpec("unipc", sample_unipc, "dpmsolver"),
        SamplerSpec("lcm", sample_lcm, "lcm"),
    )
}

# Accepted names (compared lower-cased, whitespace collapsed) -> (canonical name, karras).
# karras None: the name does not say, the caller chooses; A1111 names with a "Karras" sibling
# ("DPM++ 2M" vs "DPM++ 2M Karras") say False / True.
_NAMES: dict[str, tuple[str, bool | None]] = {name: (name, None) for name in SAMPLERS} | {
    "euler_ancestral": ("euler_a", None),
    "euler a": ("euler_a", None),
    "dpm++ 2m": ("dpmpp_2m", False),
    "dpm++ 2m karras": ("dpmpp_2m", True),
    "dpmpp_2m_karras": ("dpmpp_2m", True),
    "dpm++ 2m sde": ("dpmpp_2m_sde", False),
    "dpm++ 2m sde karras": ("dpmpp_2m_sde", True),
    "dpmpp_2m_sde_karras": ("dpmpp_2m_sde", True),
    "dpm++ sde": ("dpmpp_sde", False),
    "dpm++ sde karras": ("dpmpp_sde", True),
    "dpmpp_sde_karras": ("dpmpp_sde", True),
}

# Any sampler over Karras sigmas, as A1111 >= 1.9 writes it ("Euler a" + "Schedule type: Karras"):
# "<name> karras" for every name that does not already say.
_NAMES |= {f"{key} karras": (canonical, True) for key, (canonical, karras) in list(_NAMES.items())
           if not key.endswith("karras") and f"{key} karras" not in _NAMES}


def sampler_spec(name: str) -> tuple[SamplerSpec, bool | None]:
    """(spec, karras) for our names ("euler", "euler_a", "dpmpp_2m", ...) or A1111's ("Euler a",
    "DPM++ 2M Karras", ...), case-insensitively. Unknown names raise ValueError listing the accepted ones."""
    if not isinstance(name, str):
        raise TypeError(f"sampler name must be a string, got {type(name).__name__}")
    key = " ".join(name.lower().split())
    if key not in _NAMES:
        accepted = ", ".join(repr(n) for n in sorted(_NAMES))
        raise ValueError(f"unknown sampler {name!r}; accepted (case-insensitive): {accepted}")
    canonical, karras = _NAMES[key]
    return SAMPLERS[canonical], karras


def resolve_sampler(name: str) -> tuple[Callable[..., torch.Tensor], bool | None]:
    """(sample function, use_karras) for a sampler name; see `sampler_spec`."""
    spec, karras = sampler_spec(name)
    return spec.sample, karras
