"""Whole-image time and pipeline overhead, SD1.5 architecture (random full-size weights), fp16,
512x512, 30 steps Euler, CFG 7.5, batch 1: pocketdiffusion vs diffusers' StableDiffusionPipeline
on the same weights in the same process.

Overhead = (ms per step of the pipeline's denoising loop - ms per call of the same UNet called
back to back on the same shapes) / the latter: what the pipeline (sampler arithmetic, CFG,
checks, Python) adds to the UNet calls.

    python bench/pipeline_overhead.py --out overhead.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_models import build_reference, save_diffusers_folder  # noqa: E402

import pocketdiffusion  # noqa: E402
from pocketdiffusion.data.bpe import train_bpe, write_bpe  # noqa: E402

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry, low quality"


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD1.5 at 512x512 with CFG: latents (2, 4, 64, 64), timesteps, text context (2, 77, 768)."""
    return (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16), torch.tensor([500.0, 500.0], device="cuda"),
            torch.randn(2, 77, 768, device="cuda", dtype=torch.float16))


def pure_unet_ms(unet_call, steps: int) -> float:
    """ms per call of `steps` back-to-back UNet calls (CFG batch 2, 64x64 latents), nothing else."""
    for _ in range(3):
        unet_call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        unet_call()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


class StepClock:
    """Wall-clock span from the end of the first denoising step to the end of the last (device
    synced at both ends only): (steps - 1) steps of the loop as the pipeline runs it."""

    def __init__(self):
        self.times = []

    def tick(self, index: int, last: int) -> None:
        if index in (0, last):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def ms_per_step(self, steps: int) -> float:
        first, last = self.times[-2:]
        return 1000 * (last - first) / (steps - 1)


def timed_runs(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure_ours(pipe, args) -> dict:
    gen = lambda: pipe.generate(PROMPT, NEGATIVE, steps=args.steps, cfg=7.5, sampler="euler", seed=0,  # noqa: E731
                                width=512, height=512)
    gen()  # warm-up (and, with graphs, the capture)
    torch.cuda.reset_peak_memory_stats()
    ours = timed_runs(gen, args.repeats)
    peak = (torch.cuda.max_memory_reserved() / 2 ** 20, torch.cuda.max_memory_allocated() / 2 ** 20)
    x, t, ctx = unet_inputs()
    request = pocketdiffusion.GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps,
                                                cfg=7.5, sampler="euler", seed=0, width=512, height=512)
    loops, pures = [], []
    for _ in range(args.repeats):  # interleaved, so clock and thermal drift hit both alike
        clock = StepClock()
        for step in pipe.run(request):
            clock.tick(step.index, args.steps - 1)
        loops.append(clock.ms_per_step(args.steps))
        with torch.inference_mode():  # the very call the pipeline makes (graphed or eager)
            pures.append(pure_unet_ms(lambda: pipe.model_call(x, t, context=ctx), args.steps))
        if hasattr(pipe.model_call, "end_run"):
            pipe.model_call.end_run()  # as after a run: per-run graphs are captured anew by the next loop
    pure, loop = statistics.median(pures), statistics.median(loops)
    return {"s_per_image": statistics.median(ours), "ms_per_step": 1000 * statistics.median(ours) / args.steps,
            "loop_ms_per_step": loop, "unet_ms_per_call": pure, "overhead_pct": 100 * (loop - pure) / pure,
            "max_reserved_mib": peak[0], "max_allocated_mib": peak[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compile", action="store_true", help="the graphed row without torch.compile")
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        unet, vae, encoders = build_reference("sd15", "cuda")
        save_diffusers_folder(Path(tmp), "sd15", unet, vae, encoders)
        vocab, merges = train_bpe([PROMPT, NEGATIVE] * 4, 40)
        write_bpe(vocab, merges, Path(tmp) / "tokenizer")
        del unet, vae, encoders
        torch.cuda.empty_cache()

        # ---- ours: balanced eager, balanced (the default: graphs captured per generation), then
        # fast's UNet (compiled, its graphs kept), all on the balanced load ----
        pipe = pocketdiffusion.load(tmp, device="cuda")
        rows = (("ours, eager", dict(cuda_graphs=False, graphs_per_run=False, compile=False)),
                ("ours (balanced: CUDA graphs per generation)", dict(cuda_graphs=True, graphs_per_run=True, compile=False)),
                ("ours (fast's UNet: compiled, CUDA graphs kept)",
                 dict(cuda_graphs=True, graphs_per_run=False, compile=not args.no_compile)))
        for name, changes in rows:
            pipe.use_plan(pipe.plan.with_(**changes))
            results[name] = measure_ours(pipe, args)
            print(name, json.dumps(results[name]), flush=True)
        del pipe
        torch.cuda.empty_cache()

        # ---- diffusers, same weights ----
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
        from transformers import CLIPTokenizer
        tok = CLIPTokenizer(str(Path(tmp) / "tokenizer" / "vocab.json"), str(Path(tmp) / "tokenizer" / "merges.txt"),
                            model_max_length=77)
        ref = StableDiffusionPipeline.from_pretrained(tmp, tokenizer=tok, safety_checker=None, feature_extractor=None,
                                                      image_encoder=None, requires_safety_checker=False,
                                                      torch_dtype=torch.float16).to("cuda")
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
        rgen = lambda: ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                           generator=torch.Generator("cpu").manual_seed(0), width=512, height=512)
        rgen()
        torch.cuda.reset_peak_memory_stats()
        theirs = timed_runs(rgen, args.repeats)
        peak = (torch.cuda.max_memory_reserved() / 2 ** 20, torch.cuda.max_memory_allocated() / 2 ** 20)
        x, t, ctx = unet_inputs()
        loops, pures = [], []
        for _ in range(args.repeats):
            clock = StepClock()
            ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(0), width=512, height=512,
                callback_on_step_end=lambda p, i, t_, kw: (clock.tick(i, args.steps - 1), kw)[1])
            loops.append(clock.ms_per_step(args.steps))
            with torch.inference_mode():
                pures.append(pure_unet_ms(lambda: ref.unet(x, t, ctx), args.steps))
        pure, loop = statistics.median(pures), statistics.median(loops)
        results["diffusers"] = {
            "s_per_image": statistics.median(theirs), "ms_per_step": 1000 * statistics.median(theirs) / args.steps,
            "loop_ms_per_step": loop, "unet_ms_per_call": pure, "overhead_pct": 100 * (loop - pure) / pure,
            "max_reserved_mib": peak[0], "max_allocated_mib": peak[1]}
    if args.out:  # first: a failure printing the table must not lose the figures
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'':48s} {'s/image':>8s} {'ms/step':>8s} {'loop ms/step':>13s} {'UNet ms/call':>13s} {'overhead %':>11s} "
          f"{'reserved MiB':>13s} {'allocated MiB':>14s}")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue  # the device and torch lines
        print(f"{name:48s} {r['s_per_image']:8.3f} {r['ms_per_step']:8.1f} {r['loop_ms_per_step']:13.2f} {r['unet_ms_per_call']:13.2f} "
              f"{r['overhead_pct']:11.2f} {r['max_reserved_mib']:13.0f} {r['max_allocated_mib']:14.0f}")


if __name__ == "__main__":
    main()
