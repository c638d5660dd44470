"""Write the trained SHAPES models as diffusers folders (fp16 safetensors) and check them.

Two folders: `shapes/` (StableDiffusionPipeline) and `shapes-inpainting/`
(StableDiffusionInpaintPipeline: the 9-channel UNet with the same text encoder, VAE, tokenizer
and scheduler). Layout and names are diffusers'/transformers', so `from_pretrained` loads them:

    model_index.json
    unet/config.json + diffusion_pytorch_model.safetensors (or -0000i-of-0000n shards + .index.json)
    vae/config.json + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors      (transformers CLIPTextModel keys = ours)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json                   (EulerDiscreteScheduler, SD's settings)

Our LDM-named UNet/VAE state dicts go through diffusers' own single-file converters, and the
result is loaded strictly into diffusers' classes before anything is written, so a key the
converter would drop fails here. No file exceeds `max_file_bytes` (the GPU machine returns
files of at most 16 MiB): a larger component is written sharded.

    python -m train.export --ckpt DIR/ckpt --out DIR     # re-export from a run's checkpoints
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pocketdiffusion.config import SHAPES, CLIPConfig, ModelConfig, UNetConfig, VAEConfig, inpainting
from pocketdiffusion.data.bpe import write_bpe
from pocketdiffusion.models.tokenizer import BOS_TOKEN, EOS_TOKEN

from .common import load_checkpoint, shapes_tokenizer

MIB = 2**20
MAX_FILE_BYTES = 15 * MIB
HEADER_ALLOWANCE = 256 * 1024  # room left in a shard for the safetensors JSON header
VERIFY_PROMPT = "a red circle on a blue background"
BASE_FOLDER, INPAINT_FOLDER = "shapes", "shapes-inpainting"


# ---- configs -----------------------------------------------------------------------------------

def diffusers_unet_config(config: UNetConfig, sample_size: int) -> dict:
    """UNetConfig -> UNet2DConditionModel kwargs (diffusers' create_unet_diffusers_config_from_ldm).
    `attention_head_dim` is diffusers' misnomer for the head COUNT, per level for a fixed head size."""
    block_out = [config.model_channels * mult for mult in config.channel_mult]
    attention = [depth > 0 for depth in config.transformer_depth]
    if attention[-1] and config.transformer_depth_middle != config.transformer_depth[-1]:
        raise ValueError("diffusers takes the middle block's depth from the last level's")
    layers = list(config.transformer_depth)
    if not attention[-1]:
        layers[-1] = config.transformer_depth_middle  # unused by the last DownBlock2D
    heads = config.num_heads if config.head_dim is None else [c // config.head_dim for c in block_out]
    if config.adm_in_channels is not None:
        raise ValueError("SDXL-style UNets (adm_in_channels) are not exported by this script")
    return {
        "sample_size": sample_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": block_out,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": config.num_res_blocks, "transformer_layers_per_block": layers,
        "attention_head_dim": heads, "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer, "norm_num_groups": config.norm_groups,
    }


def diffusers_vae_config(config: VAEConfig, sample_size: int) -> dict:
    """VAEConfig -> diffusers AutoencoderKL kwargs (create_vae_diffusers_config_from_ldm)."""
    if config.embed_dim != config.z_channels:
        raise ValueError("diffusers' AutoencoderKL has one latent_channels: needs embed_dim == z_channels")
    levels = len(config.ch_mult)
    return {
        "sample_size": sample_size, "in_channels": config.in_channels, "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * mult for mult in config.ch_mult], "latent_channels": config.z_channels,
        "layers_per_block": config.num_res_blocks, "norm_num_groups": config.norm_groups,
        "scaling_factor": config.scaling_factor,
    }


def transformers_clip_config(config: CLIPConfig, bos_id: int) -> dict:
    """CLIPConfig -> a transformers CLIPTextConfig config.json."""
    if config.projection_dim is not None:
        raise ValueError("a projected text encoder (SDXL's second) is not exported by this script")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": config.vocab_size, "hidden_size": config.width, "intermediate_size": config.mlp_dim,
        "projection_dim": config.width, "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads, "max_position_embeddings": config.context_length,
        "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": bos_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.eos_token_id,
        "torch_dtype": "float16",
    }


def write_scheduler(folder: Path) -> None:
    """SD's EulerDiscreteScheduler settings: scaled-linear 0.00085..0.012, eps, "leading" + offset 1."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon",
                                       timestep_spacing="leading", steps_offset=1)
    scheduler.save_config(folder)


def model_index(inpaint: bool) -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# ---- state dicts -----------------------------------------------------------------------------------

def to_diffusers_unet(state_dict: dict, config: dict):
    """Our LDM-keyed UNet weights -> (diffusers state dict, UNet2DConditionModel holding them), by
    diffusers' converter; the strict load proves every key was mapped."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in state_dict.items()}, config)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True)
    _check_count("UNet", state_dict, converted)
    return converted, model


def to_diffusers_vae(state_dict: dict, config: dict):
    """Our LDM-keyed VAE weights -> (diffusers state dict, AutoencoderKL holding them)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in state_dict.items()}, config)
    model = AutoencoderKL(**config)
    model.load_state_dict(converted, strict=True)
    _check_count("VAE", state_dict, converted)
    return converted, model


def _check_count(what: str, ours: dict, converted: dict) -> None:
    if len(ours) != len(converted):  # a key of ours the converter silently skipped
        raise ValueError(f"{what}: {len(ours)} tensors in, {len(converted)} out of diffusers' converter")


def fp16(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state_dict.items()}


def write_safetensors(tensors: dict, folder: Path, stem: str, max_file_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """`stem`.safetensors, or when larger than `max_file_bytes`, shards
    `stem`-0000i-of-0000n.safetensors and `stem`.safetensors.index.json (the diffusers/transformers
    layout: {"metadata": {"total_size"}, "weight_map": {key: shard}})."""
    folder.mkdir(parents=True, exist_ok=True)
    limit = max_file_bytes - HEADER_ALLOWANCE
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    if total <= limit:
        path = folder / f"{stem}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return _checked([path], max_file_bytes)
    groups: list[list[str]] = [[]]
    filled = 0
    for key, size in sizes.items():
        if size > limit:
            raise ValueError(f"tensor {key} ({size} bytes) alone exceeds the {max_file_bytes}-byte file limit")
        if filled + size > limit:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size
    paths, weight_map = [], {}
    for index, keys in enumerate(groups, start=1):
        name = f"{stem}-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        paths.append(folder / name)
    index_path = folder / f"{stem}.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return _checked(paths + [index_path], max_file_bytes)


def _checked(paths: list[Path], max_file_bytes: int) -> list[Path]:
    for path in paths:
        if path.stat().st_size > max_file_bytes:
            raise ValueError(f"{path} is {path.stat().st_size} bytes, over the {max_file_bytes}-byte limit")
    return paths


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tokenizer(folder: Path) -> None:
    tokenizer = shapes_tokenizer()
    write_bpe(tokenizer.encoder, sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get), folder)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
        "clean_up_tokenization_spaces": True})


# ---- folders ---------------------------------------------------------------------------------------

@dataclass
class TrainedWeights:
    """What export needs: our fp32 (or any dtype) state dicts and the VAE's scaling factor."""

    text_encoder: dict
    unet: dict
    vae: dict
    scaling_factor: float
    inpaint_unet: dict | None = None


def shapes_config(scaling_factor: float, inpaint: bool = False) -> ModelConfig:
    from dataclasses import replace

    config = replace(SHAPES, vae=replace(SHAPES.vae, scaling_factor=scaling_factor))
    return inpainting(config) if inpaint else config


def write_model_folder(folder: Path, weights: TrainedWeights, inpaint: bool,
                       max_file_bytes: int = MAX_FILE_BYTES, share_from: Path | None = None) -> dict[str, int]:
    """One diffusers folder; returns {relative path: bytes} of the regular files it wrote.

    With `share_from` (an exported base folder holding the same text encoder and VAE), the text
    encoder's and the VAE's weight files are relative symbolic links to that folder's (configs are
    still written here): the pair of folders then stores those weights once."""
    config = shapes_config(weights.scaling_factor, inpaint)
    latent_size = config.native_size // config.vae.downscale
    unet_weights = weights.inpaint_unet if inpaint else weights.unet
    if unet_weights is None:
        raise ValueError("no inpainting UNet weights to export")
    _fresh_folder(folder)

    unet_sd, unet_model = to_diffusers_unet(unet_weights, diffusers_unet_config(config.unet, latent_size))
    unet_model.save_config(folder / "unet")
    write_safetensors(fp16(unet_sd), folder / "unet", "diffusion_pytorch_model", max_file_bytes)
    vae_sd, vae_model = to_diffusers_vae(weights.vae, diffusers_vae_config(config.vae, config.native_size))
    vae_model.save_config(folder / "vae")
    _write_json(folder / "text_encoder" / "config.json",
                transformers_clip_config(config.text_encoders[0], shapes_tokenizer().bos_id))
    if share_from is None:
        write_safetensors(fp16(vae_sd), folder / "vae", "diffusion_pytorch_model", max_file_bytes)
        write_safetensors(fp16(weights.text_encoder), folder / "text_encoder", "model", max_file_bytes)
    else:
        _link_weights(share_from / "vae", folder / "vae", "diffusion_pytorch_model")
        _link_weights(share_from / "text_encoder", folder / "text_encoder", "model")
    write_tokenizer(folder / "tokenizer")
    write_scheduler(folder / "scheduler")
    _write_json(folder / "model_index.json", model_index(inpaint))
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    for path in files:  # safetensors and write_bpe create owner-only files; these are package data
        path.chmod(0o644)
    return {str(p.relative_to(folder)): p.stat().st_size for p in files}


def _link_weights(source: Path, target: Path, stem: str) -> None:
    """Relative symlinks in `target` to `source`'s weight files (one file, or shards + index)."""
    files = sorted(source.glob(f"{stem}*.safetensors")) + sorted(source.glob(f"{stem}.safetensors.index.json"))
    if not files:
        raise ValueError(f"{source} has no {stem} weights to share")
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        os.symlink(os.path.relpath(file, target), target / file.name)


def _fresh_folder(folder: Path) -> None:
    """Replace an earlier export (it has model_index.json); refuse to write into anything else."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} exists and is not a folder: refusing to overwrite it")
    if folder.exists():
        if any(folder.iterdir()) and not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} exists and is not an earlier export: refusing to overwrite it")
        shutil.rmtree(folder)


def export_all(weights: TrainedWeights, out: Path, max_file_bytes: int = MAX_FILE_BYTES,
               max_total_mb: float = 40.0, share: bool = True) -> dict:
    """OUT/shapes and OUT/shapes-inpainting (when there are inpainting weights); prints the sizes.
    With `share`, shapes-inpainting links to shapes' text encoder and VAE weights (see
    write_model_folder) instead of holding a second copy."""
    report = {}
    for name, inpaint in ((BASE_FOLDER, False), (INPAINT_FOLDER, True)):
        if inpaint and weights.inpaint_unet is None:
            continue
        share_from = out / BASE_FOLDER if inpaint and share else None
        files = write_model_folder(out / name, weights, inpaint, max_file_bytes, share_from)
        report[name] = {"files": files, "bytes": sum(files.values())}
        linked = " (text encoder and VAE weights linked to shapes/)" if share_from is not None else ""
        print(f"[export] {out / name}: {report[name]['bytes'] / 1e6:.2f} MB in {len(files)} files, "
              f"largest {max(files.values()) / MIB:.2f} MiB{linked}", flush=True)
    total = sum(entry["bytes"] for entry in report.values())
    report["total_bytes"] = total
    report["within_size_limit"] = total <= max_total_mb * 1e6
    print(f"[export] total {total / 1e6:.2f} MB", flush=True)
    if not report["within_size_limit"]:
        print(f"[export] WARNING: the folders total {total / 1e6:.2f} MB, over the {max_total_mb} MB target",
              flush=True)
    return report


def weights_from_checkpoints(ckpt: Path) -> TrainedWeights:
    """The export inputs of a run's DIR/ckpt: the VAE, the EMA text encoder + UNet, the EMA
    inpainting UNet (if that stage ran)."""
    vae, unet, inpaint = (load_checkpoint(ckpt / f"{name}.pt") for name in ("vae", "unet", "inpaint"))
    if vae is None or unet is None:
        raise ValueError(f"{ckpt} needs vae.pt and unet.pt (a run's checkpoint folder)")
    if "scaling_factor" not in vae["metrics"]:
        raise ValueError(f"{ckpt / 'vae.pt'} is from an unfinished VAE stage (no scaling factor yet)")
    ema = unet["ema"]
    return TrainedWeights(
        text_encoder={k[len("text_encoder."):]: v for k, v in ema.items() if k.startswith("text_encoder.")},
        unet={k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")},
        vae=vae["models"], scaling_factor=vae["metrics"]["scaling_factor"],
        inpaint_unet=None if inpaint is None else inpaint["ema"])


# ---- checks ----------------------------------------------------------------------------------------

def verify_folder(folder: Path, device: str | torch.device, prompt: str = VERIFY_PROMPT, steps: int = 4):
    """Load with our loader (every key consumed, or it raises) and generate one picture."""
    import pocketdiffusion
    from pocketdiffusion.checkpoints import load

    parts = load(folder)
    expected = 9 if parts.config.is_inpainting else 4
    if parts.unet.config.in_channels != expected:
        raise ValueError(f"{folder}: loaded a {parts.unet.config.in_channels}-channel UNet, expected {expected}")
    image = pocketdiffusion.load(folder, device=device).generate(prompt, steps=steps, seed=0)[0]
    print(f"[export] {folder.name}: loads (every key consumed) and generates a {image.size[0]}x{image.size[1]} "
          f"picture in {steps} steps", flush=True)
    return image


def evaluate(folder: Path, device: str | torch.device, prompts: int, steps: int = 20, cfg: float = 7.5,
             deadline: float | None = None):
    """Generate the first `prompts` held-out prompts (shapes.heldout_prompts, seed i for prompt i)
    and grade the pictures with data/classify.py: ({attribute: accuracy, "all": ...}, images).
    Stops early at `deadline` (time.monotonic()), grading what it has."""
    import time

    import numpy as np

    import pocketdiffusion
    from pocketdiffusion.data.classify import score
    from pocketdiffusion.data.shapes import heldout_prompts

    pipe = pocketdiffusion.load(folder, device=device)
    pairs = heldout_prompts(prompts)
    images = []
    for seed, (text, _) in enumerate(pairs):
        if deadline is not None and images and time.monotonic() > deadline:
            break
        images.append(pipe.generate(text, steps=steps, cfg=cfg, seed=seed)[0])
    specs = [spec for _, spec in pairs[: len(images)]]
    scores = score(specs, [np.asarray(image.convert("RGB")) for image in images])
    return {name: round(value, 4) for name, value in scores.items()}, images


def image_grid(images: list, columns: int = 8):
    """Pictures of one size side by side, `columns` to a row."""
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (min(columns, len(images)) * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a training run's checkpoints as diffusers folders.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the run's checkpoint folder (DIR/ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="where shapes/ and shapes-inpainting/ go")
    parser.add_argument("--device", default="cpu", help="device of the verification generation")
    parser.add_argument("--max-file-mib", type=float, default=15.0)
    parser.add_argument("--no-verify", action="store_true", help="skip loading and generating")
    parser.add_argument("--copy-shared", action="store_true", help="give shapes-inpainting its own copy of the "
                        "text encoder and VAE weights instead of symbolic links to shapes/'s")
    args = parser.parse_args(argv)
    if not args.ckpt.is_dir():
        parser.error(f"--ckpt {args.ckpt} is not a folder")
    report = export_all(weights_from_checkpoints(args.ckpt), args.out, int(args.max_file_mib * MIB),
                        share=not args.copy_shared)
    if not args.no_verify:
        for name in (BASE_FOLDER, INPAINT_FOLDER):
            if name in report:
                verify_folder(args.out / name, args.device)


if __name__ == "__main__":
    main()
