"""The Stable Diffusion VAE: LDM's `AutoencoderKL` with its convolutional Encoder and Decoder.

A port of the original CompVis code:
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/model.py
  (ResnetBlock, AttnBlock, Downsample, Upsample, Encoder, Decoder) and
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/models/autoencoder.py (AutoencoderKL),
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/distributions/distributions.py
  (DiagonalGaussianDistribution).
Attribute names are the single-file checkpoint keys without their `first_stage_model.` prefix
(`encoder.down.0.block.1.nin_shortcut.weight`), so those files load unchanged.

Latents here are UNSCALED: the pipeline multiplies `encode_latents()` by `scaling_factor`
before denoising and divides by it before `decode()`.

Memory: at 512x512 the last decoder level holds (B, 128, 512, 512) activations, so every
block frees its intermediates as soon as they are consumed, runs swish in place on tensors it
owns (inside ops.GroupNormSiLU) and adds residuals in place when autograd is off. None of this
changes the arithmetic: the results are bit-for-bit those of the out-of-place code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .ops import DEFAULT_OPS, Ops

# LDM's Normalize(): GroupNorm with eps 1e-6 (not PyTorch's default 1e-5).
_NORM_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


def _may_modify_in_place(t: torch.Tensor) -> bool:
    """In-place ops are safe when autograd will not need the overwritten values."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def _add_residual(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """h + residual, written into `h` (a fresh conv output the block owns) when autograd allows.
    Float addition is commutative, so `h += x` equals LDM's `x + h` exactly."""
    if _may_modify_in_place(h):
        return h.add_(residual)
    return h + residual


