"""Test-only helpers that write tiny models in the formats users have, and read them back with
the reference implementations (diffusers' own single-file converters, diffusers/transformers
`from_pretrained`-style folders).

- `write_single_file`: OUR randomly initialised models, written as an LDM/CompVis/sgm single
  file (prefixes, OpenCLIP layout with stacked in_proj and transposed text_projection, the
  schedule buffers, EMA and loss entries real files carry), as .safetensors or .ckpt.
- `diffusers_from_single_file`: that same file converted by diffusers' converters into
  diffusers/transformers models: the reference our loader must agree with.
- `write_diffusers_folder`: tiny random diffusers/transformers models saved with
  `save_pretrained`, plus scheduler config and tokenizer files, as a diffusers folder.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                  create_diffusers_clip_model_from_ldm)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from pocketdiffusion.config import SD2, SD15, SDXL, CLIPConfig, ModelConfig, UNetConfig, VAEConfig, inpainting
from pocketdiffusion.data.bpe import train_bpe, write_bpe
from pocketdiffusion.models.clip import CLIPTextModel
from pocketdiffusion.models.unet import UNetModel
from pocketdiffusion.models.vae import AutoencoderKL
from reference_clip import hf_text_config
from reference_unet import diffusers_unet_config
from reference_vae import diffusers_vae_config

# ---- a tiny CLIP vocabulary -----------------------------------------------------------------------

CORPUS = ["a photo of a cat", "a painting of a dog on a red sofa", "an astronaut riding a horse",
          "a cat and a dog", "photo of the moon", "a red apple on a table", "the horse on the moon"] * 3
_VOCAB, _MERGES = train_bpe(CORPUS, 120)
VOCAB_SIZE = len(_VOCAB)  # 512 byte symbols + merges + BOS, EOS (EOS last, as in CLIP)
EOS_ID = VOCAB_SIZE - 1


def write_tokenizer(folder: Path, pad_token: str) -> Path:
    """vocab.json + merges.txt, and the special_tokens_map.json diffusers folders carry."""
    write_bpe(_VOCAB, _MERGES, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder


# ---- tiny architectures ---------------------------------------------------------------------------

def tiny_clip(width: int = 64, activation: str = "quick_gelu", projection_dim: int | None = None,
              heads: int | None = None) -> CLIPConfig:
    return CLIPConfig(vocab_size=VOCAB_SIZE, context_length=77, width=width, layers=2,
                      heads=heads or width // 64, mlp_dim=2 * width, activation=activation,
                      projection_dim=projection_dim, eos_token_id=EOS_ID)


TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
POOLED_DIM = 32


def tiny_config(kind: str, clip_heads: int | None = None) -> ModelConfig:
    """Tiny models of each family, laid out as the real ones (same heads rules, same prefixes).
    `clip_heads` overrides the text encoders' head count (diffusers folders state it)."""
    if kind == "sd1_inpaint":
        return inpainting(tiny_config("sd1", clip_heads))
    if kind == "sd1":
        return replace(SD15, text_encoders=(tiny_clip(heads=clip_heads),), vae=TINY_VAE, unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 0),
            transformer_depth_middle=1, num_heads=8, context_dim=64))
    if kind == "sd2":
        return replace(SD2, text_encoders=(tiny_clip(activation="gelu", heads=clip_heads),), vae=TINY_VAE,
                       unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                       transformer_depth=(1, 1), transformer_depth_middle=1, num_heads=None,
                                       head_dim=64, context_dim=64, use_linear_in_transformer=True))
    if kind == "sdxl":
        texts = (tiny_clip(heads=clip_heads), tiny_clip(128, "gelu", projection_dim=POOLED_DIM, heads=clip_heads))
        return replace(SDXL, text_encoders=texts, vae=replace(TINY_VAE, scaling_factor=0.13025),
                       unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                       transformer_depth=(0, 2), transformer_depth_middle=2, num_heads=None,
                                       head_dim=64, context_dim=192, use_linear_in_transformer=True,
                                       adm_in_channels=POOLED_DIM + 6 * 256))
    raise ValueError(kind)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere (zero-initialised output convs would hide mapping errors)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm = param.ndim == 1 and any(n in name for n in ("norm", "ln_"))
        if is_norm and name.endswith("weight"):
            param.copy_(1 + 0.2 * noise)
        elif "embedding" in name:
            param.copy_(0.5 * noise)
        else:
            param.copy_(0.1 * noise)
    return model


def our_models(config: ModelConfig, seed: int = 0) -> dict:
    """Our UNet, VAE and text encoders for `config`, randomly initialised."""
    return {
        "unet": randomize_(UNetModel(config.unet), seed),
        "vae": randomize_(AutoencoderKL(config.vae), seed + 1),
        "text_encoders": [randomize_(CLIPTextModel(c), seed + 2 + i) for i, c in enumerate(config.text_encoders)],
    }


# ---- single files ---------------------------------------------------------------------------------

SCHEDULE = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2


