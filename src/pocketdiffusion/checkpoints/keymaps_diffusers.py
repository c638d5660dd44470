"""Pure key mappers for diffusers folders: diffusers' names -> our (LDM) names.

The inverse of diffusers' `convert_ldm_unet_checkpoint` and `convert_ldm_vae_checkpoint`
(https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/single_file_utils.py).
Where a diffusers block lands in the LDM layout depends on the architecture (resnets per level,
which levels have attention and a down/upsampler), so each table is built from our config.
Text encoders need no table: a diffusers folder stores them in transformers' layout, which is
ours (keymaps.map_hf_clip_key).
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch

from ..config import UNetConfig, VAEConfig
from .keymaps import UNET, VAE, Mapped, UnexpectedKey

# diffusers ResnetBlock2D -> LDM ResBlock (openaimodel.py: in_layers = GroupNorm, SiLU, conv;
# emb_layers = SiLU, Linear; out_layers = GroupNorm, SiLU, Dropout, conv).
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D -> LDM VAE ResnetBlock: only the shortcut is named differently.
_VAE_RESNET_RENAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                       "conv_shortcut": "nin_shortcut"}
# diffusers Attention (new names, and the pre-0.14 ones) -> LDM AttnBlock.
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q", "query": "q",
    "to_k": "k", "key": "k",
    "to_v": "v", "value": "v",
    "to_out.0": "proj_out", "proj_attn": "proj_out",
}


def diffusers_discard_reason(key: str) -> str | None:
    """Why a key of a diffusers folder's weights file is deliberately not loaded, or None."""
    if key.endswith("position_ids"):
        return "transformers' constant position index buffer (0..76), saved by older versions"
    return None


def _table_lookup(key: str, table: dict[str, tuple[str, dict[str, str] | None]]) -> str | None:
    """Rename `key` by its longest prefix in `table` ({prefix: (new prefix, inner renames)})."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        entry = table.get(".".join(parts[:n]))
        if entry is None:
            continue
        new_prefix, inner_renames = entry
        rest = ".".join(parts[n:])
        if inner_renames is not None:
            # the module name is everything but the trailing weight/bias
            module, _, kind = rest.rpartition(".")
            if module not in inner_renames:
                return None
            rest = f"{inner_renames[module]}.{kind}"
        return f"{new_prefix}.{rest}"
    return None


@lru_cache(maxsize=16)
def unet_prefix_table(config: UNetConfig) -> dict[str, tuple[str, dict[str, str] | None]]:
    """{diffusers module prefix: (LDM prefix, renames inside it or None = names unchanged)}.

    LDM numbers input_blocks consecutively: 0 is conv_in, then per level `num_res_blocks`
    (resnet, transformer) blocks and, except on the last level, one downsampler. output_blocks
    walk the levels backwards with one more resnet each, the upsampler riding in the level's
    last block after the resnet (and transformer, when the level has one)."""
    levels, per_level = len(config.channel_mult), config.num_res_blocks
    table: dict[str, tuple[str, dict[str, str] | None]] = {
        "conv_in": ("input_blocks.0.0", None),
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET_RENAMES),
        "mid_block.attentions.0": ("middle_block.1", None),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET_RENAMES),
    }
    if config.adm_in_channels is not None:  # SDXL's text_time embedding
        table["add_embedding.linear_1"] = ("label_emb.0.0", None)
        table["add_embedding.linear_2"] = ("label_emb.0.2", None)

    block = 1
    for level in range(levels):
        has_attention = config.transformer_depth[level] > 0
        for r in range(per_level):
            table[f"down_blocks.{level}.resnets.{r}"] = (f"input_blocks.{block}.0", _UNET_RESNET_RENAMES)
            if has_attention:
                table[f"down_blocks.{level}.attentions.{r}"] = (f"input_blocks.{block}.1", None)
            block += 1
        if level != levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", None)
            block += 1

    block = 0
    for up in range(levels):  # diffusers up_blocks.0 is the deepest level
        has_attention = config.transformer_depth[levels - 1 - up] > 0
        for r in range(per_level + 1):
            table[f"up_blocks.{up}.resnets.{r}"] = (f"output_blocks.{block}.0", _UNET_RESNET_RENAMES)
            if has_attention:
                table[f"up_blocks.{up}.attentions.{r}"] = (f"output_blocks.{block}.1", None)
            if r == per_level and up != levels - 1:
                position = 2 if has_attention else 1
                table[f"up_blocks.{up}.upsamplers.0.conv"] = (f"output_blocks.{block}.{position}.conv", None)
            block += 1
    return table


def map_diffusers_unet_key(key: str, tensor: torch.Tensor, config: UNetConfig) -> Mapped:
    """A diffusers UNet2DConditionModel key -> our UNet parameter."""
    renamed = _table_lookup(key, unet_prefix_table(config))
    if renamed is None:
        raise UnexpectedKey(key, "not a parameter of a diffusers UNet2DConditionModel of this "
                                 "configuration (unet/config.json)")
    return [(f"{UNET}.{renamed}", tensor)]


@lru_cache(maxsize=16)
def vae_prefix_table(config: VAEConfig) -> dict[str, tuple[str, dict[str, str] | None]]:
    """{diffusers module prefix: (LDM prefix, renames inside it)} for AutoencoderKL. The decoder's
    up blocks are numbered in execution order by diffusers and by resolution by LDM
    (`decoder.up.0` is the full-resolution level), hence the reversal."""
    levels, per_level = len(config.ch_mult), config.num_res_blocks
    table: dict[str, tuple[str, dict[str, str] | None]] = {
        "quant_conv": ("quant_conv", None),
        "post_quant_conv": ("post_quant_conv", None),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        table[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET_RENAMES)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET_RENAMES)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES)
    for level in range(levels):
        for r in range(per_level):
            table[f"encoder.down_blocks.{level}.resnets.{r}"] = (f"encoder.down.{level}.block.{r}",
                                                                 _VAE_RESNET_RENAMES)
        if level != levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv",
                                                                         None)
    for up in range(levels):
        level = levels - 1 - up
        for r in range(per_level + 1):
            table[f"decoder.up_blocks.{up}.resnets.{r}"] = (f"decoder.up.{level}.block.{r}", _VAE_RESNET_RENAMES)
        if level != 0:
            table[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", None)
    return table


_VAE_ATTENTION_PROJECTION = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def map_diffusers_vae_key(key: str, tensor: torch.Tensor, config: VAEConfig) -> Mapped:
    """A diffusers AutoencoderKL key -> our VAE parameter. diffusers' attention projections are
    Linear (C, C) matrices; LDM's are 1x1 convs (C, C, 1, 1) holding the same numbers."""
    renamed = _table_lookup(key, vae_prefix_table(config))
    if renamed is None:
        raise UnexpectedKey(key, "not a parameter of a diffusers AutoencoderKL of this "
                                 "configuration (vae/config.json)")
    if _VAE_ATTENTION_PROJECTION.search(renamed) and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    return [(f"{VAE}.{renamed}", tensor)]
