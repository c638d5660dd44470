"""Tiled VAE decode/encode (memory/tiling.py).

Three kinds of VAE:
- a pointwise toy VAE (1x1 convs, nearest up/average down by f): it has no receptive field and
  no global statistics, so tiling must reproduce it EXACTLY; any misplaced tile, wrong crop or
  weights that do not sum to 1 shows up as an error far above float rounding;
- tiny random LDM VAEs (tests/ckpt_fixtures.py): the real architecture, noisy outputs;
- the same architecture briefly trained to reconstruct smooth images (60 Adam steps, ~2 s), so
  its outputs look like a trained VAE's: smooth, with local structure. Tiles there change the
  result only through the decoder's global GroupNorm statistics and mid-block attention (the
  accepted trade-off, as with diffusers' `enable_vae_tiling`); the tests bound that difference
  by PSNR and check that tile borders show no seam.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckpt_fixtures import TINY_VAE, randomize_
from pocketdiffusion.config import VAEConfig
from pocketdiffusion.memory.tiling import (blend_weights, should_tile, tile_spans, tiled_decode, tiled_encode,
                                           tiled_encode_moments)
from pocketdiffusion.models.vae import AutoencoderKL

# Three levels: downscale 4, as a scaled-down SD VAE (which has four levels, downscale 8).
THREE_LEVEL_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
MIN_PSNR_DB = 30.0
MAX_SEAM_RATIO = 2.0


# ---- helpers --------------------------------------------------------------------------------------

def smooth_images(batch: int, height: int, width: int, seed: int, cycles=(2.0, 8.0)) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: per channel four plane waves of random direction and phase,
    `cycles` waves per 256 pixels (periods of 32-128 pixels: smooth, and present everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height) / 256, torch.arange(width) / 256, indexing="ij")
    images = torch.zeros(batch, 3, height, width)
    for b in range(batch):
        for c in range(3):
            for _ in range(4):
                rate, angle, phase = torch.rand(3, generator=gen).unbind()
                rate = cycles[0] + (cycles[1] - cycles[0]) * rate
                angle, phase = 6.2832 * angle, 6.2832 * phase
                images[b, c] += 0.25 * torch.sin(6.2832 * rate * (angle.cos() * yy + angle.sin() * xx) + phase)
    return images.clamp(-1, 1)


def psnr(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """dB, with the reference's own range as the peak (random VAEs do not output [-1, 1])."""
    peak = reference.max() - reference.min()
    return float(10 * torch.log10(peak ** 2 / ((ours - reference) ** 2).mean()))


def interior_edges(spans, size: int, scale: int) -> list[int]:
    """Output coordinates of the tile borders that lie inside the image."""
    return sorted({e * scale for span in spans for e in span if 0 < e < size})


def seam_ratios(diff: torch.Tensor, rows: list[int], cols: list[int], band: int) -> tuple[float, float]:
    """Two seam measures of diff = tiled - untiled (B, C, H, W):
    band: mean |diff| within `band` pixels of a tile border / mean |diff| elsewhere;
    jump: mean |diff[x] - diff[x-1]| across tile borders / the same between other neighbours
    (a seam is a step: the difference changes abruptly where one tile's output takes over)."""
    error = diff.abs().mean((0, 1))  # (H, W)
    near = torch.zeros_like(error, dtype=torch.bool)
    for edge in rows:
        near[max(0, edge - band):edge + band, :] = True
    for edge in cols:
        near[:, max(0, edge - band):edge + band] = True
    band_ratio = float(error[near].mean() / error[~near].mean())
    signed = diff.mean(1)  # (B, H, W)
    steps_x = (signed[..., 1:] - signed[..., :-1]).abs().mean((0, 1))  # step from x-1 to x at [x-1]
    steps_y = (signed[:, 1:] - signed[:, :-1]).abs().mean((0, 2))
    at_x = torch.zeros_like(steps_x, dtype=torch.bool)
    at_x[[c - 1 for c in cols]] = True
    at_y = torch.zeros_like(steps_y, dtype=torch.bool)
    at_y[[r - 1 for r in rows]] = True
    jump = torch.cat([steps_x[at_x], steps_y[at_y]]).mean() / torch.cat([steps_x[~at_x], steps_y[~at_y]]).mean()
    return band_ratio, float(jump)


