"""Probe (session 6): where a whole 512x512 SD1.5 image's time goes, per memory mode: wall-clock
from the start to the first step's yield (prompt encoding + step 1, the per-generation capture
included), the other 29 steps, and the decode (synchronized at each mark; median of 5 images
after a warm-up), then the GPU kernels of one image by CUDA time.

    python bench/probes/image_phases.py --folder /tmp/m/sd15 --modes balanced low [--out phases.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pocketdiffusion

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry, low quality"


def phases(pipe, request) -> dict[str, float]:
    torch.cuda.synchronize()
    marks = [time.perf_counter()]
    run = pipe.run(request)
    for step in run:
        if step.index in (0, request.steps - 1):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
    torch.cuda.synchronize()
    marks.append(time.perf_counter())
    return {"text + step 1": marks[1] - marks[0], "steps 2..n": marks[2] - marks[1], "decode": marks[3] - marks[2],
            "image": marks[3] - marks[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--modes", nargs="+", default=["balanced", "low"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    request = pocketdiffusion.GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=30, cfg=7.5,
                                                sampler="euler", seed=0, width=512, height=512)
    results = {}
    for mode in args.modes:
        pipe = pocketdiffusion.load(args.folder, device="cuda", memory=mode)
        phases(pipe, request)  # warm-up: kernels compiled, graphs captured
        runs = [phases(pipe, request) for _ in range(args.repeats)]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            phases(pipe, request)
        gpu_us = lambda e: e.self_device_time_total  # noqa: E731
        kernels = sorted(prof.key_averages(), key=lambda e: -gpu_us(e))[:20]
        row["gpu_ms_total"] = sum(gpu_us(e) for e in prof.key_averages()) / 1000
        row["top_kernels"] = [(e.key[:90], e.count, round(gpu_us(e) / 1000, 2)) for e in kernels]
        results[mode] = row
        print(mode, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del pipe
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "modes": results}, f, indent=1)


if __name__ == "__main__":
    main()
