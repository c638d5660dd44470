"""The `pocketdiffusion` command (also `python -m pocketdiffusion`).

    pocketdiffusion generate "a red circle" --model model.safetensors
    pocketdiffusion edit photo.png "a watercolor painting" --strength 0.6 --model model.safetensors
    pocketdiffusion inpaint photo.png mask.png "a cat" --model inpainting.safetensors
    pocketdiffusion outpaint photo.png "a beach" --right 128 --model inpainting.safetensors
    pocketdiffusion info image.png
    pocketdiffusion inspect model.safetensors

This module is only the argument parser and the error policy; the commands live in
cli_generate.py and cli_info.py and are imported when run, so `--help` never imports torch.
Bad input exits with status 2 and one `pocketdiffusion: error: ...` line, Ctrl-C with 130;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from . import MEMORY_MODES, __version__
from .errors import PocketDiffusionError

PROG = "pocketdiffusion"
MODEL_ENV = "POCKETDIFFUSION_MODEL"
DEFAULT_OUTDIR = "outputs"
EXIT_USAGE = 2  # argparse's status for bad arguments; bad input files get the same
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

# Copies of pipelines/request.py's tuples and sampling's sampler names, so that building the
# parser (and `--help`) does not import torch; tests/test_cli.py checks that they agree.
RESIZE_MODES = ("just_resize", "crop", "fill")
INPAINT_FILLS = ("original", "latent_noise")
PROMPT_SYNTAXES = ("a1111", "plain")
SAMPLER_NAMES = ("euler", "euler_a", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "unipc", "lcm")
PREDICTIONS = ("eps", "v")
INPAINT_MASK_BLUR = 4  # GenerationRequest.mask_blur's default
OUTPAINT_MASK_BLUR = 0  # pipelines/outpaint.py: its mask already fades across the seam

EXAMPLES = f"""examples:
  {PROG} generate "a lighthouse at dusk" --model model.safetensors --seed 42
  {PROG} edit photo.png "a watercolor painting" --strength 0.6 --model model.safetensors
  {PROG} inpaint photo.png mask.png "a cat on the sofa" --model inpainting.safetensors
  {PROG} outpaint photo.png "a wide beach" --left 128 --right 128 --model inpainting.safetensors
  {PROG} generate --from outputs/00012-42-a_lighthouse.png --seed 43 --model model.safetensors
  {PROG} info outputs/00012-42-a_lighthouse.png
  {PROG} inspect model.safetensors
  {PROG} plan model.safetensors --budget 1.5GB --size 512x512

