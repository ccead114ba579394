"""The one tiling module: windows over a grid, blending weights, and accumulate-and-normalise.

Every tiler in blindsr is built from these pieces:

- the denoiser tiler (``blindsr.diffusion.tiling.tiled``: BlindDiff's MCFormer, DiffBIR's ControlNet + UNet,
  every sampling step; Gaussian windows, MultiDiffusion / StableSR "aggregation sampling" style);
- :func:`tiled_map` for image -> image networks: the stage-1 cleaners (Gaussian windows, DiffBIR's official
  weights) and the SD VAE encoder / decoder (``blindsr.models.sd.vae_tiling``: context margins and feathered
  ramps).

Windows (:func:`tile_boxes`) are ``tile`` x ``tile`` boxes every ``tile - overlap`` grid units, the last row /
column flush with the border (:func:`tile_boxes` lists them row- or column-major). Each output window is
weighted (:func:`gaussian_window`, StableSR's :func:`stablesr_window` or :func:`ramp_window`),
summed into a canvas with :class:`Accumulator`, and the canvas divided by the summed weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from blindsr.errors import BlindSRError
from blindsr.ops.progress import Progress, progress_bar


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def scaled(self, f: int) -> Box:
        return Box(self.top * f, self.left * f, self.height * f, self.width * f)

    def grown(self, margin: int, height: int, width: int) -> Box:
        """The box with ``margin`` more units on every side, clipped to (height, width)."""
        t, l = max(self.top - margin, 0), max(self.left - margin, 0)
        b, r = min(self.top + self.height + margin, height), min(self.left + self.width + margin, width)
        return Box(t, l, b - t, r - l)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts every ``stride`` units, the last one flush with the border."""
    if tile >= size:
        return [0]
    return sorted(set(range(0, size - tile, stride)) | {size - tile})


