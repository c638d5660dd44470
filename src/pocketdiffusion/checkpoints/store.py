"""The converted store (`pocketdiffusion convert`): one safetensors file holding our models'
weights under our own names, in execution order (text encoders, UNet, VAE; each model's
parameters in the order its forward uses them), in the dtype the models run in, with the
ModelConfig in the header. Loading it needs no detection and no key mapping, and with no dtype
conversion each weight is a view of the memory-mapped file: it loads in a fraction of the time
of the checkpoint it came from.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig, config_from_dict, config_to_dict
from ..errors import CheckpointError
from .formats import TensorSource

STORE_FORMAT = "pocketdiffusion-store"
STORE_VERSION = "1"


def is_store(tensors: TensorSource) -> bool:
    return tensors.metadata.get("format") == STORE_FORMAT


def store_config(tensors: TensorSource) -> ModelConfig:
    """The ModelConfig written in a store's header."""
    if tensors.metadata.get("version") != STORE_VERSION:
        raise CheckpointError(f"{tensors.path} is a pocketdiffusion store of version "
                              f"{tensors.metadata.get('version')!r}; this version reads {STORE_VERSION!r}")
    try:
        return config_from_dict(json.loads(tensors.metadata["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{tensors.path}: the store's config is unreadable ({error})") from None


def identity_key(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A store's keys are our parameter names already."""
    return [(key, tensor)]


def no_discard(key: str) -> None:
    return None


def convert(source: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
            prediction: str | None = None, overwrite: bool = False) -> Path:
    """Write `source` (any checkpoint `load` reads) as a store at `out` (.safetensors), atomically."""
    from .load import load
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"the store must be a .safetensors file, got {out.name!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    parts = load(source, device="cpu", dtype=dtype, prediction=prediction)
    tensors: dict[str, torch.Tensor] = {}
    components = [(f"text_encoders.{i}", m) for i, m in enumerate(parts.text_encoders)]
    for name, model in [*components, ("unet", parts.unet), ("vae", parts.vae)]:
        for key, value in model.state_dict().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    metadata = {"format": STORE_FORMAT, "version": STORE_VERSION,
                "config": json.dumps(config_to_dict(parts.config))}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, out)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return out
