"""The README's pictures: one per mode, made with the embedded default model on the CPU, each a
strip of input(s) -> result at the model's native 128x128, enlarged 2x (nearest) for the page.

    python bench/readme_pictures.py --out docs/images
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pocketdiffusion
from pocketdiffusion.data import shapes

SCALE = 2
GAP = 8


def strip(*images: Image.Image) -> Image.Image:
    """The pictures side by side on white, each enlarged SCALE times."""
    big = [im.convert("RGB").resize((im.width * SCALE, im.height * SCALE), Image.NEAREST) for im in images]
    canvas = Image.new("RGB", (sum(b.width for b in big) + GAP * (len(big) - 1), max(b.height for b in big)), "white")
    x = 0
    for b in big:
        canvas.paste(b, (x, (canvas.height - b.height) // 2))
        x += b.width + GAP
    return canvas


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture with the masked area whitened, as an editor shows a brushed mask."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    alpha = (np.asarray(mask.convert("L")) > 127)[..., None] * 0.6
    return Image.fromarray(np.round(pixels * (1 - alpha) + 255 * alpha).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pipe = pocketdiffusion.load("shapes", device="cpu")
    inpainter = pocketdiffusion.load("shapes-inpainting", device="cpu")

    prompts = ["a red circle on a blue background", "a large yellow star on a purple background",
               "a small green heart on the left on a white background", "a cyan triangle above an orange square"]
    txt2img = [pipe.generate(p, seed=i)[0] for i, p in enumerate(prompts)]
    strip(*txt2img).save(args.out / "txt2img.png")

    source = Image.fromarray(shapes.render(shapes.Scene("gray", [shapes.Obj("square", "pink", "small", "left",
                                                                             0.27, 0.5, 0.3)])))
    edited = pipe.edit(source, "a small black triangle", strength=0.6, seed=1)[0]
    strip(source, edited).save(args.out / "img2img.png")

    mask = np.zeros((128, 128), np.uint8)
    mask[:, 64:] = 255
    mask = Image.fromarray(mask)
    prompt = "a small yellow star on the right on a gray background"
    nine = inpainter.inpaint(source, mask, prompt, seed=2)[0]
    blended = pipe.inpaint(source, mask, prompt, seed=2, cfg=4.0)[0]
    strip(mask_overlay(source, mask), nine, blended).save(args.out / "inpaint.png")

    wider = inpainter.outpaint(source, "a small blue circle on the right on a gray background", right=64, seed=0)[0]
    strip(source, wider).save(args.out / "outpaint.png")
    for name in ("txt2img", "img2img", "inpaint", "outpaint"):
        print(args.out / f"{name}.png")


if __name__ == "__main__":
    main()
