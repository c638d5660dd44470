"""Probe (session 5; kept so that its figures in docs/BENCHMARKS.md can be reproduced): balanced's graphed eager UNet call, NCHW vs channels_last.

    python bench/probes/balanced_channels_last.py   (from the repository root, on a GPU; run 3: docs/bench/h100_s5run3_channels_last.json)
"""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from memory_gpu import write_model
folder = Path("/tmp/m/sd15")
if not (folder / "model_index.json").exists():
    folder.mkdir(parents=True, exist_ok=True); write_model(folder, "sd15")
import pocketdiffusion
pipe = pocketdiffusion.load(str(folder), device="cuda", memory="balanced")
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor([500.0, 500.0], device="cuda")
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
res = {}
def ms(fn, n=30):
    best = 1e9
    for _ in range(3):
        torch.cuda.synchronize(); a = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); best = min(best, 1000 * (time.perf_counter() - a) / n)
    return best
with torch.inference_mode():
    for layout in ("nchw", "channels_last"):
        if layout == "channels_last":
            pipe.parts.unet.to(memory_format=torch.channels_last)
        call = lambda: pipe.model_call(x, t, context=ctx)
        call(); call()
        res[layout + "_graphed_ms"] = ms(call)
        pipe.model_call.end_run()
        eager = pipe.model_call.model
        res[layout + "_eager_ms"] = ms(lambda: eager(x, t, context=ctx), 10)
        from torch.profiler import ProfilerActivity, profile
        call(); call()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): call()
            torch.cuda.synchronize()
        pipe.model_call.end_run()
        print(layout, prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18), flush=True)
print(json.dumps(res))
Path(os.environ.get("OUT", "/tmp"), "cl_probe.json").write_text(json.dumps(res))
