"""Tensor shapes -> which Stable Diffusion this is, and its exact configs.

A user passes one file and it just works: the family comes from the component prefixes, every
size from the tensor shapes (ComfyUI's `detect_unet_config` in comfy/model_detection.py,
stable-diffusion.cpp's version detection). What shapes cannot tell (attention head counts,
which text layer the UNet was trained on, the latent scaling factor) follows the family's rule.
Diffusers folders say most of it in their config.json files (detect_diffusers.py).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace

from ..config import SD2, SD15, SDXL, CLIPConfig, ModelConfig, PromptEncoding, UNetConfig, VAEConfig
from ..errors import CheckpointError
from .keymaps import mapped_shapes, text_encoder

Shapes = dict[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders."
PRESETS_BY_FAMILY = {"sd1": SD15, "sd2": SD2, "sdxl": SDXL}
SDXL_SIZE_EMBED_DIM = 256  # each SDXL size/crop number is a 256-wide sinusoidal embedding
NATIVE_SIZE = {"sd1": 512, "sdxl": 1024}  # sd2: 768 for the v model, 512 for the eps (base) one


def detect(shapes: Shapes, *, prediction: str | None = None,
           diffusers_configs: dict[str, dict] | None = None) -> ModelConfig:
    """The ModelConfig of a checkpoint, from `{key: shape}` alone.

    Single files (LDM/CompVis/sgm layout): `shapes` is the whole file. Diffusers folders:
    `shapes` holds the text encoders' tensors as "text_encoder/<key>", "text_encoder_2/<key>" and
    `diffusers_configs` the parsed JSON files by folder: "unet", "vae", "text_encoder",
    "text_encoder_2", "scheduler", optionally "tokenizer"/"tokenizer_2"
    (special_tokens_map.json).

    `prediction` ("eps" or "v") overrides what the files say. For an SD2 single file that does
    not say, the result is the SD2 default "v" and the loader checks it by running the UNet
    (`needs_prediction_probe`). Raises CheckpointError for anything that is not a complete
    SD1/SD2/SDXL model, naming what it looks like and the offending keys.
    """
    if prediction is not None and prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if not isinstance(shapes, dict):
        raise TypeError(f"shapes must be a dict {{key: shape}}, got {type(shapes).__name__}")
    if diffusers_configs is not None:
        from .detect_diffusers import detect_diffusers  # the folder case lives in its own file
        return detect_diffusers(shapes, diffusers_configs, prediction)
    return detect_single_file(shapes, prediction)


def detect_single_file(shapes: Shapes, prediction: str | None = None) -> ModelConfig:
    family = single_file_family(shapes)
    unet = unet_config_from_shapes(_strip(shapes, UNET_PREFIX), family)
    vae = vae_config_from_shapes(_strip(shapes, VAE_PREFIX), family)
    text_encoders, encodings = _single_file_text_encoders(shapes, family)
    _check_conditioning(family, unet, vae, text_encoders)

    if prediction is None:
        prediction = "v" if "v_pred" in shapes else PRESETS_BY_FAMILY[family].prediction
        if family == "sd2" and unet.in_channels != vae.embed_dim:
            prediction = "eps"  # SD2 inpainting was trained on eps (A1111 sd_models_config.py)
    config = ModelConfig(family=family, text_encoders=tuple(text_encoders),
                         prompt_encodings=tuple(encodings), unet=unet, vae=vae, prediction=prediction)
    return with_prediction(config, prediction)


def with_prediction(config: ModelConfig, prediction: str) -> ModelConfig:
    """`config` predicting `prediction`; an SD2's native size follows (768 for v, 512 for eps)."""
    native = NATIVE_SIZE.get(config.family, 768 if prediction == "v" else 512)
    return replace(config, prediction=prediction, native_size=native)


def needs_prediction_probe(shapes: Shapes, config: ModelConfig, prediction: str | None) -> bool:
    """True when an SD2 single file gives no hint of eps vs v, so the loader must run the UNet
    once (A1111's `is_using_v_parameterization_for_sd2`)."""
    return (prediction is None and config.family == "sd2" and "v_pred" not in shapes
            and not config.is_inpainting)


