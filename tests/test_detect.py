"""detect() from shapes alone, on the full-size architectures (built on the meta device, nothing
allocated), the diffusers folder configs as published, and everything that is not an SD model."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel

from ckpt_fixtures import ldm_shapes
from pocketdiffusion.checkpoints import detect
from pocketdiffusion.checkpoints.detect import needs_prediction_probe
from pocketdiffusion.checkpoints.keymaps import map_openclip_key
from pocketdiffusion.checkpoints.keymaps_diffusers import map_diffusers_unet_key, map_diffusers_vae_key
from pocketdiffusion.config import OPENCLIP_H, SD2, SD15, SDXL, PromptEncoding, inpainting
from pocketdiffusion.errors import CheckpointError
from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.unet import UNetModel
from pocketdiffusion.models.vae import AutoencoderKL
from reference_unet import diffusers_unet_config
from reference_vae import diffusers_vae_config

SD2_INPAINTING = replace(inpainting(SD2), prediction="eps", native_size=512)  # stabilityai/sd-2-inpainting


@pytest.fixture(scope="module")
def shapes():
    """{name: shapes of a full single file}, built once."""
    return {"sd15": ldm_shapes(SD15), "sd2": ldm_shapes(SD2), "sdxl": ldm_shapes(SDXL)}


# ---- single files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,expected", [
    (SD15, SD15), (SD2, SD2), (SDXL, SDXL),
    (inpainting(SD15), inpainting(SD15)), (inpainting(SD2), SD2_INPAINTING), (inpainting(SDXL), inpainting(SDXL)),
], ids=["sd15", "sd2", "sdxl", "sd15-inpainting", "sd2-inpainting", "sdxl-inpainting"])
def test_full_size_single_files_detect_to_the_exact_presets(preset, expected):
    assert detect(ldm_shapes(preset)) == expected


def test_sd2_file_with_a_cut_text_tower_reads_its_last_layer():
    cut = replace(SD2, text_encoders=(replace(OPENCLIP_H, layers=23),))
    detected = detect(ldm_shapes(cut))
    assert detected.text_encoders[0].layers == 23
    assert detected.prompt_encodings == (PromptEncoding(layer=-1, pad_token="!"),)


def test_prediction_rules(shapes):
    sdxl_vpred = {**shapes["sdxl"], "v_pred": (0,)}
    assert detect(sdxl_vpred).prediction == "v"
    assert detect(sdxl_vpred, prediction="eps").prediction == "eps"
    assert detect(shapes["sd15"], prediction="v").prediction == "v"
    sd2 = detect(shapes["sd2"])
    assert needs_prediction_probe(shapes["sd2"], sd2, None)
    assert not needs_prediction_probe(shapes["sd2"], sd2, "v")
    assert not needs_prediction_probe({**shapes["sd2"], "v_pred": (0,)}, sd2, None)
    assert not needs_prediction_probe(shapes["sd15"], detect(shapes["sd15"]), None)
    assert not needs_prediction_probe({}, SD2_INPAINTING, None)
    assert detect(shapes["sd2"], prediction="eps").native_size == 512
    with pytest.raises(ValueError, match="prediction"):
        detect(shapes["sd15"], prediction="epsilon")


def only(shapes, prefix, strip=False):
    return {(k[len(prefix):] if strip else k): v for k, v in shapes.items() if k.startswith(prefix)}


def test_incomplete_files_say_what_is_missing(shapes):
    with pytest.raises(CheckpointError, match=r"lacks the VAE \(first_stage_model.\*\) and the text encoder"):
        detect(only(shapes["sd15"], "model.diffusion_model."))
    with pytest.raises(CheckpointError, match=r"lacks the UNet \(model.diffusion_model.\*\) and the text"):
        detect(only(shapes["sd15"], "first_stage_model."))
    with pytest.raises(CheckpointError, match="a standalone VAE"):
        detect(only(shapes["sd15"], "first_stage_model.", strip=True))
    with pytest.raises(CheckpointError, match="a bare UNet state dict"):
        detect(only(shapes["sd15"], "model.diffusion_model.", strip=True))
    with pytest.raises(CheckpointError, match="no tensors at all"):
        detect({})


@pytest.mark.parametrize("key,what", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "LoRA"),
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("control_model.input_hint_block.0.weight", "ControlNet"),
    ("conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight", "SDXL refiner"),
    ("string_to_param.*", "textual-inversion"),
    ("down_blocks.0.resnets.0.conv1.weight", "diffusers folder"),
])
def test_other_architectures_are_named(shapes, key, what):
    with pytest.raises(CheckpointError, match=f"not an SD1/SD2/SDXL checkpoint.*{what}"):
        detect({**shapes["sd15"], key: (4, 4)})


def test_unknown_files_show_their_first_keys():
    with pytest.raises(CheckpointError, match="none of its keys.*first keys: alpha, beta"):
        detect({"alpha": (1,), "beta": (2,)})


def test_inconsistent_shapes_name_the_keys(shapes):
    bad = dict(shapes["sd15"])
    bad["model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"] = (640, 1024)
    with pytest.raises(CheckpointError, match=r"context width.*input_blocks.1.1.transformer_blocks.0.attn2.to_k"
                                              r".weight says 768.*output_blocks.3.1.*says 1024"):
        detect(bad)
    bad = dict(shapes["sd15"])
    bad["model.diffusion_model.input_blocks.2.0.out_layers.3.weight"] = (352, 320, 3, 3)
    with pytest.raises(CheckpointError, match="resnet width of level 0.*input_blocks.2.0.out_layers.3.weight says 352"):
        detect(bad)
    # SD1's UNet with SD2's text encoder: 768-wide cross-attention, 1024-wide text
    mixed = {k: v for k, v in shapes["sd15"].items() if not k.startswith("cond_stage_model.")}
    mixed.update(only(shapes["sd2"], "cond_stage_model."))
    with pytest.raises(CheckpointError, match="takes 768-wide text.*give 1024"):
        detect(mixed)
    both = {**shapes["sd15"], **only(shapes["sdxl"], "conditioner.")}
    with pytest.raises(CheckpointError, match="mixes the text encoders"):
        detect(both)


def test_unsupported_input_channels(shapes):
    pix2pix = {**shapes["sd15"], "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}
    with pytest.raises(CheckpointError, match="UNet takes 8 .*InstructPix2Pix"):
        detect(pix2pix)


# ---- diffusers folders (the configs as published on the Hugging Face hub) -------------------------

def text_encoder_shapes(clip, folder, flattened=False):
    """{folder/key: shape} of a transformers text encoder; `flattened`: transformers >= 5.6
    CLIPTextModel files have no `text_model.` level."""
    with torch.device("meta"):
        state = CLIPTextModel(clip).state_dict()
    return {f"{folder}/{k.removeprefix('text_model.') if flattened else k}": tuple(v.shape) for k, v in state.items()}


def clip_json(clip, eos=2):
    return {"hidden_act": clip.activation, "hidden_size": clip.width, "num_attention_heads": clip.heads,
            "num_hidden_layers": clip.layers, "layer_norm_eps": 1e-5, "eos_token_id": eos,
            "architectures": ["CLIPTextModelWithProjection" if clip.projection_dim else "CLIPTextModel"]}


SD15_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET_JSON = {**SD15_UNET_JSON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                  "use_linear_projection": True, "sample_size": 96, "dual_cross_attention": False,
                  "num_class_embeds": None, "only_cross_attention": False, "upcast_attention": True}
SDXL_UNET_JSON = {
    **SD15_UNET_JSON, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
VAE_JSON = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4}


def sd15_folder():
    return text_encoder_shapes(SD15.text_encoders[0], "text_encoder", flattened=True), {
        "unet": SD15_UNET_JSON, "vae": VAE_JSON, "text_encoder": clip_json(SD15.text_encoders[0]),
        "scheduler": {"prediction_type": "epsilon"}}


def test_diffusers_sd15_config():
    assert detect(*sd15_folder()[:1], diffusers_configs=sd15_folder()[1]) == SD15


def test_diffusers_sd21_config():
    clip = replace(OPENCLIP_H, layers=23)  # diffusers' converter drops the unused last layer
    configs = {"unet": SD21_UNET_JSON, "vae": {**VAE_JSON, "sample_size": 768}, "text_encoder": clip_json(clip),
               "scheduler": {"prediction_type": "v_prediction"}, "tokenizer": {"pad_token": "!"}}
    expected = replace(SD2, text_encoders=(clip,), prompt_encodings=(PromptEncoding(layer=-1, pad_token="!"),))
    assert detect(text_encoder_shapes(clip, "text_encoder"), diffusers_configs=configs) == expected


def test_diffusers_sdxl_config():
    clip_l, big_g = SDXL.text_encoders
    shapes = {**text_encoder_shapes(clip_l, "text_encoder", flattened=True),
              **text_encoder_shapes(big_g, "text_encoder_2")}
    configs = {"unet": SDXL_UNET_JSON, "vae": {**VAE_JSON, "scaling_factor": 0.13025, "force_upcast": True},
               "text_encoder": clip_json(clip_l, eos=49407), "text_encoder_2": clip_json(big_g),
               "scheduler": {"prediction_type": "epsilon"},
               "tokenizer": {"pad_token": "<|endoftext|>"}, "tokenizer_2": {"pad_token": "!"}}
    assert detect(shapes, diffusers_configs=configs) == SDXL


@pytest.mark.parametrize("component,change,message", [
    ("unet", {"class_embed_type": "projection"}, "class_embed_type='projection' is not supported"),
    ("unet", {"attention_head_dim": [5, 10, 20, 7]}, "does not divide"),
    ("unet", {"attention_head_dim": [5, 10, 10, 20]}, "neither one head count nor one head width"),
    ("unet", {"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ("unet", {"up_block_types": ["UpBlock2D"] * 4}, "not an SD UNet layout"),
    ("unet", {"layers_per_block": [2, 2, 2, 2]}, "layers_per_block"),
    ("vae", {"latents_mean": [0.0] * 4}, "latents_mean"),
    ("scheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("text_encoder", {"hidden_act": "relu"}, "hidden_act='relu'"),
])
def test_diffusers_configs_that_are_not_sd_are_refused(component, change, message):
    shapes, configs = sd15_folder()
    configs[component] = {**configs[component], **change}
    with pytest.raises(CheckpointError, match=message):
        detect(shapes, diffusers_configs=configs)


def test_diffusers_folder_without_a_unet_config():
    shapes, configs = sd15_folder()
    del configs["unet"]
    with pytest.raises(CheckpointError, match="no unet/config.json"):
        detect(shapes, diffusers_configs=configs)


# ---- key maps over the full-size architectures ------------------------------------------------------

@pytest.mark.parametrize("preset", [SD15, SD2, SDXL], ids=["sd15", "sd2", "sdxl"])
def test_diffusers_unet_and_vae_keys_map_onto_exactly_our_parameters(preset):
    """Every key of a full-size diffusers UNet2DConditionModel / AutoencoderKL lands on one of our
    parameters with its shape, and every one of ours is reached (meta device: no memory)."""
    with torch.device("meta"):
        reference_unet = UNet2DConditionModel(**diffusers_unet_config(preset.unet))
        reference_vae = DiffusersVAE(**diffusers_vae_config(preset.vae))
        ours = {"unet": UNetModel(preset.unet), "vae": AutoencoderKL(preset.vae)}
    for name, reference, mapper, config in (("unet", reference_unet, map_diffusers_unet_key, preset.unet),
                                            ("vae", reference_vae, map_diffusers_vae_key, preset.vae)):
        mapped = {}
        for key, tensor in reference.state_dict().items():
            for target, value in mapper(key, tensor, config):
                assert target not in mapped, target
                mapped[target] = tuple(value.shape)
        expected = {f"{name}.{k}": tuple(v.shape) for k, v in ours[name].state_dict().items()}
        assert mapped == expected


def test_openclip_in_proj_split_and_projection_transpose():
    width, projection = 4, 3
    in_proj = torch.arange(3 * width * width, dtype=torch.float32).reshape(3 * width, width)
    mapped = dict(map_openclip_key("transformer.resblocks.5.attn.in_proj_weight", in_proj, 1, keep_projection=True))
    base = "text_encoders.1.text_model.encoder.layers.5.self_attn"
    assert torch.equal(mapped[f"{base}.q_proj.weight"], in_proj[:width])
    assert torch.equal(mapped[f"{base}.k_proj.weight"], in_proj[width:2 * width])
    assert torch.equal(mapped[f"{base}.v_proj.weight"], in_proj[2 * width:])
    matrix = torch.randn(width, projection)  # open_clip: pooled @ text_projection
    ((target, weight),) = map_openclip_key("text_projection", matrix, 1, keep_projection=True)
    x = torch.randn(2, width)
    assert target == "text_encoders.1.text_projection.weight"
    assert torch.allclose(torch.nn.functional.linear(x, weight), x @ matrix)
    assert map_openclip_key("text_projection", matrix, 0, keep_projection=False) == []
    with pytest.raises(CheckpointError, match="multiple of 3"):
        map_openclip_key("transformer.resblocks.0.attn.in_proj_bias", torch.zeros(10), 0, keep_projection=False)
