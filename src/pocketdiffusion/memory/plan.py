"""`MemoryPlan`: the single source of truth for memory (DESIGN.md, Memory): in which dtype the
weights live, whether they are int8-quantized, which attention kernel runs and in what chunks,
and whether the VAE works in tiles. The loader builds the models from it; the pipelines read it.

Modes (`pocketdiffusion.load(memory=...)`):
- "fast": on CUDA the UNet compiled (speed/compile.py) and its call replayed from CUDA graphs
  (speed/cuda_graphs.py); the text encoders streamed, the VAE parked in pinned host memory and
  brought whole for its use (memory/residency.py), decoding untiled; the graph's activations stay
  reserved between calls.
  Elsewhere the same as balanced.
- "balanced": fp16 weights (on the CPU the UNet's, computing in fp32); on CUDA only the UNet stays on the device:
  the text encoders and the VAE stream from pinned host memory block by block and the VAE decodes
  above 256x256 pixels in tiles (`stream_text`, `stream_vae`), and the eager UNet's steps replay
  from CUDA graphs captured per generation (`graphs_per_run`: the eager step is host-bound, ~2x
  the GPU's time; the graphs are freed before the decode, so the peak stays the eager one); on the CPU the
  UNet's weights are stored in fp16 and computed in fp32 (`unet_store`, memory/store16.py) and the
  text encoders and the VAE stream block by block from the mapped file (`stream_text`, `stream_vae`);
  SDPA attention on CUDA and the CPU (both
  have blocked flash kernels that never hold the full attention matrix; measured on the 2-core
  CPU at 4096 tokens, SDPA took 0.21 s against 0.53 s for our chunked kernel), chunked attention
  with in-place softmax on MPS; the VAE tiled above `vae_tile_above` pixels.
- "low": as balanced, with int8 weight-only per-output-channel quantization of the UNet's
  linears and convolutions, dequantized per layer on use; quantized tensor by tensor as the file is
  read (`swap_layers_for`), so the float UNet never exists whole.
- "minimal": the weights streamed block by block (memory/streaming.py: from the mapped file on
  the CPU, from pinned CPU memory with a prefetching side stream on CUDA) and the VAE always tiled.

Modes are listed fastest first; `memory/planner.py` picks the fastest that fits a budget.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

MODES = ("fast", "balanced", "low", "minimal")


@dataclass(frozen=True)
class MemoryPlan:
    mode: str = "balanced"
    weight_dtype: torch.dtype | None = None  # None: float16 on GPUs, float32 on the CPU
    quantize_unet: bool = False  # int8 weight-only (memory/quant.py)
    stream_weights: bool = False  # block by block from the file / pinned memory (memory/streaming.py)
    cuda_graphs: bool = False  # replay the UNet call from CUDA graphs (speed/cuda_graphs.py; CUDA, resident weights)
    # The graphs captured anew in each generation (its first step eager) and freed before the
    # decode, so that they keep no memory outside the steps (balanced/low); else kept across
    # generations, their pool reserved throughout (fast).
    graphs_per_run: bool = False
    # CUDA, a resident UNet: the VAE waits in pinned host memory between its uses
    # (memory/residency.py) and the text encoders are streamed layer by layer from there
    # (memory/streaming.py), so the UNet never shares the device with a whole text encoder
    # (SDXL's two are 1.5 GiB) or the VAE while it steps.
    park_idle: bool = False
    stream_text: bool = False
    compile: bool = False  # torch.compile the UNet (speed/compile.py; CUDA, with cuda_graphs in `fast`)
    # CUDA, eager UNet: its weights and input in channels_last, so that cuDNN's Hopper convolutions
    # do not transpose every NCHW input and output (compiled: speed/compile.py does it itself). No
    # named plan sets it yet (balanced's peak, plan_for); the benchmarks reach it as a variant:
    # `bench/memory_gpu.py --modes balanced:channels_last=True`.
    channels_last: bool = False
    # CUDA: GroupNorm and GroupNorm + SiLU by the Triton kernels of speed/group_norm_cuda.py
    # (PyTorch's fills a quarter of an H100 at batch 1: the VAE decoder's norms ran 3-11x slower).
    norm_kernels: bool = True
    # The UNet's linear and conv weights kept in this 16-bit dtype and upcast to the compute dtype
    # per layer on use (memory/store16.py; the CPU's balanced plan: fp16, half of fp32's bytes).
    unet_store: torch.dtype | None = None
    # The VAE's weights stream block by block for its one use (memory/streaming.py; on the CPU from
    # the mapped file, as the text encoders do there with `stream_text`), never resident.
    stream_vae: bool = False
    # CPU: the UNet's calls after the first keep their freed blocks in the heap for the next step
    # instead of handing them back (no page faults: ~1.5 s of a 8 s SD1.5 step), for a few tens of
    # MiB of heap fragmentation (memory/cpu_heap.py). Off in minimal, whose peak comes first.
    heap_reuse: bool = False
    attention: str = "sdpa"  # "sdpa" or "chunked"
    attention_chunk: int = 1024  # query rows per chunk for "chunked"
    vae_tile_above: int | None = 1024 * 1024  # tile the VAE when an image has more pixels; None = never
    vae_tile: int = 64  # latent tile side
    vae_tile_overlap: int = 16  # latent overlap between tiles, blended

    def with_(self, **changes) -> "MemoryPlan":
        return replace(self, **changes)


def plan_for(mode: str, device: torch.device | str) -> MemoryPlan:
    """The plan of a named mode on a device."""
    if mode not in MODES:
        raise ValueError(f"memory={mode!r}: expected one of {MODES}")
    device = torch.device(device)
    attention = "chunked" if device.type == "mps" else "sdpa"
    if mode == "minimal":
        # Smaller tiles than the other modes' (256 pixels): one tile's decoder activations are
        # then about a sixth of a whole 512x512 decode's, in line with one streamed block.
        return MemoryPlan(mode=mode, attention=attention, stream_weights=True, vae_tile_above=0,
                          vae_tile=32, vae_tile_overlap=8)
    if device.type == "cuda":
        # Only the UNet stays on the device. balanced/low: the text encoders and the VAE stream
        # from pinned host memory block by block, and the VAE decodes above 256x256 pixels in
        # tiles: the resident UNet plus a whole VAE and an untiled 512x512 decode (~360 MiB of
        # activations) was the peak, 1925 MiB allocated for SD1.5 (docs/BENCHMARKS.md).
        if mode == "fast":  # speed first: the VAE comes whole for its one use and decodes untiled
            # up to 768x768; above, in tiles (SDXL at 1024x1024 decoding whole: 7576 MiB allocated
            # against 4970 in the steps, H100).
            return MemoryPlan(mode=mode, attention=attention, park_idle=True, stream_text=True,
                              cuda_graphs=True, compile=True, vae_tile_above=768 * 768)
        # low: smaller tiles still, its decode beside the int8 UNet and its dequantization buffer
        # (H100, SD1.5 512: tile 32 gave 1028 MiB allocated in the decode against 984 in the
        # steps, 1132 reserved; tile 24 961 and 1092 reserved but 16 tiles instead of 9, and each
        # tile streams the VAE's weights again: 0.684 against 0.594 s an image). 26 is the largest
        # tile that keeps the decode under the steps and still covers 64 latents in 3x3 tiles.
        tile, overlap = (26, 6) if mode == "low" else (32, 8)
        # Not channels_last (MemoryPlan.channels_last), though cuDNN transposes every NCHW conv input
        # (99 of balanced's 388 ms of GPU time an image, H100 session 6 run 5): it made balanced's
        # image 1.19-1.28x faster but reserved 1914 MiB for the same 1832 allocated, over its
        # 1900 MiB bar (runs 6 and 7, docs/BENCHMARKS.md).
        return MemoryPlan(mode=mode, attention=attention, quantize_unet=mode == "low", stream_text=True,
                          stream_vae=True, vae_tile_above=256 * 256, vae_tile=tile, vae_tile_overlap=overlap,
                          cuda_graphs=True, graphs_per_run=True)
    if device.type == "cpu":
        # Only the UNet is resident, in fp16 (balanced, fast) or int8 (low), computing in fp32; the
        # text encoders and the VAE stay in the mapped file and stream block by block for their one
        # use each (zero-copy views of the file's pages, dropped after each block). An untiled
        # 512x512 decode holds ~970 MiB of fp32 activations, more than the UNet's step (~400): the
        # VAE decodes above 256x256 pixels in minimal's tiles (~250 MiB), as on CUDA.
        return MemoryPlan(mode=mode, attention=attention, quantize_unet=mode == "low",
                          unet_store=None if mode == "low" else torch.float16, stream_text=True, stream_vae=True,
                          heap_reuse=True, vae_tile_above=256 * 256, vae_tile=32, vae_tile_overlap=8)
    return MemoryPlan(mode=mode, attention=attention, quantize_unet=mode == "low")


def swap_layers_for(plan: MemoryPlan):
    """What `checkpoints.load(swap_layers=...)` does to the meta models under this plan: the UNet's
    layers int8 (memory/quant.py) or stored in 16 bits (memory/store16.py); None: nothing."""
    if plan.quantize_unet:
        from .quant import quantize_
        return lambda models: quantize_(models["unet"])
    if plan.unet_store is not None:
        from .store16 import store16_
        return lambda models: store16_(models["unet"], plan.unet_store)
    return None


def streamed_components(plan: MemoryPlan) -> tuple[str, ...] | None:
    """The components whose weights stream under this plan (`BlockStreaming(components=...)`):
    None for all of them (minimal), () for none."""
    if plan.stream_weights:
        return None
    return tuple(name for name, on in (("text_encoders", plan.stream_text), ("vae", plan.stream_vae)) if on)


def ops_for(plan: MemoryPlan, device: torch.device | str | None = None):
    """The layer family the models are built from under this plan: the attention kernel, and on
    CUDA the GroupNorms of speed/group_norm_cuda.py (PyTorch's fills a quarter of an H100 at batch 1)."""
    import functools

    from ..models.attention import chunked_attention
    from ..models.ops import DEFAULT_OPS, Ops
    if plan.attention not in ("sdpa", "chunked"):
        raise ValueError(f"attention={plan.attention!r}: expected 'sdpa' or 'chunked'")
    layers = {}
    if plan.attention == "chunked":
        layers["attention"] = functools.partial(chunked_attention, chunk=plan.attention_chunk)
    if plan.norm_kernels and device is not None and torch.device(device).type == "cuda":
        from ..speed.group_norm_cuda import HOST_BOUND_MIN_ELEMENTS, CudaGroupNorm, CudaGroupNormSiLU
        # The streamed plan's eager steps are host-bound: small norms stay with PyTorch's one launch.
        least = HOST_BOUND_MIN_ELEMENTS if plan.stream_weights else 0
        layers.update(GroupNorm=functools.partial(CudaGroupNorm, min_elements=least),
                      GroupNormSiLU=functools.partial(CudaGroupNormSiLU, min_elements=least))
    return Ops(**layers) if layers else DEFAULT_OPS


class MemoryFallbackWarning(UserWarning):
    """A generation ran out of memory and is being retried on a lower plan."""


def lower_plan(plan: MemoryPlan) -> MemoryPlan | None:
    """The next plan down after an out-of-memory: balanced (no CUDA graphs), int8 UNet weights, then the VAE tiled at every
    size; None when there is nothing lower left to try. (A streamed plan is the lowest there is:
    its int8 counterpart would hold the whole UNet resident.)"""
    if plan.mode == "fast":  # first give up the graphs' reserved activations
        return plan.with_(mode="balanced", cuda_graphs=False, compile=False, graphs_per_run=False)
    if plan.stream_weights:
        return plan.with_(vae_tile_above=0) if plan.vae_tile_above != 0 else None
    if not plan.quantize_unet:
        return plan.with_(mode="low", quantize_unet=True, channels_last=False)
    if plan.vae_tile_above != 0:
        return plan.with_(vae_tile_above=0)
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU/MPS allocators' RuntimeErrors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
