"""int8 weight-only quantization for the "low" memory mode (DESIGN.md, Memory).

Every large `nn.Linear` / `nn.Conv2d` is replaced by an `Int8Linear` / `Int8Conv2d` holding its
weight as int8 plus one scale per output channel (symmetric: scale = max|w| / 127 over the input
dims, q = round(w / scale) in [-127, 127]). The layer dequantizes its weight to the input's dtype
on each call (`q * scale`, one temporary the size of that one layer's weight), so only one
layer's float weight exists at a time and the resident weights take 1 byte per element instead
of 2 (fp16) or 4 (fp32). Activations stay in the compute dtype ("weight-only").

The module names do not change, so a quantized model's state dict reads
`<name>.weight_int8`, `<name>.weight_scale`, `<name>.bias`.

The int8 weight and its scales are buffers, not parameters: `next(model.parameters()).dtype`
(how the pipelines read a model's compute dtype) keeps answering with a float dtype, and
`model.half()` / `.to(device)` move the scales and biases along as they would the float layer.
Same scheme as bitsandbytes' LLM.int8 weights without the outlier path, and as Draw Things'
int8 UNet (weights dequantized per layer on use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .scratch import Scratch

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is never used, so negation stays exact
# A layer with more weight elements computes in slices of its output channels, each dequantized
# into the shared buffer in turn, so the buffer is one slice of at most this many elements instead
# of the largest layer: SD1.5's 2560->1280 3x3 convs are 29.5 M elements (56 MiB in fp16; 8 M: 15
# MiB). Those layers run at the UNet's lowest resolutions, where the sliced outputs and their
# concatenation are a few MiB.
SLICE_ELEMENTS = 2 ** 23


# ---- the quantize / dequantize math ---------------------------------------------------------------

def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """fp16 weights keep fp16 scales (exact enough: 11-bit mantissa vs the 1/254 rounding step);
    anything else (fp32, bf16 with its 8-bit mantissa) gets fp32 scales. Scales are
    `out_channels` numbers, a negligible share of the layer's bytes either way."""
    return torch.float16 if weight_dtype == torch.float16 else torch.float32


@torch.no_grad()
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, ...) float -> (q int8 (out, ...), scale (out,)), symmetric per output channel.

    The rounding uses the scale as stored (after its cast to fp16 where it is fp16), so that
    `dequantize(q, scale)` is the nearest point of the stored grid to `weight`."""
    if not weight.is_floating_point() or weight.ndim < 2:
        raise TypeError(f"quantize_per_channel expects a floating-point (out, in, ...) weight, "
                        f"got {weight.dtype} of shape {tuple(weight.shape)}")
    w = weight.float()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)))  # (out,)
    # An all-zero row would give scale 0 and 0/0: any scale represents it (q = 0); use 1.
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(scale_dtype_for(weight.dtype))
    # fp16 can flush a tiny scale to 0: keep it positive so the division below stays finite.
    scale = torch.where(scale > 0, scale, torch.finfo(scale.dtype).tiny)
    per_row = scale.float().view(-1, *([1] * (w.ndim - 1)))  # (out, 1, ...) broadcast over the input dims
    # One fp32 temporary the size of the weight (rounded and clamped in place), then the int8 copy.
    q = (w / per_row).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 (out, ...) * scale (out,) -> a `dtype` weight. int8 * float promotes to the float's
    dtype inside one kernel (int8 -> float is exact), so the only temporary is the result."""
    return q * scale.to(dtype).view(-1, *([1] * (q.ndim - 1)))  # scale (out, 1, ...)


# ---- the layers -----------------------------------------------------------------------------------

