"""Predicted peak memory of one generation under a plan, without a weight or an activation.

peak = resident weights + the largest working set of the three phases (text encoding, one
denoising step of the UNet with its CFG batch, the VAE decode, tiled or not) + the runtime's
own overhead.

The working sets are not modelled by hand: the real models are built on the meta device (shapes,
no memory) in the plan's dtype, attention kernel and quantization, and the very code a
generation runs (the UNet forward, `decode_latents` with its tiling) is executed on meta tensors
under a dispatch mode that adds up the bytes of every tensor storage created and subtracts them
when the storage is freed. The highest sum is the activation peak; in-place ops, skips popped
as they are consumed and one-tile-at-a-time decoding are all counted as they happen. Streamed
weights are added while their group runs (and, on CUDA, the next group, which is prefetched; on
the CPU, where a group is a view of the mapped file, each layer's weights from its first call).
The CPU's swapped UNet layers (int8, 16-bit-stored) compute from one scratch buffer allocated at
load (resident), and a UNet that reuses the heap holds its holes too (`CPU_HEAP_REUSE`).

What it cannot see, the per-device overhead below, was measured (docs/BENCHMARKS.md, "Memory
planner / minimal mode (CPU)").
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ModelConfig
from .plan import MemoryPlan, ops_for, streamed_components, swap_layers_for
from .streaming import gathers_rows, packed_bytes, stream_group

MIB = 2 ** 20
# What a generation's process holds beyond `import torch` and the tensors counted here: our
# modules, PIL, numpy, the tokenizer, oneDNN's scratchpad and the small-block heap (large blocks
# go back to the OS: memory/cpu_heap.py). Measured on the 2-core CPU machine: the offset between
# traced and measured peaks was 41-45 MiB for balanced and minimal at 256 and 384 pixels.
CPU_OVERHEAD = 48 * MIB
# A UNet call that reuses the heap (memory/cpu_heap.py, `MemoryPlan.heap_reuse`) holds its live
# tensors plus the holes between them: measured at SD1.5 512x512 balanced (fp32 weights in the
# same process, docs/BENCHMARKS.md), 265-290 MiB above the resident weights where the heap that
# hands blocks back held 231.
CPU_HEAP_REUSE = 0.15
# The caching allocator's reserve above the allocated working sets (block rounding, expandable
# segments growing in 2 MiB pages) and cuBLAS's workspace (32 MiB on Hopper, taken from the same
# allocator). Calibrated on the H200 runs of docs/BENCHMARKS.md (SD1.5 512x512): the UNet steps
# allocated 149 MiB above the resident weights where the trace counts 116; reserved ran 2-25%
# above allocated. Resident weights are exact allocations and take no reserve.
CUDA_RESERVE = 0.15
CUDA_WORKSPACE = 32 * MIB
TEXT_TOKENS = 77
# How a convolution reaches the dispatch mode (conv2d is not decomposed under inference mode).
CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.conv2d.default)


@dataclass(frozen=True)
class Prediction:
    """The predicted peak of one generation, in bytes, and what it is made of."""

    plan: MemoryPlan
    weights: int  # resident weights (all of them, or the non-streamed ones)
    text: int  # working set of the text encoding
    unet: int  # of one denoising step (activations, plus streamed groups while they run)
    vae: int  # of the decode
    overhead: int

    @property
    def peak(self) -> int:
        return self.weights + max(self.text, self.unet, self.vae) + self.overhead

    @property
    def largest_phase(self) -> str:
        return max(("text encoding", self.text), ("UNet step", self.unet), ("VAE decode", self.vae),
                   key=lambda item: item[1])[0]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive while code runs under it; `peak` is the
    most at any time. Only storages created under the mode count (weights made before do not).

    `conv_scratch`: the CPU's convolutions (oneDNN) also hold, while they run, a reordered copy of
    the larger of their input and output (measured: a 64->64 3x3 conv at 256x256 peaks 16 MiB
    above its output, a 128->64 one 32 MiB; docs/BENCHMARKS.md) and one of their weight (what
    dominates at full size, where the deep convs' weights dwarf their activations)."""

    def __init__(self, conv_scratch: bool | str | None = False):  # True or "cpu": oneDNN's; "cuda": cuDNN's
        super().__init__()
        self.live = self.peak = 0
        self.conv_scratch = conv_scratch
        self._seen = WeakIdKeyDictionary()

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._seen:  # a view or an in-place result: no new memory
                    self._seen[storage] = True
                    self.add(storage.nbytes())
                    weakref.finalize(storage, self.add, -storage.nbytes())
        if self.conv_scratch == "cuda" and func in CONVOLUTIONS:
            # cuDNN's workspace for the chosen algorithm: about one output's bytes for the large
            # convs of an untiled decode (fast's 512x512 decode peaked ~200 MiB above the trace)
            self.peak = max(self.peak, self.live + out.numel() * out.element_size())
        elif self.conv_scratch and func in CONVOLUTIONS:
            # and of its weight: at SD1.5's 8x8 latents a 2560->1280 3x3 conv (112.5 MiB of fp32
            # weight) peaked 121.8 MiB above what was live; its activations are about 1 MiB
            scratch = (max(args[0].numel(), out.numel()) + args[1].numel()) * out.element_size()
            self.peak = max(self.peak, self.live + scratch)
        return out


