"""The layer family models are built from.

A model never names `torch.nn.Linear` directly: it asks `ops.Linear(...)`. A memory strategy
(casting, int8 quantization, weight streaming, another attention kernel) is a different `Ops`,
so none of it touches model code (the idea of ComfyUI's comfy/ops.py, without global state).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sdpa_attention


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm then SiLU, one layer (same parameters and checkpoint keys as nn.GroupNorm), so
    that a kernel can do both in one pass (speed/group_norm_cuda.py). Every GroupNorm of the UNet's
    ResBlocks and of the VAE is followed by a SiLU. Here the SiLU runs in place on the norm's fresh
    output when autograd allows: the values are those of the two layers one after the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


@dataclass(frozen=True)
class Ops:
    Linear: Callable[..., nn.Module] = nn.Linear
    Conv2d: Callable[..., nn.Module] = nn.Conv2d
    GroupNorm: Callable[..., nn.Module] = nn.GroupNorm
    GroupNormSiLU: Callable[..., nn.Module] = GroupNormSiLU
    LayerNorm: Callable[..., nn.Module] = nn.LayerNorm
    Embedding: Callable[..., nn.Module] = nn.Embedding
    # attention(q, k, v, heads, mask=None) -> out; shapes (B, T, C)
    attention: Callable[..., torch.Tensor] = sdpa_attention


DEFAULT_OPS = Ops()
