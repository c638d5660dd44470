"""Peak GPU memory and speed of our memory modes against diffusers' (issues 5 and 6), same random
full-size weights, same workload, one run, one card.

The architecture (SD1.5 or SDXL, random weights scaled by 0.5: bench/reference_models.py) is
written once as an fp16 diffusers folder with a small BPE tokenizer. Each row then runs in a
fresh process (the allocator's high-water marks start clean): load, one warm-up image, then
`--repeats` timed images (txt2img, Euler, CFG 7.5, batch 1, prompt encoding and decoding inside
the timed region, as ../shared/ANCHORS.md). Peak = torch.cuda.max_memory_reserved() /
max_memory_allocated() over the timed images (reset after the warm-up, as the anchors); the
`whole` columns are the same over the process's whole life (load and warm-up, compilation or
graph capture included). ms/step = s/image / steps, as the anchors count it.

    python bench/memory_gpu.py --arch sd15 --size 512 --steps 30 --out sd15.json
    python bench/memory_gpu.py --arch sdxl --size 1024 --modes balanced low minimal diffusers
    python bench/memory_gpu.py --growth 512 768 1024 2048 --steps 2 --plot docs/images/memory_growth.png
    python bench/memory_gpu.py --device cpu --steps 3    # the CPU table (bench/memory_cpu.py)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on the moon", "blurry, low quality"
OURS = ("fast", "balanced", "low", "minimal")
THEIRS = ("diffusers", "diffusers_model_offload", "diffusers_group_offload", "diffusers_sequential_offload")
LABELS = {"diffusers": "diffusers fp16 (default)", "diffusers_model_offload": "diffusers enable_model_cpu_offload",
          "diffusers_sequential_offload": "diffusers enable_sequential_cpu_offload",
          "diffusers_group_offload": "diffusers group offload (leaf, stream)"}
MIB = 2 ** 20

MEASURE = r"""
import json, statistics, sys, time
started = time.perf_counter()  # before importing torch: "process start" for the warm-start figure
import torch

which, folder, arch, steps, size, repeats, prompt, negative = sys.argv[1:9]
steps, size, repeats = int(steps), int(size), int(repeats)
t0 = time.perf_counter()
if which.startswith("diffusers"):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    toks = {name: CLIPTokenizer(f"{folder}/{name}/vocab.json", f"{folder}/{name}/merges.txt", model_max_length=77)
            for name in (["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"])}
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {} if arch == "sdxl" else dict(safety_checker=None, feature_extractor=None, image_encoder=None,
                                            requires_safety_checker=False)
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float16, **toks, **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if which == "diffusers":
        pipe.to("cuda")
    elif which == "diffusers_model_offload":
        pipe.enable_model_cpu_offload()
    elif which == "diffusers_sequential_offload":
        pipe.enable_sequential_cpu_offload()
    elif which == "diffusers_group_offload":
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    else:
        raise SystemExit(f"unknown row {which}")
    generate = lambda: pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5,
                            width=size, height=size, generator=torch.Generator("cpu").manual_seed(0)).images
else:
    import ast
    import pocketdiffusion
    import pocketdiffusion.memory.plan as plans
    mode, _, changes = which.partition(":")  # a variant: "balanced:vae_tile=24,vae_tile_overlap=6"
    if changes:  # applied where load() reads the plan, so a variant may change what loading does too
        fields = {k: ast.literal_eval(v) for k, v in (item.split("=") for item in changes.split(","))}
        named_plan = plans.plan_for
        plans.plan_for = lambda m, d: named_plan(m, d).with_(**fields) if m == mode else named_plan(m, d)
    pipe = pocketdiffusion.load(folder, device="cuda", memory=mode)
    generate = lambda: pipe.generate(prompt, negative, steps=steps, cfg=7.5, sampler="euler", seed=0,
                                     width=size, height=size)
torch.cuda.synchronize()
loaded = time.perf_counter()
first = generate()
torch.cuda.synchronize()
first_image_s = time.perf_counter() - loaded
whole_reserved, whole_allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(repeats):
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = generate()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
phases = {}  # ours: the allocated peak of each phase, from one more (untimed) image
if not which.startswith("diffusers"):
    torch.cuda.reset_peak_memory_stats()
    run = pipe.run(pocketdiffusion.GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, cfg=7.5,
                                                     sampler="euler", seed=0, width=size, height=size))
    for step in run:
        if step.index in (0, steps - 1):
            phases["text + step 1" if step.index == 0 else "steps"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    phases["decode"] = torch.cuda.max_memory_allocated()
# Where the reserved memory sits after the image (kept CUDA graphs' private pools vs the rest):
# reserved and allocated MiB per pool, to tell the allocator's slack from live tensors.
segments = {}
for segment in torch.cuda.memory_snapshot():
    pool = "graph pool" if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0) else "general"
    total = segments.setdefault(pool, [0, 0])
    total[0] += segment["total_size"] / 2 ** 20
    total[1] += segment["allocated_size"] / 2 ** 20
