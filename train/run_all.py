"""Train the SHAPES model end to end within a wall-clock budget, then export it.

    python -m train.run_all --out DIR --seconds 540 [--seed 0] [--resume DIR] [--pack PACKDIR]

Stages and their shares of the training time: VAE 15%, text encoder + UNet 65%, inpainting
UNet 15%; the export (and its checks) gets a fixed reserve at the end. Each stage's budget is
recomputed from the clock when it starts, so one that overran shortens the next ones and the
whole command ends near `--seconds` after it started (plus Python's own start-up).

Outputs (docs/TRAINING.md): DIR/ckpt/{vae,unet,inpaint}.pt (fp32 weights, EMA, optimizer: what
--resume continues from), DIR/shapes/ and DIR/shapes-inpainting/ (diffusers fp16 folders),
DIR/samples.png (held-out prompts, base model) and DIR/train_log.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from .common import Settings, load_checkpoint, setup_backends
from .inpaint import InpaintHyper, train_inpaint
from .unet import UNetHyper, train_text_unet
from .vae import VAEHyper, train_vae

STAGES = ("vae", "unet", "inpaint")
SHARES = {"vae": 0.15, "unet": 0.65, "inpaint": 0.15}
AFTER_STAGE_SECONDS = 5.0   # per stage: data workers starting, evaluation, checkpoint writing
PACK_PIECE_BYTES = 15 * 2**20
EVAL_CFG = 7.5              # the pipeline's default guidance scale
DEFAULT_CUDA_WORKERS = 6    # data processes; each draws ~40 batches of 256 a second, far above the GPU's need


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, exports, log)")
    p.add_argument("--seconds", type=float, default=540.0, help="wall-clock budget of the whole command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="a previous run's --out: finished stages are reused, an "
                   "unfinished one continues from its last checkpoint")
    p.add_argument("--extend", default="", help="comma-separated finished stages to train further (new LR "
                   "cycle) when resuming, e.g. unet,inpaint")
    p.add_argument("--stop-after", choices=STAGES + ("export",), default="export")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help=f"data worker processes (default: {DEFAULT_CUDA_WORKERS} on CUDA, "
                   "0 on the CPU)")
    p.add_argument("--size", type=int, default=128, help="training image side (the model is native 128)")
    p.add_argument("--shares", type=parse_shares, default=dict(SHARES),
                   help="stage shares of the training time, e.g. vae=0.3,unet=0.55,inpaint=0.15 "
                        f"(default {','.join(f'{k}={v}' for k, v in SHARES.items())})")
    p.add_argument("--vae-edge-weight", type=float, default=VAEHyper.edge_weight,
                   help="extra loss weight of outline pixels in the VAE stage (0: plain L1 + MSE)")
    p.add_argument("--vae-batch", type=int, default=VAEHyper.batch_size)
    p.add_argument("--unet-batch", type=int, default=UNetHyper.batch_size)
    p.add_argument("--inpaint-batch", type=int, default=InpaintHyper.batch_size)
    p.add_argument("--max-steps", type=int, help="cap on each stage's steps (smoke tests)")
    p.add_argument("--latent-stat-images", type=int, default=VAEHyper.latent_stat_images)
    p.add_argument("--eval-images", type=int, default=VAEHyper.eval_images, help="held-out images for the PSNR")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions in the VAE (CUDA)")
    p.add_argument("--export-seconds", type=float, default=30.0, help="time kept for the export and checks")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts generated and graded")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--max-file-mib", type=float, default=15.0, help="largest exported file; larger is sharded")
    p.add_argument("--copy-shared", action="store_true", help="give shapes-inpainting its own copy of the text "
                   "encoder and VAE weights (default: symbolic links to shapes/'s, the pair then fits 40 MB)")
    p.add_argument("--pack", type=Path, help="also write the exports as a tar in <=15 MiB pieces here "
                   "(+ train_log.json, samples.png): the GPU machine returns at most 8 files of 16 MiB")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds must be positive, got {args.seconds}")
    if args.size < 16 or args.size % 8:
        p.error(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    for name in ("vae_batch", "unet_batch", "inpaint_batch", "log_every", "eval_images", "latent_stat_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resume is not None and not (args.resume / "ckpt").is_dir():
        p.error(f"--resume {args.resume}: no ckpt/ folder there (pass a previous run's --out)")
    args.extend = {s for s in args.extend.split(",") if s}
    if args.extend - set(STAGES):
        p.error(f"--extend takes stages among {', '.join(STAGES)}, got {', '.join(sorted(args.extend))}")
    if args.extend and args.resume is None:
        p.error("--extend needs --resume (it continues finished stages)")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU")
    if args.stop_after == "export":
        try:  # fail now, not after minutes of training
            import diffusers.loaders.single_file_utils  # noqa: F401
        except Exception as error:  # ImportError, or a diffusers that breaks on this environment
            p.error(f"the export needs diffusers ({type(error).__name__}: {error}); install diffusers==0.42.1 "
                    "or carry its wheel (docs/TRAINING.md), or pass --stop-after inpaint and export later "
                    "with python -m train.export")
    return args


def parse_shares(text: str) -> dict[str, float]:
    shares = dict(SHARES)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in SHARES:
            raise argparse.ArgumentTypeError(f"unknown stage {name!r} in --shares: expected {', '.join(SHARES)}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shares {name}={value!r}: expected a number") from None
        if shares[name] <= 0:
            raise argparse.ArgumentTypeError(f"--shares {name}={value}: a share must be positive")
    return shares


def planned_stages(stop_after: str) -> list[str]:
    return list(STAGES[: STAGES.index(stop_after) + 1]) if stop_after in STAGES else list(STAGES)


def stage_finished(resume: Path | None, stage: str) -> bool:
    payload = load_checkpoint(None if resume is None else resume / "ckpt" / f"{stage}.pt")
    return payload is not None and payload["state"]["done"]


class Clock:
    """The command's deadline and each stage's share of what is left of it."""

    def __init__(self, seconds: float, export_reserve: float, start: float | None = None,
                 shares: dict[str, float] | None = None):
        self.start = time.monotonic() if start is None else start
        self.seconds, self.export_reserve = seconds, export_reserve
        self.shares = dict(SHARES if shares is None else shares)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def budget(self, stage: str, to_train: list[str]) -> float:
        """`stage`'s share (among the stages still to train) of the time left before the reserve;
        0 for a stage that is not to be trained (reused from --resume)."""
        if stage not in to_train:
            return 0.0
        spare = self.left() - self.export_reserve - AFTER_STAGE_SECONDS * len(to_train)
        return max(spare, 0.0) * self.shares[stage] / sum(self.shares[s] for s in to_train)


def main(argv: list[str] | None = None) -> dict:
    started = time.monotonic()  # the budget covers the diffusers check in parse_args too
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join([sys.executable, "-m", "train.run_all", *argv])
    print(f"command: {command}\nseed: {args.seed}", flush=True)
    stages = planned_stages(args.stop_after)
    export = args.stop_after == "export"
    clock = Clock(args.seconds, args.export_seconds if export else 0.0, started, args.shares)
    workers = args.workers if args.workers is not None else (DEFAULT_CUDA_WORKERS if args.device.type == "cuda" else 0)
    settings = Settings(device=args.device, size=args.size, seed=args.seed, workers=workers,
                        log_every=args.log_every, max_steps=args.max_steps, ckpt_every_seconds=args.ckpt_every,
                        channels_last=args.channels_last)
    setup_backends(args.device)
    torch.manual_seed(args.seed)  # model initialisation
    ckpt_dir = args.out / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = {"command": command, "seed": args.seed, "device": _device_name(args.device),
           "torch": torch.__version__, "seconds_budget": args.seconds, "stages": {}}

    def resume_path(stage: str) -> Path | None:
        return None if args.resume is None else args.resume / "ckpt" / f"{stage}.pt"

    to_train = [s for s in stages if s in args.extend or not stage_finished(args.resume, s)]

    def stage_options(stage: str) -> dict:
        return {"checkpoint": ckpt_dir / f"{stage}.pt", "resume": resume_path(stage), "extend": stage in args.extend}

    def finish(stage: str, record: dict) -> None:
        if stage in to_train:
            to_train.remove(stage)
        log["stages"][stage] = record
        _write_log(args.out, log, clock)

    vae_hyper = replace(VAEHyper(), batch_size=args.vae_batch, edge_weight=args.vae_edge_weight, latent_stat_images=args.latent_stat_images,
                        eval_images=args.eval_images)
    vae = train_vae(settings, vae_hyper, clock.budget("vae", to_train), **stage_options("vae"))
    finish("vae", vae.record)
    base = inpaint = None
    if "unet" in stages:
        base = train_text_unet(settings, replace(UNetHyper(), batch_size=args.unet_batch),
                               clock.budget("unet", to_train), vae=vae.vae, **stage_options("unet"))
        finish("unet", base.record)
    if "inpaint" in stages:
        inpaint = train_inpaint(settings, replace(InpaintHyper(), batch_size=args.inpaint_batch),
                                clock.budget("inpaint", to_train), vae=vae.vae, text_encoder=base.text_encoder,
                                base_unet=base.unet, **stage_options("inpaint"))
        finish("inpaint", inpaint.record)
    if export:
        log["export"] = export_and_check(args, vae, base, inpaint, clock)
        _write_log(args.out, log, clock)
        if args.pack is not None:
            pack(args.out, args.pack)
    print(f"total {clock.elapsed():.1f} s; log: {args.out / 'train_log.json'}", flush=True)
    if export and log["export"]["errors"]:
        raise SystemExit(f"the export or its checks failed: {'; '.join(log['export']['errors'])} "
                         f"(the trained checkpoints are in {ckpt_dir}; re-export with python -m train.export)")
    return log


def export_and_check(args: argparse.Namespace, vae, base, inpaint, clock: Clock) -> dict:
    """Write both folders, load each with our loader and generate; then, while time is left, grade
    pictures of held-out prompts (data/classify.py) and save a grid of them. A failing step is
    recorded in report["errors"] (with its traceback printed) and the rest still runs, so the
    packed results come back whatever happens."""
    from .export import BASE_FOLDER, INPAINT_FOLDER, TrainedWeights, evaluate, export_all, image_grid, verify_folder

    started = time.monotonic()
    report: dict = {"errors": []}

    def attempt(what: str, action):
        try:
            return action()
        except Exception as error:  # keep going: the log and the pack must still be written
            traceback.print_exc()
            report["errors"].append(f"{what}: {type(error).__name__}: {error}")
            return None

    def on_cpu(module: torch.nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    weights = TrainedWeights(text_encoder=on_cpu(base.text_encoder), unet=on_cpu(base.unet), vae=on_cpu(vae.vae),
                             scaling_factor=vae.scaling_factor, inpaint_unet=on_cpu(inpaint.unet))
    written = attempt("export", lambda: export_all(weights, args.out, int(args.max_file_mib * 2**20),
                                                   share=not args.copy_shared))
    if written is None:
        return report
    report.update(written)
    for name in (BASE_FOLDER, INPAINT_FOLDER):
        attempt(f"verify {name}", lambda: verify_folder(args.out / name, args.device).save(
            args.out / f"verify-{name}.png"))
    if args.eval_prompts > 0 and clock.left() > 5:
        deadline = time.monotonic() + clock.left() - 2  # stop generating before the budget ends
        result = attempt("held-out evaluation", lambda: evaluate(
            args.out / BASE_FOLDER, args.device, args.eval_prompts, steps=args.eval_steps, cfg=EVAL_CFG,
            deadline=deadline))
        if result is not None:
            scores, images = result
            image_grid(images[:32]).save(args.out / "samples.png")
            report["heldout_scores"] = {"prompts": len(images), "steps": args.eval_steps, "cfg": EVAL_CFG, **scores}
            print(f"[export] held-out prompts ({len(images)}, {args.eval_steps} steps, cfg {EVAL_CFG}): {scores}",
                  flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def pack(out: Path, pack_dir: Path) -> list[Path]:
    """shapes/ and shapes-inpainting/ as one tar split into <= 15 MiB pieces
    (`cat shapes-export.tar.part* | tar x` joins them), plus train_log.json and samples.png."""
    from .export import BASE_FOLDER, INPAINT_FOLDER

    pack_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in (BASE_FOLDER, INPAINT_FOLDER):
            if (out / name).is_dir():  # symbolic links are stored as links (shared weights stay shared)
                tar.add(out / name, arcname=name)
    data = buffer.getvalue()
    written = []
    for index, start in enumerate(range(0, len(data), PACK_PIECE_BYTES)):
        piece = pack_dir / f"shapes-export.tar.part{index:02d}"
        piece.write_bytes(data[start:start + PACK_PIECE_BYTES])
        written.append(piece)
    for name in ("train_log.json", "samples.png"):
        if (out / name).is_file():
            (pack_dir / name).write_bytes((out / name).read_bytes())
            written.append(pack_dir / name)
    print(f"[pack] {len(written)} files in {pack_dir} ({len(data) / 1e6:.1f} MB of tar)", flush=True)
    return written


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _write_log(out: Path, log: dict, clock: Clock) -> None:
    log["seconds_total"] = round(clock.elapsed(), 1)
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=2) + "\n")
    os.replace(tmp, out / "train_log.json")


if __name__ == "__main__":
    main()
