"""Tiled denoising for arbitrary image sizes: ``tiled(model_fn, tile, overlap)`` is again a denoiser.

At every call the input is cut into overlapping ``tile`` x ``tile`` windows (the last row / column flush
with the border), the model runs per window, and its outputs are blended with Gaussian weights
(MultiDiffusion / StableSR "aggregation sampling" style): spatial outputs (eps, var_values, spatial extras)
per pixel; global extras such as BlindDiff's kernel (B, 441) are averaged with each tile's share of the
image (sum over its pixels of its normalised weight). Everything is differentiable, so a guidance loss on
the whole image gets its gradient through every tile.

Models conditioned on another image (BlindDiff's LR) need the matching crop: with ``pass_box=True`` the
wrapped function is called as ``model_fn(x_tile, t, box=Box(...))`` in x_t pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from blindsr.diffusion.samplers import ModelFn, ModelOutput


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "reflect") -> Tensor:
    """Pad (bottom, right) so both sides are multiples of ``multiple``.

    ``mode="reflect"`` (BlindDiff; replicate where the image is too small to reflect) or ``"zeros"``
    (DiffBIR's official ``pad_to_multiples_of``).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    if mode == "zeros":
        return F.pad(x, (0, pw, 0, ph))
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts every ``stride`` pixels, the last one flush with the border."""
    if tile >= size:
        return [0]
    return sorted(set(range(0, size - tile, stride)) | {size - tile})


def tile_boxes(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Box]:
    """Windows covering (height, width); sizes, strides and starts are multiples of ``align``."""
    if height % align or width % align:
        raise ValueError(f"image size {height}x{width} must be a multiple of {align} for tiling")
    tile = max(align, tile // align * align)
    th, tw = min(tile, height), min(tile, width)
    stride = max(align, (tile - overlap) // align * align)
    return [Box(y, x, th, tw) for y in tile_starts(height, th, stride) for x in tile_starts(width, tw, stride)]


def gaussian_weights(height: int, width: int, sigma: float = 0.25, device=None) -> Tensor:
    """(height, width) separable Gaussian centred on the window; ``sigma`` is a fraction of its size."""
    def g(n: int) -> Tensor:
        u = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-(u**2) / (2 * (sigma * n) ** 2))
    return g(height)[:, None] * g(width)[None, :]


def tiled(model_fn: ModelFn, tile: int, overlap: int = 32, *, align: int = 8, sigma: float = 0.25,
          pass_box: bool = False, checkpoint: bool = True) -> ModelFn:
    """Wrap ``model_fn`` so it runs on overlapping tiles and blends their outputs (same denoiser contract).

    ``checkpoint``: when autograd is on (guidance), each tile's activations are dropped after its forward
    pass and recomputed during the backward pass (``torch.utils.checkpoint``), so the memory of a
    whole-image gradient is about one tile's, at the cost of a second forward per tile."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile (got tile={tile}, overlap={overlap})")

    def plain(x: Tensor, t: Tensor, box: Box) -> ModelOutput:
        return model_fn(x, t, box=box) if pass_box else model_fn(x, t)

    def call(x: Tensor, t: Tensor, box: Box) -> ModelOutput:
        if checkpoint and torch.is_grad_enabled() and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(plain, x, t, box, use_reentrant=False)
        return plain(x, t, box)

    def fn(x: Tensor, t: Tensor) -> ModelOutput:
        H, W = x.shape[-2:]
        boxes = tile_boxes(H, W, tile, overlap, align)
        if len(boxes) == 1:
            return call(x, t, boxes[0])
        mask = gaussian_weights(boxes[0].height, boxes[0].width, sigma, x.device)
        wsum = torch.zeros(H, W, device=x.device, dtype=torch.float32)
        for b in boxes:
            wsum[b.slices] += mask
        acc: dict[str, Tensor] = {}
        spatial_keys: set[str] = set()

        def add(key: str, value: Tensor, box: Box, share: float, spatial: bool) -> None:
            if not spatial:  # a global quantity, weighted by the tile's share of the image
                acc[key] = acc[key] + share * value if key in acc else share * value
                return
            if key not in acc:
                acc[key] = value.new_zeros(*value.shape[:-2], H, W)
                spatial_keys.add(key)
            acc[key][..., box.slices[0], box.slices[1]] += value * mask.to(value.dtype)

        for b in boxes:
            out = call(x[..., b.slices[0], b.slices[1]], t, b)
            share = float((mask / wsum[b.slices]).sum()) / (H * W)
            add("eps", out.eps, b, share, True)
            if out.var_values is not None:
                add("var_values", out.var_values, b, share, True)
            for k, v in out.extras.items():
                add("extra:" + k, v, b, share, v.ndim >= 3 and tuple(v.shape[-2:]) == (b.height, b.width))

        def finish(key: str) -> Tensor:
            v = acc[key]
            return v / wsum.to(v.dtype) if key in spatial_keys else v

        extras = {k[6:]: finish(k) for k in acc if k.startswith("extra:")}
        return ModelOutput(eps=finish("eps"), var_values=finish("var_values") if "var_values" in acc else None,
                           extras=extras)

    return fn
