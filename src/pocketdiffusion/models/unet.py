"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL and their 9-channel inpainting variants).

A port of LDM's `UNetModel` with `SpatialTransformer`s
(https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/openaimodel.py)
and SDXL's generalisation of it (per-level `transformer_depth`, `transformer_depth_middle`,
`adm_in_channels` with `num_classes="sequential"`:
https://github.com/Stability-AI/generative-models/blob/main/sgm/modules/diffusionmodules/openaimodel.py).
Parameter names are the single-file checkpoint keys without the `model.diffusion_model.` prefix.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import UNetConfig
from .ops import DEFAULT_OPS, Ops
from .unet_blocks import (RESBLOCK_NORM_EPS, Downsample, ResBlock, SpatialTransformer, UNetBlock, Upsample,
                          fresh_add)

SDXL_SIZE_EMBED_DIM = 256  # sgm ConcatTimestepEmbedderND outdim for each of the size/crop numbers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) float32, cos half first then sin (LDM's order; diffusers'
    `flip_sin_to_cos=True, freq_shift=0`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sdxl_label_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's `y`: the pooled text embedding (B, P) then a 256-wide sinusoidal embedding of each of the
    size/crop numbers (B, N) -> (B, P + 256 * N); P=1280, N=6 (original size, crop top-left, target
    size) for SDXL base, so 2816. sgm's ConcatTimestepEmbedderND; diffusers' add_time_proj + text_embeds."""
    if pooled.ndim != 2 or time_ids.ndim != 2 or pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(f"sdxl_label_vector expects pooled (B, P) and time_ids (B, N) with the same B, "
                         f"got {tuple(pooled.shape)} and {tuple(time_ids.shape)}")
    size_embedding = timestep_embedding(time_ids.flatten(), SDXL_SIZE_EMBED_DIM)  # (B * N, 256)
    size_embedding = size_embedding.reshape(time_ids.shape[0], -1)  # (B, N * 256)
    return torch.cat([pooled, size_embedding.to(pooled.dtype)], dim=-1)


def _check_config(config: UNetConfig) -> None:
    levels = len(config.channel_mult)
    if len(config.transformer_depth) != levels:
        raise ValueError(f"UNetConfig.transformer_depth needs one entry per level ({levels}), "
                         f"got {config.transformer_depth}")
    if (config.num_heads is None) == (config.head_dim is None):
        raise ValueError("UNetConfig needs exactly one of num_heads (SD1) or head_dim (SD2/SDXL), "
                         f"got num_heads={config.num_heads}, head_dim={config.head_dim}")
    if config.transformer_depth_middle < 1:
        raise ValueError("UNetConfig.transformer_depth_middle must be >= 1 (the SD1/SD2/SDXL middle "
                         f"block always has attention), got {config.transformer_depth_middle}")
    for mult, depth in zip(config.channel_mult, config.transformer_depth):
        channels = config.model_channels * mult
        if channels % config.norm_groups:
            raise ValueError(f"{channels} channels are not divisible into {config.norm_groups} norm groups")
        heads, head_dim = config.heads_for(channels)
        if depth and (heads < 1 or heads * head_dim != channels):
            raise ValueError(f"{channels} channels do not split into attention heads "
                             f"(num_heads={config.num_heads}, head_dim={config.head_dim})")


class UNetModel(nn.Module):
    """eps/v predictor: (noisy latents, timesteps, text context[, SDXL label vector]) -> (B, out, H, W)."""

    def __init__(self, config: UNetConfig, ops: Ops = DEFAULT_OPS):
        super().__init__()
        _check_config(config)
        self.config = config
        mc, groups = config.model_channels, config.norm_groups
        emb_dim = mc * 4

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads, head_dim = config.heads_for(channels)
            return SpatialTransformer(channels, heads, head_dim, depth, config.context_dim,
                                      config.use_linear_in_transformer, groups, ops)

        self.time_embed = nn.Sequential(ops.Linear(mc, emb_dim), nn.SiLU(), ops.Linear(emb_dim, emb_dim))
        if config.adm_in_channels is not None:
            # sgm num_classes="sequential": a Sequential inside a Sequential, hence `label_emb.0.0`.
            self.label_emb = nn.Sequential(nn.Sequential(
                ops.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), ops.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([UNetBlock([ops.Conv2d(config.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]  # channels of each input block's output, consumed by the output blocks
        ch = mc
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            depth = config.transformer_depth[level]
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mc * mult, emb_dim, groups, ops)]
                ch = mc * mult
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(UNetBlock([Downsample(ch, ops)]))
                skip_channels.append(ch)

        self.middle_block = UNetBlock([
            ResBlock(ch, ch, emb_dim, groups, ops),
            transformer(ch, config.transformer_depth_middle),
            ResBlock(ch, ch, emb_dim, groups, ops),
        ])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            depth = config.transformer_depth[level]
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mc * mult, emb_dim, groups, ops)]
                ch = mc * mult
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch, ops))  # key output_blocks.{n}.{1|2}.conv
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(ops.GroupNormSiLU(groups, ch, eps=RESBLOCK_NORM_EPS), nn.Identity(),
                                 ops.Conv2d(ch, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W) with H, W multiples of 2**(levels-1); timesteps (B,) or a scalar;
        context (B, T, context_dim); y (B, adm_in_channels), required iff the config has
        adm_in_channels (SDXL: `sdxl_label_vector(pooled, time_ids)`). Returns (B, out_channels, H, W)."""
        timesteps = self._check_inputs(x, timesteps, context, y)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = fresh_add(emb, self.label_emb(y.to(x.dtype)))
        context = context.to(x.dtype)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            # pop: each skip tensor is freed as soon as it has been concatenated
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # GroupNorm + SiLU, (Identity), conv

    def _check_inputs(self, x, timesteps, context, y) -> torch.Tensor:
        """Raise a ValueError naming what was expected; return timesteps as a (B,) tensor."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet input must be (B, {cfg.in_channels}, H, W) latents, got {_describe(x)}")
        batch, _, height, width = x.shape
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(f"UNet input height and width must be multiples of {factor}, "
                             f"got {height}x{width}")

        if isinstance(timesteps, (int, float)):
            timesteps = torch.tensor(float(timesteps))
        if not isinstance(timesteps, torch.Tensor) or timesteps.ndim > 1 \
                or timesteps.numel() not in (1, batch):
            raise ValueError(f"timesteps must be a number or a ({batch},) tensor, got {_describe(timesteps)}")
        timesteps = timesteps.to(x.device).reshape(-1).expand(batch)

        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != batch \
                or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be ({batch}, T, {cfg.context_dim}) text embeddings, "
                             f"got {_describe(context)}")

        if cfg.adm_in_channels is None:
            if y is not None:
                raise ValueError("this UNet takes no `y` (only SDXL-style UNets with adm_in_channels do)")
        elif not isinstance(y, torch.Tensor) or tuple(y.shape) != (batch, cfg.adm_in_channels):
            raise ValueError(f"this UNet needs y of shape ({batch}, {cfg.adm_in_channels}) "
                             f"(sdxl_label_vector(pooled, time_ids)), got {_describe(y)}")
        return timesteps


def _describe(value) -> str:
    """A tensor's shape, else the value's type, for error messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
