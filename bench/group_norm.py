"""PyTorch's CUDA GroupNorm (+ SiLU) against the Triton kernels of speed/group_norm_cuda.py, on
the shapes SD runs: the VAE decoder's levels at 512x512 and 1024x1024 (batch 1), the UNet's levels
with CFG (batch 2). fp16, CUDA events, median of 50 after 10 warm-up calls: launched one by one
(host time included, as an eager step pays it) and replayed from a CUDA graph (GPU time only).

    python bench/group_norm.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pocketdiffusion.speed.group_norm_cuda import group_norm  # noqa: E402

SHAPES = {
    "vae 512: (1,128,512,512)": (1, 128, 512, 512), "vae 512: (1,256,256,256)": (1, 256, 256, 256),
    "vae 512: (1,512,128,128)": (1, 512, 128, 128), "vae 512: (1,512,64,64)": (1, 512, 64, 64),
    "vae 1024: (1,128,1024,1024)": (1, 128, 1024, 1024),
    "unet 512 cfg: (2,320,64,64)": (2, 320, 64, 64), "unet 512 cfg: (2,640,32,32)": (2, 640, 32, 32),
    "unet 512 cfg: (2,1280,16,16)": (2, 1280, 16, 16), "unet 512 cfg: (2,1280,8,8)": (2, 1280, 8, 8),
    "unet 1024 cfg: (2,640,64,64)": (2, 640, 64, 64),
}


def time_us(fn, repeats: int = 50) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end))
    return statistics.median(times)


def graphed_us(fn, calls: int = 20) -> float:
    """GPU time per call: `calls` calls captured in one CUDA graph and replayed (no host launches)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_us(graph.replay, repeats=20) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            x = torch.randn(shape, device="cuda", dtype=torch.float16)
            w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            b = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            row = {"shape": name,
                   "torch_gn_us": time_us(lambda: F.group_norm(x, 32, w, b, 1e-6)),
                   "torch_gn_silu_us": time_us(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True)),
                   "triton_gn_us": time_us(lambda: group_norm(x, 32, w, b, 1e-6)),
                   "triton_gn_silu_us": time_us(lambda: group_norm(x, 32, w, b, 1e-6, silu=True))}
            row["speedup_gn_silu"] = row["torch_gn_silu_us"] / row["triton_gn_silu_us"]
            row["graphed_torch_gn_silu_us"] = graphed_us(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True))
            row["graphed_triton_gn_silu_us"] = graphed_us(lambda: group_norm(x, 32, w, b, 1e-6, silu=True))
            rows.append(row)
            print(f"{name:32s} torch {row['torch_gn_us']:8.1f} / +silu {row['torch_gn_silu_us']:8.1f} us   "
                  f"triton {row['triton_gn_us']:8.1f} / +silu {row['triton_gn_silu_us']:8.1f} us   "
                  f"x{row['speedup_gn_silu']:.2f}   in a CUDA graph: torch +silu {row['graphed_torch_gn_silu_us']:7.1f}"
                  f" triton +silu {row['graphed_triton_gn_silu_us']:7.1f} us", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
