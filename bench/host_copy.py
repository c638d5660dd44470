"""Host-to-device copy bandwidth from pinned memory, the ceiling of the minimal mode's weight
streaming on CUDA (memory/streaming.py copies 8 MiB chunks and each big tensor whole, on a side
stream): GB/s for copies of several sizes, 1.64 GB in all (SD1.5's fp16 UNet, one step's worth).

    python bench/host_copy.py
"""
from __future__ import annotations

import time

import torch

TOTAL = 1_640_000_000


def bandwidth(chunk: int, stream: torch.cuda.Stream) -> float:
    count = max(1, TOTAL // chunk)
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    device = [torch.empty(chunk, dtype=torch.uint8, device="cuda") for _ in range(2)]
    for _ in range(3):  # warm
        device[0].copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        for i in range(count):
            device[i % 2].copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return count * chunk / (time.perf_counter() - start) / 1e9


def main() -> None:
    stream = torch.cuda.Stream()
    print(torch.cuda.get_device_name())
    for mib in (0.5, 2, 8, 32, 56):
        chunk = int(mib * 2 ** 20)
        print(f"{mib:5.1f} MiB copies: {bandwidth(chunk, stream):5.1f} GB/s")


if __name__ == "__main__":
    main()