Run `{PROG} COMMAND --help` for the options of a command."""

# What bad input raises: messages written for users, so no traceback. The OSError subclasses
# are paths that are missing, taken, of the wrong kind or not readable.
USER_ERRORS = (PocketDiffusionError, ValueError, TypeError, FileNotFoundError, FileExistsError,
               IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse has printed
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # e.g. the out-of-memory fallback's message
            return _dispatch(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("generate", "edit", "inpaint", "outpaint"):
        from .cli_generate import run_generation
        return run_generation(args)
    if args.command == "serve":
        from .server.serve import serve
        return serve(args)
    if args.command == "plan":
        from .cli_plan import run_plan
        return run_plan(args)
    from .cli_info import convert_model, inspect_model, list_models, show_info
    if args.command == "models":
        return list_models(args)
    if args.command == "convert":
        return convert_model(args)
    return show_info(args) if args.command == "info" else inspect_model(args)


# ---- the parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Stable Diffusion for small hardware: generate, edit, inpaint and outpaint images; read "
                    "their parameters; inspect models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = _command(commands, "generate", "txt2img: an image from a text prompt.")
    generate.add_argument("prompt", nargs="?", metavar="PROMPT",
                          help="what the image should show (optional with --from, which supplies it)")
    _generation_options(generate, size_default="the model's native size (512 for SD1, 1024 for SDXL)",
                        also_from="the size")

    edit = _command(commands, "edit", "img2img: rework an image toward a prompt.")
    edit.add_argument("image", metavar="IMAGE", help="the image to rework (PNG, JPEG, WebP, ...)")
    edit.add_argument("prompt", nargs="?", metavar="PROMPT",
                      help="what the image should become (optional with --from, which supplies it)")
    edit.add_argument("--strength", type=float, metavar="S",
                      help="how much to change: 0 keeps the image, 1 repaints it fully; runs the last "
                           "S share of the steps (default: 0.75)")
    _resize_option(edit)
    _generation_options(edit, size_default="IMAGE's size rounded down to a multiple of 8",
                        also_from="the size and denoising strength")

    inpaint = _command(commands, "inpaint", "Repaint the masked part of an image.")
    inpaint.add_argument("image", metavar="IMAGE", help="the image to repaint (PNG, JPEG, WebP, ...)")
    inpaint.add_argument("mask", metavar="MASK", help="the mask, the same size as IMAGE: white = repaint, "
                                                      "black = keep (for an RGBA mask: opaque = repaint)")
    inpaint.add_argument("prompt", nargs="?", metavar="PROMPT",
                         help="what the masked part should show (optional with --from, which supplies it)")
    inpaint.add_argument("--strength", type=float, metavar="S",
                         help="how much of the masked part to change, 0 to 1 (default: 1.0)")
    _mask_options(inpaint, fill_default="original", blur_default=INPAINT_MASK_BLUR)
    inpaint.add_argument("--only-masked", action="store_true", default=None,
                         help="work on the masked area only, cropped (plus --padding) and scaled to "
                              "the working size, then pasted back: more detail for small areas "
                              "(A1111 'Inpaint area: Only masked'; default: off, the whole picture)")
    inpaint.add_argument("--padding", type=int, default=32, metavar="PX",
                         help="with --only-masked, pixels of context kept around the masked area "
                              "(default: 32)")
    _resize_option(inpaint)
    _generation_options(inpaint, size_default="IMAGE's size rounded down to a multiple of 8",
                        also_from="denoising strength, mask blur and inpaint area (--only-masked)")

    outpaint = _command(commands, "outpaint", "Extend an image beyond its borders.")
    outpaint.add_argument("image", metavar="IMAGE", help="the image to extend (PNG, JPEG, WebP, ...)")
    outpaint.add_argument("prompt", nargs="?", metavar="PROMPT",
                          help="what the new area should show (optional with --from, which supplies it)")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, metavar="PX",
                              help=f"pixels to add on the {side} (default: 0; at least one side must be > 0; "
                                   "the canvas is rounded up to a multiple of 8)")
    outpaint.add_argument("--strength", type=float, metavar="S",
                          help="how much of the new area (and the seam) to paint, 0 to 1 (default: 1.0)")
    _mask_options(outpaint, fill_default="latent_noise", blur_default=OUTPAINT_MASK_BLUR)
    _generation_options(outpaint, size_default="the extended canvas's size rounded down to a multiple of 8",
                        also_from="denoising strength and mask blur")

    info = _command(commands, "info", "Print the generation parameters stored in a PNG.")
    info.add_argument("image", metavar="IMAGE",
                      help="a PNG written by pocketdiffusion, AUTOMATIC1111, Forge or compatible tools")
    info.add_argument("--json", action="store_true",
                      help="print the parsed fields as a JSON object instead of the raw A1111 text "
                           "(default: the raw text)")

    inspect = _command(commands, "inspect", "Describe a model: family, prediction, components, sizes.")
    inspect.add_argument("model", metavar="MODEL",
                         help="a .safetensors/.ckpt file or a diffusers folder")
    inspect.add_argument("--prediction", choices=PREDICTIONS,
                         help="override what the model predicts (eps or v); default: read from the "
                              "files (an SD2 single file that does not say is loaded on the CPU and run "
                              "once to tell)")
    inspect.add_argument("--json", action="store_true",
                         help="print the description as a JSON object (default: readable text)")

    convert = _command(commands, "convert", "Write a model as a pocketdiffusion store: one .safetensors file "
                                            "in execution order and the run dtype, that loads by mmap "
                                            "without detection or conversion.")
    convert.add_argument("model", metavar="MODEL", help="a .safetensors/.ckpt file or a diffusers folder")
    convert.add_argument("out", metavar="OUT.safetensors", help="the store to write")
    convert.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                         help="weight precision of the store (default: fp16)")
    convert.add_argument("--prediction", choices=PREDICTIONS,
                         help="override what the model predicts (eps or v); default: read from the files")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")

    from .cli_plan import add_plan_options  # no torch import: the options only
    add_plan_options(_command(commands, "plan", "Pick the fastest memory plan that fits a budget: its "
                                                "predicted peak, why, and the alternatives."))

    models = _command(commands, "models", "List the models --model accepts by name: the embedded ones and "
                                          "the checkpoints in ./models and $POCKETDIFFUSION_MODELS_DIR.")
    models.add_argument("--json", action="store_true",
                        help="print the list as JSON (default: one model per line)")

    from .server.serve import add_serve_options  # the server's options live with the server
    add_serve_options(_command(commands, "serve", "Serve the web editor and the HTTP API (AUTOMATIC1111-"
                                                  "compatible and native jobs); needs the [server] extra."))
    return parser


def _command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=summary,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _resize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="just_resize",
                        help="how IMAGE is fitted to --width x --height when the sizes differ: "
                             "just_resize stretches, crop fills and crops the overflow, fill fits "
                             "inside and extends the edges (default: just_resize)")


def _mask_options(parser: argparse.ArgumentParser, fill_default: str, blur_default: int) -> None:
    parser.add_argument("--mask-blur", type=int, metavar="PX",
                        help="soften the mask edge by this many pixels so the repaint blends in "
                             f"(default: {blur_default})")
    parser.add_argument("--fill", choices=INPAINT_FILLS, default=fill_default,
                        help="what the masked area starts from: original keeps the picture under it, "
                             "latent_noise starts from noise; it matters when the picture is noised "
                             "rather than replaced (--strength below 1, or a model that is not an "
                             f"inpainting model; default: {fill_default})")


def _generation_options(parser: argparse.ArgumentParser, size_default: str, also_from: str) -> None:
    """Options every generating command shares. Those --from can supply default to None here and
    get their documented default in cli_generate.py when neither the command line nor the
    --from image gives them."""
    group = parser.add_argument_group("generation")
    group.add_argument("--negative", metavar="TEXT", help="what the image should not show (default: empty)")
    group.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: 30)")
    group.add_argument("--cfg", type=float, metavar="SCALE",
                       help="classifier-free guidance scale: how strictly to follow the prompt (default: 7.5)")
    group.add_argument("--sampler", metavar="NAME",
                       help=f"the sampler: one of {', '.join(SAMPLER_NAMES)}, or an AUTOMATIC1111 name "
                            "such as 'Euler a' or 'DPM++ 2M Karras' (default: euler)")
    group.add_argument("--seed", type=int, metavar="N",
                       help="random seed; image i of the run uses seed N+i; -1 picks a random seed "
                            "(default: 0)")
    group.add_argument("--width", type=int, metavar="W", help=f"width in pixels, a multiple of 8 "
                                                             f"(default: {size_default})")
    group.add_argument("--height", type=int, metavar="H", help=f"height in pixels, a multiple of 8 "
                                                              f"(default: {size_default})")
    group.add_argument("--batch-size", type=int, default=1, metavar="N",
                       help="images denoised together, in one batch (default: 1)")
    group.add_argument("--batch-count", type=int, default=1, metavar="N",
                       help="batches run one after another (default: 1)")
    group.add_argument("--clip-skip", type=int, metavar="N",
                       help="A1111 'Clip skip': 1 = the text encoder's last layer, 2 = the penultimate "
                            "(default: the model's own choice)")
    group.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, default="a1111",
                       help="a1111: (word:1.2) weights, BREAK and long prompts in 75-token chunks; "
                            "plain: the text as is, like diffusers (default: a1111)")
    group.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                       help="reuse the parameters stored in this PNG (by pocketdiffusion, AUTOMATIC1111, "
                            "Forge, ...): prompt, negative prompt, steps, sampler and schedule, CFG, seed, "
                            f"clip skip, {also_from}; options given on the command line win (default: none)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help=f"the model: a .safetensors/.ckpt file or a diffusers folder (default: the "
                            f"{MODEL_ENV} environment variable; one of them is required)")
    model.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:N or mps (default: cuda when "
                                                          "available, else cpu)")
    model.add_argument("--memory", choices=MEMORY_MODES, default="balanced",
                       help="memory mode: balanced keeps fp16 weights (on the CPU the UNet's, computing in fp32); low "
                            "also stores the UNet's weights as int8, dequantized layer by layer; minimal "
                            "streams the weights block by block and tiles the VAE (`plan` says which "
                            "fits; default: balanced)")
    model.add_argument("--prediction", choices=PREDICTIONS,
                       help="override what the model predicts, eps or v (default: what its files say)")

    output = parser.add_argument_group("output")
    where = output.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE.png",
                       help="write the image to this file; with several images FILE-1.png, FILE-2.png, ... "
                            "(default: a new name in --outdir)")
    where.add_argument("--outdir", default=DEFAULT_OUTDIR, metavar="DIR",
                       help="folder for the images, named 00012-SEED-prompt_words.png after the highest "
                            f"number already there; never overwrites (default: ./{DEFAULT_OUTDIR})")
    output.add_argument("--overwrite", action="store_true",
                        help="with --out, replace existing files (default: refuse, before generating)")
    output.add_argument("--quiet", action="store_true",
                        help="no progress bar or messages: print only the written paths, one per line "
                             "(default: progress on stderr)")