def openclip_layout(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers-named CLIP state dict in open_clip's TextTransformer layout (how SD2 and
    SDXL files store OpenCLIP): q/k/v stacked into in_proj, text_projection as the (C, P)
    matrix open_clip multiplies by on the right."""
    out = {prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])  # (3C, C) / (3C,)
            for hf_name, oc_name in renames.items():
                out[f"{oc}{oc_name}.{kind}"] = state[f"{hf}{hf_name}.{kind}"]
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].t().contiguous()  # (C, P)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_state_dict(models: dict, family: str) -> dict[str, torch.Tensor]:
    """Our models as the keys of a real LDM single file of `family`, with the non-weights such
    files carry (schedule buffers, EMA bookkeeping, position_ids)."""
    sd = {"betas": SCHEDULE, "alphas_cumprod": torch.cumprod(1 - SCHEDULE, 0),
          "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    sd.update({"model.diffusion_model." + k: v for k, v in models["unet"].state_dict().items()})
    sd.update({"first_stage_model." + k: v for k, v in models["vae"].state_dict().items()})
    texts = [m.state_dict() for m in models["text_encoders"]]
    position_ids = torch.arange(77, dtype=torch.int64)[None]
    if family == "sd1":
        sd.update({"cond_stage_model.transformer." + k: v for k, v in texts[0].items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    elif family == "sd2":
        sd.update(openclip_layout(texts[0], "cond_stage_model.model."))
        width = texts[0]["text_model.final_layer_norm.weight"].shape[0]
        sd["cond_stage_model.model.text_projection"] = torch.randn(width, width)  # present, unused by SD2
    else:
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in texts[0].items()})
        sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = position_ids
        sd.update(openclip_layout(texts[1], "conditioner.embedders.1.model."))
    return sd


def write_single_file(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Path:
    """`.safetensors` (float tensors cast to `dtype`) or `.ckpt` ({"state_dict": ...} as Lightning saves)."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, path)
    return path


def read_single_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)["state_dict"]


def diffusers_from_single_file(path: Path, config: ModelConfig, workdir: Path) -> dict:
    """The single file converted by diffusers' own converters into fp32 diffusers/transformers
    models (the reference). Text encoders go through `create_diffusers_clip_model_from_ldm`,
    the function diffusers' `from_single_file` uses, given a local transformers config."""
    checkpoint = {k: v.float() if v.is_floating_point() else v for k, v in read_single_file(path).items()}
    unet_config = diffusers_unet_config(config.unet)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = diffusers_vae_config(config.vae)
    vae = DiffusersVAE(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    texts = []
    for index, clip in enumerate(config.text_encoders):
        folder = workdir / f"hf_text_config_{index}"
        hf_text_config(clip).save_pretrained(folder)
        cls = HFCLIPTextModelWithProjection if clip.projection_dim else HFCLIPTextModel
        model = create_diffusers_clip_model_from_ldm(cls, checkpoint, config=str(folder), local_files_only=True)
        assert not any(p.is_meta for p in model.parameters()), "diffusers left text encoder weights unloaded"
        texts.append(model.float().eval())
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoders": texts}


# ---- diffusers folders ----------------------------------------------------------------------------

def diffusers_models(config: ModelConfig, seed: int = 0) -> dict:
    """Tiny random diffusers/transformers models of `config`'s architecture."""
    unet = randomize_(UNet2DConditionModel(**diffusers_unet_config(config.unet)), seed)
    vae = randomize_(DiffusersVAE(**diffusers_vae_config(config.vae)), seed + 1)
    texts = []
    for index, clip in enumerate(config.text_encoders):
        cls = HFCLIPTextModelWithProjection if clip.projection_dim else HFCLIPTextModel
        texts.append(randomize_(cls(hf_text_config(clip)), seed + 2 + index))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoders": [t.eval() for t in texts]}


def write_diffusers_folder(folder: Path, config: ModelConfig, models: dict, *, safe_serialization: bool = True,
                           prediction_type: str = "epsilon") -> Path:
    """A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder(_2)/, scheduler/,
    tokenizer(_2)/. With `safe_serialization=False` the weights are pickled .bin files."""
    folder.mkdir(parents=True, exist_ok=True)
    models["unet"].save_pretrained(folder / "unet", safe_serialization=safe_serialization)
    models["vae"].save_pretrained(folder / "vae", safe_serialization=safe_serialization)
    index = {"_class_name": "StableDiffusionXLPipeline" if config.family == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    for i, (model, encoding) in enumerate(zip(models["text_encoders"], config.prompt_encodings)):
        suffix = "" if i == 0 else f"_{i + 1}"
        model.save_pretrained(folder / f"text_encoder{suffix}")
        if not safe_serialization:
            # transformers 5 always writes safetensors; old folders have pytorch_model.bin
            weights = folder / f"text_encoder{suffix}" / "model.safetensors"
            torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
            weights.unlink()
        write_tokenizer(folder / f"tokenizer{suffix}", encoding.pad_token)
        index[f"text_encoder{suffix}"] = ["transformers", type(model).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": prediction_type}))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def ldm_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a full single file of `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        models = {"unet": UNetModel(config.unet), "vae": AutoencoderKL(config.vae),
                  "text_encoders": [CLIPTextModel(c) for c in config.text_encoders]}
    return {k: tuple(v.shape) for k, v in ldm_state_dict(models, config.family).items()}

