"""Pixels in and out: PIL <-> tensors, A1111's resize modes, masks, the "only masked" crop box
and the final composite that keeps pixels outside the mask exactly."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from .request import InvalidRequest


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1] (diffusers' VaeImageProcessor normalize)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> RGB PIL images (diffusers' denormalize + numpy_to_pil)."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def mask_to_array(mask: Image.Image) -> np.ndarray:
    """Grayscale mask -> (H, W) float32 in [0, 1]; 1 = repaint (white), like A1111 and diffusers."""
    if mask.mode in ("RGBA", "LA"):  # a brushed layer: the alpha channel is where the user painted
        return np.asarray(mask.getchannel("A"), dtype=np.float32) / 255.0
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """A1111's resize modes (modules/images.py `resize_image`): "just_resize" stretches, "crop"
    fills the target and crops the overflow (centered), "fill" fits inside and fills the rest by
    stretching the image's edges."""
    if image.size == (width, height):
        return image
    if mode == "just_resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        scale = width / image.width if ratio > src_ratio else height / image.height
        w, h = round(image.width * scale), round(image.height * scale)
        resized = image.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    if mode == "fill":
        scale = width / image.width if ratio < src_ratio else height / image.height
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        resized = np.asarray(image.convert("RGB").resize((w, h), Image.LANCZOS))
        pad_y, pad_x = height - h, width - w
        padded = np.pad(resized, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
                        mode="edge")
        return Image.fromarray(padded)
    raise InvalidRequest(f"resize_mode={mode!r}: expected one of just_resize, crop, fill")


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Soften the mask edge (A1111 "Mask blur") so the repainted area blends in."""
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def mask_box(mask: np.ndarray, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The masked area's bounding box plus `padding`, grown to the target aspect ratio and kept
    inside the image (A1111 masking.get_crop_region + expand_crop_region). (left, top, right, bottom)."""
    rows, cols = np.nonzero(mask > 0)
    img_h, img_w = mask.shape
    if rows.size == 0:
        return 0, 0, img_w, img_h
    x1, y1 = max(cols.min() - padding, 0), max(rows.min() - padding, 0)
    x2, y2 = min(cols.max() + 1 + padding, img_w), min(rows.max() + 1 + padding, img_h)
    ratio = width / height
    box_w, box_h = x2 - x1, y2 - y1
    if box_w / box_h < ratio:  # too tall: widen
        want = min(img_w, round(box_h * ratio))
        x1 = max(0, min(x1 - (want - box_w) // 2, img_w - want))
        x2 = x1 + want
    else:  # too wide: heighten
        want = min(img_h, round(box_w / ratio))
        y1 = max(0, min(y1 - (want - box_h) // 2, img_h - want))
        y2 = y1 + want
    return int(x1), int(y1), int(x2), int(y2)


def composite(original: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """generated where mask = 1, the original where mask = 0 (bit for bit), a blend in between."""
    orig = np.asarray(original.convert("RGB"), dtype=np.float32)
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    alpha = mask[..., None]
    out = np.where(alpha > 0, orig * (1 - alpha) + gen * alpha, orig)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def latent_mask(mask: np.ndarray, height: int, width: int, device, dtype) -> torch.Tensor:
    """(H, W) mask -> (1, 1, h, w) at latent size, nearest, as diffusers' inpaint pipelines do."""
    m = torch.from_numpy(mask)[None, None]
    return torch.nn.functional.interpolate(m, size=(height, width)).to(device=device, dtype=dtype)
