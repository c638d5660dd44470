"""Probe (session 5; kept so that its figures in docs/BENCHMARKS.md can be reproduced): fp8 (e4m3) linear layers in fast's compiled UNet: call time and error.

    python bench/probes/fp8_linears.py   (from the repository root, on a GPU; run 6: docs/bench/h100_s5run6_fp8_probe.json)
"""
import json, os, sys, time
from pathlib import Path
import numpy as np
import torch
from torch import nn
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from memory_gpu import write_model, PROMPT, NEGATIVE
folder = Path("/tmp/m/sd15")
if not (folder / "model_index.json").exists():
    folder.mkdir(parents=True, exist_ok=True); write_model(folder, "sd15")
import pocketdiffusion
from pocketdiffusion.speed import GraphedModel
from pocketdiffusion.speed.compile import compile_unet
from pocketdiffusion.pipelines.base import _unet_call
res = {}
pipe = pocketdiffusion.load(str(folder), device="cuda", memory="fast")
gen = lambda: np.asarray(pipe.generate(PROMPT, NEGATIVE, steps=30, cfg=7.5, sampler="euler", seed=0, width=512, height=512)[0], np.float64)
img16 = gen()
torch.manual_seed(0)
x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
t = torch.tensor([500.0, 500.0], device="cuda")
ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
def ms(fn, n=30):
    best = 1e9
    for _ in range(3):
        for _ in range(3): fn()
        torch.cuda.synchronize(); a = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); best = min(best, 1000 * (time.perf_counter() - a) / n)
    return best
def snr(ref, got):
    ref, got = ref.double(), got.double()
    return float(10 * torch.log10((ref ** 2).sum() / ((got - ref) ** 2).sum()))
unet = pipe.parts.unet
with torch.inference_mode():
    res["fp16_ms"] = ms(lambda: pipe.model_call(x, t, context=ctx))
    ref = unet(x.contiguous(memory_format=torch.channels_last), t, ctx).float()
    res["fp16_compiled_snr_db"] = snr(ref, pipe.model_call(x, t, context=ctx))
print(res, flush=True)

class Fp8Linear(nn.Module):
    def __init__(self, linear, rowwise):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) if rowwise else w.abs().amax()).clamp(min=1e-12) / 448.0
        self.w8 = (w / scale).to(torch.float8_e4m3fn)
        self.w_scale = scale.reshape(1, -1).contiguous() if rowwise else scale.reshape(())
        self.bias = linear.bias
        self.rowwise = rowwise
    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.rowwise:
            xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        else:
            xs = x2.abs().amax().float().clamp(min=1e-12) / 448.0
        x8 = (x2.float() / xs).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x8, self.w8.t(), scale_a=xs, scale_b=self.w_scale,
                               out_dtype=torch.bfloat16 if self.rowwise else x.dtype)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], -1)

originals = {}
for name, m in unet.named_modules():
    for cname, child in m.named_children():
        if type(child) is nn.Linear and child.in_features >= 320 and child.out_features >= 320 \
                and child.in_features % 16 == 0 and child.out_features % 16 == 0 and "emb" not in f"{name}.{cname}":
            originals[(m, cname)] = child
res["fp8_layers"] = len(originals)
for rowwise in (True, False):
    key = "rowwise" if rowwise else "tensorwise"
    for (m, cname), child in originals.items():
        setattr(m, cname, Fp8Linear(child, rowwise))
    try:
        torch._dynamo.reset()
        call = GraphedModel(_unet_call(compile_unet(unet)))
        with torch.inference_mode():
            t0 = time.perf_counter(); call(x, t, context=ctx); res[key + "_compile_s"] = time.perf_counter() - t0
            res[key + "_ms"] = ms(lambda: call(x, t, context=ctx))
            res[key + "_snr_db"] = snr(ref, call(x, t, context=ctx))
        pipe.model_call = call
        img8 = gen()
        mse = ((img8 - img16) ** 2).mean()
        res[key + "_image_psnr_db"] = float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))
    except Exception as e:
        res[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(res, flush=True)
    for (m, cname), child in originals.items():
        setattr(m, cname, child)
Path(os.environ.get("OUT", "/tmp"), "fp8_probe.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
