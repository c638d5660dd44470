"""Full-size SD1.5 on the CPU (issues 5 and 6): peak RSS and time per step of our memory modes
against diffusers' StableDiffusionPipeline fp32, same random weights, same workload, one run.

The SD1.5 architecture with random weights (bench/reference_models.py, every matrix scaled by
0.5) is written once as a diffusers folder (safetensors) with a small BPE tokenizer. Then each
row runs in a fresh process with 2 threads: load, then one 512x512 txt2img, Euler, CFG 7.5,
batch 1. Peak = VmHWM (the process's own high-water mark, load included) minus the RSS right
after `import torch` (DESIGN.md, Measuring). ms/step = median of the loop's steps after the first
(each step timed end to end, as the sampler loop yields them); s/image = text encoding, all
steps and the decode. `fast` is not a row: on the CPU it is balanced (memory/plan.py). The last
column is the planner's prediction of each of our rows (`pocketdiffusion plan`, memory/estimate.py)
and its error against the measured peak.

    python bench/memory_cpu.py --steps 3 --modes balanced low minimal diffusers
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # the children measure this checkout, whatever is installed
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry, low quality"
MIB = 2 ** 20

MEASURE = r"""
import json, statistics, sys, time
import torch

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

base = status("VmRSS:")  # a process that has only imported torch
torch.set_num_threads(2)
which, folder, steps, size, prompt, negative = sys.argv[1:7]
steps, size = int(steps), int(size)
ends = []  # perf_counter at the end of each denoising step
t0 = time.perf_counter()
if which == "diffusers":
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(f"{folder}/tokenizer/vocab.json", f"{folder}/tokenizer/merges.txt", model_max_length=77)
    pipe = StableDiffusionPipeline.from_pretrained(folder, tokenizer=tok, safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
         generator=torch.Generator().manual_seed(0),
         callback_on_step_end=lambda p, i, t, kw: (ends.append(time.perf_counter()), kw)[1])
else:
    import pocketdiffusion
    pipe = pocketdiffusion.load(folder, device="cpu", memory=which)
    loaded = time.perf_counter()
    request = pocketdiffusion.GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, cfg=7.5,
                                                sampler="euler", seed=0, width=size, height=size)
    run = pipe.run(request)
    for _ in run:
        ends.append(time.perf_counter())
    assert run.result is not None and len(run.result.images) == 1
done = time.perf_counter()
step_ms = [1000 * (b - a) for a, b in zip(ends, ends[1:])]  # steps 2.. (step 1 has no clean start)
print(json.dumps({"which": which, "peak": status("VmHWM:") - base, "base": base, "load_s": loaded - t0,
                  "image_s": done - loaded, "step_ms": step_ms, "ms_per_step": statistics.median(step_ms),
                  "threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def write_model(folder: Path) -> None:
    """The SD1.5 architecture, random weights, as a diffusers folder with a tokenizer."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    from reference_models import build_reference, save_diffusers_folder

    from pocketdiffusion.data.bpe import train_bpe, write_bpe

    unet, vae, encoders = build_reference("sd15")
    save_diffusers_folder(folder, "sd15", unet, vae, encoders)
    vocab, merges = train_bpe([PROMPT, NEGATIVE] * 4, 40)
    write_bpe(vocab, merges, folder / "tokenizer")


def measure(which: str, folder: Path, steps: int, size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", MEASURE, which, str(folder), str(steps), str(size), PROMPT,
                           NEGATIVE], check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def planner_predictions(folder: Path, modes: list[str], size: int) -> dict[str, int]:
    """`pocketdiffusion plan`'s predicted peak of each of our modes (memory/estimate.py), in bytes."""
    sys.path.insert(0, str(SRC))
    from pocketdiffusion.checkpoints.load import read_config
    from pocketdiffusion.memory.estimate import predict
    from pocketdiffusion.memory.plan import plan_for
    config = read_config(folder)
    return {mode: predict(config, plan_for(mode, "cpu"), "cpu", size, size).peak for mode in modes
            if mode != "diffusers"}


def load_average() -> float:
    return os.getloadavg()[0]


def wait_until_quiet(threshold: float, hold_s: float = 30, limit_s: float = 1800) -> None:
    """Time only on an otherwise idle machine: wait until the 1-minute load average has stayed
    below `threshold` for `hold_s` seconds (our own previous row raises it to about 2, its 2
    threads, and it decays in ~20 s; a test suite between two tests dips below it for moments)."""
    start = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < hold_s:
        if load_average() >= threshold:
            quiet_since = time.monotonic()
        if time.monotonic() - start > limit_s:
            raise SystemExit(f"the 1-minute load average stayed at {load_average():.2f} >= {threshold} "
                             f"for {limit_s:.0f} s: the machine is busy, not timing")
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps per image (at least 2)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--modes", nargs="+", default=["balanced", "low", "minimal", "diffusers"],
                    choices=["balanced", "low", "minimal", "diffusers"])
    ap.add_argument("--folder", type=Path, default=None,
                    help="keep the model here (written if missing; default: a temporary folder)")
    ap.add_argument("--quiet-below", type=float, default=1.5,
                    help="start each row only when the 1-minute load average is below this (0: don't wait)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is not timed)")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="sd15_cpu_"))
    try:
        if not (folder / "model_index.json").exists():
            print(f"writing the random SD1.5 model to {folder} ...", flush=True)
            write_model(folder)
        results = []
        for which in args.modes:
            if args.quiet_below > 0:
                wait_until_quiet(args.quiet_below)
            before = load_average()
            r = measure(which, folder, args.steps, args.size)
            r["load_before"], r["load_after"] = before, load_average()
            results.append(r)
            print(json.dumps(r), flush=True)
        if args.out:  # before anything else can fail
            args.out.write_text(json.dumps(results, indent=1))
        predicted = planner_predictions(folder, [r["which"] for r in results], args.size)  # reads the folder
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    anchor = next((r for r in results if r["which"] == "diffusers"), None)
    print(f"\nSD1.5 random weights, {args.size}x{args.size}, {args.steps} steps Euler, CFG 7.5, batch 1, CPU fp32, "
          f"2 threads, torch {results[0]['torch']}")
    print(f"{'run':22s} {'peak MiB':>9s} {'ms/step':>9s} {'vs diffusers':>13s} {'s/image':>8s} {'load s':>7s} "
          f"{'load avg':>9s} {'predicted':>18s}")
    for r in results:
        name = "diffusers fp32" if r["which"] == "diffusers" else f"pocketdiffusion {r['which']}"
        ratio = f"{r['ms_per_step'] / anchor['ms_per_step']:.2f}x" if anchor else "-"
        # 2 threads of ours load the machine to about 2: well above, something else ran meanwhile
        disturbed = "  (disturbed: load rose above 2.5)" if r["load_after"] > 2.5 else ""
        guess = predicted.get(r["which"])
        guess = f"{guess / MIB:.0f} MiB ({(guess - r['peak']) / r['peak']:+.1%})" if guess else ""
        print(f"{name:22s} {r['peak'] / MIB:9.0f} {r['ms_per_step']:9.0f} {ratio:>13s} {r['image_s']:8.1f} "
              f"{r['load_s']:7.1f} {r['load_before']:4.2f}/{r['load_after']:5.2f} {guess:>18s}{disturbed}")
        r["predicted"] = predicted.get(r["which"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