class ResnetBlock(nn.Module):
    """Two (GroupNorm, swish, 3x3 conv) stages and a skip; a 1x1 `nin_shortcut` when the
    channel count changes. (LDM's temb and dropout are unused by the VAE: temb_channels=0,
    dropout=0.)"""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, ops: Ops):
        super().__init__()
        self.norm1 = ops.GroupNormSiLU(norm_groups, in_channels, eps=_NORM_EPS)
        self.conv1 = ops.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = ops.GroupNormSiLU(norm_groups, out_channels, eps=_NORM_EPS)
        self.conv2 = ops.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = ops.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reassigning `h` drops each intermediate as soon as the next one exists: at most the
        # input, one stage input and one stage output are alive at a time.
        h = self.conv1(self.norm1(x))  # the norms include the swish (ops.GroupNormSiLU)
        h = self.conv2(self.norm2(h))
        # The shortcut is computed last, when the stage intermediates are already freed.
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return _add_residual(h, shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv q/k/v/proj_out (the
    checkpoints store them as (C, C, 1, 1) conv weights). Attention goes through
    `ops.attention` so a memory plan can chunk it: at 512x512 the mid block attends over
    64*64 = 4096 positions, a 4096x4096 score matrix per image."""

    def __init__(self, channels: int, norm_groups: int, ops: Ops):
        super().__init__()
        self.norm = ops.GroupNorm(norm_groups, channels, eps=_NORM_EPS)
        self.q = ops.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.k = ops.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.v = ops.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = ops.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)
        self._attention = ops.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, H*W, C) as views of the conv outputs: no copies.
        q = self.q(normed).flatten(2).transpose(1, 2)
        k = self.k(normed).flatten(2).transpose(1, 2)
        v = self.v(normed).flatten(2).transpose(1, 2)
        del normed
        # One head of size C: the softmax scale is C**-0.5, as LDM's `int(c)**(-0.5)`.
        h = self._attention(q, k, v, 1)  # (B, H*W, C)
        del q, k, v
        # Back to a standard contiguous (B, C, H, W) layout: a strided view here would make the
        # 1x1 conv emit channels-last and that layout would spread through the decoder.
        h = h.transpose(1, 2).reshape(b, c, height, width).contiguous()  # (B, C, H, W)
        h = self.proj_out(h)
        return _add_residual(h, x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad of one pixel right and bottom (LDM's
    `pad = (0, 1, 0, 1)`; torch's conv padding could only pad symmetrically)."""

    def __init__(self, channels: int, ops: Ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


# Upsampled tensors above this size are convolved in bands of rows (Upsample.forward).
UPSAMPLE_BAND_BYTES = 32 * 2 ** 20


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv.

    The decoder's memory peak was here: at 512x512 the last upsample makes a (1, 256, 512, 512)
    tensor (128 MiB in fp16) for a conv whose output is as big again, and cuDNN took ~225 MiB of
    workspace for that conv (H100, measured per layer). Above UPSAMPLE_BAND_BYTES the output is
    made in bands of input rows: each band is upsampled with one row of context on each side,
    convolved, and its exact rows copied into the output, so the upsampled tensor and the conv's
    workspace only ever exist for one band. The rows are those of the whole conv (a band's
    boundary rows, where the conv would have padded with zeros, are the ones dropped)."""

    def __init__(self, channels: int, ops: Ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[-2]
        bands = -(-4 * x.numel() * x.element_size() // UPSAMPLE_BAND_BYTES)
        if bands <= 1 or rows < 2 * bands:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        step = -(-rows // bands)
        out = None
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            low, high = max(start - 1, 0), min(stop + 1, rows)  # one row of context each side
            band = self.conv(F.interpolate(x[:, :, low:high], scale_factor=2.0, mode="nearest"))
            first = 2 * (start - low)
            if out is None:
                out = band.new_empty((*band.shape[:2], 2 * rows, band.shape[-1]))
            out[:, :, 2 * start:2 * stop] = band[:, :, first:first + 2 * (stop - start)]
            del band
        return out


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (LDM's `mid`)."""

    def __init__(self, channels: int, norm_groups: int, ops: Ops):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups, ops)
        self.attn_1 = AttnBlock(channels, norm_groups, ops)
        self.block_2 = ResnetBlock(channels, channels, norm_groups, ops)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and optionally `downsample` or `upsample`,
    the LDM `down[i]` / `up[i]` containers. (LDM's empty `attn` lists hold no weights for SD's
    attn_resolutions=[] and are left out.)"""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        # None registers no module (and no keys): encoder's last level has no downsample,
        # decoder's level 0 no upsample.
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = config.downscale."""

    def __init__(self, config: VAEConfig, ops: Ops = DEFAULT_OPS):
        super().__init__()
        groups = config.norm_groups
        self.conv_in = ops.Conv2d(config.in_channels, config.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(config.ch_mult)
        last_level = len(config.ch_mult) - 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.ch_mult):
            block_in, block_out = config.ch * in_ch_mult[level], config.ch * mult
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups, ops))
                block_in = block_out
            downsample = Downsample(block_out, ops) if level != last_level else None
            self.down.append(Level(blocks, downsample=downsample))
        block_in = config.ch * config.ch_mult[-1]
        self.mid = MidBlock(block_in, groups, ops)
        self.norm_out = ops.GroupNormSiLU(groups, block_in, eps=_NORM_EPS)
        # double_z=True: the mean and the log-variance of the latent distribution.
        self.conv_out = ops.Conv2d(block_in, 2 * config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.norm_out(h)  # with the swish
        return self.conv_out(h)


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[i]` is resolution level i (0 = full size) as in LDM, which builds the list in reverse
    (`self.up.insert(0, up)`) and runs it from the last level down to 0."""

    def __init__(self, config: VAEConfig, ops: Ops = DEFAULT_OPS):
        super().__init__()
        groups = config.norm_groups
        block_in = config.ch * config.ch_mult[-1]
        self.conv_in = ops.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, groups, ops)
        levels: list[Level] = []
        for level in reversed(range(len(config.ch_mult))):
            block_out = config.ch * config.ch_mult[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups, ops))
                block_in = block_out
            upsample = Upsample(block_out, ops) if level != 0 else None
            levels.insert(0, Level(blocks, upsample=upsample))
        self.up = nn.ModuleList(levels)
        self.norm_out = ops.GroupNormSiLU(groups, block_in, eps=_NORM_EPS)
        self.conv_out = ops.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        h = self.norm_out(h)  # with the swish
        return self.conv_out(h)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + std * noise, the draw of diffusers' DiagonalGaussianDistribution.sample: the noise
    from `torch.randn` with `generator` on the generator's device, then moved (so a CPU generator
    gives the same latents on every device)."""
    noise_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.device)


class AutoencoderKL(nn.Module):
    """LDM's AutoencoderKL: `encode` an image in [-1, 1] to the moments of a diagonal Gaussian
    over latents, `decode` latents back to an image.

    Latents in and out are unscaled; the pipeline scales them by `scaling_factor`
    (0.18215 for SD1/SD2, 0.13025 for SDXL)."""

    def __init__(self, config: VAEConfig, ops: Ops = DEFAULT_OPS):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, ops)
        self.decoder = Decoder(config, ops)
        self.quant_conv = ops.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = ops.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def scaling_factor(self) -> float:
        """What the pipeline multiplies encoder latents by (and divides by before `decode`);
        this module never applies it."""
        return self.config.scaling_factor

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return self.config.downscale

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image x (B, in_channels, H, W) in [-1, 1] -> (mean, logvar), each
        (B, embed_dim, H/f, W/f) with f = `downscale`; logvar clamped to [-30, 20]."""
        self._check_input(x, "image", self.config.in_channels, self.downscale)
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = False) -> torch.Tensor:
        """Unscaled latents of image x: the distribution's mean, or with `sample=True` a draw
        mean + std * noise, the noise from `torch.randn` with `generator` (on the generator's
        device, then moved, so a CPU generator gives the same latents on every device)."""
        mean, logvar = self.encode(x)
        return sample_posterior(mean, logvar, generator) if sample else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), roughly in
        [-1, 1] (not clamped)."""
        self._check_input(z, "latents", self.config.embed_dim, 1)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = False) -> torch.Tensor:
        """Reconstruction: decode(encode_latents(x))."""
        return self.decode(self.encode_latents(x, generator=generator, sample=sample))

    @staticmethod
    def _check_input(t: object, what: str, channels: int, multiple: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"VAE {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"VAE {what} must have shape (B, {channels}, H, W), "
                             f"got {t.ndim} dimensions: {tuple(t.shape)}")
        if t.shape[1] != channels:
            raise ValueError(f"VAE {what} must have {channels} channels (B, {channels}, H, W), "
                             f"got {t.shape[1]} channels: {tuple(t.shape)}")
        height, width = t.shape[-2:]
        if height == 0 or width == 0 or height % multiple or width % multiple:
            raise ValueError(f"VAE {what} height and width must be positive multiples of "
                             f"{multiple}, got {height}x{width}")
        if not t.is_floating_point():
            raise TypeError(f"VAE {what} must be a floating-point tensor, got {t.dtype}")
