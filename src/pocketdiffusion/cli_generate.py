"""`pocketdiffusion generate | edit | inpaint | outpaint`: arguments -> GenerationRequest -> PNGs.

Everything that can be wrong with the input (model path, images, --from, request fields, output
names) is checked before the model is loaded, so a typo costs milliseconds, not a model load and
a generation.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .cli import INPAINT_MASK_BLUR, MODEL_ENV, OUTPAINT_MASK_BLUR, PROG
from .cli_from import defaults_from_image

# The documented defaults of the options --from can supply (cli.py's help states them).
OPTION_DEFAULTS: dict[str, Any] = {"negative": "", "steps": 30, "cfg": 7.5, "sampler": "euler", "seed": 0,
                                   "width": None, "height": None, "clip_skip": None, "only_masked": False}
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {  # those that differ by command
    "strength": {"edit": 0.75, "inpaint": 1.0, "outpaint": 1.0},
    "mask_blur": {"inpaint": INPAINT_MASK_BLUR, "outpaint": OUTPAINT_MASK_BLUR},
}
FROM_IMAGE_OPTIONS = ("prompt", *OPTION_DEFAULTS, *COMMAND_DEFAULTS)
RANDOM_SEED = -1
# Command-line option -> GenerationRequest field, where the names differ or the option is one
# whose value the request checks (so its errors can name the option the user typed).
REQUEST_FIELD_OF_OPTION = {"negative": "negative_prompt", "steps": "steps", "cfg": "cfg", "seed": "seed",
                           "width": "width", "height": "height", "batch_size": "batch_size",
                           "batch_count": "batch_count", "clip_skip": "clip_skip", "strength": "strength",
                           "mask_blur": "mask_blur", "padding": "only_masked_padding"}


@dataclass
class Outputs:
    """Where the images go: fixed names (--out), or new names in a folder (--outdir)."""

    files: list[Path] | None
    folder: Path
    overwrite: bool

    def path_for(self, index: int, seed: int, prompt: str) -> Path:
        from .pipelines.output import next_output_path
        return self.files[index] if self.files is not None else next_output_path(self.folder, seed, prompt)


def run_generation(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    device = check_device(args.device)
    request = build_request(args)
    outputs = plan_outputs(args, request.batch_size * request.batch_count)
    say = _messenger(args.quiet)

    import pocketdiffusion
    from .pipelines.output import save_png
    say(f"loading {model} ...")
    pipe = pocketdiffusion.load(model, device=device, memory=args.memory, prediction=args.prediction)
    run = pipe.run(request)
    _iterate_with_progress(run, args.quiet)
    result = run.result
    for index, (image, seed, params) in enumerate(zip(result.images, result.seeds, result.parameters)):
        path = save_png(image, params, outputs.path_for(index, seed, request.prompt), overwrite=outputs.overwrite)
        print(path, flush=True)
    return 0


def _messenger(quiet: bool):
    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)
    return say


def _iterate_with_progress(run, quiet: bool) -> None:
    """Run to the end under a tqdm bar on stderr: steps done / total and the ETA."""
    from tqdm import tqdm
    with tqdm(total=run.total_steps, desc="generating", unit="step", file=sys.stderr, disable=quiet,
              dynamic_ncols=True) as bar:
        for _ in run:
            bar.update(1)


# ---- inputs -----------------------------------------------------------------------------------------

def resolve_model(given: str | None) -> str:
    """--model, else $POCKETDIFFUSION_MODEL, else the embedded default model when installed; a
    path must exist (model names are resolved by pocketdiffusion.load)."""
    from .catalog import EMBEDDED, DEFAULT_MODEL, embedded_available, local_models
    model = given or os.environ.get(MODEL_ENV) or None
    if model is None:
        if embedded_available(DEFAULT_MODEL):
            return DEFAULT_MODEL
        raise ValueError(f"no model given: pass --model with a .safetensors/.ckpt file or a diffusers folder "
                         f"(or set the {MODEL_ENV} environment variable)")
    if model in EMBEDDED or any(entry.name == model for entry in local_models()):
        return model
    if not Path(model).exists():
        source = "--model" if given else f"{MODEL_ENV}"
        raise FileNotFoundError(f"{source} '{model}' does not exist; expected a .safetensors/.ckpt file or a "
                                "diffusers folder")
    return model


def check_device(device: str | None) -> str | None:
    """The --device value, checked now rather than deep inside the first weight copy."""
    if device is None:
        return None
    import torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (no NVIDIA GPU, or a CPU-only "
                         "PyTorch); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    return device


def open_image(path: str, role: str) -> Image.Image:
    """The image at `path`, fully read and upright (EXIF orientation applied, as photos expect);
    a clear error naming the file when it is missing or not an image."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{role} '{path}' does not exist")
    if file.is_dir():
        raise IsADirectoryError(f"{role} '{path}' is a folder; expected an image file")
    try:
        with Image.open(file) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ValueError(f"{role} '{path}' is not an image (or not one Pillow can read); expected a PNG, "
                         "JPEG or WebP file") from None
    except (OSError, SyntaxError, EOFError) as error:
        if isinstance(error, PermissionError):
            raise
        raise ValueError(f"{role} '{path}' is a truncated or corrupt image: {error}") from None