class PointwiseVAE(nn.Module):
    """The VAE interface with no spatial context at all: decode = 1x1 conv, tanh, nearest x f;
    encode = average over f x f blocks, 1x1 conv to (mean, logvar). Tiles aligned to f see
    exactly what the whole image sees, so tiling must not change its output."""

    def __init__(self, f: int = 4, channels: int = 4):
        super().__init__()
        self.downscale, self.latent_channels = f, channels
        self.config = SimpleNamespace(in_channels=3)
        self.to_image = nn.Conv2d(channels, 3, 1)
        self.to_moments = nn.Conv2d(3, 2 * channels, 1)
        self.requires_grad_(False)

    def decode(self, z):
        return F.interpolate(torch.tanh(self.to_image(z)), scale_factor=self.downscale, mode="nearest")

    def encode(self, x):
        mean, logvar = self.to_moments(F.avg_pool2d(x, self.downscale)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def encode_latents(self, x, generator=None, sample=False):
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise if sample else mean


@pytest.fixture(scope="module")
def trained_vae() -> AutoencoderKL:
    """THREE_LEVEL_VAE trained for 60 steps to reconstruct 32x32 smooth images (about 2 s): far
    from converged, but its decoder already behaves like a trained one: smooth, local outputs."""
    torch.manual_seed(0)
    vae = AutoencoderKL(THREE_LEVEL_VAE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for step in range(60):
        images = smooth_images(4, 32, 32, seed=1000 + step, cycles=(2.0, 12.0))
        loss = F.mse_loss(vae.decode(vae.encode(images)[0]), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vae.eval().requires_grad_(False)


def random_vae(config: VAEConfig = TINY_VAE, seed: int = 1) -> AutoencoderKL:
    return randomize_(AutoencoderKL(config), seed).eval().requires_grad_(False)


# ---- tile layout and blend weights ----------------------------------------------------------------

def test_tile_spans_cover_the_axis_and_shift_the_last_tile_to_the_border():
    assert tile_spans(72, 32, 8) == [(0, 32), (24, 56), (40, 72)]  # last shifted back from (48, 80)
    assert tile_spans(64, 32, 16) == [(0, 32), (16, 48), (32, 64)]  # fits exactly: nothing shifted
    assert tile_spans(48, 24, 0) == [(0, 24), (24, 48)]
    assert tile_spans(20, 32, 8) == [(0, 20)]  # smaller than a tile: one short tile
    assert tile_spans(32, 32, 8) == [(0, 32)]
    for size, tile, overlap in [(37, 16, 4), (100, 24, 20), (33, 32, 31), (9, 2, 1)]:
        spans = tile_spans(size, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(stop - start == tile for start, stop in spans)
        assert all(b[0] - a[0] == tile - overlap for a, b in zip(spans[:-2], spans[1:-1]))  # regular stride
        assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:]))  # every overlap >= overlap


@pytest.mark.parametrize("height, width, tile, overlap, scale", [
    (48, 72, 32, 8, 4),  # 2x3 tiles, last row and column shifted
    (37, 53, 16, 4, 1),  # sizes not divisible by the tile
    (40, 40, 24, 20, 2),  # overlap > tile / 2: three tiles meet
    (16, 100, 32, 8, 8),  # one row of tiles
])
def test_blend_weights_sum_to_one_with_linear_ramps_and_none_at_the_border(height, width, tile, overlap, scale):
    rows = [(a * scale, b * scale) for a, b in tile_spans(height, tile, overlap)]
    cols = [(a * scale, b * scale) for a, b in tile_spans(width, tile, overlap)]
    row_weights, col_weights = blend_weights(rows, height * scale), blend_weights(cols, width * scale)
    weight_map = torch.zeros(height * scale, width * scale, dtype=torch.float64)
    for (y0, y1), wy in zip(rows, row_weights):
        for (x0, x1), wx in zip(cols, col_weights):
            tile_weight = wy[:, None] * wx[None, :]  # (tile_h, tile_w): the 2D weight is separable
            assert tile_weight.min() > 0 and tile_weight.max() <= 1 + 1e-12
            weight_map[y0:y1, x0:x1] += tile_weight
    assert torch.allclose(weight_map, torch.ones_like(weight_map), atol=1e-12), float((weight_map - 1).abs().max())
    for spans, weights in ((rows, row_weights), (cols, col_weights)):
        # No ramp at the image border: the first tile starts, the last ends, at full weight.
        assert weights[0][0] == 1 and weights[-1][-1] == 1
        if len(spans) > 1 and tile >= 2 * overlap:
            # Two tiles meet: complementary linear ramps (pixel centres) across their overlap.
            ramp = spans[0][1] - spans[1][0]
            expected = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
            assert torch.allclose(weights[1][:ramp], expected, atol=1e-12)
            assert torch.allclose(weights[0][-ramp:], 1 - expected, atol=1e-12)
            assert torch.all(weights[0][:spans[1][0]] == 1)  # full weight before the overlap


def test_tile_spans_and_blend_weights_reject_bad_layouts():
    with pytest.raises(ValueError, match="positive int size"):
        tile_spans(0, 16, 4)
    with pytest.raises(ValueError, match="must be larger than the overlap"):
        tile_spans(64, 16, 16)
    with pytest.raises(ValueError, match="cover"):
        blend_weights([(0, 10), (12, 20)], 20)
    with pytest.raises(ValueError, match="cover"):
        blend_weights([(0, 10)], 20)


# ---- exactness: one tile, and a VAE without spatial context ---------------------------------------

def test_one_tile_is_bit_identical_to_untiled():
    vae = random_vae()
    z = torch.randn(2, 4, 16, 12)
    assert torch.equal(tiled_decode(vae, z, tile=16, overlap=4), vae.decode(z))
    image = torch.rand(2, 3, 32, 24) * 2 - 1
    assert torch.equal(tiled_encode(vae, image, tile=32, overlap=8), vae.encode_latents(image))
    drawn = tiled_encode(vae, image, tile=32, overlap=8, generator=torch.Generator().manual_seed(5), sample=True)
    expected = vae.encode_latents(image, generator=torch.Generator().manual_seed(5), sample=True)
    assert torch.equal(drawn, expected)


@pytest.mark.parametrize("batch, height, width, tile, overlap", [
    (1, 12, 18, 8, 2),  # 2x3 tiles
    (2, 37, 53, 16, 4),  # batch > 1, non-square, not divisible by the tile
    (1, 40, 40, 24, 20),  # three tiles overlap
    (3, 5, 70, 16, 0),  # no overlap, one row, shifted last column
])
def test_tiling_is_exact_on_a_vae_without_spatial_context(batch, height, width, tile, overlap):
    vae = PointwiseVAE().double()
    z = torch.randn(batch, 4, height, width, dtype=torch.float64)
    tiled, untiled = tiled_decode(vae, z, tile=tile, overlap=overlap), vae.decode(z)
    assert tiled.shape == untiled.shape == (batch, 3, height * 4, width * 4) and tiled.dtype == torch.float64
    assert float((tiled - untiled).abs().max()) < 1e-12
    image = torch.rand(batch, 3, height * 4, width * 4, dtype=torch.float64) * 2 - 1
    mean, logvar = tiled_encode_moments(vae, image, tile=tile * 4, overlap=overlap * 4)
    reference_mean, reference_logvar = vae.encode(image)
    assert float((mean - reference_mean).abs().max()) < 1e-12
    assert float((logvar - reference_logvar).abs().max()) < 1e-12


def test_low_precision_latents_keep_their_dtype():
    vae = PointwiseVAE().to(torch.bfloat16)
    z = torch.randn(1, 4, 20, 30, dtype=torch.bfloat16)
    tiled = tiled_decode(vae, z, tile=8, overlap=4)
    assert tiled.dtype == torch.bfloat16
    assert float((tiled.float() - vae.decode(z).float()).abs().max()) <= 2 ** -7  # bf16 rounding only


# ---- the real architecture -----------------------------------------------------------------------

def test_multi_tile_decode_matches_untiled_without_seams(trained_vae):
    """2x3 tiles over a decoded 192x288 image of a smooth picture."""
    vae, f, tile, overlap = trained_vae, trained_vae.downscale, 32, 8
    latents = vae.encode(smooth_images(1, 192, 288, seed=0))[0]  # (1, 4, 48, 72)
    rows, cols = tile_spans(48, tile, overlap), tile_spans(72, tile, overlap)
    assert (len(rows), len(cols)) == (2, 3)
    untiled = vae.decode(latents)
    tiled = tiled_decode(vae, latents, tile=tile, overlap=overlap)
    quality = psnr(tiled, untiled)
    band, jump = seam_ratios(tiled - untiled, interior_edges(rows, 48, f), interior_edges(cols, 72, f), band=2 * f)
    # Control: abutting tiles, no overlap to blend: the seam measure must see their seams.
    abutting = tiled_decode(vae, latents, tile=24, overlap=0)
    edges_24 = interior_edges(tile_spans(48, 24, 0), 48, f), interior_edges(tile_spans(72, 24, 0), 72, f)
    _, abutting_jump = seam_ratios(abutting - untiled, *edges_24, band=2 * f)
    print(f"trained VAE, 2x3 tiles: PSNR {quality:.1f} dB, seam band ratio {band:.2f}, "
          f"jump ratio {jump:.2f} (abutting tiles: jump {abutting_jump:.2f})")
    assert quality >= MIN_PSNR_DB
    assert band <= MAX_SEAM_RATIO and jump <= MAX_SEAM_RATIO
    assert abutting_jump > MAX_SEAM_RATIO


@pytest.mark.parametrize("config, latent_size, tile, overlap", [
    (TINY_VAE, (36, 52), 24, 8),  # 2x3 tiles, downscale 2, sizes not divisible by the tile
    (THREE_LEVEL_VAE, (48, 72), 32, 8),
])
def test_random_vae_tiled_decode_is_close_and_batch_independent(config, latent_size, tile, overlap):
    """Random weights give noisy outputs: a misplaced tile would drop the PSNR to a few dB."""
    vae = random_vae(config)
    f = vae.downscale
    height, width = latent_size
    latents = vae.encode(smooth_images(2, height * f, width * f, seed=3))[0]  # (2, 4, h, w)
    tiled = tiled_decode(vae, latents, tile=tile, overlap=overlap)
    assert tiled.shape == (2, 3, height * f, width * f)
    quality = psnr(tiled, vae.decode(latents))
    print(f"random {config.ch_mult} VAE: PSNR {quality:.1f} dB")
    assert quality >= 25.0
    for index in range(2):  # each image of the batch is tiled on its own
        alone = tiled_decode(vae, latents[index:index + 1], tile=tile, overlap=overlap)
        assert torch.allclose(alone, tiled[index:index + 1], atol=1e-5 * float(alone.abs().max()))


def test_tiled_encode_round_trip(trained_vae):
    vae, f = trained_vae, trained_vae.downscale
    images = smooth_images(2, 160, 224, seed=7)  # (2, 3, 160, 224): 2x3 tiles of 96 pixels
    tiled = tiled_encode(vae, images, tile=96, overlap=32)
    untiled = vae.encode_latents(images)
    assert tiled.shape == untiled.shape == (2, 4, 160 // f, 224 // f)
    latent_quality = psnr(tiled, untiled)
    round_trip = psnr(tiled_decode(vae, tiled, tile=24, overlap=8), vae.decode(untiled))
    print(f"tiled encode: latent PSNR {latent_quality:.1f} dB, tiled round trip vs untiled {round_trip:.1f} dB")
    assert latent_quality >= MIN_PSNR_DB and round_trip >= MIN_PSNR_DB


def test_tiled_encode_samples_once_over_the_blended_posterior(trained_vae):
    images = smooth_images(1, 128, 160, seed=8)
    mean, logvar = tiled_encode_moments(trained_vae, images, tile=64, overlap=16)
    drawn = tiled_encode(trained_vae, images, tile=64, overlap=16, generator=torch.Generator().manual_seed(3),
                         sample=True)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(tiled_encode(trained_vae, images, tile=64, overlap=16), mean)


def test_largest_decoder_activation_is_one_tiles():
    vae = random_vae(THREE_LEVEL_VAE)
    largest = {"numel": 0}

    def record(module, inputs, output):
        largest["numel"] = max(largest["numel"], output.numel())

    handles = [m.register_forward_hook(record) for m in vae.modules() if m is not vae]

    def largest_activation(run) -> int:
        largest["numel"] = 0
        run()
        return largest["numel"]

    latents = torch.randn(1, 4, 48, 72)
    untiled = largest_activation(lambda: vae.decode(latents))
    tiled = largest_activation(lambda: tiled_decode(vae, latents, tile=16, overlap=4))
    one_tile = largest_activation(lambda: vae.decode(latents[:, :, :16, :16]))
    for handle in handles:
        handle.remove()
    print(f"largest decoder activation: untiled {untiled}, tiled {tiled}, one 16x16 tile {one_tile} elements")
    assert untiled == 32 * (48 * 4) * (72 * 4)  # (1, 32, H, W): the last upsample's output, full size
    assert tiled <= one_tile
    assert tiled * 10 < untiled


# ---- the plan's switch and bad input ---------------------------------------------------------------

def test_should_tile():
    assert should_tile(1024 * 1024 + 1, 1024 * 1024)
    assert not should_tile(1024 * 1024, 1024 * 1024)
    assert not should_tile(4096 * 4096, None)
    assert should_tile(1, 0)
    with pytest.raises(ValueError, match="pixels"):
        should_tile(-1, 100)
    with pytest.raises(ValueError, match="tile_above"):
        should_tile(10, 2.5)


def test_bad_input_is_rejected_with_a_clear_message():
    vae = random_vae()
    z = torch.randn(1, 4, 16, 16)
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"tile \(8\) must be larger than the overlap \(8\)"):
        tiled_decode(vae, z, tile=8, overlap=8)
    with pytest.raises(ValueError, match="must be larger than the overlap"):
        tiled_encode(vae, image, tile=8, overlap=16)
    with pytest.raises(ValueError, match="non-negative"):
        tiled_decode(vae, z, tile=8, overlap=-2)
    with pytest.raises(ValueError, match="must be an int"):
        tiled_decode(vae, z, tile=8.0, overlap=2)
    with pytest.raises(ValueError, match="multiple of the VAE's downscale factor 2"):
        tiled_encode(vae, image, tile=15, overlap=4)
    with pytest.raises(ValueError, match="positive multiples of 2, got 31x32"):
        tiled_encode(vae, torch.rand(1, 3, 31, 32), tile=16, overlap=4)
    with pytest.raises(ValueError, match=r"shape \(B, 4, H, W\), got 3 dimensions"):
        tiled_decode(vae, z[0], tile=8, overlap=2)
    with pytest.raises(ValueError, match="must have 3 channels"):
        tiled_encode(vae, torch.rand(1, 4, 32, 32), tile=16, overlap=4)
    with pytest.raises(ValueError, match="must have 4 channels"):
        tiled_decode(vae, torch.randn(1, 3, 16, 16), tile=8, overlap=2)
    with pytest.raises(TypeError, match="floating-point"):
        tiled_decode(vae, torch.zeros(1, 4, 16, 16, dtype=torch.int64), tile=8, overlap=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiled_decode(vae, [[1.0]], tile=8, overlap=2)
