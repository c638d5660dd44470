"""Test-only bridge to the diffusers reference UNet: UNetConfig -> `UNet2DConditionModel` config dict,
and LDM-keyed state dict -> diffusers state dict through diffusers' own single-file converter.

The mapping follows diffusers' `create_unet_diffusers_config_from_ldm`
(diffusers/loaders/single_file_utils.py): `attention_head_dim` is diffusers' misnomer for the head
COUNT (an int for SD1's fixed 8 heads, one count per level where the head size is fixed).
"""
from __future__ import annotations

from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

from pocketdiffusion.config import UNetConfig


def diffusers_unet_config(config: UNetConfig) -> dict:
    block_out_channels = [config.model_channels * mult for mult in config.channel_mult]
    has_attention = [depth > 0 for depth in config.transformer_depth]
    # diffusers' mid block takes its depth from the last level's entry.
    assert config.transformer_depth_middle == config.transformer_depth[-1] or not has_attention[-1], \
        "diffusers cannot express a middle depth different from the last level's"
    transformer_layers = list(config.transformer_depth)
    if not has_attention[-1]:
        transformer_layers[-1] = config.transformer_depth_middle  # unused by the last DownBlock2D
    if config.head_dim is None:
        heads: int | list[int] = config.num_heads
    else:
        heads = [channels // config.head_dim for channels in block_out_channels]
    result = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": block_out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "layers_per_block": config.num_res_blocks,
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": heads,
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer,
        "norm_num_groups": config.norm_groups,
    }
    if config.adm_in_channels is not None:
        result.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return result


def to_diffusers_state_dict(ldm_state_dict: dict, diffusers_config: dict) -> dict:
    """Our (LDM-keyed) UNet state dict -> diffusers keys, by diffusers' single-file converter."""
    checkpoint = {LDM_UNET_KEY + key: value for key, value in ldm_state_dict.items()}
    return convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