class _Int8Weight(nn.Module):
    """What both int8 layers share: the buffers, their dequantization, the bias.

    The loader's protocol (checkpoints/load.py): a layer swapped in on the meta device before
    loading takes its float weight through `load_weight` as it is read from the file, so a model
    is quantized tensor by tensor and its float weights never all exist at once. The file's key
    stays `<name>.weight` (of `weight_shape`); `stored_buffers` are what `load_weight` fills."""

    stored_buffers = ("weight_int8", "weight_scale")

    def _init_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.is_meta:
            # A layer swapped before loading (shapes only): no arithmetic. On meta tensors it runs
            # through torch._refs, whose first use imports torch._dynamo: 74 MiB and ~0.7 s of a load.
            q = torch.empty(weight.shape, dtype=torch.int8, device="meta")
            scale = torch.empty(weight.shape[0], dtype=scale_dtype_for(weight.dtype), device="meta")
        else:
            q, scale = quantize_per_channel(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        # The float layer's own bias Parameter: the same tensor, dtype and device (no copy).
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_int8.shape)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (the float weight of this layer's shape) into the int8 buffers: the very
        values `from_float` gives a float layer holding it."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{type(self).__name__}.load_weight expects a weight of shape {self.weight_shape}, "
                             f"got {tuple(weight.shape)}")
        self._buffers["weight_int8"], self._buffers["weight_scale"] = quantize_per_channel(weight)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer computes with (`dtype`: default the scales' dtype)."""
        return dequantize(self.weight_int8, self.weight_scale, dtype or self.weight_scale.dtype)

    def output_slices(self) -> list[slice]:
        """The output channels each dequantization covers: all at once, or slices of at most
        SLICE_ELEMENTS weight elements for the largest layers."""
        rows, *rest = self.weight_int8.shape
        count = -(-rows * math.prod(rest) // SLICE_ELEMENTS)
        if count <= 1 or getattr(self, "groups", 1) != 1:  # a grouped conv's slices would cut its groups
            return [slice(None)]
        step = -(-rows // count)
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]

    def _weight_and_bias(self, x: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float weight (and bias) of output channels `rows`, in x's dtype."""
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        bias = None if self.bias is None else self.bias[rows].to(x.dtype)
        q, scale = self.weight_int8[rows], self.weight_scale[rows]
        scratch = getattr(self, "scratch", None)
        # The shared buffer without autograd only (a graph would keep the weight for backward). On
        # the CPU too: a fresh weight per layer per step fragmented the heap that a UNet call reuses
        # (memory/cpu_heap.py; SD1.5 512 low: its step's peak grew 444 -> 612 -> 715 MiB over 3 steps).
        if scratch is not None and x.device.type in ("cuda", "cpu") and not torch.is_grad_enabled():
            return scratch.dequantize(q, scale, x.dtype), bias
        return dequantize(q, scale, x.dtype), bias

    def _sliced(self, x: torch.Tensor, compute, dim: int) -> torch.Tensor:
        """`compute(x, weight, bias)` over the output slices, concatenated along `dim`. One stream
        orders each slice's dequantization after the previous slice's kernel has read the buffer."""
        slices = self.output_slices()
        if len(slices) == 1:
            return compute(x, *self._weight_and_bias(x))
        return torch.cat([compute(x, *self._weight_and_bias(x, rows)) for rows in slices], dim=dim)


class Int8Linear(_Int8Weight):
    """`nn.Linear` with an int8 weight (out, in) and per-output-channel scales (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"Int8Linear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._init_weight(weight, bias)

    @classmethod
    def from_float(cls, layer: nn.Linear) -> "Int8Linear":
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"Int8Linear.from_float expects an nn.Linear, got {type(layer).__name__}")
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sliced(x, F.linear, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Conv2d(_Int8Weight):
    """`nn.Conv2d` with an int8 weight (out, in / groups, kh, kw) and per-output-channel scales (out,);
    same stride, padding (and padding mode), dilation and groups as the layer it replaces."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        if weight.ndim != 4:
            raise ValueError(f"Int8Conv2d expects a 4-D (out, in/groups, kh, kw) weight, got shape "
                             f"{tuple(weight.shape)}")
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self._init_weight(weight, bias)

    @classmethod
    def from_float(cls, layer: nn.Conv2d) -> "Int8Conv2d":
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"Int8Conv2d.from_float expects an nn.Conv2d, got {type(layer).__name__}")
        conv = cls(layer.weight, layer.bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                   groups=layer.groups, padding_mode=layer.padding_mode)
        # nn.Conv2d's precomputed F.pad argument for non-"zeros" padding modes.
        conv._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sliced(x, lambda x, weight, bias: conv2d_like(self, x, weight, bias), dim=1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


def conv2d_like(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`layer`'s convolution (its stride, padding and padding mode, dilation, groups) with the weight
    given: what the int8 and 16-bit-stored convs (memory/store16.py) share. As nn.Conv2d._conv_forward,
    a non-"zeros" padding mode pads explicitly, then convolves unpadded."""
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


INT8_LAYERS = (Int8Linear, Int8Conv2d)


# ---- whole models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantReport:
    """What `quantize_` did: layers replaced, their weight elements, and the bytes of those layers'
    weights + biases (+ scales after) before and after."""
    layers: int
    params: int
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        mib = 2 ** 20
        return (f"int8: {self.layers} layers, {self.params:,} weights, "
                f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB")


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _quantizable(module: nn.Module, parent: nn.Module) -> bool:
    from .store16 import STORED16_LAYERS  # a 16-bit-stored layer (balanced on the CPU) quantizes as its float one
    if isinstance(module, STORED16_LAYERS):
        return True
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return False  # a lazy layer has no weight to quantize yet
    # nn.MultiheadAttention reads `out_proj.weight` directly instead of calling the layer.
    return not isinstance(parent, nn.MultiheadAttention)


def _int8_of(layer: nn.Module) -> nn.Module:
    from .store16 import Stored16Conv2d, Stored16Linear
    if isinstance(layer, Stored16Linear):  # its stored weight, exactly, in fp32 (scales in fp32)
        return Int8Linear(layer.weight.float(), layer.bias)
    if isinstance(layer, Stored16Conv2d):
        conv = Int8Conv2d(layer.weight.float(), layer.bias, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode)
        conv._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
        return conv
    return (Int8Linear if isinstance(layer, nn.Linear) else Int8Conv2d).from_float(layer)


def quantize_(model: nn.Module, *, min_params: int = 4096,
              skip: Callable[[str, nn.Module], bool] | None = None) -> QuantReport:
    """Replace IN PLACE every `nn.Linear` / `nn.Conv2d` (or 16-bit-stored layer, memory/store16.py) below
    `model` that has at least `min_params` weight elements (and that `skip(dotted_name, layer)` does not claim) by its int8 counterpart.
    Names are kept; the float weights are released as each layer is replaced (one layer's worth of
    extra memory at a time). Layers already int8 are left as they are, so running it twice is
    harmless. Works on any device and floating dtype, inside `torch.inference_mode()` or not."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module (a model whose layers to quantize), got "
                        f"{type(model).__name__}")
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"quantize_ replaces the layers inside a model and cannot replace the model itself "
                        f"({type(model).__name__}); use Int8Linear.from_float / Int8Conv2d.from_float")
    if isinstance(min_params, bool) or not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params must be a non-negative int, got {min_params!r}")
    if skip is not None and not callable(skip):
        raise TypeError(f"skip must be a callable (name, module) -> bool or None, got {type(skip).__name__}")

    replaced: dict[int, nn.Module] = {}  # id(float layer) -> its int8 layer: a layer shared by two parents
    layers = params = bytes_before = bytes_after = 0
    scratch = Scratch()
    # Collect first: replacing children while named_modules() walks them would change the walk.
    targets = [(prefix, parent, child_name, child)
               for prefix, parent in model.named_modules(remove_duplicate=False)
               # `_modules`, not named_children(): that one hides a layer's second name in the same parent
               for child_name, child in parent._modules.items()
               if child is not None and _quantizable(child, parent)]
    for prefix, parent, child_name, child in targets:
        name = f"{prefix}.{child_name}" if prefix else child_name
        if id(child) not in replaced:
            if child.weight.numel() < min_params or (skip is not None and skip(name, child)):
                continue
            int8 = _int8_of(child)
            int8.train(child.training)
            object.__setattr__(int8, "scratch", scratch)  # a plain attribute: not a submodule, not in state_dict
            replaced[id(child)] = int8
            scratch.size_hint = max(scratch.size_hint, max(int8.weight_int8[rows].numel()
                                                               for rows in int8.output_slices()))
            layers += 1
            params += child.weight.numel()
            bytes_before += _bytes(child.weight, child.bias)
            bytes_after += _bytes(int8.weight_int8, int8.weight_scale, int8.bias)
        setattr(parent, child_name, replaced[id(child)])
    # Returning drops `targets`, the last references to the float layers (and so their weights).
    return QuantReport(layers=layers, params=params, bytes_before=bytes_before, bytes_after=bytes_after)


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every int8 layer's `weight_int8` + `weight_scale` turned back into a
    float `<name>.weight` of `dtype`: the keys and values a float model would have, for comparisons."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dequantized_state_dict expects an nn.Module, got {type(model).__name__}")
    int8_layers = {f"{name}." if name else "": module for name, module in model.named_modules()
                   if isinstance(module, INT8_LAYERS)}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        layer = int8_layers.get(f"{prefix}." if prefix else "")
        if layer is not None:
            weight_key = f"{prefix}.weight" if prefix else "weight"
            if weight_key not in state:  # first, before the bias, in the float layer's key order
                state[weight_key] = layer.dequantized_weight(dtype)
            if leaf in ("weight_int8", "weight_scale"):
                continue
        state[key] = value
    return state
