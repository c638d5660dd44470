"""Model names users can type instead of paths: the embedded default model (and its inpainting
UNet), and the checkpoints found in local model folders (`pocketdiffusion models`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "shapes"
DEFAULT_INPAINTING_MODEL = "shapes-inpainting"
# name -> (folder under assets/, which UNet subfolder)
EMBEDDED = {DEFAULT_MODEL: ("shapes", "unet"), DEFAULT_INPAINTING_MODEL: ("shapes", "unet_inpaint")}
MODELS_DIR_ENV = "POCKETDIFFUSION_MODELS_DIR"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: a file or diffusers folder, and which UNet of a folder to use."""

    name: str
    path: Path
    unet_subfolder: str = "unet"
    embedded: bool = False


def resolve(model: str | os.PathLike) -> ModelRef:
    """An embedded model's name ("shapes", "shapes-inpainting"), a name found in the local model
    folders, or a path."""
    text = os.fspath(model)
    if text in EMBEDDED:
        folder, unet = EMBEDDED[text]
        path = ASSETS / folder
        if not (path / unet).is_dir():
            raise FileNotFoundError(f"the embedded model {text!r} is not in this installation ({path / unet} "
                                    "does not exist; it ships once it passes its quality bar, see "
                                    "docs/TRAINING.md): pass a .safetensors/.ckpt file or a diffusers folder")
        return ModelRef(text, path, unet, embedded=True)
    path = Path(text).expanduser()
    if not path.exists():
        for entry in local_models():
            if entry.name == text:
                return entry
    return ModelRef(path.stem if path.is_file() else path.name, path)


def model_dirs() -> list[Path]:
    """Where local checkpoints are looked for: $POCKETDIFFUSION_MODELS_DIR (os.pathsep-separated)
    and ./models."""
    dirs = [Path(p).expanduser() for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p]
    return dirs + [Path("models")]


def local_models() -> list[ModelRef]:
    """Single-file checkpoints and diffusers folders directly inside the model folders."""
    found = []
    for folder in model_dirs():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix in CHECKPOINT_SUFFIXES:
                found.append(ModelRef(entry.stem, entry))
            elif entry.is_dir() and (entry / "model_index.json").is_file():
                found.append(ModelRef(entry.name, entry))
    return found


def embedded_available(name: str = DEFAULT_MODEL) -> bool:
    folder, unet = EMBEDDED[name]
    return (ASSETS / folder / unet).is_dir()


def all_models() -> list[ModelRef]:
    embedded = [resolve(name) for name in EMBEDDED if embedded_available(name)]
    return embedded + local_models()
