"""Inpainting: repaint where the mask is white. Two ways:
- a 9-channel inpainting model gets mask + masked-image latents as extra UNet input channels;
- any ordinary model repaints by latent mask blending each step (the kept area is replaced by the
  original latents noised to the current sigma before every model call, as A1111 does).
The random draws follow diffusers' StableDiffusionInpaintPipeline order (image sample, noise,
masked-image sample), so seeds match it. Pixels outside the mask are kept exactly: the decoded
picture is composited over the original with the (blurred) mask. "Only masked" crops the
masked box plus padding, works on it at the model's resolution and pastes it back.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..sampling import MaskedDenoiser
from .base import encode_images
from .images import blur_mask, composite, latent_mask, mask_box, mask_to_array, resize_image, to_tensor
from .img2img import strength_start
from .stages import Prepared, Setup


def prepare_inpaint(setup: Setup) -> Prepared:
    request, parts = setup.request, setup.parts
    original = request.init_image.convert("RGB")
    soft_mask = mask_to_array(blur_mask(_mask_image(request.mask), request.mask_blur))  # (H, W) in [0, 1]
    if request.inpaint_only_masked:
        box = mask_box(soft_mask, request.only_masked_padding, setup.width, setup.height)
        work_image = original.crop(box)
        work_mask = Image.fromarray(np.round(soft_mask * 255).astype(np.uint8)).crop(box)
    else:
        box, work_image = None, original
        work_mask = Image.fromarray(np.round(soft_mask * 255).astype(np.uint8))
    work_image = resize_image(work_image, setup.width, setup.height, request.resize_mode)
    work_mask = resize_image(work_mask.convert("RGB"), setup.width, setup.height, request.resize_mode)
    binary = (mask_to_array(work_mask) >= 0.5).astype(np.float32)  # diffusers' mask_processor binarize

    batch = len(setup.seeds)
    pixels = to_tensor(work_image).repeat(batch, 1, 1, 1)
    nine_channel = parts.config.is_inpainting
    strength = request.strength
    full_strength = strength >= 1.0
    sigmas = setup.sigmas[strength_start(request.steps, strength):]

    image_latents = None
    if not nine_channel or not full_strength:
        image_latents = encode_images(parts, pixels, setup.generators, setup.plan).to(setup.dtype)
    noise = setup.noise(setup.generators)
    concat = None
    h, w = setup.latent_shape[1:]
    mask_lat = latent_mask(binary, h, w, setup.device, setup.dtype).expand(batch, -1, -1, -1)
    if nine_channel:
        masked_pixels = pixels * torch.from_numpy(binary < 0.5)[None, None]
        masked_latents = encode_images(parts, masked_pixels, setup.generators, setup.plan).to(setup.dtype)
        concat = torch.cat([mask_lat, masked_latents], dim=1)
    if image_latents is not None and request.inpainting_fill == "latent_noise":
        fill = setup.noise(setup.generators)  # A1111 "latent noise": the masked area starts from noise
        image_latents = image_latents * (1 - mask_lat) + fill * mask_lat

    if full_strength:
        x = noise * setup.schedule.init_sigma(sigmas, setup.spec)
    else:
        x = image_latents + noise * sigmas[0]

    wrap = None
    if not nine_channel:
        def wrap(denoiser, original=image_latents, mask=mask_lat, noise=noise):
            return MaskedDenoiser(denoiser, original, mask, noise)

    keep_size = request.width is None and request.height is None  # else the user chose the output size

    def finish(latents: torch.Tensor) -> list[Image.Image]:
        if not nine_channel:
            # The kept area ends as the original latents, whatever the sampler's last level: DDIM
            # stops at alphas_cumprod[0], not sigma 0, and the VAE decoder's receptive field
            # carries the kept latents into the repainted pixels along the seam. diffusers'
            # inpaint loop (last step, no re-noising) and A1111's StableDiffusionProcessingImg2Img
            # .sample (`samples * nmask + init_latent * mask`) both blend so.
            latents = (1 - mask_lat) * image_latents + mask_lat * latents
        return [_paste(original, generated, soft_mask, box, keep_size) for generated in setup.decode(latents)]

    return Prepared(x=x, sigmas=sigmas, finish=finish, concat=concat, wrap=wrap)


def _mask_image(mask: Image.Image) -> Image.Image:
    """Brushed RGBA layers carry the mask in alpha; anything else is read as grayscale."""
    if mask.mode in ("RGBA", "LA"):
        return mask.getchannel("A")
    return mask.convert("L")


def _paste(original: Image.Image, generated: Image.Image, soft_mask: np.ndarray,
           box: tuple[int, int, int, int] | None, keep_size: bool) -> Image.Image:
    """Put the generated picture back over the original; outside the mask the original stays."""
    if box is None and keep_size and generated.size != original.size:
        # worked at the image's size rounded to a multiple of 8: scale the picture back up, so the
        # output has the image's size and its unmasked pixels stay exactly as they were
        generated = generated.resize(original.size, Image.LANCZOS)
    if box is None:
        if generated.size != original.size:  # a size the user asked for: composite at that size
            original = original.resize(generated.size, Image.LANCZOS)
            soft_mask = mask_to_array(Image.fromarray(np.round(soft_mask * 255).astype(np.uint8))
                                      .resize(generated.size, Image.LANCZOS))
        return composite(original, generated, soft_mask)
    canvas = original.copy()
    canvas.paste(generated.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
    return composite(original, canvas, soft_mask)
