"""The planner: the fastest plan whose predicted peak fits a memory budget, and why.

Candidates, fastest first: each mode of memory/plan.py MODES (fast on CUDA only, balanced, low, minimal), the first
two also with the VAE tiled at every size (a slower decode, a smaller one). The first candidate
whose predicted peak (memory/estimate.py) fits the budget wins; the others are reported with
their predictions. With no budget given, the budget is what the device has free: CUDA's free
memory, or the system's available RAM on the CPU (and on MPS, which shares it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import PocketDiffusionError
from .tiling import should_tile
from .estimate import MIB, Prediction, predict
from .plan import MODES, MemoryPlan, plan_for

UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
BUDGET_FORMAT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
BUDGET_HELP = ("a size such as 1.5GB, 800MB or 2GiB (units B, KB, MB, GB, TB; binary, as GPU memory is "
               "quoted: 1GB = 1024MB)")


class PlanError(PocketDiffusionError, ValueError):
    """A budget that cannot be read, or that no plan fits."""


def parse_budget(text: str) -> int:
    """'1.5GB' -> bytes. Raises PlanError naming what was wrong and what is expected."""
    if not isinstance(text, str):
        raise PlanError(f"budget must be a string such as '1.5GB', got {type(text).__name__}")
    match = BUDGET_FORMAT.match(text)
    if match is None:
        raise PlanError(f"budget {text!r} is not a size: expected {BUDGET_HELP}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and match.group(3) and match.group(3).lower() == "ib":
        raise PlanError(f"budget {text!r} is not a size: expected {BUDGET_HELP}")
    budget = int(number * UNITS[unit])
    if budget <= 0:
        raise PlanError(f"budget {text!r} is zero: expected a positive size, {BUDGET_HELP}")
    return budget


def free_memory(device: torch.device | str) -> int:
    """What `device` has free now: CUDA's free memory, else the system's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Choice:
    """The chosen plan, every candidate's prediction (fastest first) and the reason in words."""

    plan: MemoryPlan
    prediction: Prediction
    candidates: list[tuple[str, Prediction]]
    budget: int
    budget_source: str  # "--budget" or what free memory was read
    reason: str


def candidates(config: ModelConfig, device: torch.device | str, width: int, height: int,
               batch: int = 1) -> list[tuple[str, Prediction]]:
    """(label, prediction) of every candidate plan, fastest first."""
    out = []
    pixels = width * height
    minimal = plan_for("minimal", device)
    for mode in MODES:
        plan = plan_for(mode, device)
        if mode == "fast" and not plan.cuda_graphs:
            continue  # off CUDA, fast is balanced: listing it twice would say nothing
        out.append((mode, predict(config, plan, device, width, height, batch)))
        if not should_tile(pixels, plan.vae_tile_above):
            # the same plan with minimal's small VAE tiles: slower decoding, a smaller peak
            tiled = plan.with_(vae_tile_above=0, vae_tile=minimal.vae_tile, vae_tile_overlap=minimal.vae_tile_overlap)
            prediction = predict(config, tiled, device, width, height, batch)
            if prediction.peak < out[-1][1].peak:  # listed only where tiling saves memory
                out.append((f"{mode}, VAE tiled", prediction))
    return out


def choose_plan(config: ModelConfig, device: torch.device | str, width: int, height: int, batch: int = 1,
                budget: int | None = None) -> Choice:
    """The fastest candidate whose predicted peak fits `budget` bytes (default: free memory)."""
    for name, value in (("width", width), ("height", height), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive int, got {value!r}")
    factor = 2 ** (len(config.unet.channel_mult) - 1) * config.vae.downscale
    if width % factor or height % factor:
        raise PlanError(f"the size {width}x{height} must be a multiple of {factor} a side for this model")
    source = "--budget"
    if budget is None:
        budget = free_memory(device)
        source = "free CUDA memory" if torch.device(device).type == "cuda" else "available RAM"
    listed = candidates(config, device, width, height, batch)
    for index, (label, prediction) in enumerate(listed):
        if prediction.peak <= budget:
            faster = listed[:index]
            why = (f"{label} is the fastest plan that fits: {_mib(prediction.peak)} predicted "
                   f"<= {_mib(budget)} ({source})")
            if faster:
                why += "; faster plans need more: " + ", ".join(f"{l} {_mib(p.peak)}" for l, p in faster)
            return Choice(prediction.plan, prediction, listed, budget, source, why)
    smallest_label, smallest = listed[-1]
    raise PlanError(f"a budget of {_mib(budget)} ({source}) is too small for any plan of this model at "
                    f"{width}x{height}, batch {batch}: the smallest, {smallest_label}, needs {_mib(smallest.peak)} "
                    f"(predicted); expected a budget of at least that, or a smaller size")


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.0f} MiB"
