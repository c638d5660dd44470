"""The building blocks of the Stable Diffusion UNet, ported from the original LDM code.

Attribute names are the LDM single-file checkpoint keys (`in_layers.0`, `transformer_blocks.0.attn1.to_q`,
`ff.net.0.proj`, ...), so a `model.diffusion_model.*` state dict loads with the prefix stripped.

References:
- ResBlock, Downsample, Upsample, TimestepEmbedSequential:
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/openaimodel.py
- SpatialTransformer, BasicTransformerBlock, CrossAttention, FeedForward, GEGLU (with SD2's
  `use_linear` projections):
  https://github.com/Stability-AI/stablediffusion/blob/main/ldm/modules/attention.py

Memory: every in-place operation below writes only into a tensor the same block has just created,
never into a block's input (the UNet keeps those as skip connections), and only when autograd does
not need the overwritten values (`requires_grad` off, as under `torch.inference_mode()`). In-place
and out-of-place adds give bit-identical results, so parity with the reference is unaffected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Ops

RESBLOCK_NORM_EPS = 1e-5  # LDM GroupNorm32 default
TRANSFORMER_NORM_EPS = 1e-6  # LDM `Normalize(in_channels)` in SpatialTransformer
LAYER_NORM_EPS = 1e-5  # torch default, as in LDM's BasicTransformerBlock


def fresh_add(fresh: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`fresh + residual`, accumulated into `fresh` (a tensor the caller just made) when autograd is off."""
    if fresh.requires_grad or residual.requires_grad:
        return fresh + residual
    return fresh.add_(residual)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep embedding, GroupNorm-SiLU-(dropout)-conv, + skip."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, norm_groups: int, ops: Ops):
        super().__init__()
        # LDM's (GroupNorm, SiLU, conv): the SiLU runs inside ops.GroupNormSiLU (one kernel where
        # the plan has one), and an Identity keeps the conv at index 2, as checkpoints name it.
        self.in_layers = nn.Sequential(
            ops.GroupNormSiLU(norm_groups, channels, eps=RESBLOCK_NORM_EPS),
            nn.Identity(),
            ops.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            ops.GroupNormSiLU(norm_groups, out_channels, eps=RESBLOCK_NORM_EPS),
            nn.Identity(),  # LDM's SiLU slot (inside the norm)
            nn.Identity(),  # LDM's Dropout slot: keeps the conv at index 3, as checkpoints name it
            ops.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # LDM: a 1x1 conv only where the channel count changes, else Identity (no checkpoint key).
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else ops.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # GroupNorm + SiLU, conv
        # `emb` is shared by every ResBlock of the UNet, so its SiLU is never in place.
        emb_out = self.emb_layers[1](F.silu(emb)).to(h.dtype)
        h = fresh_add(h, emb_out[:, :, None, None])  # (B, C, 1, 1) broadcast over H, W
        h = self.out_layers(h)
        return fresh_add(h, self.skip_connection(x))


class Downsample(nn.Module):
    """A stride-2 3x3 conv (LDM `conv_resample=True`)."""

    def __init__(self, channels: int, ops: Ops):
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, ops: Ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (itself when None); q/k/v without bias."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, ops: Ops):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.attention = ops.attention
        self.to_q = ops.Linear(query_dim, inner_dim, bias=False)
        self.to_k = ops.Linear(context_dim, inner_dim, bias=False)
        self.to_v = ops.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner_dim, query_dim))  # LDM: (Linear, Dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, T, inner_dim)
        out = self.attention(q, k, v, self.heads)  # (B, Tq, inner_dim)
        del q, k, v
        return self.to_out(out)


class GEGLU(nn.Module):
    """`value * gelu(gate)` with value and gate from one projection (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int, ops: Ops):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # two (B, T, dim_out) views of one buffer
        out = F.gelu(gate)
        del gate
        if out.requires_grad or value.requires_grad:
            return value * out
        return out.mul_(value)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ops: Ops, mult: int = 4):
        super().__init__()
        # LDM: (GEGLU, Dropout, Linear); Identity keeps the output Linear at index 2.
        self.net = nn.Sequential(GEGLU(dim, dim * mult, ops), nn.Identity(), ops.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, ops: Ops):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, ops)
        self.ff = FeedForward(dim, ops)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, ops)
        self.norm1 = ops.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = ops.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm3 = ops.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = fresh_add(self.attn1(self.norm1(x)), x)
        x = fresh_add(self.attn2(self.norm2(x), context), x)
        return fresh_add(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map: GroupNorm, project in, `depth` transformer blocks,
    project out, + input. SD1 projects with 1x1 convs on (B, C, H, W); SD2/SDXL (`use_linear`) with
    Linear layers on (B, H*W, C)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, norm_groups: int, ops: Ops):
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear = use_linear
        self.norm = ops.GroupNorm(norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if use_linear:
            self.proj_in = ops.Linear(channels, inner_dim)
        else:
            self.proj_in = ops.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, heads, head_dim, context_dim, ops) for _ in range(depth)])
        if use_linear:
            self.proj_out = ops.Linear(inner_dim, channels)
        else:
            self.proj_out = ops.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C)
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        # (B, C, H, W). The reshape alone would be a channels-last view; copy it to the contiguous
        # layout the convolutions downstream expect, as LDM does.
        out = tokens.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        del tokens
        if not self.use_linear:
            out = self.proj_out(out)
        return fresh_add(out, x)


class UNetBlock(nn.ModuleList):
    """LDM's `TimestepEmbedSequential`: layers run in order, each given what it needs (ResBlocks the
    timestep embedding, SpatialTransformers the text context). A ModuleList so that children are
    named 0, 1, 2 as in the checkpoints."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
