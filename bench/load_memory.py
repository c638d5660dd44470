"""CPU memory of loading a full-size SD1.5 single file stored fp32 into fp16 weights.

Peak RSS of the load over the RSS of the same process right after its imports (the
torch-imported baseline of DESIGN.md, plus the loading library's own import), for
pocketdiffusion's `checkpoints.load` and for diffusers' `StableDiffusionPipeline.from_single_file`,
each in a fresh subprocess, on the same random-weight file; and the load of the same model
converted to a pocketdiffusion store (`pocketdiffusion convert`, fp16).

    python bench/load_memory.py --file /tmp/sd15_fp32.safetensors   # writes the file if missing
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

MEASURE = r"""
import json, sys, time, torch
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
which, path, cfg = sys.argv[1], sys.argv[2], sys.argv[3]
if which in ("ours", "store"):
    from pocketdiffusion.checkpoints import load
else:
    from diffusers import StableDiffusionPipeline
base = rss("VmRSS:")
t0 = time.perf_counter()
if which in ("ours", "store"):
    c = load(path if which == "ours" else path.replace(".safetensors", ".store.safetensors"), dtype=torch.float16)
    modules = [*c.text_encoders, c.unet, c.vae]
else:
    p = StableDiffusionPipeline.from_single_file(path, config=cfg, local_files_only=True,
                                                 torch_dtype=torch.float16, safety_checker=None)
    modules = [p.text_encoder, p.unet, p.vae]
seconds = time.perf_counter() - t0
fp16 = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
dtypes = sorted({str(t.dtype) for m in modules for t in m.state_dict().values()})
print(json.dumps({"which": which, "peak_over_base": rss("VmHWM:") - base, "weights_bytes": fp16,
                  "dtypes": dtypes, "seconds": seconds}))
"""


def write_random_sd15(path: Path) -> None:
    """Full-size SD1.5 LDM single file, fp32, random values (shapes from our own models)."""
    import torch
    from safetensors.torch import save_file

    from pocketdiffusion.config import SD15
    from pocketdiffusion.models.clip import CLIPTextModel
    from pocketdiffusion.models.unet import UNetModel
    from pocketdiffusion.models.vae import AutoencoderKL

    with torch.device("meta"):
        parts = {"cond_stage_model.transformer.": CLIPTextModel(SD15.text_encoders[0]),
                 "model.diffusion_model.": UNetModel(SD15.unet),
                 "first_stage_model.": AutoencoderKL(SD15.vae)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, model in parts.items():
        for key, p in model.state_dict().items():
            t = torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) \
                if p.ndim >= 2 else torch.zeros(p.shape)
            tensors[prefix + key] = t
    save_file(tensors, str(path))


def write_diffusers_config_folder(folder: Path) -> None:
    """The config-only folder diffusers' from_single_file needs offline (no weights)."""
    sys.path.insert(0, str(HERE))
    from reference_models import CLIP_L, SCHEDULER, SD15_UNET, SD_VAE

    from pocketdiffusion.data.bpe import train_bpe, write_bpe

    for name, cfg in {"unet": SD15_UNET, "vae": SD_VAE, "scheduler": SCHEDULER}.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / fname).write_text(json.dumps(cfg))
    (folder / "text_encoder").mkdir(exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(
        {**CLIP_L, "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}))
    vocab, merges = train_bpe(["a photo of a cat"], 10)
    write_bpe(vocab, merges, folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "sd15_fp32.safetensors")
    ap.add_argument("--which", nargs="+", default=["ours", "diffusers", "store"],
                    help="store: the file converted by `pocketdiffusion convert` (written next to it if missing)")
    args = ap.parse_args()
    if not args.file.exists():
        print(f"writing {args.file} ...", flush=True)
        write_random_sd15(args.file)
    store = args.file.with_name(args.file.name.replace(".safetensors", ".store.safetensors"))
    if "store" in args.which and not store.exists():
        from pocketdiffusion.checkpoints.store import convert
        convert(args.file, store)
    with tempfile.TemporaryDirectory() as cfg:
        write_diffusers_config_folder(Path(cfg))
        for which in args.which:
            out = subprocess.run([sys.executable, "-c", MEASURE, which, str(args.file), cfg],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib = 2 ** 20
            print(f"{which:10s} peak RSS over baseline {r['peak_over_base'] / mib:8.0f} MiB; "
                  f"fp16 weights {r['weights_bytes'] / mib:6.0f} MiB; ratio "
                  f"{r['peak_over_base'] / r['weights_bytes']:.3f}; {r['seconds']:.1f} s; {r['dtypes']}")


if __name__ == "__main__":
    main()
