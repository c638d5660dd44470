"""Test-only bridge to the diffusers VAE: our VAEConfig as a diffusers `AutoencoderKL` config,
and our state dict through diffusers' own single-file converter (so the key names are checked
against the LDM layout diffusers expects, not against a mapping of ours)."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from pocketdiffusion.config import VAEConfig

# Single-file checkpoints store the VAE under this prefix.
LDM_VAE_PREFIX = "first_stage_model."


def diffusers_vae_config(config: VAEConfig, sample_size: int = 512) -> dict:
    """The config dict diffusers builds from an LDM yaml (`create_vae_diffusers_config_from_ldm`),
    plus `norm_num_groups`, which that function leaves at its default of 32."""
    if config.embed_dim != config.z_channels:
        raise ValueError("diffusers' AutoencoderKL has one latent_channels: "
                         f"needs embed_dim == z_channels, got {config.embed_dim} != {config.z_channels}")
    levels = len(config.ch_mult)
    return {
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * mult for mult in config.ch_mult],
        "latent_channels": config.z_channels,
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.norm_groups,
        "scaling_factor": config.scaling_factor,
    }


def to_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """Our (LDM-named) state dict -> diffusers names, via diffusers' single-file converter."""
    checkpoint = {LDM_VAE_PREFIX + key: value for key, value in state_dict.items()}
    return convert_ldm_vae_checkpoint(checkpoint, diffusers_vae_config(config))


def reference_vae(ours: torch.nn.Module, config: VAEConfig) -> DiffusersAutoencoderKL:
    """A diffusers AutoencoderKL holding exactly `ours`'s weights (strict load), in eval mode."""
    reference = DiffusersAutoencoderKL(**diffusers_vae_config(config))
    reference.load_state_dict(to_diffusers_state_dict(ours.state_dict(), config), strict=True)
    return reference.eval()
