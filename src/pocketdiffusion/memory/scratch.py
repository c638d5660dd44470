"""The reusable weight buffer of the layers that store their weights in another form than they
compute with (16-bit-stored, int8): one layer's compute weight at a time, in one buffer."""
from __future__ import annotations

import torch

from .dequant_cuda import dequantize_into


class Scratch:
    """One reusable buffer per dtype and device that holds one layer's compute weight at a time:
    the 16-bit-stored layers' upcasts (memory/store16.py) and the int8 layers' dequantizations
    (memory/quant.py), one buffer as large as the largest layer (or int8 slice) for all of a model.

    `size_hint` elements (`store16_` sets its largest layer's) are allocated at once, and
    `reserve` allocates them before the first call: grown layer by layer inside the UNet's first
    call, each outgrown buffer left a hole in the heap that the UNet's calls reuse, and a buffer
    born there pinned the heap so that it could not shrink after the call (memory/cpu_heap.py).
    One generation at a time per model, as everywhere in the pipelines."""

    def __init__(self, size_hint: int = 0) -> None:
        self.size_hint = size_hint
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def reserve(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Allocate the `dtype` buffer on `device` now, `size_hint` elements."""
        self.take((self.size_hint,), dtype, torch.device(device))

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A `shape` view of the `dtype` buffer on `device`, to be written (valid until the next take)."""
        numel = 1
        for size in shape:
            numel *= size
        key = (dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)
            del buffer  # the old one first: never two at a time
            with torch.inference_mode(False):  # a normal tensor: inference mode may write into it, and so may code outside it
                buffer = self.buffers[key] = torch.empty(max(numel, self.size_hint), dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def upcast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight` converted to `dtype`, in the buffer (valid until the next take)."""
        return self.take(weight.shape, dtype, weight.device).copy_(weight)

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        """Whether a layer called on `x` may compute from the scratch: on the CPU (no asynchronous
        kernel still reading it when the next layer writes) and without autograd (a graph would
        save the weight for the backward pass)."""
        return x.device.type == "cpu" and not torch.is_grad_enabled()

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """int8 `q` (out, ...) times its per-row `scale`, as `dtype`, in the buffer (valid until the
        next take). On CUDA one Triton pass (memory/dequant_cuda.py); safe on one stream: the next
        layer's dequantization is queued after the kernels that read this one. A fresh weight per
        layer per call was a stream of 0.1-56 MiB blocks through the CUDA caching allocator (the low
        mode's reserved peak ~110 MiB above its allocated one, SD1.5 512x512) and, on the CPU,
        fragmented the heap a UNet call reuses (memory/cpu_heap.py)."""
        out = self.take(q.shape, dtype, q.device)
        scale = scale.to(dtype)
        if q.is_cuda and dequantize_into(q, scale, out):
            return out
        return torch.mul(q, scale.view(-1, *([1] * (q.ndim - 1))), out=out)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
