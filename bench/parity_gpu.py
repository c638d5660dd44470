"""Full-size parity against diffusers/transformers in fp16 on a GPU (random weights).

Each component (text encoder(s), UNet, VAE encoder, VAE decoder) of the SD1.5 and SDXL
architectures: diffusers' random full-size models are written as a diffusers folder, loaded by
pocketdiffusion's own loader, and both run on the same inputs in fp16. Reported: relative error
||ours - ref|| / ||ref|| against diffusers fp16, and both against diffusers fp32 for scale.

    python bench/parity_gpu.py --arch sd15 sdxl --out parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_models import build_reference, save_diffusers_folder  # noqa: E402

from pocketdiffusion.checkpoints import load  # noqa: E402
from pocketdiffusion.models.unet import sdxl_label_vector  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def token_ids(batch: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.full((batch, 77), 49407, dtype=torch.long)
    ids[:, 0] = 49406
    for i in range(batch):
        n = 5 + 20 * i
        ids[i, 1:n] = torch.randint(0, 49405, (n - 1,), generator=g)
    return ids.to(device)


@torch.inference_mode()
def run_arch(arch: str, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    unet32, vae32, encs32 = build_reference(arch, device)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        unet16 = unet32.half()
        save_diffusers_folder(Path(tmp), arch, unet16, vae32, encs32)
        unet16 = None
        unet32 = unet32.float()  # .half() converted in place; rebuild fp32 for the fp32 reference
        t0 = time.perf_counter()
        ours = load(tmp, device=device, dtype=torch.float16)
        rows["load_s"] = round(time.perf_counter() - t0, 2)

    def compare(name, ours_out, ref16, ref32):
        rows[name] = {"rel_vs_diffusers_fp16": rel(ours_out, ref16),
                      "ours_fp16_vs_fp32": rel(ours_out, ref32),
                      "diffusers_fp16_vs_fp32": rel(ref16, ref32),
                      "max_abs_vs_fp16_over_max": float((ours_out.float() - ref16.float()).abs().max()
                                                          / ref16.float().abs().max())}

    ids = token_ids(2, device)
    contexts, pooled16 = [], None
    for i, enc32 in enumerate(encs32):
        enc16 = type(enc32)(enc32.config).to(device).half().eval()
        enc16.load_state_dict(enc32.state_dict())
        r32 = enc32(ids, output_hidden_states=True)
        r16 = enc16(ids, output_hidden_states=True)
        mine = ours.text_encoders[i]
        h_last, _ = mine(ids, layer=-1, final_norm=True)
        h_pen, pooled = mine(ids, layer=-2, final_norm=False, pooled=True)
        compare(f"text_encoder_{i}.last", h_last, r16.last_hidden_state, r32.last_hidden_state)
        compare(f"text_encoder_{i}.penultimate", h_pen, r16.hidden_states[-2], r32.hidden_states[-2])
        pooled_key = "text_embeds" if hasattr(r16, "text_embeds") else "pooler_output"
        compare(f"text_encoder_{i}.pooled", pooled, getattr(r16, pooled_key), getattr(r32, pooled_key))
        contexts.append(r16.hidden_states[-2] if arch == "sdxl" else r16.last_hidden_state)
        if arch == "sdxl" and i == 1:
            pooled16 = r16.text_embeds
        del enc16
    context = torch.cat(contexts, dim=-1)

    side = 128 if arch == "sdxl" else 64
    x = torch.randn(2, 4, side, side, generator=g).to(device)
    t = torch.tensor([999.0, 421.0], device=device)
    kwargs, y = {}, None
    if arch == "sdxl":
        time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=torch.float16)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled16, "time_ids": time_ids}}
        y = sdxl_label_vector(pooled16, time_ids).half()
    ref32 = unet32(x, t, context.float(), added_cond_kwargs={k: v.float() for k, v in
                   kwargs.get("added_cond_kwargs", {}).items()} or None).sample
    unet16 = unet32.half()
    ref16 = unet16(x.half(), t, context, **kwargs).sample
    compare("unet", ours.unet(x.half(), t, context, y=y), ref16, ref32)
    del unet16, unet32, ref16, ref32

    img = (torch.rand(1, 3, side * 8, side * 8, generator=g) * 2 - 1).to(device)
    z = torch.randn(1, 4, side, side, generator=g).to(device)
    e32 = vae32.encode(img).latent_dist.mean
    d32 = vae32.decode(z).sample
    vae16 = vae32.half()
    e16 = vae16.encode(img.half()).latent_dist.mean
    d16 = vae16.decode(z.half()).sample
    mean, _ = ours.vae.encode(img.half())
    compare("vae_encoder", mean, e16, e32)
    compare("vae_decoder", ours.vae.decode(z.half()), d16, d32)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "torch": torch.__version__}
    for arch in args.arch:
        results[arch] = run_arch(arch, args.device)
        torch.cuda.empty_cache() if args.device == "cuda" else None
    print(f"{'component':34s} {'rel vs diffusers fp16':>22s} {'ours vs fp32':>13s} {'diffusers vs fp32':>18s}")
    for arch in args.arch:
        for name, r in results[arch].items():
            if isinstance(r, dict):
                print(f"{arch + ' ' + name:34s} {r['rel_vs_diffusers_fp16']:22.2e} "
                      f"{r['ours_fp16_vs_fp32']:13.2e} {r['diffusers_fp16_vs_fp32']:18.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
