"""pocketdiffusion: a Stable Diffusion engine for small hardware.

    import pocketdiffusion
    pipe = pocketdiffusion.load()                    # the embedded default model, or a path
    image = pipe.generate("a red circle on a blue background", seed=1)[0]
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

MEMORY_MODES = ("fast", "balanced", "low", "minimal")  # memory/plan.py MODES

if TYPE_CHECKING:
    import torch

    from .pipelines.pipeline import Pipeline


def load(path: str | os.PathLike = "shapes", device: "str | torch.device | None" = None, memory: str = "balanced",
         *, dtype: "torch.dtype | None" = None, prediction: str | None = None) -> "Pipeline":
    """Load a model into a ready `Pipeline`: a .safetensors/.ckpt file, a diffusers folder, the name
    of a model in ./models or $POCKETDIFFUSION_MODELS_DIR, or an embedded model ("shapes", the
    default; "shapes-inpainting", its 9-channel inpainting variant).

    `device`: "cuda", "cpu", "mps" or None (CUDA when available, else CPU). `memory`: the memory
    mode (memory/plan.py): "fast" (on CUDA the UNet compiled and replayed from CUDA graphs kept
    between generations; elsewhere balanced), "balanced" (fp16 weights on GPUs, on CUDA the UNet's
    steps replayed from CUDA graphs captured per generation; on the CPU the UNet's stored in fp16,
    computed in fp32) or "low" (as
    balanced, with the UNet's weights int8, dequantized per layer on use) or "minimal" (the weights
    streamed block by block from the file, or from pinned memory on CUDA; the VAE always tiled;
    `pocketdiffusion plan MODEL` says which fits a budget). `dtype` overrides the weight
    precision; `prediction` ("eps"/"v") overrides what the files say. A missing or unreadable
    model raises `CheckpointError` (a ValueError) naming the path and what was wrong.
    """
    import torch

    from .catalog import resolve
    from .checkpoints import load as load_components
    from .memory.plan import ops_for, plan_for, streamed_components, swap_layers_for
    from .pipelines.pipeline import Pipeline

    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: expected one of {MEMORY_MODES}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load() takes a model path or name, got {type(path).__name__}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolve(path)
    plan = plan_for(memory, device)
    if dtype is not None:  # the weights in the dtype asked for, not a 16-bit store of them
        plan = plan.with_(unet_store=None)
    if torch.device(device).type == "cpu":
        from .memory.cpu_heap import return_freed_memory_to_os
        return_freed_memory_to_os()  # freed activations leave the process at once: a lower, predictable peak
    on_cuda = torch.device(device).type == "cuda"
    streaming = None
    components = streamed_components(plan)
    if components != ():
        from .memory.streaming import BlockStreaming
        streaming = BlockStreaming(device, components=components)
    parking = plan.park_idle and on_cuda
    if on_cuda:
        from .memory.cuda_allocator import use_expandable_segments
        use_expandable_segments()
    parts = load_components(model.path, device=device, dtype=dtype or plan.weight_dtype, prediction=prediction,
                            unet_subfolder=model.unet_subfolder, ops=ops_for(plan, device), streaming=streaming,
                            host_components=("vae",) if parking else (), swap_layers=swap_layers_for(plan))
    if torch.device(device).type == "cpu":
        from .memory.cpu_heap import give_back, reuse_during, trim_after
        from .memory.store16 import reserve_scratch
        give_back()  # what loading freed between the weights it kept
        reserve_scratch(parts.unet, next(parts.unet.parameters()).dtype, device)  # outside the heap reused below
        if plan.heap_reuse:
            reuse_during(parts.unet)  # its steps reuse the heap's blocks (no page faults), given back after each
        for module in (*parts.text_encoders, parts.vae.encoder, parts.vae.decoder):
            trim_after(module)
    if parking:
        from .memory.residency import HostParking
        parts.residency = HostParking(device, [parts.vae])
    if on_cuda:
        torch.cuda.empty_cache()  # what loading (and quantizing) freed goes back, not into the generation's peak
    return Pipeline(parts, name=model.name, plan=plan)


def __getattr__(name: str):
    # Lazy, so `import pocketdiffusion` stays cheap (no torch import) for the CLI's --help.
    if name in ("Pipeline", "Run"):
        from .pipelines import pipeline
        return getattr(pipeline, name)
    if name in ("GenerationRequest", "Step", "Result"):
        from .pipelines import request
        return getattr(request, name)
    raise AttributeError(f"module 'pocketdiffusion' has no attribute {name!r}")


__all__ = ["load", "Pipeline", "Run", "GenerationRequest", "Step", "Result", "__version__"]
