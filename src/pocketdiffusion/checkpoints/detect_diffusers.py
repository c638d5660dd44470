"""A diffusers folder's config.json files -> ModelConfig.

diffusers spells the LDM architecture differently: `attention_head_dim` is in fact the number
of heads (an int for SD1, a per-block list like [5, 10, 20, 20] for SD2/SDXL, i.e. 64-wide
heads), `transformer_layers_per_block` is LDM's `transformer_depth`, the middle block takes the
last entry of both (diffusers models/unets/unet_2d_condition.py). Options that change the
arithmetic away from SD1/SD2/SDXL are refused by name rather than ignored.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError
from .detect import (NATIVE_SIZE, PRESETS_BY_FAMILY, SDXL_SIZE_EMBED_DIM, Shapes, _strip,
                     check_latent_channels, clip_config_from_shapes)
from .keymaps import mapped_shapes, map_hf_clip_key

# unet/config.json entries that must keep diffusers' default: any other value is an
# architecture this package does not implement.
_UNET_REQUIRED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "downsample_padding": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "dual_cross_attention": False,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "cross_attention_norm": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1, "reverse_transformer_layers_per_block": None,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
}
_VAE_REQUIRED = {
    "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "latents_mean": None, "latents_std": None, "shift_factor": None,
}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
_ACTIVATIONS = ("quick_gelu", "gelu")


def _check_required(config: dict, required: dict, where: str) -> None:
    for name, expected in required.items():
        value = config.get(name, expected)
        if isinstance(value, list) and not isinstance(expected, list) and len(set(map(repr, value))) == 1:
            value = value[0]  # a per-block list that says the same for every block
        if value != expected:
            raise CheckpointError(f"{where}: {name}={value!r} is not supported "
                                  f"(SD1/SD2/SDXL use {expected!r})")


def _per_level(value, levels: int, name: str, where: str) -> list:
    """An int (same for every level) or a per-level list -> a per-level list."""
    if isinstance(value, list):
        if len(value) != levels or not all(isinstance(v, int) for v in value):
            raise CheckpointError(f"{where}: {name}={value!r} must be an int or {levels} ints")
        return value
    if not isinstance(value, int):
        raise CheckpointError(f"{where}: {name}={value!r} must be an int or a list of ints")
    return [value] * levels


def _field(config: dict, name: str, where: str, kind=int):
    if name not in config:
        raise CheckpointError(f"{where} has no {name!r}")
    value = config[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{where}: {name}={value!r} should be {kind.__name__}")
    return value


def unet_config_from_diffusers(config: dict, family: str, where: str = "unet/config.json") -> UNetConfig:
    _check_required(config, _UNET_REQUIRED, where)
    block_out = _field(config, "block_out_channels", where, list)
    levels = len(block_out)
    down, up = _field(config, "down_block_types", where, list), _field(config, "up_block_types", where, list)
    attention = [t == "CrossAttnDownBlock2D" for t in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if len(down) != levels or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) \
            or up != expected_up:
        raise CheckpointError(f"{where}: down_block_types {down} / up_block_types {up} are not an "
                              f"SD UNet layout (expected up blocks {expected_up})")
    model_channels = block_out[0]
    if any(c % model_channels for c in block_out):
        raise CheckpointError(f"{where}: block_out_channels {block_out} are not multiples of the first")
    layers_per_block = _field(config, "layers_per_block", where)

    depths = _per_level(config.get("transformer_layers_per_block", 1), levels,
                        "transformer_layers_per_block", where)
    transformer_depth = tuple(d if a else 0 for d, a in zip(depths, attention))

    # attention_head_dim is a head COUNT in diffusers' UNet2DConditionModel (a historical misnomer);
    # num_attention_heads, when set, is the same thing correctly named.
    heads_value = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads_value, levels, "attention_head_dim", where)
    heads_kwargs = _heads_rule(block_out, heads, attention, family, where)

    addition = config.get("addition_embed_type")
    adm_in_channels = None
    if addition == "text_time":
        if config.get("addition_time_embed_dim") != SDXL_SIZE_EMBED_DIM:
            raise CheckpointError(f"{where}: addition_time_embed_dim={config.get('addition_time_embed_dim')} "
                                  f"is not supported (SDXL uses {SDXL_SIZE_EMBED_DIM})")
        adm_in_channels = _field(config, "projection_class_embeddings_input_dim", where)
    elif addition is not None:
        raise CheckpointError(f"{where}: addition_embed_type={addition!r} is not supported "
                              "(SDXL uses 'text_time', SD1/SD2 none)")
    context_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        raise CheckpointError(f"{where}: cross_attention_dim={context_dim!r} must be one int")
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=model_channels, channel_mult=tuple(c // model_channels for c in block_out),
        num_res_blocks=layers_per_block, transformer_depth=transformer_depth,
        transformer_depth_middle=depths[-1], context_dim=context_dim,
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        adm_in_channels=adm_in_channels, norm_groups=config.get("norm_num_groups", 32), **heads_kwargs)


def _heads_rule(block_out: list[int], heads: list[int], attention: list[bool], family: str,
                where: str) -> dict:
    """Per-block head counts -> our one rule: a fixed count (SD1) or a fixed width (SD2/SDXL).
    The middle block uses the last level's heads and channels, so it follows either rule."""
    used = [(c, h) for c, h, a in zip(block_out, heads, attention) if a]
    used.append((block_out[-1], heads[-1]))  # the middle block
    if any(h <= 0 or c % h for c, h in used):
        raise CheckpointError(f"{where}: attention_head_dim {heads} does not divide block_out_channels "
                              f"{block_out} into heads")
    counts, widths = {h for _, h in used}, {c // h for c, h in used}
    fixed_count = {"num_heads": counts.pop(), "head_dim": None} if len(counts) == 1 else None
    fixed_width = {"num_heads": None, "head_dim": widths.pop()} if len(widths) == 1 else None
    preferred = (fixed_count, fixed_width) if family == "sd1" else (fixed_width, fixed_count)
    for rule in preferred:
        if rule is not None:
            return rule
    raise CheckpointError(f"{where}: attention heads {heads} over channels {block_out} have neither one "
                          "head count nor one head width, which SD UNets always have")


def vae_config_from_diffusers(config: dict, where: str = "vae/config.json") -> VAEConfig:
    _check_required(config, _VAE_REQUIRED, where)
    block_out = _field(config, "block_out_channels", where, list)
    levels = len(block_out)
    if config.get("down_block_types", ["DownEncoderBlock2D"] * levels) != ["DownEncoderBlock2D"] * levels or \
            config.get("up_block_types", ["UpDecoderBlock2D"] * levels) != ["UpDecoderBlock2D"] * levels:
        raise CheckpointError(f"{where}: block types {config.get('down_block_types')} / "
                              f"{config.get('up_block_types')} are not the SD VAE's")
    ch = block_out[0]
    if any(c % ch for c in block_out):
        raise CheckpointError(f"{where}: block_out_channels {block_out} are not multiples of the first")
    latent = config.get("latent_channels", 4)
    scaling = config.get("scaling_factor", 0.18215)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or scaling <= 0:
        raise CheckpointError(f"{where}: scaling_factor={scaling!r} must be a positive number")
    return VAEConfig(in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=ch,
                     ch_mult=tuple(c // ch for c in block_out), num_res_blocks=_field(config, "layers_per_block", where),
                     z_channels=latent, embed_dim=latent, scaling_factor=float(scaling),
                     norm_groups=config.get("norm_num_groups", 32))


def clip_config_from_diffusers(shapes: Shapes, config: dict, index: int, folder: str) -> CLIPConfig:
    """A transformers CLIPTextConfig + the weights' shapes -> CLIPConfig. Sizes come from the
    shapes (what will be loaded); heads, activation and norm epsilon only the config knows."""
    where = f"{folder}/config.json"
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act={activation!r} is not supported ({_ACTIVATIONS})")
    ours, _ = mapped_shapes(_strip(shapes, folder + "/"), lambda k, t: map_hf_clip_key(k, t, index))
    component = _strip(ours, f"text_encoders.{index}.")
    if not component:
        raise CheckpointError(f"{folder}/ has no weights")
    eos = config.get("eos_token_id")
    # eos_token_id 2 is the value of configs written before transformers PR #24773, whose CLIP
    # pooled at the largest id instead: that is CLIP's end-of-text, the last vocabulary entry.
    eos = None if eos in (None, 2) else eos
    return clip_config_from_shapes(component, f"{folder}/", activation=activation,
                                   heads=_field(config, "num_attention_heads", where),
                                   eos_token_id=eos, layer_norm_eps=config.get("layer_norm_eps", 1e-5))


def _pad_token(special_tokens: dict | None, default: str) -> str:
    """The pad token a diffusers tokenizer folder declares (special_tokens_map.json)."""
    pad = (special_tokens or {}).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad if isinstance(pad, str) and pad else default


def detect_diffusers(shapes: Shapes, configs: dict[str, dict], prediction: str | None) -> ModelConfig:
    for required in ("unet", "vae", "text_encoder"):
        if not isinstance(configs.get(required), dict):
            raise CheckpointError(f"the diffusers folder has no {required}/config.json; a Stable Diffusion "
                                  "folder needs unet/, vae/ and text_encoder/")
    text_names = ["text_encoder"] + (["text_encoder_2"] if isinstance(configs.get("text_encoder_2"), dict) else [])
    texts = [clip_config_from_diffusers(shapes, configs[name], i, name) for i, name in enumerate(text_names)]
    if len(texts) == 2:
        family = "sdxl"
    else:
        family = "sd2" if texts[0].activation == "gelu" else "sd1"  # OpenCLIP vs OpenAI CLIP
    unet = unet_config_from_diffusers(configs["unet"], family)
    vae = vae_config_from_diffusers(configs["vae"])
    if family == "sdxl" and unet.adm_in_channels is None:
        raise CheckpointError("the folder has two text encoders (SDXL) but unet/config.json has no "
                              "addition_embed_type 'text_time'")
    if family != "sdxl" and unet.adm_in_channels is not None:
        raise CheckpointError("unet/config.json has SDXL's text_time embedding but the folder has one "
                              "text encoder (text_encoder_2/ is missing)")
    if unet.context_dim != sum(t.width for t in texts):
        raise CheckpointError(f"unet/config.json cross_attention_dim={unet.context_dim} does not match the "
                              f"text encoder width(s) {[t.width for t in texts]}")
    check_latent_channels(unet, vae)

    preset = PRESETS_BY_FAMILY[family]
    encodings = list(preset.prompt_encodings)
    if family == "sd2":
        # diffusers' converter drops OpenCLIP-H's last layer (SD2 uses the penultimate), so the
        # folder's last layer is the one to read.
        encodings[0] = replace(encodings[0], layer=-1)
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    encodings = [replace(e, pad_token=_pad_token(configs.get(folder), e.pad_token))
                 for e, folder in zip(encodings, tokenizer_folders)]

    if prediction is None:
        scheduler_prediction = (configs.get("scheduler") or {}).get("prediction_type")
        if scheduler_prediction is None:
            prediction = preset.prediction
        elif scheduler_prediction in _PREDICTIONS:
            prediction = _PREDICTIONS[scheduler_prediction]
        else:
            raise CheckpointError(f"scheduler/scheduler_config.json: prediction_type={scheduler_prediction!r} "
                                  f"is not supported ({sorted(_PREDICTIONS)})")
    sample_size = configs["unet"].get("sample_size")
    if isinstance(sample_size, int):
        native = sample_size * vae.downscale
    else:
        native = NATIVE_SIZE.get(family, 768 if prediction == "v" else 512)
    return ModelConfig(family=family, text_encoders=tuple(texts), prompt_encodings=tuple(encodings),
                       unet=unet, vae=vae, prediction=prediction, native_size=native)

