"""torch.compile of the UNet for the `fast` plan (CUDA): Inductor fuses the UNet's elementwise
work (GroupNorm + SiLU, the residual adds, GEGLU's gate) into the surrounding kernels and runs
1x1 convolutions as matrix products; with channels_last weights the convolutions skip their
layout transposes. ../shared/ANCHORS.md: diffusers' UNet call went from 43.0 ms eager to 13.2 ms
compiled with channels_last, 8.6 ms with CUDA graphs on top — which the `fast` plan adds itself
(speed/cuda_graphs.py captures the compiled call).

Compiled UNets are kept on disk, under $POCKETDIFFUSION_CACHE or ~/.cache/pocketdiffusion:
- `aot/`: where this torch has `torch.compile(...).aot_compile` (2.11 on the device machine;
  experimental), one artifact per model architecture and call signature. It holds the traced
  graph and the generated kernels, not the weights: the weights are inputs, so one file serves
  every checkpoint of an architecture. A second process loads it in ~1.7 s and skips Dynamo's
  trace and Inductor. docs/BENCHMARKS.md, session 5 run 13 (a probe of these calls): the first
  image 1.5-2.9 s after that load, against 7.6 s from the warm Inductor cache alone.
- `inductor/`: Inductor's FX-graph and autotuning caches (a user's TORCHINDUCTOR_CACHE_DIR wins),
  for the lazy torch.compile this falls back to when AOT compiling is not there.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch


def cache_root() -> Path:
    return Path(os.environ.get("POCKETDIFFUSION_CACHE") or Path.home() / ".cache" / "pocketdiffusion")


def cache_dir() -> Path:
    """Inductor's caches."""
    return cache_root() / "inductor"


def aot_dir() -> Path:
    """The AOT-compiled UNets."""
    return cache_root() / "aot"


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
    """`unet` (in place: channels_last weights) and its compiled forward. Compilation runs on the
    first call of each signature: an AOT artifact of that architecture and signature is loaded
    from disk, or compiled and saved (or, on a torch without AOT compiling, torch.compile runs
    lazily). A failure there (no Triton, an unsupported GPU) falls back to the eager UNet with a
    warning, once."""
    mode, cudnn_benchmark = tuning_from_environment()  # a bad knob fails here, before anything changes
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    unet.to(memory_format=torch.channels_last)
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    state: dict = {"failed": False, "by_signature": {}, "compiled": 0, "loaded": 0}

    def compiled_call(key, x, t, context, y):
        call = state["by_signature"].get(key)
        if call is None:
            call = state["by_signature"][key] = _aot_call(unet, (x, t, context), y, mode, state) or \
                _lazy_call(unet, mode)
        try:
            return call(x, t, context, y=y)
        except Exception as error:  # an AOT artifact that cannot run here: the lazy compile instead
            if not getattr(call, "aot", False):
                raise
            _warn_unless_out_of_memory(error, "the saved compiled UNet failed", "compiling it anew")
            call = state["by_signature"][key] = _lazy_call(unet, mode)
            return call(x, t, context, y=y)

    def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None):
        x = x.contiguous(memory_format=torch.channels_last)
        if not state["failed"]:
            try:
                return compiled_call(tuple(_describe(v) for v in (x, t, context, y)), x, t, context, y)
            except Exception as error:  # noqa: BLE001 - any compiler failure: run eager instead
                _warn_unless_out_of_memory(error, "torch.compile of the UNet failed", "running it eager")
                state["failed"] = True
        return unet(x, t, context, y=y)

    forward.state = state  # for tests and the benchmark
    return forward


def _warn_unless_out_of_memory(error: Exception, what: str, instead: str) -> None:
    """A compiler failure has a way around it (said in the warning); running out of memory does not
    (the pipeline's own fallback to a lower plan handles that), so it propagates."""
    if isinstance(error, torch.OutOfMemoryError):
        raise error
    warnings.warn(f"{what} ({type(error).__name__}: {str(error)[:200]}); {instead}", RuntimeWarning, stacklevel=4)