def build_request(args: argparse.Namespace):
    """The GenerationRequest of the command line, validated (sampler included)."""
    from .pipelines.request import GenerationRequest
    from .sampling import sampler_spec

    command = args.command
    from_image: dict[str, Any] = {}
    if args.from_image is not None:
        not_given = {name for name in FROM_IMAGE_OPTIONS if getattr(args, name, None) is None}
        say = _messenger(args.quiet)
        from_image = defaults_from_image(args.from_image, command, not_given,
                                         lambda message: say(f"{PROG}: warning: {message}"))
    prompt = args.prompt if args.prompt is not None else from_image.get("prompt")
    if prompt is None:
        raise ValueError(f"{command} needs a PROMPT (or --from IMAGE.png to reuse the prompt stored in an image)")

    def option(name: str) -> Any:
        """The command line's value, else the --from image's, else the documented default."""
        given = getattr(args, name)
        if given is not None:
            return given
        default = COMMAND_DEFAULTS[name][command] if name in COMMAND_DEFAULTS else OPTION_DEFAULTS[name]
        return from_image.get(name, default)

    seed = option("seed")
    fields: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=option("negative"), steps=option("steps"), cfg=option("cfg"),
        sampler=option("sampler"), seed=None if seed == RANDOM_SEED else seed,
        width=option("width"), height=option("height"), batch_size=args.batch_size,
        batch_count=args.batch_count, clip_skip=option("clip_skip"), prompt_syntax=args.prompt_syntax)
    if command != "generate":
        fields.update(init_image=open_image(args.image, "IMAGE"), strength=option("strength"))
    if command in ("edit", "inpaint"):
        fields.update(resize_mode=args.resize_mode)
    if command == "inpaint":
        fields.update(mask=open_image(args.mask, "MASK"), mask_blur=option("mask_blur"),
                      inpaint_only_masked=option("only_masked"), only_masked_padding=args.padding,
                      inpainting_fill=args.fill)
    if command == "outpaint":
        # What Pipeline.outpaint does (test_cli checks the images agree), done here so that the
        # run can be iterated under a progress bar.
        from .pipelines.outpaint import extend_canvas
        canvas, mask = extend_canvas(fields["init_image"], left=args.left, right=args.right, top=args.top,
                                     bottom=args.bottom)
        fields.update(init_image=canvas, mask=mask, mask_blur=option("mask_blur"), inpainting_fill=args.fill)
    request = GenerationRequest(**fields)
    try:
        request.validate()
    except ValueError as error:
        raise type(error)(_option_names(str(error))) from None
    sampler_spec(request.sampler)
    return request


def _option_names(message: str) -> str:
    """Say `--steps=0` rather than the request field `steps=0` users never typed."""
    for option, field in REQUEST_FIELD_OF_OPTION.items():
        if message.startswith(f"{field}="):
            return f"--{option.replace('_', '-')}" + message[len(field):]
    return message


def plan_outputs(args: argparse.Namespace, count: int) -> Outputs:
    """The output names, checked before generating: --out refuses existing files unless
    --overwrite; --outdir must be a folder (or not exist yet)."""
    if args.out is None:
        folder = Path(args.outdir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--outdir '{folder}' is a file; expected a folder for the images")
        return Outputs(files=None, folder=folder, overwrite=False)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out '{out}': expected a file name ending in .png (the parameters are stored in "
                         "the PNG)")
    files = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]
    for file in files:
        if file.is_dir():
            raise IsADirectoryError(f"--out '{file}' is a folder; expected the path of a PNG file")
        if file.exists() and not args.overwrite:
            raise FileExistsError(f"'{file}' already exists; pass --overwrite to replace it, or pick another "
                                  "--out name")
    return Outputs(files=files, folder=out.parent, overwrite=args.overwrite)