def predict(config: ModelConfig, plan: MemoryPlan, device: torch.device | str, width: int, height: int,
            batch: int = 1, cfg: bool = True) -> Prediction:
    """The peak of a `batch`-image generation at `width` x `height` under `plan` on `device`."""
    from ..checkpoints.load import _build_on_meta  # the loader's own meta build: the same modules
    device = torch.device(device)
    dtype = plan.weight_dtype or (torch.float32 if device.type == "cpu" else torch.float16)
    models = _build_on_meta(config, ops_for(plan))
    for model in models.values():
        model.to(dtype)
    swap = swap_layers_for(plan)  # int8 or 16-bit-stored UNet layers, as the loader swaps them
    if swap is not None:
        swap(models)
    components = streamed_components(plan)
    streamed = {k: m for k, m in models.items() if components is None or k.split(".")[0] in components}
    sizes = _group_sizes(streamed)
    # What a group takes while streamed: on CUDA its packed device buffers (HostTransport), rounded
    # to the allocator's steps (SD1.5 minimal: 211 MiB predicted from the tensors' own bytes
    # against 252 measured, H100); on the CPU the file's pages of its tensors.
    groups = {g: packed_bytes(s) if device.type == "cuda" else sum(s) for g, s in sizes.items()}
    tables, rows = _gathered_bytes(streamed, device)
    prefetch = bool(streamed) and device.type == "cuda"  # the next group is on its way meanwhile
    resident = sum(_nbytes(models)) - sum(sum(s) for s in sizes.values()) - tables
    scratch_bytes = 0
    if swap is not None:  # on CUDA too: low's int8 layers dequantize into one Scratch (memory/scratch.py)
        # The layers' compute weights go into one buffer as large as the largest, allocated at load
        # (memory/store16.py reserve_scratch): resident, and no per-layer temporary in the trace.
        scratch_bytes = _use_meta_scratch(models["unet"], dtype)
        resident += scratch_bytes
    text = (_text_working_set(config, dtype) + rows
            + max((b for g, b in groups.items() if g.startswith("text")), default=0))
    decoder = 0
    if plan.park_idle and device.type == "cuda":  # memory/residency.py: on the device for its use only
        decoder = sum(_nbytes({"decoder": models["vae"].decoder, "post": models["vae"].post_quant_conv}))
        resident -= sum(_nbytes({"vae": models["vae"]}))
    scratch = "cpu" if device.type == "cpu" else "cuda" if device.type == "cuda" else None
    unet = _trace_unet(models["unet"], config, dtype, width, height, batch * (2 if cfg else 1), groups, prefetch,
                       scratch)
    if device.type == "cpu" and plan.heap_reuse:
        unet = int(unet * (1 + CPU_HEAP_REUSE))
    vae = _trace_decode(models["vae"], plan, dtype, width, height, batch, groups, prefetch, scratch) + decoder
    overhead = CPU_OVERHEAD if device.type != "cuda" else 0
    if device.type == "cuda":
        text, unet, vae = (int((v + CUDA_WORKSPACE) * (1 + CUDA_RESERVE)) for v in (text, unet, vae))
        # Streaming's slack: device buffers of many sizes come and go each call, and the allocator
        # holds about half the largest group more than is live (calibrated on the H100: SD1.5
        # minimal reserved 252 MiB for 198 allocated, SDXL 434 for 365; the largest group of both,
        # a 2560->1280 conv, is 56 MiB).
        text, unet, vae = (v + max((b for g, b in groups.items() if g.startswith(prefix)), default=0) // 2
                           for v, prefix in ((text, "text"), (unet, "unet"), (vae, "vae.decoder")))
        if plan.cuda_graphs and not plan.graphs_per_run:  # the kept graph pool holds the UNet's working set
            # beside the text encoding; the decode borrows that pool (GraphedModel.lend_pool), so
            # the two working sets share it (SD1.5 512, H100 session 6 run 1: pool 668 MiB after the
            # decode, 148 before)
            text, vae = text + unet, max(vae, unet)
    return Prediction(plan, resident, text, unet, vae, overhead)


