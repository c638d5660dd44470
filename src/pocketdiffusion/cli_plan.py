"""`pocketdiffusion plan MODEL [--budget B] [--size WxH] [--batch N]`: which memory plan fits, its
predicted peak and why, and every alternative's prediction. Reads no weight (memory/planner.py)."""
from __future__ import annotations

import argparse
import re

SIZE_FORMAT = re.compile(r"^(\d+)[xX](\d+)$")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a .safetensors/.ckpt file, a diffusers folder or a model name (shapes, ...)")
    parser.add_argument("--budget", metavar="B",
                        help="the memory to fit in, e.g. 1.5GB, 800MB, 2GiB (binary units: 1GB = 1024MB; "
                             "default: the device's free memory, available RAM on the CPU)")
    parser.add_argument("--size", metavar="WxH", help="image size (default: the model's native size)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="images per batch (default: 1)")
    parser.add_argument("--device", metavar="DEVICE",
                        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")


def parse_size(text: str) -> tuple[int, int]:
    match = SIZE_FORMAT.match(text.strip())
    if match is None:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, such as 512x512")
    return int(match.group(1)), int(match.group(2))


def describe_residency(plan) -> str:
    """Where each component's weights live under `plan`, in a few words."""
    if plan.stream_weights:
        return "all weights streamed block by block"
    unet = "UNet int8" if plan.quantize_unet else f"UNet {'stored 16-bit' if plan.unet_store else 'resident'}"
    others = [name for name, on in (("text encoders", plan.stream_text), ("VAE", plan.stream_vae)) if on]
    graphs = ", CUDA graphs" + (" captured per generation" if plan.graphs_per_run else "") if plan.cuda_graphs else ""
    parts = [unet + (", compiled" if plan.compile else "") + graphs]
    if others:
        parts.append(" and ".join(others) + " streamed")
    if plan.park_idle:
        parts.append("VAE parked in host memory")
    return "; ".join(parts)


def describe_tiling(plan) -> str:
    if plan.vae_tile_above is None:
        return "VAE untiled"
    if plan.vae_tile_above == 0:
        return "VAE tiled"
    side = int(plan.vae_tile_above ** 0.5)
    return f"VAE tiled above {side}x{side}" if side * side == plan.vae_tile_above else \
        f"VAE tiled above {plan.vae_tile_above} pixels"


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from .catalog import resolve
    from .checkpoints.load import read_config
    from .memory.estimate import MIB
    from .memory.planner import choose_plan, parse_budget

    budget = parse_budget(args.budget) if args.budget is not None else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = resolve(args.model)
    config = read_config(model.path, model.unet_subfolder)
    width, height = parse_size(args.size) if args.size else (config.native_size, config.native_size)
    choice = choose_plan(config, device, width, height, args.batch, budget)
    plan, predicted = choice.plan, choice.prediction
    print(f"model:     {model.name} ({config.family}), {width}x{height}, batch {args.batch}, on {device}")
    print(f"budget:    {choice.budget / MIB:,.0f} MiB ({choice.budget_source})")
    print(f"plan:      memory={plan.mode}: {describe_residency(plan)}; attention {plan.attention}; "
          f"{describe_tiling(plan)}")
    print(f"predicted: {predicted.peak / MIB:,.0f} MiB peak = weights {predicted.weights / MIB:,.0f} + "
          f"{predicted.largest_phase} {max(predicted.text, predicted.unet, predicted.vae) / MIB:,.0f} + "
          f"runtime {predicted.overhead / MIB:,.0f}")
    print(f"why:       {choice.reason}")
    print("all plans, fastest first:")
    for label, prediction in choice.candidates:
        fits = "fits" if prediction.peak <= choice.budget else "too big"
        print(f"  {label:<22} {prediction.peak / MIB:>9,.0f} MiB  {fits}")
    return 0
