"""pocketdiffusion: a Stable Diffusion engine for small hardware."""
__version__ = "0.1.0"