# ---- what the file is ---------------------------------------------------------------------------

_FOREIGN_MARKERS: tuple[tuple[str, str], ...] = (
    # (regex over keys, what a file with such a key is)
    (r"lora_|\.lora_(A|B|down|up)\.|^lora\.", "a LoRA (adapter weights to apply on top of "
                                                     "a base model), not a full model"),
    (r"(^|\.)joint_blocks\.", "a Stable Diffusion 3 / 3.5 (MMDiT) model"),
    (r"(^|\.)double_blocks\.|(^|\.)single_blocks\.", "a Flux model"),
    (r"^control_model\.|input_hint_block\.", "a ControlNet"),
    (r"^string_to_param|^emb_params$|^clip_[lg]$", "a textual-inversion embedding"),
    (r"^conditioner\.embedders\.0\.model\.", "an SDXL refiner (only its OpenCLIP bigG encoder), "
                                             "which is not supported"),
    (r"^model\.diffusion_model\.(x_embedder|t_embedder|blocks\.)", "a transformer (DiT) diffusion "
                                                                  "model, not an SD UNet"),
    (r"^(down_blocks|up_blocks|mid_block)\.", "a single component of a diffusers folder; pass the "
                                              "folder (with model_index.json) instead"),
    (r"^text_model\.encoder\.layers\.|^transformer\.resblocks\.", "a standalone text encoder"),
    (r"^(encoder|decoder)\.(down|up|mid)\.", "a standalone VAE"),
    (r"^input_blocks\.\d+\.", "a bare UNet state dict (no model.diffusion_model. prefix), without "
                              "text encoder and VAE"),
)


def describe_foreign(keys) -> str | None:
    """What a file that is not an LDM SD1/SD2/SDXL checkpoint looks like, when it is obvious."""
    keys = list(keys)
    for pattern, what in _FOREIGN_MARKERS:
        regex = re.compile(pattern)
        if any(regex.search(k) for k in keys):
            return what
    return None


def single_file_family(shapes: Shapes) -> str:
    """"sd1", "sd2" or "sdxl" from the component prefixes; a clear error for anything else."""
    keys = list(shapes)
    foreign = describe_foreign(keys)
    if foreign is not None:
        raise CheckpointError(f"not an SD1/SD2/SDXL checkpoint: this file looks like {foreign}.")
    has = {name: any(k.startswith(prefix) for k in keys)
           for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("sd1", SD1_TEXT_PREFIX),
                                ("sd2", SD2_TEXT_PREFIX), ("sdxl", SDXL_TEXT_PREFIX))}
    text = [family for family in ("sdxl", "sd2", "sd1") if has[family]]
    if not (has["unet"] or has["vae"] or text):
        sample = ", ".join(keys[:5]) or "no tensors at all"
        raise CheckpointError(
            "not an SD1/SD2/SDXL checkpoint: none of its keys start with model.diffusion_model., "
            f"first_stage_model., cond_stage_model. or conditioner.embedders. (first keys: {sample}).")
    missing = []
    if not has["unet"]:
        missing.append("the UNet (model.diffusion_model.*)")
    if not has["vae"]:
        missing.append("the VAE (first_stage_model.*)")
    if not text:
        missing.append("the text encoder (cond_stage_model.* or conditioner.embedders.*)")
    if missing:
        raise CheckpointError(f"incomplete checkpoint: it lacks {' and '.join(missing)}. "
                              "A full SD1/SD2/SDXL single file holds UNet, VAE and text encoder(s).")
    if len(text) > 1:
        raise CheckpointError(f"the file mixes the text encoders of {' and '.join(text)} "
                              "(cond_stage_model.transformer./.model., conditioner.embedders.)")
    return text[0]


# ---- shape helpers ------------------------------------------------------------------------------

