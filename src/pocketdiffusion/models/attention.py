"""Attention kernels. Every model calls attention through `ops.attention`, so a memory plan can
swap the backend (SDPA/flash on CUDA, chunked with in-place softmax elsewhere) without touching
model code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)  # (B, heads, T, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, C)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Tq, C), k/v (B, Tk, C) -> (B, Tq, C). `mask` is additive, broadcastable to
    (B, heads, Tq, Tk) (the CLIP causal mask)."""
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads),
                                         _split_heads(v, heads), attn_mask=mask)
    return _merge_heads(out)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      mask: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Same result as `sdpa_attention`, never holding more than (B, heads, chunk, Tk) scores;
    the softmax runs in place on that slice."""
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    scale = qh.shape[-1] ** -0.5
    out = torch.empty_like(qh)
    kt = kh.transpose(-1, -2)  # (B, heads, head_dim, Tk)
    for start in range(0, qh.shape[2], chunk):
        scores = torch.matmul(qh[:, :, start:start + chunk] * scale, kt)  # (B, heads, chunk, Tk)
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., start:start + chunk, :]
            scores += m
        torch.softmax(scores, dim=-1, out=scores)
        torch.matmul(scores, vh, out=out[:, :, start:start + chunk])
        del scores
    return _merge_heads(out)