def _use_meta_scratch(unet: nn.Module, dtype: torch.dtype) -> int:
    """Make the UNet's swapped layers (int8, 16-bit-stored) compute from one meta buffer made
    before the trace, as they do from their scratch on the CPU, instead of a fresh weight each;
    return that buffer's bytes."""
    from .quant import INT8_LAYERS
    from .store16 import STORED16_LAYERS
    layers = [m for m in unet.modules() if isinstance(m, (*INT8_LAYERS, *STORED16_LAYERS))]
    if not layers:
        return 0
    # int8 layers dequantize their largest layers in slices of output channels (quant.SLICE_ELEMENTS)
    numel = max(max(m.weight_int8[rows].numel() for rows in m.output_slices()) if isinstance(m, INT8_LAYERS)
                else m.weight.numel() for m in layers)
    buffer = torch.empty(numel, dtype=dtype, device="meta")

    def from_buffer(layer: nn.Module, shape: tuple[int, ...]):
        def weight_and_bias(x: torch.Tensor, rows: slice = slice(None)):
            out = (len(range(shape[0])[rows]), *shape[1:])
            return (buffer[:torch.Size(out).numel()].view(out),
                    None if layer.bias is None else layer.bias[rows].to(x.dtype))
        return weight_and_bias
    for layer in layers:
        layer._weight_and_bias = from_buffer(layer, layer.weight_shape)  # an instance attribute, on the meta copy only
    return numel * buffer.element_size()


def _nbytes(models: dict[str, nn.Module]) -> list[int]:
    return [t.numel() * t.element_size() for model in models.values()
            for t in (*model.parameters(), *model.buffers())]


def _group_sizes(models: dict[str, nn.Module]) -> dict[str, list[int]]:
    """{streamed group: the bytes of each of its weights}, named as memory/streaming.py names them."""
    sizes: dict[str, list[int]] = {}
    for component, model in models.items():
        for name, tensor in model.named_parameters():
            group = stream_group(f"{component}.{name}")
            if group is not None:
                sizes.setdefault(group, []).append(tensor.numel() * tensor.element_size())
    return sizes


def _gathered_bytes(models: dict[str, nn.Module], device: torch.device) -> tuple[int, int]:
    """(bytes of the embedding tables the minimal mode leaves in the file, bytes of the rows one
    prompt reads from them: at most 77 per table, memory/streaming.py RowGather)."""
    tables = rows = 0
    for component, model in models.items():
        for name, tensor in model.named_parameters():
            if gathers_rows(f"{component}.{name}"):
                tables += tensor.numel() * tensor.element_size()
                rows += min(TEXT_TOKENS, tensor.shape[0]) * tensor.shape[1] * tensor.element_size()
    return tables, rows


