"""Probe (session 6): the SD1.5 UNet (random weights scaled by 0.5, fp32, 2 threads) on the CPU,
eager against torch.compile (Inductor's C++ backend) with and without freezing (weights folded
in as constants and prepacked for oneDNN), and with channels_last: seconds per call (CFG batch 2,
64x64 latents), the first call's compile time, the largest difference to eager, and the peak RSS.
Each variant is its own process (the RSS is that variant's alone).

    python bench/probes/cpu_compile.py eager
    python bench/probes/cpu_compile.py freeze      # also: freeze_cl, compile, compile_cl
"""
import os, sys, time, json
import torch
torch.set_num_threads(2)
from pocketdiffusion.config import SD15
from pocketdiffusion.models.unet import UNetModel
variant = sys.argv[1]
torch.manual_seed(0)
unet = UNetModel(SD15.unet).eval()
with torch.no_grad():
    for p in unet.parameters():
        p.mul_(0.5)
x = torch.randn(2, 4, 64, 64); t = torch.tensor([500.0, 500.0]); ctx = torch.randn(2, 77, 768)
res = {"variant": variant}
if variant == "eager":
    f = unet
else:
    import torch._inductor.config as ic
    ic.freezing = variant.startswith("freeze")
    if "cl" in variant:
        unet = unet.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    f = torch.compile(unet, dynamic=False)
with torch.no_grad():
    s = time.perf_counter(); ref = f(x, t, ctx); res["first_s"] = time.perf_counter() - s
    times = []
    for _ in range(2):
        s = time.perf_counter(); out = f(x, t, ctx); times.append(time.perf_counter() - s)
    res["call_s"] = times
    eager = unet(x, t, ctx) if variant != "eager" else out
    res["max_rel_err"] = float((out - eager).abs().max() / eager.abs().max())
import resource
res["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res), flush=True)
