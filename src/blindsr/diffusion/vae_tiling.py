"""Tiled VAE encoding and decoding for large images (our own scheme).

Both directions are tiled on the *latent* grid (1 latent pixel = ``factor`` image pixels, 8 for SD):

1. the latent grid is cut into ``tile`` x ``tile`` core windows that overlap by ``overlap`` (the last row /
   column flush with the border);
2. each window is grown by a context ``margin`` on every side (clipped at the image border) and the matching
   region of the input (pixels for the encoder, latents for the decoder) goes through the network alone;
3. the output is cropped back to the core window and accumulated with a feathered weight: 1 inside, a linear
   ramp over the ``overlap`` on every side that borders another window (never on the image border);
4. the sum is divided by the summed weights.

The margin hides the border effects of the convolutions (zero padding, downsampling phase); the ramps hide what
is left. GroupNorm statistics and the VAE's mid-block attention are computed per tile, so the result is close
to, not equal to, the untiled one (tests/test_diffbir_pipeline.py measures how close; a purely local network
is reproduced exactly). Larger tiles mean fewer, smaller differences. (We tried synchronising GroupNorm
statistics across tiles with repeated passes and with a low-resolution estimate; neither helped consistently on
our test VAE, so they were dropped.) The functions are differentiable, so restoration guidance can
back-propagate through a tiled decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from blindsr.diffusion.tiling import Box, tile_boxes
from blindsr.errors import BlindSRError


@dataclass
class VAETiling:
    """Tile sizes in *image pixels* (multiples of the VAE factor 8); 0 disables tiling for that direction."""

    encoder_tile: int = 1024  # official --vae_encoder_tile_size: 256 (off unless asked)
    decoder_tile: int = 1024  # official --vae_decoder_tile_size: 256 (off unless asked)
    overlap: int = 64  # pixels shared by neighbouring core windows (blended linearly)
    encoder_margin: int = 32  # context pixels around each encoder window (cropped away)
    decoder_margin: int = 64  # context pixels (8 latents) around each decoder window


def ramp_axis(start: int, length: int, size: int, ramp: int, device=None) -> Tensor:
    """1-D feathered weights of a window: linear ramps of ``ramp`` cells on the sides inside ``[0, size)``."""
    w = torch.ones(length, device=device)
    ramp = min(ramp, length)
    if ramp > 0:
        r = torch.arange(1, ramp + 1, device=device, dtype=torch.float32) / (ramp + 1)
        if start > 0:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if start + length < size:
            w[length - ramp:] = torch.minimum(w[length - ramp:], r.flip(0))
    return w


def ramp_weights(box: Box, grid: tuple[int, int], overlap: int, factor: int = 1, device=None) -> Tensor:
    """(box.height*factor, box.width*factor) feathered weights of one window."""
    def axis(start: int, length: int, size: int) -> Tensor:
        return ramp_axis(start * factor, length * factor, size * factor, overlap * factor, device)
    return axis(box.top, box.height, grid[0])[:, None] * axis(box.left, box.width, grid[1])[None, :]


def tiled_map(fn: Callable[[Tensor], Tensor], x: Tensor, grid: tuple[int, int], *, in_factor: int,
              out_factor: int, tile: int, overlap: int, margin: int) -> Tensor:
    """Apply ``fn`` window by window; ``grid``, ``tile``, ``overlap`` and ``margin`` are in grid units.

    ``x`` covers the grid at ``in_factor`` pixels per grid unit, ``fn``'s output at ``out_factor``.
    """
    H, W = grid
    if tuple(x.shape[-2:]) != (H * in_factor, W * in_factor):
        raise BlindSRError(f"tiled VAE: input {tuple(x.shape[-2:])} does not match the grid {grid} x {in_factor}")
    overlap = min(overlap, tile - 1)
    boxes = tile_boxes(H, W, tile, overlap)
    if len(boxes) == 1:
        return fn(x)
    out = wsum = None
    for b in boxes:
        t0, l0 = max(b.top - margin, 0), max(b.left - margin, 0)
        t1, l1 = min(b.top + b.height + margin, H), min(b.left + b.width + margin, W)
        y = fn(x[..., t0 * in_factor:t1 * in_factor, l0 * in_factor:l1 * in_factor])
        dy, dx = (b.top - t0) * out_factor, (b.left - l0) * out_factor
        core = y[..., dy:dy + b.height * out_factor, dx:dx + b.width * out_factor]
        w = ramp_weights(b, grid, overlap, out_factor, y.device)
        if out is None:
            out = y.new_zeros(*y.shape[:-2], H * out_factor, W * out_factor, dtype=torch.float32)
            wsum = torch.zeros(H * out_factor, W * out_factor, device=y.device)
        ys = slice(b.top * out_factor, (b.top + b.height) * out_factor)
        xs = slice(b.left * out_factor, (b.left + b.width) * out_factor)
        out[..., ys, xs] += core.float() * w
        wsum[ys, xs] += w
    return (out / wsum).to(y.dtype)



def _latent_units(pixels: int, factor: int, what: str) -> int:
    if pixels % factor:
        raise BlindSRError(f"{what} ({pixels}) must be a multiple of the VAE factor {factor}")
    return pixels // factor


def tiled_encode(encode: Callable[[Tensor], Tensor], img: Tensor, tile: int, overlap: int = 64, margin: int = 32,
                 factor: int = 8) -> Tensor:
    """``encode`` (image -> latent, ``factor`` x smaller) on ``tile``-pixel windows; sizes in pixels.
    Untiled when ``tile <= 0`` or the image fits in one tile.
    """
    H, W = img.shape[-2:]
    if H % factor or W % factor:
        raise BlindSRError(f"tiled VAE encoding needs a size divisible by {factor}, got {H}x{W}")
    if tile <= 0 or (H <= tile and W <= tile):
        return encode(img)
    return tiled_map(encode, img, (H // factor, W // factor), in_factor=factor, out_factor=1,
                     tile=_latent_units(tile, factor, "VAE encoder tile"),
                     overlap=_latent_units(overlap, factor, "VAE tile overlap"),
                     margin=_latent_units(margin, factor, "VAE encoder margin"))


def tiled_decode(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int = 64, margin: int = 64,
                 factor: int = 8) -> Tensor:
    """``decode`` (latent -> image, ``factor`` x larger) on windows of ``tile`` *output* pixels."""
    h, w = z.shape[-2:]
    if tile <= 0 or (h * factor <= tile and w * factor <= tile):
        return decode(z)
    return tiled_map(decode, z, (h, w), in_factor=1, out_factor=factor,
                     tile=_latent_units(tile, factor, "VAE decoder tile"),
                     overlap=_latent_units(overlap, factor, "VAE tile overlap"),
                     margin=_latent_units(margin, factor, "VAE decoder margin"))