def _text_working_set(config: ModelConfig, dtype: torch.dtype) -> int:
    """A CLIP layer's activations for one prompt: a handful of (1, 77, mlp) tensors (KBs to MBs:
    never the largest phase, so a bound does)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return max(8 * TEXT_TOKENS * max(c.mlp_dim, c.width) * size for c in config.text_encoders)


def _with_groups(model: nn.Module, component: str, groups: dict[str, int], counter: LiveBytes,
                 prefetch: bool, touched: bool = False) -> list:
    """Hooks that count a streamed group's weights while it runs (and the next group's, on CUDA).
    `touched` (the CPU, MmapTransport): a group's weights are views of the mapped file whose pages
    become resident as each layer first reads them, so each layer's weights count from its first
    call in the group's run (not the whole group's from its start) until the group ends. (It
    assumes the file holds the run dtype; a converted group is whole from its start.)"""
    if touched:
        return _with_touched_groups(model, component, groups, counter)
    handles = []
    # In the modules' order (a block's norms' group before its layers'), which is the order they
    # run in but for a transformer block's feed-forward (defined before its cross-attention).
    order = {f"{component}.{name}": i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted((n for n in groups if n.startswith(component + ".")), key=lambda n: order.get(n, -1))
    for index, name in enumerate(names):
        module = model.get_submodule(name[len(component) + 1:])
        extra = groups[names[index + 1]] if prefetch and index + 1 < len(names) else 0
        nbytes = groups[name] + extra
        handles.append(module.register_forward_pre_hook(lambda *_, n=nbytes: counter.add(n)))
        handles.append(module.register_forward_hook(lambda *_, n=nbytes: counter.add(-n)))
    return handles


def _with_touched_groups(model: nn.Module, component: str, groups: dict[str, int], counter: LiveBytes) -> list:
    owners: dict[str, dict[int, tuple[nn.Module, int]]] = {}  # group -> {id(layer): (layer, its weights' bytes)}
    for name, tensor in model.named_parameters():
        group = stream_group(f"{component}.{name}")
        if group is not None:
            layer = model.get_submodule(name.rpartition(".")[0])
            _, before = owners.setdefault(group, {}).get(id(layer), (layer, 0))
            owners[group][id(layer)] = (layer, before + tensor.numel() * tensor.element_size())
    handles = []
    for group, layers in owners.items():
        state = {"seen": set(), "bytes": 0}

        def start(*_, state=state) -> None:
            state["seen"].clear()
            state["bytes"] = 0

        def end(*_, state=state) -> None:
            counter.add(-state["bytes"])
            start(state=state)

        def touch(layer: nn.Module, *_, state=state, layers=layers) -> None:
            if id(layer) not in state["seen"]:
                state["seen"].add(id(layer))
                nbytes = layers[id(layer)][1]
                state["bytes"] += nbytes
                counter.add(nbytes)
        module = model.get_submodule(group[len(component) + 1:])
        handles.append(module.register_forward_pre_hook(start))
        handles.append(module.register_forward_hook(end))
        for layer, _ in layers.values():
            handles.append(layer.register_forward_pre_hook(touch))
    return handles


def _trace(run, model: nn.Module, component: str, groups: dict[str, int], prefetch: bool, scratch: bool) -> int:
    counter = LiveBytes(conv_scratch=scratch)
    # on the CPU (the conv scratch's device) a streamed group comes from the mapped file
    handles = _with_groups(model, component, groups, counter, prefetch, touched=scratch == "cpu")
    try:
        with torch.inference_mode(), counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counter.peak


def _trace_unet(unet: nn.Module, config: ModelConfig, dtype: torch.dtype, width: int, height: int, batch: int,
                groups: dict[str, int], prefetch: bool, scratch: bool) -> int:
    f = config.vae.downscale
    cfg = config.unet
    meta = {"device": "meta", "dtype": dtype}
    x = torch.empty(batch, cfg.in_channels, height // f, width // f, **meta)
    context = torch.empty(batch, TEXT_TOKENS, cfg.context_dim, **meta)
    y = None if cfg.adm_in_channels is None else torch.empty(batch, cfg.adm_in_channels, **meta)
    t = torch.empty(batch, device="meta")
    peak = _trace(lambda: unet(x, t, context, y), unet, "unet", groups, prefetch, scratch)
    # The sampler's own latents around the call: x, denoised, the scaled input and the CFG halves.
    return peak + 6 * x.numel() * x.element_size()


def _trace_decode(vae: nn.Module, plan: MemoryPlan, dtype: torch.dtype, width: int, height: int, batch: int,
                  groups: dict[str, int], prefetch: bool, scratch: bool) -> int:
    from ..pipelines.base import decode_latents
    f = vae.downscale
    latents = torch.empty(batch, vae.latent_channels, height // f, width // f, device="meta", dtype=dtype)
    parts = SimpleNamespace(vae=vae, in_use=lambda *modules: contextlib.nullcontext())  # weights counted apart
    peak = _trace(lambda: decode_latents(parts, latents, plan), vae.decoder, "vae.decoder", groups, prefetch,
                  scratch)
    # the images as float and as 8-bit arrays on their way to PIL (pipelines/images.py to_pil)
    return peak + batch * 3 * width * height * (4 + 1)
