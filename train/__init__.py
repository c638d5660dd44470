"""Training scripts for the project's own small model, SHAPES (pocketdiffusion.config.SHAPES).

Three stages on synthetic data (pocketdiffusion.data.shapes), each bounded by wall-clock time:
the VAE (vae.py), the text encoder and UNet together (unet.py), the 9-channel inpainting UNet
(inpaint.py); then export.py writes diffusers-compatible fp16 folders. run_all.py runs them all
in one command: `python -m train.run_all --out DIR --seconds 540`. See docs/TRAINING.md.

This is a development tool, not part of the package: it may import diffusers (export.py).
"""
