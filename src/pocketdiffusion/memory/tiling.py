"""Tiled VAE decode and encode with blended overlaps (DESIGN.md, Memory).

At 1024x1024 the SD decoder's last level holds (B, 128, 1024, 1024) fp32 activations, 512 MiB
per image, plus the intermediates of each ResnetBlock: the largest allocation of a whole
generation. Here the latent is cut into overlapping tiles, each tile is decoded ALONE (so the
peak activation is one tile's, whatever the image size) and the decoded tiles are summed into
the output with weights that ramp linearly across each overlap. Only the 3-channel output and
one tile's activations are ever alive.

Weights: along each axis a tile's weight is 1 in its middle and ramps linearly across the
overlap with each neighbour (complementary ramps, so two overlapping tiles sum to 1 there); a
tile at the image border gets no ramp on that side. The weights are normalised by their sum, so
they sum to 1 everywhere even where three tiles meet (small strides, the shifted last tile).
The 2D weight of a tile is the outer product of its row and column weights: per-axis sums of 1
make the 2D sum 1.

Tiles are `tile` wide and `tile - overlap` apart; the last row/column is shifted back to end
exactly at the border (it then overlaps its neighbour by more than `overlap`, and its ramp spans
that whole overlap) instead of padding the input.

The result is not bit-identical to the untiled one: the decoder's GroupNorm statistics and its
mid-block attention are computed over the whole image, and a tile sees only itself. diffusers'
`enable_vae_tiling` makes the same trade-off (its tiles are also decoded independently:
https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py,
`tiled_decode`, whose `blend_v`/`blend_h` blend one side of each overlap; here every overlap is
blended symmetrically and the tiles are accumulated as they come rather than all kept).
tests/test_tiling.py measures the difference (PSNR against the untiled decode) and checks that
the tile borders show no seam.

Encoding tiles the image the same way and blends the posterior's mean and log-variance; a
sample, if asked for, is drawn once over the whole blended posterior, exactly as
`AutoencoderKL.encode_latents` draws it, so a one-tile encode equals it bit for bit.
"""
from __future__ import annotations

from numbers import Integral
from typing import Callable, Sequence

import torch

from ..models.vae import AutoencoderKL, sample_posterior

Span = tuple[int, int]  # [start, stop) along one axis


def should_tile(pixels: int, tile_above: int | None) -> bool:
    """Whether an image of `pixels` pixels (height * width) goes through the tiled VAE under a
    plan whose `vae_tile_above` is `tile_above` (None: never tile)."""
    if not _is_int(pixels) or pixels < 0:
        raise ValueError(f"pixels must be a non-negative int (height * width), got {pixels!r}")
    if tile_above is None:
        return False
    if not _is_int(tile_above) or tile_above < 0:
        raise ValueError(f"tile_above must be a non-negative int or None, got {tile_above!r}")
    return pixels > tile_above


def tile_spans(size: int, tile: int, overlap: int) -> list[Span]:
    """The [start, stop) spans of the tiles along an axis of `size`: `tile` long, starting every
    `tile - overlap`, the last one shifted to end at `size`. One span when `size <= tile`."""
    _check_tile_overlap(tile, overlap, multiple=1, unit="positions along the axis")
    if not _is_int(size) or size <= 0:
        raise ValueError(f"the axis to tile must have a positive int size, got {size!r}")
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    # Every regular tile ends strictly inside the axis; the border tile is added after.
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return [(start, start + tile) for start in starts]


def blend_weights(spans: Sequence[Span], size: int) -> list[torch.Tensor]:
    """Per-span 1D float64 weights along an axis of `size` (same units as the spans): linear
    ramps across the overlap with each neighbour, none at the axis borders, normalised so that
    the weights of all spans sum to 1 at every position. (float64 so that they are exact to the
    accumulation dtype they are cast to, float64 included.)"""
    if not spans or spans[0][0] != 0 or spans[-1][1] != size:
        raise ValueError(f"tile spans {list(spans)} must cover the whole axis [0, {size})")
    raw: list[torch.Tensor] = []
    for index, (start, stop) in enumerate(spans):
        # Pixel centres: position p of the span sits at p + 0.5, so a ramp over L pixels runs
        # (0.5/L, 1.5/L, ..., (L-0.5)/L) and the two complementary ramps sum to exactly 1.
        centres = torch.arange(stop - start, dtype=torch.float64) + 0.5
        weight = torch.ones(stop - start, dtype=torch.float64)
        if index > 0:
            left_overlap = spans[index - 1][1] - start
            if left_overlap > 0:
                weight = torch.minimum(weight, centres / left_overlap)
        if index + 1 < len(spans):
            right_overlap = stop - spans[index + 1][0]
            if right_overlap > 0:
                weight = torch.minimum(weight, (stop - start - centres) / right_overlap)
        raw.append(weight)
    total = torch.zeros(size, dtype=torch.float64)
    for (start, stop), weight in zip(spans, raw):
        total[start:stop] += weight
    if bool((total <= 0).any()):
        raise ValueError(f"tile spans {list(spans)} leave part of the axis [0, {size}) uncovered")
    return [weight / total[start:stop] for (start, stop), weight in zip(spans, raw)]


