"""The int8 dequantization kernel on CUDA (memory/quant.py, the "low" mode): `out = q * scale[row]`
in one pass, int8 read and 16-bit written once.

PyTorch's `torch.mul(int8, fp16, out=fp16)` is correct but takes its slow path: inputs of two
dtypes make TensorIterator cast element by element instead of running its vectorized loop.
This Triton kernel computes the same values (the int8 value, exact in fp32, times the scale in
fp32, rounded once to the output dtype: what PyTorch's fp16 multiply does in its fp32 "opmath"),
so it is a drop-in, bit for bit (tests/test_quant.py). Without Triton the PyTorch path runs.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequantize_rows(q_ptr, scale_ptr, out_ptr, numel, row_len, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        q = tl.load(q_ptr + offsets, mask=inside, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + offsets // row_len, mask=inside, other=0).to(tl.float32)
        tl.store(out_ptr + offsets, (q * scale).to(out_ptr.dtype.element_ty), mask=inside)

    return triton, dequantize_rows


BLOCK = 4096


def dequantize_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
    """Write `q * scale` (per output row) into `out` with the Triton kernel; False (nothing done)
    where it does not apply: not CUDA, no Triton, or a non-contiguous tensor."""
    if not (q.is_cuda and q.is_contiguous() and scale.is_contiguous() and out.is_contiguous()):
        return False
    found = _kernel()
    if found is None:
        return False
    triton, kernel = found
    numel = q.numel()
    if numel == 0:
        return True
    kernel[(triton.cdiv(numel, BLOCK),)](q, scale, out, numel, numel // q.shape[0], BLOCK=BLOCK, num_warps=8)
    return True