def _strip(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _need(shapes: Shapes, key: str, where: str, ndim: int | None = None) -> tuple[int, ...]:
    """The shape of a tensor detection relies on; a CheckpointError naming it when absent."""
    if key not in shapes:
        raise CheckpointError(f"missing tensor {where}{key}, needed to tell the architecture")
    shape = shapes[key]
    if ndim is not None and len(shape) != ndim:
        raise CheckpointError(f"{where}{key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _indices(shapes: Shapes, pattern: str) -> dict[str, set[int]]:
    """{group 1 of `pattern`: {group 2 as int}} over all keys (e.g. block -> transformer indices)."""
    found: dict[str, set[int]] = defaultdict(set)
    regex = re.compile(pattern)
    for key in shapes:
        match = regex.match(key)
        if match:
            found[match.group(1)].add(int(match.group(2)))
    return found


def _one_value(values: dict[str, int], what: str, where: str) -> int:
    """The single value all `values` ({key: value}) agree on; an error naming disagreeing keys."""
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        examples = {v: next(k for k, x in values.items() if x == v) for v in distinct}
        listing = ", ".join(f"{where}{k} says {v}" for v, k in examples.items())
        raise CheckpointError(f"inconsistent {what} within the file: {listing}")
    return distinct[0]


# ---- UNet -----------------------------------------------------------------------------------------

def _family_heads(family: str) -> dict:
    """What shapes cannot tell: SD1 uses 8 heads everywhere, SD2/SDXL 64-wide heads."""
    return {"num_heads": 8, "head_dim": None} if family == "sd1" else {"num_heads": None, "head_dim": 64}


def unet_config_from_shapes(shapes: Shapes, family: str, where: str = UNET_PREFIX) -> UNetConfig:
    """UNetConfig from LDM UNet keys (prefix removed; `where` is the prefix, for messages)."""
    model_channels, in_channels = _need(shapes, "input_blocks.0.0.weight", where, ndim=4)[:2]
    out_channels = _need(shapes, "out.2.weight", where, ndim=4)[0]

    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]  # resnet block indices per level
    for block in blocks[1:]:
        if f"input_blocks.{block}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(block)
    if not levels[0]:
        raise CheckpointError(f"{where}input_blocks has no resnet blocks: not an SD UNet")

    depths_in = _indices(shapes, r"(input_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")
    channel_mult, transformer_depth = [], []
    for level, level_blocks in enumerate(levels):
        widths = {f"input_blocks.{b}.0.out_layers.3.weight":
                  _need(shapes, f"input_blocks.{b}.0.out_layers.3.weight", where, ndim=4)[0]
                  for b in level_blocks}
        width = _one_value(widths, f"resnet width of level {level}", where)
        if width % model_channels:
            raise CheckpointError(f"level {level} width {width} is not a multiple of the model's "
                                  f"{model_channels} channels ({where}input_blocks.{level_blocks[0]})")
        channel_mult.append(width // model_channels)
        depths = {f"input_blocks.{b}.1.transformer_blocks": len(depths_in.get(f"input_blocks.{b}", ()))
                  for b in level_blocks}
        transformer_depth.append(_one_value(depths, f"transformer depth of level {level}", where))
    counts = {f"input_blocks level {i}": len(b) for i, b in enumerate(levels)}
    num_res_blocks = _one_value(counts, "number of resnet blocks per level", where)

    # Output blocks mirror the input blocks (num_res_blocks + 1 per level, deepest level first).
    depths_out = _indices(shapes, r"(output_blocks\.\d+)\.1\.transformer_blocks\.(\d+)\.")
    for block, found in depths_out.items():
        level = len(levels) - 1 - int(block.split(".")[1]) // (num_res_blocks + 1)
        if level < 0 or len(found) != transformer_depth[level]:
            raise CheckpointError(f"{where}{block}.1 has {len(found)} transformer blocks but the input "
                                  f"blocks of its level have {transformer_depth[max(level, 0)]}: "
                                  "this UNet layout is not supported")
    middle = len(_indices(shapes, r"(middle_block\.1)\.transformer_blocks\.(\d+)\.").get("middle_block.1", ()))
    if middle == 0:
        raise CheckpointError(f"{where}middle_block.1 has no transformer blocks: not an SD1/SD2/SDXL UNet")

    context_dims = {k: s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")}
    if not context_dims:
        raise CheckpointError(f"the UNet has no cross-attention ({where}*.attn2.to_k.weight): "
                              "not a text-conditioned SD UNet")
    context_dim = _one_value(context_dims, "cross-attention context width (attn2.to_k)", where)
    proj_ranks = {k: len(s) for k, s in shapes.items() if k.endswith(".proj_in.weight")}
    use_linear = _one_value(proj_ranks, "proj_in kind (2 dims = Linear, 4 = 1x1 conv)", where) == 2

    adm_in_channels = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
        transformer_depth=tuple(transformer_depth), transformer_depth_middle=middle,
        context_dim=context_dim, use_linear_in_transformer=use_linear,
        adm_in_channels=adm_in_channels, **_family_heads(family))


# ---- VAE ------------------------------------------------------------------------------------------

def vae_config_from_shapes(shapes: Shapes, family: str, where: str = VAE_PREFIX) -> VAEConfig:
    """VAEConfig from LDM VAE keys (prefix removed)."""
    ch, in_channels = _need(shapes, "encoder.conv_in.weight", where, ndim=4)[:2]
    levels = sorted(_indices(shapes, r"(encoder\.down)\.(\d+)\.").get("encoder.down", ()))
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointError(f"{where}encoder.down.* levels are {levels}, expected 0..n-1")
    ch_mult = []
    for level in levels:
        width = _need(shapes, f"encoder.down.{level}.block.0.conv2.weight", where, ndim=4)[0]
        if width % ch:
            raise CheckpointError(f"{where}encoder.down.{level} width {width} is not a multiple of {ch}")
        ch_mult.append(width // ch)
    per_level = {f"encoder.down.{level}.block": len(found)
                 for level, found in ((lv, _indices(shapes, rf"(encoder\.down\.{lv}\.block)\.(\d+)\.")
                                       .get(f"encoder.down.{lv}.block", ())) for lv in levels)}
    num_res_blocks = _one_value(per_level, "number of resnet blocks per VAE level", where)
    z_channels = _need(shapes, "decoder.conv_in.weight", where, ndim=4)[1]
    encoder_out = _need(shapes, "encoder.conv_out.weight", where, ndim=4)[0]
    if encoder_out != 2 * z_channels:
        raise CheckpointError(f"{where}encoder.conv_out gives {encoder_out} channels but "
                              f"{where}decoder.conv_in takes {z_channels}: expected twice as many "
                              "(mean and log-variance)")
    embed_dim = _need(shapes, "post_quant_conv.weight", where, ndim=4)[1]
    out_ch = _need(shapes, "decoder.conv_out.weight", where, ndim=4)[0]
    return VAEConfig(in_channels=in_channels, out_ch=out_ch, ch=ch, ch_mult=tuple(ch_mult),
                     num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim,
                     scaling_factor=PRESETS_BY_FAMILY[family].vae.scaling_factor)


# ---- text encoders ----------------------------------------------------------------------------

def clip_config_from_shapes(shapes: Shapes, where: str, *, activation: str, heads: int | None = None,
                            eos_token_id: int | None = None, layer_norm_eps: float = 1e-5) -> CLIPConfig:
    """CLIPConfig from our (transformers') names of one text encoder, prefix removed. `heads`
    defaults to width // 64 (every SD text encoder has 64-wide heads); the end-of-text id to the
    last vocabulary entry (where CLIP's vocabulary puts it)."""
    vocab_size, width = _need(shapes, "text_model.embeddings.token_embedding.weight", where, ndim=2)
    context_length = _need(shapes, "text_model.embeddings.position_embedding.weight", where, ndim=2)[0]
    layers = len(_indices(shapes, r"(text_model\.encoder\.layers)\.(\d+)\.").get("text_model.encoder.layers", ()))
    if layers == 0:
        raise CheckpointError(f"the text encoder under {where} has no transformer layers")
    mlp_dim = _need(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", where, ndim=2)[0]
    projection = shapes.get("text_projection.weight")
    if heads is None:
        if width % 64:
            raise CheckpointError(f"text encoder width {width} ({where}) is not a multiple of 64, "
                                  "so its attention head count cannot be inferred")
        heads = width // 64
    return CLIPConfig(vocab_size=vocab_size, context_length=context_length, width=width, layers=layers,
                      heads=heads, mlp_dim=mlp_dim, activation=activation,
                      projection_dim=projection[0] if projection is not None else None,
                      eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
                      layer_norm_eps=layer_norm_eps)


def _single_file_text_encoders(shapes: Shapes, family: str
                               ) -> tuple[list[CLIPConfig], list[PromptEncoding]]:
    text_shapes = {k: v for k, v in shapes.items()
                   if k.startswith(("cond_stage_model.", "conditioner.embedders."))}
    ours, _ = mapped_shapes(text_shapes)  # unknown keys are the loader's to report
    if family == "sd1":
        layouts = [(SD1_TEXT_PREFIX, "quick_gelu")]
    elif family == "sd2":
        layouts = [(SD2_TEXT_PREFIX, "gelu")]
    else:
        layouts = [(SDXL_TEXT_PREFIX + "0.transformer.", "quick_gelu"), (SDXL_TEXT_PREFIX + "1.model.", "gelu")]
    configs = []
    for index, (where, activation) in enumerate(layouts):
        component = _strip(ours, text_encoder(index) + ".")
        configs.append(clip_config_from_shapes(component, where, activation=activation))
    encodings = list(PRESETS_BY_FAMILY[family].prompt_encodings)
    if family == "sd2" and configs[0].layers == 23:
        # SD2 conditions on the penultimate of OpenCLIP-H's 24 layers; a file converted back from
        # a diffusers folder stores only those 23, whose last is that same layer.
        encodings[0] = replace(encodings[0], layer=-1)
    return configs, encodings


def _check_conditioning(family: str, unet: UNetConfig, vae: VAEConfig, texts: list[CLIPConfig]) -> None:
    """The components of one file must fit together: text width = UNet context, latent channels."""
    widths = [t.width for t in texts]
    if unet.context_dim != sum(widths):
        raise CheckpointError(f"the UNet's cross-attention takes {unet.context_dim}-wide text "
                              f"(attn2.to_k) but the text encoder(s) give {'+'.join(map(str, widths))}")
    if family == "sdxl":
        pooled = texts[1].projection_dim
        if unet.adm_in_channels is None or pooled is None or \
                (unet.adm_in_channels - pooled) % SDXL_SIZE_EMBED_DIM or unet.adm_in_channels <= pooled:
            raise CheckpointError(f"SDXL UNet label_emb takes {unet.adm_in_channels} inputs, which is not "
                                  f"the pooled text ({pooled}, conditioner.embedders.1.model.text_projection) "
                                  f"plus {SDXL_SIZE_EMBED_DIM}-wide size embeddings")
    elif unet.adm_in_channels is not None:
        raise CheckpointError(f"{UNET_PREFIX}label_emb is only expected in SDXL files (this is {family})")
    check_latent_channels(unet, vae)


def check_latent_channels(unet: UNetConfig, vae: VAEConfig) -> None:
    latent = vae.embed_dim
    if unet.out_channels != latent or unet.in_channels not in (latent, 2 * latent + 1):
        raise CheckpointError(
            f"the UNet takes {unet.in_channels} and gives {unet.out_channels} channels but the VAE's "
            f"latents have {latent}: supported are {latent} in (text-to-image) or {2 * latent + 1} in "
            f"(inpainting: latents, mask, masked-image latents), {latent} out. Other variants "
            "(InstructPix2Pix 8, depth 5) are not supported.")

