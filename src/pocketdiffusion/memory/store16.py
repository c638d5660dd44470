"""16-bit weight storage with fp32 compute: the CPU's "balanced" mode (DESIGN.md, Memory).

On the CPU the UNet computes in fp32 (16-bit convolutions and matmuls are slower than fp32 ones
on a CPU without AMX: measured on the 2-core Xeon, a 320->320 3x3 conv at 64x64 took 1.7x as
long in bf16 or fp16), but its weights need not be stored in fp32: every large `nn.Linear` /
`nn.Conv2d` is replaced by a `Stored16Linear` / `Stored16Conv2d` that keeps its weight in fp16
and upcasts it to the input's dtype on each call (as memory/quant.py dequantizes its int8
weights on use). The resident UNet halves (SD1.5: 3.2 GiB -> 1.6 GiB) and fp16 -> fp32 is exact,
so the layer computes with the fp16-rounded weight in full fp32 arithmetic.

The upcast goes into one reusable buffer (`Scratch`, per thread, as large as the largest layer's
weight; in inference, on the CPU): the conv or matmul that reads it returns before the next layer
overwrites it. A fresh tensor per call would cost a page fault per 4 KiB of every large weight
on every step wherever the allocator hands big blocks back to the OS (memory/cpu_heap.py).

The weight is a *buffer* named `weight` (the float layer's state dict key), the bias stays the
float layer's Parameter: `next(model.parameters())` (how the pipelines read a model's compute
dtype) keeps answering fp32. The layers follow the loader's protocol (`load_weight`,
`weight_shape`, `stored_buffers`; checkpoints/load.py), so a model swapped on the meta device
before loading converts each weight as it is read.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quant import conv2d_like
from .scratch import Scratch

STORE_DTYPES = (torch.float16, torch.bfloat16)


def reserve_scratch(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> int:
    """Allocate now the scratch buffers of `model`'s 16-bit-stored and int8 layers (memory/quant.py),
    for computing in `dtype` on `device`. Returns their bytes."""
    scratches = {id(s): s for m in model.modules() if (s := getattr(m, "scratch", None)) is not None
                 and hasattr(s, "reserve")}
    for scratch in scratches.values():
        scratch.reserve(dtype, device)
    return sum(scratch.nbytes() for scratch in scratches.values())


class _Stored16Weight(nn.Module):
    """What both layers share: the 16-bit weight buffer, its upcast, the bias, the loader's protocol."""

    stored_buffers = ("weight",)

    def _init_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                     scratch: Scratch | None) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"{type(self).__name__} stores float16 or bfloat16 weights, got {dtype}")
        self.register_buffer("weight", weight.detach().to(dtype))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self.scratch = scratch

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (this layer's float weight) in the layer's 16-bit dtype."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{type(self).__name__}.load_weight expects a weight of shape {self.weight_shape}, "
                             f"got {tuple(weight.shape)}")
        self._buffers["weight"] = weight.to(self.weight.dtype)

    def _weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.weight
        if weight.dtype != x.dtype:
            # The scratch only where nothing may keep the weight after the call: no autograd
            # graph (it would save the weight for backward), and the CPU (no asynchronous kernels).
            reuse = self.scratch is not None and self.scratch.usable(x)
            weight = self.scratch.upcast(weight, x.dtype) if reuse else weight.to(x.dtype)
        return weight, bias


class Stored16Linear(_Stored16Weight):
    """`nn.Linear` whose (out, in) weight is kept in 16 bits and upcast to the input's dtype on use."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                 scratch: Scratch | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"Stored16Linear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._init_weight(weight, bias, dtype, scratch)

    @classmethod
    def from_float(cls, layer: nn.Linear, dtype: torch.dtype = torch.float16,
                   scratch: Scratch | None = None) -> "Stored16Linear":
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"Stored16Linear.from_float expects an nn.Linear, got {type(layer).__name__}")
        return cls(layer.weight, layer.bias, dtype, scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weight_and_bias(x)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.weight.dtype}")


class Stored16Conv2d(_Stored16Weight):
    """`nn.Conv2d` whose weight is kept in 16 bits and upcast to the input's dtype on use; same stride,
    padding (and padding mode), dilation and groups as the layer it replaces."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16,
                 scratch: Scratch | None = None, *, stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros"):
        super().__init__()
        if weight.ndim != 4:
            raise ValueError(f"Stored16Conv2d expects a 4-D (out, in/groups, kh, kw) weight, got shape "
                             f"{tuple(weight.shape)}")
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self._init_weight(weight, bias, dtype, scratch)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, dtype: torch.dtype = torch.float16,
                   scratch: Scratch | None = None) -> "Stored16Conv2d":
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"Stored16Conv2d.from_float expects an nn.Conv2d, got {type(layer).__name__}")
        conv = cls(layer.weight, layer.bias, dtype, scratch, stride=layer.stride, padding=layer.padding,
                   dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode)
        conv._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_like(self, x, *self._weight_and_bias(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, stored={self.weight.dtype}")


STORED16_LAYERS = (Stored16Linear, Stored16Conv2d)


def store16_(model: nn.Module, dtype: torch.dtype = torch.float16, *, min_params: int = 4096,
             skip: Callable[[str, nn.Module], bool] | None = None) -> int:
    """Replace IN PLACE every `nn.Linear` / `nn.Conv2d` below `model` with at least `min_params`
    weight elements (and that `skip(name, layer)` does not claim) by its 16-bit-stored counterpart,
    all sharing one `Scratch`. Works on the meta device (before loading). Returns how many layers
    were replaced."""
    if not isinstance(model, nn.Module) or isinstance(model, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"store16_ replaces the layers inside a model, got {type(model).__name__}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store16_ stores float16 or bfloat16 weights, got {dtype}")
    scratch = Scratch()
    replaced: dict[int, nn.Module] = {}
    targets = [(prefix, parent, child_name, child)
               for prefix, parent in model.named_modules(remove_duplicate=False)
               for child_name, child in parent._modules.items()
               if isinstance(child, (nn.Linear, nn.Conv2d)) and not isinstance(parent, nn.MultiheadAttention)]
    for prefix, parent, child_name, child in targets:
        name = f"{prefix}.{child_name}" if prefix else child_name
        if id(child) not in replaced:
            if child.weight.numel() < min_params or (skip is not None and skip(name, child)):
                continue
            layer = (Stored16Linear if isinstance(child, nn.Linear) else Stored16Conv2d).from_float(child, dtype,
                                                                                                   scratch)
            layer.train(child.training)
            replaced[id(child)] = layer
            scratch.size_hint = max(scratch.size_hint, child.weight.numel())
        setattr(parent, child_name, replaced[id(child)])
    return len(replaced)
