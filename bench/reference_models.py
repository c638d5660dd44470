"""The reference (diffusers / transformers) configs of the real SD1.5 and SDXL models, as their
hub folders ship them, for benchmarks and full-size parity. Bench/test-only: the package never
imports diffusers or transformers."""
from __future__ import annotations

import json
from pathlib import Path

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading",
}
ARCHS = {
    "sd15": {"unet": SD15_UNET, "vae": SD_VAE, "text_encoders": [CLIP_L]},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoders": [CLIP_L, CLIP_BIGG]},
}


def scale_weights_(module, factor: float = 0.5) -> None:
    """Random init, every weight matrix scaled by `factor`, so that fp16 activations stay finite
    through the full-size networks (the anchor runs of ../shared/ANCHORS.md do the same)."""
    import torch
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.mul_(factor)


def build_reference(arch: str, device="cpu"):
    """Random full-size diffusers/transformers components of `arch` (fp32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHS[arch]
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec["unet"])
        vae = AutoencoderKL.from_config(spec["vae"])
        encoders = []
        for i, cfg in enumerate(spec["text_encoders"]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**cfg)))
    for m in (unet, vae, *encoders):
        scale_weights_(m)
        m.eval().requires_grad_(False)
    return unet, vae, encoders


def save_diffusers_folder(folder: Path, arch: str, unet, vae, encoders, prediction="epsilon"):
    """Write components as a diffusers folder (safetensors), with scheduler and model_index."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    names = ["text_encoder", "text_encoder_2"]
    for name, enc in zip(names, encoders):
        enc.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER, "prediction_type": prediction}))
    index = {"_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for name, enc in zip(names, encoders):
        index[name] = ["transformers", type(enc).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if arch != "sdxl":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index))