def tile_boxes(height: int, width: int, tile: int, overlap: int, align: int = 1, order: str = "yx") -> list[Box]:
    """Windows covering (height, width); sizes, strides and starts are multiples of ``align``.

    ``order``: ``yx`` (row by row) or ``xy`` (column by column: StableSR's canvas loop, whose outer loop runs
    over x offsets). The placement is the same; only the order of the windows (and so of the sums) changes."""
    if height % align or width % align:
        raise ValueError(f"image size {height}x{width} must be a multiple of {align} for tiling")
    if order not in ("yx", "xy"):
        raise ValueError(f"tile order must be 'yx' or 'xy', not {order!r}")
    tile = max(align, tile // align * align)
    th, tw = min(tile, height), min(tile, width)
    stride = max(align, (tile - overlap) // align * align)
    ys, xs = tile_starts(height, th, stride), tile_starts(width, tw, stride)
    if order == "xy":
        return [Box(y, x, th, tw) for x in xs for y in ys]
    return [Box(y, x, th, tw) for y in ys for x in xs]


def gaussian_window(height: int, width: int, sigma: float = 0.25, device=None) -> Tensor:
    """(height, width) separable Gaussian centred on the window; ``sigma`` is a fraction of its size
    (0.1 = DiffBIR's official tile weights, variance 0.01 of the tile size)."""
    def g(n: int) -> Tensor:
        u = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-(u**2) / (2 * (sigma * n) ** 2))
    return g(height)[:, None] * g(width)[None, :]


def stablesr_window(height: int, width: int, var: float = 0.01, device=None,
                    dtype: torch.dtype = torch.float64) -> Tensor:
    """StableSR's official tile weights (``_gaussian_weights``, README §4.6), float64 as there (``dtype``:
    float32 where a device has no float64, e.g. MPS): ``outer(p_y, p_x)`` with
    ``p(i) = exp(-(i - m)^2 / (n^2 * 2 var)) / sqrt(2 pi var)``, the centre ``m = (n - 1) / 2`` along x but
    ``n / 2`` along y (the official asymmetry, kept)."""
    def p(n: int, m: float) -> Tensor:
        i = torch.arange(n, device=device, dtype=dtype)
        return torch.exp(-((i - m) ** 2) / (n * n * 2 * var)) / math.sqrt(2 * math.pi * var)
    return p(height, height / 2)[:, None] * p(width, (width - 1) / 2)[None, :]


def ramp_window(box: Box, grid: tuple[int, int], ramp: int, device=None) -> Tensor:
    """(box.height, box.width) feathered weights: 1 inside, linear ramps of ``ramp`` cells on the sides that
    border another window (never on the grid's border)."""
    def axis(start: int, length: int, size: int) -> Tensor:
        w = torch.ones(length, device=device)
        r = min(ramp, length)
        if r > 0:
            steps = torch.arange(1, r + 1, device=device, dtype=torch.float32) / (r + 1)
            if start > 0:
                w[:r] = torch.minimum(w[:r], steps)
            if start + length < size:
                w[length - r:] = torch.minimum(w[length - r:], steps.flip(0))
        return w
    return axis(box.top, box.height, grid[0])[:, None] * axis(box.left, box.width, grid[1])[None, :]


class Accumulator:
    """A weighted canvas: ``add(value, box, weight)`` sums ``value * weight`` into ``box``; ``result()``
    divides by the summed weights. Sums are kept in fp32 (or the value's dtype when ``keep_dtype``, so that a
    differentiable sum stays in the graph's dtype)."""

    def __init__(self, height: int, width: int, keep_dtype: bool = False):
        self.size, self.keep_dtype = (height, width), keep_dtype
        self.sum: Tensor | None = None
        self.weight: Tensor | None = None

    def add(self, value: Tensor, box: Box, weight: Tensor) -> None:
        if self.sum is None:
            dtype = value.dtype if self.keep_dtype else torch.float32
            self.sum = value.new_zeros(*value.shape[:-2], *self.size, dtype=dtype)
            self.weight = torch.zeros(self.size, device=value.device, dtype=torch.float32)
        self.sum[..., box.slices[0], box.slices[1]] += value.to(self.sum.dtype) * weight.to(self.sum.dtype)
        self.weight[box.slices] += weight

    def result(self, dtype: torch.dtype | None = None) -> Tensor:
        out = self.sum / self.weight.to(self.sum.dtype)
        return out if dtype is None else out.to(dtype)


def tiled_map(fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, margin: int = 0,
              window: str = "gaussian", sigma: float = 0.1, in_factor: int = 1, out_factor: int | None = None,
              progress: Progress = False) -> Tensor:
    """Apply an image -> image network ``fn`` window by window and blend the outputs.

    Windows live on a grid of ``in_factor`` input pixels per unit (1 for a cleaner, 8 for the SD VAE encoder
    working on latent units); ``tile``, ``overlap`` and ``margin`` are in grid units. Each window is grown by
    ``margin`` units of context (clipped at the border), run alone, and cropped back. The output has
    ``out_factor`` pixels per grid unit (None: read from the first window, e.g. 4 for a x4 RRDBNet).
    ``window``: ``gaussian`` (``sigma`` x window size) or ``ramp`` (linear over the overlap, interior sides).
    An input that fits one window is processed in one call.
    """
    if overlap < 0 or overlap >= tile:
        raise BlindSRError(f"tile overlap must be in [0, tile), got tile={tile} overlap={overlap}")
    if window not in ("gaussian", "ramp"):
        raise BlindSRError(f"tile blending must be 'gaussian' or 'ramp', not {window!r}")
    H, W = x.shape[-2] // in_factor, x.shape[-1] // in_factor
    if (H * in_factor, W * in_factor) != tuple(x.shape[-2:]):
        raise BlindSRError(f"tiling: input {tuple(x.shape[-2:])} is not a multiple of {in_factor}")
    boxes = tile_boxes(H, W, tile, overlap)
    if len(boxes) == 1:
        return fn(x)
    bar = progress_bar(len(boxes), progress, "tiles")
    acc = None
    for b in boxes:
        g = b.grown(margin, H, W)
        y = fn(x[..., g.top * in_factor:(g.top + g.height) * in_factor,
                 g.left * in_factor:(g.left + g.width) * in_factor])
        if acc is None:
            f = out_factor or y.shape[-2] // g.height
            if y.shape[-2] != f * g.height or y.shape[-1] != f * g.width or f < 1:
                raise BlindSRError(f"tiling needs an integer output scale; got {tuple(y.shape[-2:])} "
                                   f"from a {g.height}x{g.width} window")
            acc, dtype = Accumulator(H * f, W * f), y.dtype
        core = y[..., (b.top - g.top) * f:(b.top - g.top + b.height) * f,
                 (b.left - g.left) * f:(b.left - g.left + b.width) * f]
        w = gaussian_window(b.height * f, b.width * f, sigma, y.device) if window == "gaussian" else \
            ramp_window(b.scaled(f), (H * f, W * f), overlap * f, y.device)
        acc.add(core, b.scaled(f), w)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return acc.result(dtype)


def choose_tile(height: int, width: int, budget: int, per_tile_pixel: float, per_image_pixel: float, *,
                align: int = 8, overlap: int = 0, whole_per_pixel: float | None = None) -> int | None:
    """The tile (a multiple of ``align``) whose work fits ``budget`` bytes, or None when the whole image fits
    untiled. Memory model: ``per_tile_pixel`` bytes for every pixel of the window being processed
    (activations) plus ``per_image_pixel`` bytes for every pixel of the whole image (the sample, its blended
    outputs, the gradient canvas); ``whole_per_pixel`` (default: their sum) when the image is one window.
    Of the tiles that fit, the smallest one with as few windows as the largest is returned (less overlap to
    compute twice). A budget too small for the smallest useful tile is a one-line error."""
    pixels = height * width
    if pixels * (whole_per_pixel or per_tile_pixel + per_image_pixel) <= budget:
        return None
    room = budget - pixels * per_image_pixel
    smallest = (overlap // align + 1) * align * 2  # at least twice the overlap, so tiles make progress
    side = int((max(room, 0) / per_tile_pixel) ** 0.5) // align * align
    if side < smallest:
        need = (pixels * per_image_pixel + smallest**2 * per_tile_pixel) / 1024**3
        raise BlindSRError(f"a {width}x{height} output needs about {need:.1f} GiB for sampling even with "
                           f"{smallest}-pixel tiles, {budget / 1024**3:.1f} GiB are left of the budget; "
                           "raise --max-memory")
    n = len(tile_boxes(height, width, side, overlap, align))
    while side - align >= smallest and len(tile_boxes(height, width, side - align, overlap, align)) <= n:
        side -= align
    return side