import numpy as np
pixels = np.asarray(images[0])
print(json.dumps({"which": which, "arch": arch, "size": size, "steps": steps,
                  "reserved": reserved, "allocated": allocated, "phases": phases, "segments": segments,
                  "whole_reserved": max(whole_reserved, reserved), "whole_allocated": max(whole_allocated, allocated),
                  "s_per_image": statistics.median(times), "times": times, "load_s": loaded - t0,
                  "first_image_s": first_image_s, "import_torch_s": t0 - started,
                  "start_to_full_speed_s": loaded - started + first_image_s, "finite": bool(np.isfinite(pixels).all()),
                  "mean_pixel": float(pixels.mean()), "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__}))
"""


def write_model(folder: Path, arch: str) -> None:
    """The architecture with random weights, fp16, as a diffusers folder with BPE tokenizers."""
    import torch
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(SRC))
    from reference_models import build_reference, save_diffusers_folder

    from pocketdiffusion.data.bpe import train_bpe, write_bpe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, vae, encoders = build_reference(arch, device)
    for module in (unet, vae, *encoders):
        module.half()
    save_diffusers_folder(folder, arch, unet, vae, encoders)
    vocab, merges = train_bpe([PROMPT, NEGATIVE] * 4, 40)
    for name in (["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]):
        write_bpe(vocab, merges, folder / name)
    del unet, vae, encoders
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(which: str, folder: Path, arch: str, steps: int, size: int, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", MEASURE, which, str(folder), arch, str(steps), str(size),
                           str(repeats), PROMPT, NEGATIVE], check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        print(f"{which} at {size}: failed: {error}", file=sys.stderr, flush=True)
        return {"which": which, "arch": arch, "size": size, "steps": steps, "error": error,
                "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_variant(which: str) -> None:
    """A row of ours: a mode, or `mode:field=value,...` with MemoryPlan fields and Python literals
    (checked here, before any process starts, with what was wrong)."""
    import ast
    import dataclasses
    mode, colon, changes = which.partition(":")
    if mode not in OURS:
        raise ValueError(f"unknown row {which!r}: expected one of {', '.join(OURS + THEIRS)} or mode:field=value,...")
    if not colon:
        return
    sys.path.insert(0, str(SRC))
    from pocketdiffusion.memory.plan import MemoryPlan
    names = {f.name for f in dataclasses.fields(MemoryPlan)} - {"mode"}
    for item in changes.split(","):
        key, equals, value = item.partition("=")
        if not equals or key not in names:
            raise ValueError(f"{which!r}: {item!r} is not field=value with a MemoryPlan field "
                             f"({', '.join(sorted(names))})")
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{which!r}: the value of {key} must be a Python literal (24, True, None), "
                             f"got {value!r}") from None


def label(which: str) -> str:
    return LABELS.get(which, f"pocketdiffusion {which}")


def print_table(results: list[dict]) -> None:
    ok = [r for r in results if "error" not in r]
    if ok:
        print(f"\n{ok[0]['device']}, torch {ok[0]['torch']}")
    print(f"{'arch':5s} {'size':>5s} {'run':42s} {'reserved MiB':>12s} {'allocated':>10s} {'whole res.':>10s} "
          f"{'s/image':>8s} {'ms/step':>8s} {'first s':>8s} {'load s':>7s}")
    for r in results:
        if "error" in r:
            print(f"{r['arch']:5s} {r['size']:5d} {label(r['which']):42s} FAILED: {r['error'][:80]}")
            continue
        print(f"{r['arch']:5s} {r['size']:5d} {label(r['which']):42s} {r['reserved'] / MIB:12.0f} "
              f"{r['allocated'] / MIB:10.0f} {r['whole_reserved'] / MIB:10.0f} {r['s_per_image']:8.3f} "
              f"{1000 * r['s_per_image'] / r['steps']:8.1f} {r['first_image_s']:8.2f} {r['load_s']:7.1f}"
              + ("" if r["finite"] else "  (non-finite pixels!)")
              + ("  phases " + ", ".join(f"{k} {v / MIB:.0f}" for k, v in r["phases"].items()) if r.get("phases") else "")
              + ("  after: " + ", ".join(f"{k} {v[0]:.0f} reserved / {v[1]:.0f} allocated"
                                         for k, v in r["segments"].items()) if r.get("segments") else ""))


def plot_growth(results: list[dict], path: Path) -> None:
    """Peak reserved against the image side, one line per run, log-scaled memory axis, drawn with
    Pillow (PNG)."""
    import math

    from PIL import Image, ImageDraw
    ok = [r for r in results if "error" not in r]
    runs = sorted({r["which"] for r in ok}, key=lambda w: (w.startswith("diffusers"), w))
    sizes = sorted({r["size"] for r in ok})
    low, high = math.log2(min(r["reserved"] for r in ok) / MIB / 1.3), math.log2(max(r["reserved"] for r in ok) / MIB * 1.3)
    width, height, left, bottom, margin, legend = 960, 560, 90, 60, 40, 300
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x_of = lambda s: left + (width - left - legend) * sizes.index(s) / max(1, len(sizes) - 1)  # noqa: E731
    y_of = lambda mib: height - bottom - (height - bottom - margin) * (math.log2(mib) - low) / (high - low)  # noqa: E731
    draw.line([(left, margin), (left, height - bottom), (width - legend + 10, height - bottom)], fill="black")
    for s in sizes:
        draw.text((x_of(s) - 24, height - bottom + 8), f"{s}x{s}", fill="black")
    for power in range(math.ceil(low), math.floor(high) + 1):
        y = y_of(2 ** power)
        draw.line([(left - 4, y), (width - legend + 10, y)], fill="#e0e0e0")
        draw.text((8, y - 6), f"{2 ** power} MiB", fill="black")
    colours = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#555555", "#8c564b", "#9467bd", "#e377c2"]
    for i, which in enumerate(runs):
        points = [(x_of(r["size"]), y_of(r["reserved"] / MIB)) for r in sorted(ok, key=lambda r: r["size"])
                  if r["which"] == which]
        colour = colours[i % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.line([(width - legend + 30, margin + 20 * i + 6), (width - legend + 55, margin + 20 * i + 6)],
                  fill=colour, width=3)
        draw.text((width - legend + 60, margin + 20 * i), label(which).replace("pocketdiffusion ", "ours "),
                  fill="black")
    arch = ok[0]["arch"] if ok else ""
    draw.text((left, 12), f"peak torch.cuda.max_memory_reserved, {arch} txt2img, CFG 7.5, batch 1 "
              f"({ok[0]['device'] if ok else ''})", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    known, rest = device.parse_known_args()
    if known.device == "cpu":  # the same comparison on the CPU: bench/memory_cpu.py, its options
        sys.path.insert(0, str(HERE))
        import memory_cpu
        sys.argv = [str(HERE / "memory_cpu.py"), *rest]
        memory_cpu.main()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: our modes and diffusers fp32 on the CPU (bench/memory_cpu.py and its options)")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--size", type=int, default=None, help="image side (default: 512 for sd15, 1024 for sdxl)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="timed images per row, after one warm-up")
    ap.add_argument("--modes", nargs="+", default=[*OURS, *THEIRS],
                    help=f"rows: {', '.join(OURS + THEIRS)}, or a variant of ours, mode:field=value,... "
                         "(MemoryPlan fields, e.g. balanced:vae_tile=24,vae_tile_overlap=6)")
    ap.add_argument("--growth", type=int, nargs="+", default=None,
                    help="run every mode at each of these sides instead of --size (the memory-growth plot)")
    ap.add_argument("--folder", type=Path, default=None, help="keep the model here (written if missing)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="with --growth: write the plot here (PNG)")
    ap.add_argument("--replot", type=Path, nargs="+", default=None,
                    help="only draw --plot from these --out JSON files (runs earlier), no measuring")
    args = ap.parse_args()
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot")
        results = [r for f in args.replot for r in json.loads(f.read_text())]
        print_table(results)
        plot_growth(results, args.plot)
        return
    for which in args.modes:
        if which not in THEIRS:
            try:
                check_variant(which)
            except ValueError as error:
                ap.error(f"--modes: {error}")
    folder = args.folder or Path(tempfile.mkdtemp(prefix=f"{args.arch}_gpu_"))
    sizes = args.growth or [args.size or (1024 if args.arch == "sdxl" else 512)]
    results = []
    try:
        if not (folder / "model_index.json").exists():
            print(f"writing the random {args.arch} model to {folder} ...", flush=True)
            write_model(folder, args.arch)
        for size in sizes:
            for which in args.modes:
                r = measure(which, folder, args.arch, args.steps, size, args.repeats)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "stderr"}), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(results, indent=1))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(results)
    if args.plot:
        plot_growth(results, args.plot)


if __name__ == "__main__":
    main()