def tiled_decode(vae, z: torch.Tensor, *, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """`vae.decode(z)` in latent tiles of side `tile` overlapping by `overlap` (latent pixels),
    blended with linear ramps. z (B, C, h, w) -> image (B, 3, h*f, w*f), f = `vae.downscale`.
    A latent that fits in one tile is decoded directly (identical to `vae.decode`)."""
    _check_tile_overlap(tile, overlap, multiple=1, unit="latent pixels")
    _check_tensor(z, "latents", vae.latent_channels, multiple=1)
    height, width = z.shape[-2:]
    if height <= tile and width <= tile:
        return vae.decode(z)
    f = vae.downscale
    (image,) = _blend_tiles(z, tile_spans(height, tile, overlap), tile_spans(width, tile, overlap),
                            lambda latents: (vae.decode(latents),), scale=lambda n: n * f)
    return image


def tiled_encode_moments(vae, x: torch.Tensor, *, tile: int = 512,
                         overlap: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(x)` in image tiles of side `tile` overlapping by `overlap` (pixels, multiples
    of `vae.downscale`): the posterior's (mean, logvar), each (B, C, H/f, W/f), blended with
    linear ramps across the overlaps."""
    f = vae.downscale
    _check_tile_overlap(tile, overlap, multiple=f, unit="pixels")
    _check_tensor(x, "image", vae.config.in_channels, multiple=f)
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return vae.encode(x)
    mean, logvar = _blend_tiles(x, tile_spans(height, tile, overlap), tile_spans(width, tile, overlap),
                                vae.encode, scale=lambda n: n // f)
    return mean, logvar


def tiled_encode(vae, x: torch.Tensor, *, tile: int = 512, overlap: int = 128,
                 generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """`vae.encode_latents(x, generator, sample)` in image tiles (see `tiled_encode_moments`):
    unscaled latents, the blended mean, or with `sample=True` one draw over the whole blended
    posterior. An image that fits in one tile is encoded directly (identical to
    `vae.encode_latents`)."""
    f = vae.downscale
    _check_tile_overlap(tile, overlap, multiple=f, unit="pixels")
    _check_tensor(x, "image", vae.config.in_channels, multiple=f)
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return vae.encode_latents(x, generator=generator, sample=sample)
    mean, logvar = tiled_encode_moments(vae, x, tile=tile, overlap=overlap)
    # one draw over the whole blended posterior, as AutoencoderKL.encode_latents draws it
    return sample_posterior(mean, logvar, generator) if sample else mean


def _blend_tiles(source: torch.Tensor, rows: list[Span], cols: list[Span],
                 run_tile: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 scale: Callable[[int], int]) -> tuple[torch.Tensor, ...]:
    """Run `run_tile` on each (row, col) tile of `source` (B, C, H, W) and sum its outputs,
    weighted, into full-size outputs. `scale` maps a source coordinate to an output coordinate
    (x f for the decoder, / f for the encoder)."""
    height, width = source.shape[-2:]
    out_rows = [(scale(a), scale(b)) for a, b in rows]
    out_cols = [(scale(a), scale(b)) for a, b in cols]
    row_weights = blend_weights(out_rows, scale(height))
    col_weights = blend_weights(out_cols, scale(width))
    sums: list[torch.Tensor] | None = None
    result_dtypes: list[torch.dtype] = []
    for (y0, y1), (oy0, oy1), weight_y in zip(rows, out_rows, row_weights):
        for (x0, x1), (ox0, ox1), weight_x in zip(cols, out_cols, col_weights):
            outputs = run_tile(source[:, :, y0:y1, x0:x1])
            if sums is None:
                # Accumulate in at least fp32: sums of fp16 tiles would round at every add.
                result_dtypes = [t.dtype for t in outputs]
                sums = [t.new_zeros((t.shape[0], t.shape[1], scale(height), scale(width)),
                                    dtype=torch.promote_types(t.dtype, torch.float32)) for t in outputs]
            weight = (weight_y[:, None] * weight_x[None, :]).to(sums[0].device)  # (tile_h, tile_w)
            for total, tile_out in zip(sums, outputs):
                total[:, :, oy0:oy1, ox0:ox1].addcmul_(tile_out.to(total.dtype), weight.to(total.dtype))
            del outputs  # free this tile's outputs before the next tile runs
    return tuple(total.to(dtype) for total, dtype in zip(sums, result_dtypes))


def _is_int(value: object) -> bool:
    """Python and numpy integers, not bools (a stray True is not a tile size)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_tile_overlap(tile: object, overlap: object, *, multiple: int, unit: str) -> None:
    for name, value in (("tile", tile), ("overlap", overlap)):
        if not _is_int(value):
            raise ValueError(f"VAE {name} must be an int ({unit}), got {value!r}")
        if value % multiple:
            raise ValueError(f"VAE {name}={value} must be a multiple of the VAE's downscale factor "
                             f"{multiple} ({unit})")
    if tile <= 0 or overlap < 0:
        raise ValueError(f"VAE tile must be positive and overlap non-negative, got tile={tile}, "
                         f"overlap={overlap} ({unit})")
    if tile <= overlap:
        raise ValueError(f"VAE tile ({tile}) must be larger than the overlap ({overlap}) ({unit}): "
                         f"tiles advance by tile - overlap")


def _check_tensor(t: object, what: str, channels: int, multiple: int) -> None:
    """The VAE's own input check (same messages), named as the tiled call's input."""
    AutoencoderKL._check_input(t, f"(tiled) {what}", channels, multiple)
