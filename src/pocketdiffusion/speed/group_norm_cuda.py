"""GroupNorm (and GroupNorm + SiLU) on CUDA as two Triton kernels that fill the GPU.

PyTorch's CUDA GroupNorm gives each (image, group) one thread block. At batch 1 with SD's 32
groups that is 32 blocks for a 132-SM H100, each reducing a whole group: the profile of one
SD1.5 512x512 image (H100, `bench/step_profile.py --memory fast`) showed the VAE decoder's 30
GroupNorms at ~760 us each (RowwiseMoments + the normalization), 23 ms of a 251 ms image, for
tensors (1, 128, 512, 512) that a memory-bound pass reads in ~40 us. The eager UNet (batch 2 with
CFG, 64 blocks) has the same shape of problem, and each of its norms is followed by a SiLU that
reads and writes the whole tensor again.

Here every (image, group) span (contiguous in NCHW) is cut into chunks of CHUNK elements:
1. `_chunk_stats`: one program per chunk writes the chunk's count, mean and M2 (sum of squared
   deviations, two passes over the chunk, the second from L2), in fp32, the mean as its first
   value plus the mean of the differences (activations far from zero keep their digits);
2. `_normalize`: one program per chunk merges its group's partials (Chan et al.'s parallel
   variance: M2 = sum M2_i + sum n_i (mean_i - mean)^2, as stable as PyTorch's Welford) and writes
   (x - mean) * rstd * weight + bias, optionally SiLU, rounded once to x's dtype.
Inputs in channels-last layout (the UNet's, on CUDA) are normalized in place in that layout: a
group is then `channels_per_group` values at every pixel. The values equal PyTorch's up to float
rounding order (tests/test_group_norm_cuda.py, on a GPU).

bench/group_norm.py (H100): GroupNorm + SiLU of the VAE decoder at 512x512 in 88 us instead of
989 (1, 128, 512, 512), the UNet's (2, 320, 64, 64) in 10.8 us instead of 32.2, GPU time. Launched
one by one from Python, though, the two Triton launches cost ~100 us of host time, more than
PyTorch's ~60: a host-bound model (minimal's streamed, eager UNet) keeps PyTorch's kernel for
tensors under `min_elements`; graphed and GPU-bound ones use these for every size.

Where the kernels do not apply (not CUDA, no Triton, another layout, inside torch.compile, which
fuses the norm itself, or autograd recording) the layers run PyTorch's GroupNorm.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ops import GroupNormSiLU

CHUNK = 8192   # elements per program: (1, 128, 512, 512) at 32 groups is 128 programs per group
BLOCK = 1024   # elements per loop iteration inside a program
MAX_PARTS = 2048  # chunks per group at most (the normalizing program merges them all in registers)
# For host-bound models: below this many elements PyTorch's kernel is faster launched one by one
# (bench/group_norm.py, H100: the UNet's norms at 512x512 took ~105 us against ~65 of host time;
# from (1, 512, 128, 128) up the Triton kernels won 3-10x even so).
HOST_BOUND_MIN_ELEMENTS = 2 ** 22


@functools.lru_cache(maxsize=1)
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _address(index, row, span, spatial, channels, channels_per_group, groups, CHANNELS_LAST: tl.constexpr):
        """Element `index` of group row (image * groups + group), relative to x's start."""
        if CHANNELS_LAST:  # (N, H, W, C) in memory: a group is channels_per_group values per pixel
            image, group = row // groups, row % groups
            pixel, within = index // channels_per_group, index % channels_per_group
            return (image.to(tl.int64) * spatial + pixel) * channels + group * channels_per_group + within
        return row.to(tl.int64) * span + index  # (N, C, H, W): a group is one contiguous span

    @triton.jit
    def _chunk_stats(x_ptr, stats_ptr, span, chunk, parts, spatial, channels, channels_per_group, groups,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        start = part * chunk
        end = tl.minimum(start + chunk, span)
        # Sums of x - shift (the chunk's first value): the mean of activations far from zero
        # keeps its digits in fp32 (x ~ 1000 with a spread of 0.01 would lose them otherwise).
        shift = tl.load(x_ptr + _address(start, row, span, spatial, channels, channels_per_group, groups,
                                         CHANNELS_LAST)).to(tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(start, end, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = index < end
            where = _address(index, row, span, spatial, channels, channels_per_group, groups, CHANNELS_LAST)
            total += tl.where(inside, tl.load(x_ptr + where, mask=inside, other=0.0).to(tl.float32) - shift, 0.0)
        count = (end - start).to(tl.float32)
        centred = tl.sum(total, axis=0) / count
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(start, end, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = index < end
            where = _address(index, row, span, spatial, channels, channels_per_group, groups, CHANNELS_LAST)
            deviation = tl.load(x_ptr + where, mask=inside, other=0.0).to(tl.float32) - shift - centred
            deviation = tl.where(inside, deviation, 0.0)
            squares += deviation * deviation
        out = stats_ptr + (row * parts + part) * 4
        tl.store(out, count)
        tl.store(out + 1, shift)  # the mean is shift + centred, kept apart: their sum would round
        tl.store(out + 2, centred)
        tl.store(out + 3, tl.sum(squares, axis=0))

    @triton.jit
    def _normalize(x_ptr, y_ptr, weight_ptr, bias_ptr, stats_ptr, span, chunk, parts, spatial, channels,
                   channels_per_group, groups, eps, CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
                   PARTS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        which = tl.arange(0, PARTS)
        present = which < parts
        stats = stats_ptr + (row * parts + which) * 4
        counts = tl.load(stats, mask=present, other=0.0)
        # The chunks' means relative to the first chunk's shift, for the same reason as the shift.
        reference = tl.load(stats_ptr + row * parts * 4 + 1)
        shifts = tl.load(stats + 1, mask=present, other=0.0)
        offsets = tl.where(present, (shifts - reference) + tl.load(stats + 2, mask=present, other=0.0), 0.0)
        m2s = tl.load(stats + 3, mask=present, other=0.0)
        n = tl.sum(counts, axis=0)
        mean_offset = tl.sum(counts * offsets, axis=0) / n
        spread = offsets - mean_offset
        variance = (tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)) / n
        rstd = 1.0 / tl.sqrt(variance + eps)
        first_channel = (row % groups) * channels_per_group
        start = part * chunk
        end = tl.minimum(start + chunk, span)
        for offset in range(start, end, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            inside = index < end
            where = _address(index, row, span, spatial, channels, channels_per_group, groups, CHANNELS_LAST)
            x = tl.load(x_ptr + where, mask=inside, other=0.0).to(tl.float32)
            if CHANNELS_LAST:
                channel = first_channel + index % channels_per_group
            else:
                channel = first_channel + index // spatial
            weight = tl.load(weight_ptr + channel, mask=inside, other=1.0).to(tl.float32)
            bias = tl.load(bias_ptr + channel, mask=inside, other=0.0).to(tl.float32)
            y = ((x - reference) - mean_offset) * (rstd * weight) + bias
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_ptr + where, y.to(y_ptr.dtype.element_ty), mask=inside)

    return triton, _chunk_stats, _normalize


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor | None:
    """GroupNorm of `x` (N, C, ...) with per-channel `weight` and `bias`, then SiLU if asked, by
    the Triton kernels; None (nothing computed) where they do not apply. `x` is contiguous, or a
    4-D channels-last tensor (what the UNet's convolutions run in on CUDA); `y` has x's layout."""
    if not (x.is_cuda and x.ndim >= 3 and weight is not None and bias is not None
            and weight.is_cuda and bias.is_cuda and x.numel() > 0 and x.shape[1] % groups == 0):
        return None
    channels_last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not (x.is_contiguous() or channels_last):
        return None
    found = _kernels()
    if found is None:
        return None
    triton, chunk_stats, normalize = found
    rows = x.shape[0] * groups
    span = x.numel() // rows
    spatial = x[0, 0].numel()
    channels = x.shape[1]
    chunk = min(max(CHUNK, triton.cdiv(span, MAX_PARTS)), span)
    parts = triton.cdiv(span, chunk)
    stats = torch.empty(rows * parts * 4, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)  # the same layout as x
    grid = (rows, parts)
    layout = (spatial, channels, channels // groups, groups)
    chunk_stats[grid](x, stats, span, chunk, parts, *layout, CHANNELS_LAST=channels_last, BLOCK=BLOCK, num_warps=4)
    normalize[grid](x, y, weight, bias, stats, span, chunk, parts, *layout, eps, CHANNELS_LAST=channels_last,
                    SILU=silu, PARTS=triton.next_power_of_2(parts), BLOCK=BLOCK, num_warps=4)
    return y


class CudaGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that runs the Triton kernels on CUDA (same parameters and keys); tensors under
    `min_elements` go to PyTorch's (see the module's note on host-bound models)."""

    silu = False  # the SiLU after the norm, in the normalizing pass (CudaGroupNormSiLU)

    def __init__(self, *args, min_elements: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_elements = min_elements

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine and self._applies(x):
            y = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)
            if y is not None:
                return y
        return super().forward(x)  # PyTorch's: nn.GroupNorm's, or GroupNormSiLU's norm and SiLU

    def _applies(self, x: torch.Tensor) -> bool:
        """CUDA, big enough, outside torch.compile, nothing for autograd to record (no backward here)."""
        if not x.is_cuda or x.numel() < self.min_elements or torch.compiler.is_compiling():
            return False
        return not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad)


class CudaGroupNormSiLU(CudaGroupNorm, GroupNormSiLU):
    """models.ops.GroupNormSiLU with both steps in the Triton kernels' one normalizing pass on CUDA."""

    silu = True
