"""torch.compile of the UNet for the `fast` plan (CUDA): Inductor fuses the UNet's elementwise
work (GroupNorm + SiLU, the residual adds, GEGLU's gate) into the surrounding kernels and runs
1x1 convolutions as matrix products; with channels_last weights the convolutions skip their
layout transposes. ../shared/ANCHORS.md: diffusers' UNet call went from 43.0 ms eager to 13.2 ms
compiled with channels_last, 8.6 ms with CUDA graphs on top — which the `fast` plan adds itself
(speed/cuda_graphs.py captures the compiled call).

Compiled kernels are cached on disk (Inductor's FX graph and autotuning caches) under
$POCKETDIFFUSION_CACHE or ~/.cache/pocketdiffusion/inductor, so a second process start skips
code generation; a user's TORCHINDUCTOR_CACHE_DIR wins.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch


def cache_dir() -> Path:
    base = os.environ.get("POCKETDIFFUSION_CACHE") or Path.home() / ".cache" / "pocketdiffusion"
    return Path(base) / "inductor"


# torch.compile modes that leave the CUDA graphs to speed/cuda_graphs.py (the others capture their own)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def tuning_from_environment() -> tuple[str | None, bool]:
    """The tuning knobs (bench/fast_variants.py measures them; neither paid on the H100, so both
    are off unless set): POCKETDIFFUSION_COMPILE_MODE, a torch.compile mode from COMPILE_MODES
    ("max-autotune-no-cudagraphs": Triton GEMM/conv templates timed against cuBLAS/cuDNN, minutes
    of compiling), and POCKETDIFFUSION_CUDNN_BENCHMARK=1, cuDNN's algorithms timed, not guessed."""
    mode = os.environ.get("POCKETDIFFUSION_COMPILE_MODE") or None
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"POCKETDIFFUSION_COMPILE_MODE={mode!r}: expected one of {COMPILE_MODES} "
                         "(modes with CUDA graphs of their own would capture inside ours)")
    benchmark = os.environ.get("POCKETDIFFUSION_CUDNN_BENCHMARK", "")
    if benchmark not in ("", "0", "1"):
        raise ValueError(f"POCKETDIFFUSION_CUDNN_BENCHMARK={benchmark!r}: expected 1 (on) or 0 (off)")
    return mode, benchmark == "1"


def compile_unet(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """`unet` (in place: channels_last weights) and its compiled forward. Compilation itself runs
    lazily, on the first call; a failure there (no Triton, an unsupported GPU) falls back to the
    eager UNet with a warning, once."""
    mode, cudnn_benchmark = tuning_from_environment()  # a bad knob fails here, before anything changes
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True  # SD's 1x1 convs (attention projections in/out, skips) as GEMMs
    unet.to(memory_format=torch.channels_last)
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    compiled = torch.compile(unet, dynamic=False, mode=mode)
    state = {"failed": False}

    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        x = x.contiguous(memory_format=torch.channels_last)
        if not state["failed"]:
            try:
                return compiled(x, t, context, y=y)
            except Exception as error:  # noqa: BLE001 - any compiler failure: run eager instead
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                state["failed"] = True
                warnings.warn(f"torch.compile of the UNet failed ({type(error).__name__}: {str(error)[:200]}); "
                              "running it eager", RuntimeWarning, stacklevel=2)
        return unet(x, t, context, y=y)

    forward.compiled = compiled  # for tests and the benchmark
    forward.state = state
    return forward
