"""Probe (session 6): this CPU's matrix-product throughput per dtype (2 threads, a 4096x2048 by
2048x2048 product, mean of 5 after 2 warm-ups): the arithmetic floor under a UNet call. One SD1.5
512x512 UNet call with CFG is 1.607 TFLOP (the speed issue's count, torch.utils.flop_counter).

    python bench/probes/cpu_gemm_peak.py
"""
import time

import torch

torch.set_num_threads(2)
UNET_CALL_TFLOP = 1.607
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    a, b = torch.randn(4096, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(2):
        a @ b
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        a @ b
    rate = 2 * 4096 * 2048 * 2048 * repeats / (time.perf_counter() - start)
    print(f"{str(dtype):16} {rate / 1e9:6.0f} GFLOP/s -> an SD1.5 UNet call at this rate: {UNET_CALL_TFLOP * 1e12 / rate:.2f} s")
