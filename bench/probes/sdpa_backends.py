"""Probe (session 6): PyTorch's SDPA backends (flash, memory-efficient, cuDNN) on the attention
shapes SD1.5 512x512 and SDXL 1024x1024 run with CFG (batch 2), fp16, GPU time per call (CUDA
events around 50 back-to-back calls, best of 3), and the largest difference to the math backend.

    python bench/probes/sdpa_backends.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (label, batch, heads, query tokens, key tokens, head dim)
SHAPES = [
    ("sd15 self 64x64", 2, 8, 4096, 4096, 40), ("sd15 cross 64x64", 2, 8, 4096, 77, 40),
    ("sd15 self 32x32", 2, 8, 1024, 1024, 80), ("sd15 self 16x16", 2, 8, 256, 256, 160),
    ("sdxl self 64x64", 2, 10, 4096, 4096, 64), ("sdxl cross 64x64", 2, 10, 4096, 77, 64),
    ("sdxl self 32x32", 2, 20, 1024, 1024, 64),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def gpu_us(fn, calls: int = 50) -> float:
    best = float("inf")
    for _ in range(3):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, 1000 * start.elapsed_time(end) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for label, b, h, lq, lk, d in SHAPES:
        g = torch.Generator("cuda").manual_seed(0)
        # Our layout: (B, L, heads*D) split into heads as a view, as models/attention.py does.
        q = torch.randn(b, lq, h * d, device="cuda", dtype=torch.float16, generator=g).view(b, lq, h, d).transpose(1, 2)
        k = torch.randn(b, lk, h * d, device="cuda", dtype=torch.float16, generator=g).view(b, lk, h, d).transpose(1, 2)
        v = torch.randn(b, lk, h * d, device="cuda", dtype=torch.float16, generator=g).view(b, lk, h, d).transpose(1, 2)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        row = {"shape": label, "b": b, "heads": h, "lq": lq, "lk": lk, "d": d}
        with sdpa_kernel(list(BACKENDS.values())):
            row["default_us"] = gpu_us(lambda: F.scaled_dot_product_attention(q, k, v))
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    got = F.scaled_dot_product_attention(q, k, v)
                    row[f"{name}_us"] = gpu_us(lambda: F.scaled_dot_product_attention(q, k, v))
                row[f"{name}_max_err"] = float((got.float() - want).abs().max())
            except RuntimeError as error:  # a backend that does not take this shape
                row[f"{name}_us"] = None
                row[f"{name}_error"] = str(error).splitlines()[0][:200]
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
