"""`pocketdiffusion info IMAGE` and `pocketdiffusion inspect MODEL`: read, never generate."""
from __future__ import annotations

import sys

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


def show_info(args: argparse.Namespace) -> int:
    """Print the A1111 infotext stored in a PNG, or (--json) its parsed fields."""
    from .pipelines.metadata import parse_parameters, read_png_infotext

    image = Path(args.image)
    if not image.exists():
        raise FileNotFoundError(f"IMAGE '{image}' does not exist")
    text = read_png_infotext(image)
    print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False) if args.json else text)
    return 0


def inspect_model(args: argparse.Namespace) -> int:
    report = describe_model(args.model, args.prediction)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def describe_model(model: str, prediction: str | None = None) -> dict[str, Any]:
    """What a model file or diffusers folder holds, as a JSON-ready dict.

    A single file is described from its tensor shapes alone (checkpoints' `detect`; the models
    are built on the meta device to count parameters), without reading a weight. A diffusers
    folder is loaded on the CPU in float16 (checkpoints/ detects those only while loading), as
    is an SD2 single file that does not say eps or v, in float32: telling them apart takes one
    UNet run (checkpoints/load.py `probe_v_prediction`).
    """
    import torch

    from .checkpoints import detect, load
    from .checkpoints.detect import needs_prediction_probe
    from .checkpoints.formats import open_weights

    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"MODEL '{model}' does not exist; expected a .safetensors/.ckpt file or a "
                                "diffusers folder")
    probe = False
    if path.is_file():
        with open_weights(path) as weights:
            shapes = weights.shapes()
        config = detect(shapes, prediction=prediction)
        probe = needs_prediction_probe(shapes, config, prediction)
    if path.is_file() and not probe:
        modules = _models_on_meta(config)
    else:
        parts = load(path, device="cpu", dtype=torch.float32 if probe else torch.float16, prediction=prediction)
        config, modules = parts.config, (*parts.text_encoders, parts.unet, parts.vae)

    *encoders, unet, vae = modules
    components = []
    for index, (encoder, encoding) in enumerate(zip(encoders, config.prompt_encodings)):
        name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        components.append(_component(name, encoder, config.text_encoders[index],
                                     prompt_encoding=dataclasses.asdict(encoding)))
    components.append(_component("unet", unet, config.unet))
    components.append(_component("vae", vae, config.vae))
    return {
        "model": str(path),
        "format": "diffusers folder" if path.is_dir() else f"single file ({path.suffix or 'no extension'})",
        "family": config.family,
        "prediction": config.prediction,
        "prediction_probed": probe,
        "weights_read": not path.is_file() or probe,
        "inpainting": config.is_inpainting,
        "native_size": [config.native_size, config.native_size],
        "parameters": sum(component["parameters"] for component in components),
        "components": components,
    }


def _models_on_meta(config) -> tuple:
    """The text encoders, UNet and VAE of `config` on the meta device: shapes, no memory."""
    import torch

    from .models.clip import CLIPTextModel
    from .models.unet import UNetModel
    from .models.vae import AutoencoderKL

    with torch.device("meta"):
        return (*(CLIPTextModel(clip) for clip in config.text_encoders), UNetModel(config.unet),
                AutoencoderKL(config.vae))


def _component(name: str, module, config, **extra: Any) -> dict[str, Any]:
    return {"name": name, "class": type(module).__name__,
            "parameters": sum(p.numel() for p in module.parameters()),
            "config": dataclasses.asdict(config), **extra}


PREDICTION_NAMES = {"eps": "eps (predicts the noise)", "v": "v (predicts velocity)"}


def format_report(report: dict[str, Any]) -> str:
    width, height = report["native_size"]
    probed = ", found by running the UNet once" if report["prediction_probed"] else ""
    lines = [
        f"model:       {report['model']}",
        f"format:      {report['format']}",
        f"family:      {report['family']}",
        f"prediction:  {PREDICTION_NAMES.get(report['prediction'], report['prediction'])}{probed}",
        f"inpainting:  {'yes' if report['inpainting'] else 'no'}",
        f"native size: {width}x{height}",
        f"parameters:  {report['parameters']:,}",
        f"read from:   {'the weights' if report['weights_read'] else 'the tensor shapes (no weight was read)'}",
    ]
    for component in report["components"]:
        lines += ["", f"{component['name']} ({component['class']}): {component['parameters']:,} parameters"]
        lines += [f"  {key}: {_text(value)}" for key, value in component["config"].items()]
        if "prompt_encoding" in component:
            encoding = ", ".join(f"{k}={_text(v)}" for k, v in component["prompt_encoding"].items())
            lines.append(f"  prompt encoding: {encoding}")
    return "\n".join(lines)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def list_models(args) -> int:
    """`pocketdiffusion models`: one line per model (name, kind, path), without loading any."""
    import json

    from .catalog import all_models, model_dirs
    entries = all_models()
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "embedded": m.embedded,
                           "unet_subfolder": m.unet_subfolder} for m in entries], indent=1))
        return 0
    for m in entries:
        kind = "embedded" if m.embedded else ("diffusers folder" if m.path.is_dir() else m.path.suffix[1:])
        print(f"{m.name:24s} {kind:16s} {m.path}")
    if not entries:
        searched = ", ".join(str(d) for d in model_dirs())
        print(f"no models found (searched {searched}); pass --model PATH to the commands", file=sys.stderr)
    return 0


def convert_model(args) -> int:
    """`pocketdiffusion convert MODEL OUT`: write the store, print its path."""
    import torch

    from .checkpoints.store import convert
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(convert(args.model, args.out, dtype=dtype, prediction=args.prediction, overwrite=args.overwrite))
    return 0
