"""The fast mode's UNet under compiler settings (speed issue): per variant, a fresh process loads
SD1.5 (random full-size weights, fp16) with memory="fast", makes one image (compiling and
capturing), then times 30 replayed UNet calls (CFG batch 2, 64x64 latents) and two whole
512x512 images (30 steps Euler, CFG 7.5). A variant is a set of environment variables that
speed/compile.py reads.

    python bench/fast_variants.py --variants default cudnn_benchmark max_autotune freezing coordinate_descent
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory_gpu import NEGATIVE, PROMPT, SRC, write_model  # noqa: E402

VARIANTS = {
    "default": {},
    "cudnn_benchmark": {"POCKETDIFFUSION_CUDNN_BENCHMARK": "1"},
    "max_autotune": {"POCKETDIFFUSION_COMPILE_MODE": "max-autotune-no-cudagraphs"},
    # Inductor's own switches: weights folded in as constants; Triton launch parameters tuned
    "freezing": {"TORCHINDUCTOR_FREEZING": "1"},
    "coordinate_descent": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"},
}

CHILD = r"""
import json, statistics, sys, time
import torch
import pocketdiffusion
folder, prompt, negative = sys.argv[1:4]
t0 = time.perf_counter()
pipe = pocketdiffusion.load(folder, device="cuda", memory="fast")
gen = lambda: pipe.generate(prompt, negative, steps=30, cfg=7.5, sampler="euler", seed=0, width=512, height=512)
gen()
first = time.perf_counter() - t0
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(2):
    torch.cuda.synchronize(); s = time.perf_counter(); gen(); torch.cuda.synchronize()
    times.append(time.perf_counter() - s)
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor([500.0, 500.0], device="cuda")
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
calls = []
with torch.inference_mode():
    for _ in range(3):
        for _ in range(3):
            pipe.model_call(x, t, context=ctx)
        torch.cuda.synchronize(); s = time.perf_counter()
        for _ in range(30):
            pipe.model_call(x, t, context=ctx)
        torch.cuda.synchronize(); calls.append(1000 * (time.perf_counter() - s) / 30)
print(json.dumps({"first_s": first, "s_per_image": statistics.median(times), "unet_ms": min(calls),
                  "reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20,
                  "device": torch.cuda.get_device_name()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per variant")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sd15_fast_"))
    results = {}
    try:
        write_model(folder, "sd15")
        for name in args.variants:
            env = {**os.environ, **VARIANTS[name],
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, str(folder), PROMPT, NEGATIVE], env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
                results[name] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                                 else {"error": done.stderr.strip().splitlines()[-1:]})
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"over {args.timeout} s"}
            print(name, json.dumps(results[name]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