def _set_inductor_options() -> None:
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True  # SD's 1x1 convs (attention projections in/out, skips) as GEMMs


def _lazy_call(unet: torch.nn.Module, mode: str | None) -> Callable[..., torch.Tensor]:
    _set_inductor_options()
    return torch.compile(unet, dynamic=False, mode=mode)


def _describe(value: torch.Tensor | None) -> tuple | None:
    """What a compiled artifact is specialized on, per input (inference tensors have other
    dispatch keys than normal ones, and the artifact's guards check them)."""
    if value is None:
        return None
    return (tuple(value.shape), value.stride(), str(value.dtype), value.device.type, value.is_inference())


def _aot_call(unet: torch.nn.Module, args: tuple, y: torch.Tensor | None, mode: str | None,
              state: dict) -> Callable[..., torch.Tensor] | None:
    """The UNet's forward AOT-compiled for these inputs: loaded from aot_dir() if there, else
    compiled and saved there. None where this torch cannot AOT compile."""
    path = aot_dir() / f"unet-{_fingerprint(unet, args, y, mode)}.pt"
    function = None
    if path.is_file():
        try:
            with open(path, "rb") as file:
                function = torch.compiler.load_compiled_function(file)
            state["loaded"] += 1
        except Exception:  # noqa: BLE001 - a stale or damaged artifact: compile anew below
            path.unlink(missing_ok=True)
    if function is None:
        _set_inductor_options()
        dynamo_config = torch._dynamo.config
        if hasattr(dynamo_config, "enable_aot_compile"):  # off by default in torch 2.11
            dynamo_config.enable_aot_compile = True
        compiled = torch.compile(type(unet).forward, fullgraph=True, dynamic=False, mode=mode)
        aot_compile = getattr(compiled, "aot_compile", None)
        if aot_compile is None:
            return None
        try:
            function = aot_compile(((unet, *args), {"y": y}))
        except Exception as error:  # noqa: BLE001 - an experimental API: the lazy compile instead
            _warn_unless_out_of_memory(error, "AOT compiling the UNet failed",
                                       "compiling it lazily, not saved for the next start")
            return None
        state["compiled"] += 1
        _save(function, path)

    def call(x, t, context, y=None):
        return function(unet, x, t, context, y=y)
    call.aot = True
    return call


def _save(function, path: Path) -> None:
    """Write the artifact under a temporary name and rename it: a process starting meanwhile
    never loads half a file. A cache that cannot be written only costs the next start its compile."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        function.save_compiled_function(str(temporary))
        os.replace(temporary, path)
    except Exception as error:  # noqa: BLE001
        with contextlib.suppress(OSError):  # no folder to write in means no temporary file either
            temporary.unlink(missing_ok=True)
        warnings.warn(f"could not save the compiled UNet to {path} ({type(error).__name__}: {error}); "
                      "the next process compiles it again", RuntimeWarning, stacklevel=3)


def _fingerprint(unet: torch.nn.Module, args: tuple, y: torch.Tensor | None, mode: str | None) -> str:
    """Everything the artifact depends on: torch and its CUDA, the GPU, the compile mode, the
    model's code and its parameters' shapes (not their values), and the inputs' layout."""
    import hashlib

    from .. import models

    digest = hashlib.sha256()
    device = args[0].device
    gpu = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)) \
        if device.type == "cuda" else None
    # Inductor's switches set from the environment change the kernels it writes (coordinate descent
    # tuning, freezing, ...): an artifact compiled under other ones is not this one.
    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR")
    parts = [torch.__version__, torch.version.cuda, gpu, mode, switches, type(unet).__qualname__,
             [_describe(v) for v in (*args, y)],
             [(name, tuple(v.shape), v.stride(), str(v.dtype)) for name, v in unet.state_dict().items()]]
    digest.update(repr(parts).encode())
    for source in sorted(Path(models.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]
