"""The layer family models are built from.

A model never names `torch.nn.Linear` directly: it asks `ops.Linear(...)`. A memory strategy
(casting, int8 quantization, weight streaming, another attention kernel) is a different `Ops`,
so none of it touches model code (the idea of ComfyUI's comfy/ops.py, without global state).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import sdpa_attention


@dataclass(frozen=True)
class Ops:
    Linear: Callable[..., nn.Module] = nn.Linear
    Conv2d: Callable[..., nn.Module] = nn.Conv2d
    GroupNorm: Callable[..., nn.Module] = nn.GroupNorm
    LayerNorm: Callable[..., nn.Module] = nn.LayerNorm
    Embedding: Callable[..., nn.Module] = nn.Embedding
    # attention(q, k, v, heads, mask=None) -> out; shapes (B, T, C)
    attention: Callable[..., torch.Tensor] = sdpa_attention


DEFAULT_OPS = Ops()
