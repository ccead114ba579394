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

from torch import Tensor

from blindsr.errors import BlindSRError
from blindsr.ops.tiling import tiled_map


@dataclass
class VAETiling:
    """Tile sizes in *image pixels* (multiples of the VAE factor 8); 0 disables tiling for that direction."""

    encoder_tile: int = 1024  # official --vae_encoder_tile_size: 256 (off unless asked)
    decoder_tile: int = 1024  # official --vae_decoder_tile_size: 256 (off unless asked)
    overlap: int = 64  # pixels shared by neighbouring core windows (blended linearly)
    encoder_margin: int = 32  # context pixels around each encoder window (cropped away)
    decoder_margin: int = 64  # context pixels (8 latents) around each decoder window


def _latent_units(pixels: int, factor: int, what: str) -> int:
    if pixels % factor:
        raise BlindSRError(f"{what} ({pixels}) must be a multiple of the VAE factor {factor}")
    return pixels // factor


def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, margin: int, factor: int, *,
           in_factor: int, out_factor: int, what: str) -> Tensor:
    """The shared tiler on the latent grid with ramp windows (sizes given in pixels)."""
    tile = _latent_units(tile, factor, f"VAE {what} tile")
    return tiled_map(fn, x, tile=tile, overlap=min(_latent_units(overlap, factor, "VAE tile overlap"), tile - 1),
                     margin=_latent_units(margin, factor, f"VAE {what} margin"), window="ramp",
                     in_factor=in_factor, out_factor=out_factor)


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
    return _tiled(encode, img, tile, overlap, margin, factor, in_factor=factor, out_factor=1, what="encoder")


def tiled_decode(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int = 64, margin: int = 64,
                 factor: int = 8) -> Tensor:
    """``decode`` (latent -> image, ``factor`` x larger) on windows of ``tile`` *output* pixels."""
    h, w = z.shape[-2:]
    if tile <= 0 or (h * factor <= tile and w * factor <= tile):
        return decode(z)
    return _tiled(decode, z, tile, overlap, margin, factor, in_factor=1, out_factor=factor, what="decoder")
