"""Tiled denoising for arbitrary image sizes: ``tiled(model_fn, tile, overlap)`` is again a denoiser.

At every call the input is cut into overlapping ``tile`` x ``tile`` windows (``blindsr.ops.tiling``), the model
runs per window, and its outputs are blended with Gaussian weights (MultiDiffusion / StableSR "aggregation
sampling" style): spatial outputs (the prediction, var_values, spatial extras) per pixel; global extras such as
BlindDiff's kernel (B, 441) are averaged with each tile's share of the image (sum over its pixels of its
normalised weight). Everything is differentiable, so a guidance loss on the whole image gets its gradient
through every tile.

Models conditioned on another image (BlindDiff's LR) need the matching crop: with ``pass_box=True`` the
wrapped function is called as ``model_fn(x_tile, t, box=Box(...))`` in x_t pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor

from blindsr.diffusion.samplers import ModelFn, ModelOutput
from blindsr.ops.tiling import Accumulator, Box, gaussian_window, tile_boxes


def tiled(model_fn: ModelFn, tile: int, overlap: int = 32, *, align: int = 8, sigma: float = 0.25,
          pass_box: bool = False, checkpoint: bool = True, on_tile: Callable[[], object] | None = None) -> ModelFn:
    """Wrap ``model_fn`` so it runs on overlapping tiles and blends their outputs (same denoiser contract).

    ``checkpoint``: when autograd is on (guidance), each tile's activations are dropped after its forward
    pass and recomputed during the backward pass (``torch.utils.checkpoint``), so the memory of a
    whole-image gradient is about one tile's, at the cost of a second forward per tile.
    ``on_tile``: called after every tile's forward pass (progress bars)."""
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
            out = call(x, t, boxes[0])
            if on_tile is not None:
                on_tile()
            return out
        mask = gaussian_window(boxes[0].height, boxes[0].width, sigma, x.device)
        wsum = torch.zeros(H, W, device=x.device, dtype=torch.float32)
        for b in boxes:
            wsum[b.slices] += mask
        spatial: dict[str, Accumulator] = {}
        global_: dict[str, Tensor] = {}
        kind = "eps"

        def add(key: str, value: Tensor, box: Box, share: float) -> None:
            if value.ndim >= 3 and tuple(value.shape[-2:]) == (box.height, box.width):
                spatial.setdefault(key, Accumulator(H, W, keep_dtype=True)).add(value, box, mask)
            else:  # a global quantity, weighted by the tile's share of the image
                global_[key] = global_[key] + share * value if key in global_ else share * value

        for b in boxes:
            out = call(x[..., b.slices[0], b.slices[1]], t, b)
            if on_tile is not None:
                on_tile()
            kind = out.kind
            share = float((mask / wsum[b.slices]).sum()) / (H * W)
            add("pred", out.pred, b, share)
            if out.var_values is not None:
                add("var_values", out.var_values, b, share)
            for k, v in out.extras.items():
                add("extra:" + k, v, b, share)
        merged = {**{k: a.result() for k, a in spatial.items()}, **global_}
        extras = {k[6:]: v for k, v in merged.items() if k.startswith("extra:")}
        return ModelOutput(pred=merged["pred"], kind=kind, var_values=merged.get("var_values"), extras=extras)

    return fn
