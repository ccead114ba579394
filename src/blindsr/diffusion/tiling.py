"""Tiled denoising for arbitrary image sizes: ``tiled(model_fn, tile, overlap)`` is again a denoiser.

At every call the input is cut into overlapping ``tile`` x ``tile`` windows (``blindsr.ops.tiling``), the model
runs per window, and its outputs are blended with Gaussian weights (MultiDiffusion / StableSR "aggregation
sampling" style): spatial outputs (the prediction, var_values, spatial extras) per pixel; global extras such as
BlindDiff's kernel (B, 441) are averaged with each tile's share of the image (sum over its pixels of its
normalised weight). The blend is differentiable, so a guidance loss on the whole image gets its exact gradient
through every tile.

Gradients in bounded memory (``checkpoint=True``, the default): when the input requires a gradient, the tiles
run without autograd and nothing of them is kept; the backward pass then visits the tiles again, one at a
time, recomputing each tile's forward with autograd and pulling back its slice of the incoming gradient
(weighted by the tile's blend weights) -- a vector-Jacobian product per tile, summed into the input's
gradient. That is exactly the gradient of the blended output (the same as keeping every tile's graph), with
the memory of one tile's graph and a few image-sized tensors. Cost: a second forward per tile.

Models conditioned on another image (BlindDiff's LR) need the matching crop: with ``pass_box=True`` the
wrapped function is called as ``model_fn(x_tile, t, box=Box(...))`` in x_t pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from blindsr.diffusion.samplers import ModelFn, ModelOutput
from blindsr.ops.tiling import Box, gaussian_window, stablesr_window, tile_boxes


@dataclass
class _Layout:
    """The tiles of one call and their blend weights: per-pixel ``mask / wsum`` and each tile's share."""

    boxes: list[Box]
    mask: Tensor  # (tile_h, tile_w) Gaussian window
    wsum: Tensor  # (H, W) sum of the windows
    shares: list[float]  # each tile's share of the image (global extras)

    def weight(self, box: Box) -> Tensor:
        return self.mask / self.wsum[box.slices]

    @staticmethod
    def spatial(value: Tensor, box: Box) -> bool:
        return value.ndim >= 3 and tuple(value.shape[-2:]) == (box.height, box.width)


def _flatten(out: ModelOutput) -> tuple[list[str], list[Tensor]]:
    keys = ["pred"] + (["var_values"] if out.var_values is not None else []) + ["extra:" + k for k in out.extras]
    vals = [out.pred] + ([out.var_values] if out.var_values is not None else []) + list(out.extras.values())
    return keys, vals


def _blend(run: Callable[[Tensor, Box], ModelOutput], x: Tensor, lay: _Layout,
           on_tile: Callable[[], object] | None) -> tuple[str, list[str], list[Tensor]]:
    """Run every tile and blend: (kind, keys, blended values)."""
    H, W = x.shape[-2:]
    sums: list[Tensor] | None = None
    keys: list[str] = []
    kind = "eps"
    for box, share in zip(lay.boxes, lay.shares, strict=True):
        out = run(x[..., box.slices[0], box.slices[1]], box)
        if on_tile is not None:
            on_tile()
        kind = out.kind
        keys, vals = _flatten(out)
        if sums is None:
            sums = [v.new_zeros(*v.shape[:-2], H, W) if lay.spatial(v, box) else torch.zeros_like(v) for v in vals]
        weight = lay.weight(box)
        for acc, v in zip(sums, vals, strict=True):
            if lay.spatial(v, box):
                acc[..., box.slices[0], box.slices[1]] += v * weight.to(v.dtype)
            else:
                acc += share * v
    return kind, keys, sums


class _TiledVJP(torch.autograd.Function):
    """Blended tile outputs whose backward recomputes one tile at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, run, lay: _Layout, on_tile, info: dict) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # outputs the loss does not use (var_values) get None, not zeros
        kind, keys, vals = _blend(run, x, lay, on_tile)
        info.update(kind=kind, keys=keys)
        ctx.run, ctx.lay = run, lay
        ctx.save_for_backward(x)
        return tuple(vals)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        (x,) = ctx.saved_tensors
        lay = ctx.lay
        grad_x = torch.zeros_like(x)
        for box, share in zip(lay.boxes, lay.shares, strict=True):
            xi = x[..., box.slices[0], box.slices[1]].detach().requires_grad_(True)
            with torch.enable_grad():
                _, vals = _flatten(ctx.run(xi, box))
            outs, gs, weight = [], [], lay.weight(box)
            for v, g in zip(vals, grads, strict=True):
                if g is None or not v.requires_grad:
                    continue
                outs.append(v)
                gs.append(g[..., box.slices[0], box.slices[1]] * weight.to(g.dtype) if lay.spatial(v, box)
                          else share * g)
            if outs:
                (gi,) = torch.autograd.grad(outs, xi, gs, allow_unused=True)
                if gi is not None:
                    grad_x[..., box.slices[0], box.slices[1]] += gi
        return grad_x, None, None, None, None


def tiled(model_fn: ModelFn, tile: int, overlap: int = 32, *, align: int = 8, sigma: float = 0.25,
          pass_box: bool = False, checkpoint: bool = True, on_tile: Callable[[], object] | None = None,
          window: str = "gaussian", order: str = "yx") -> ModelFn:
    """Wrap ``model_fn`` so it runs on overlapping tiles and blends their outputs (same denoiser contract).

    ``checkpoint``: when the input requires a gradient (guidance), keep no tile's graph and recompute the tiles
    in the backward pass (exact gradient, one tile's memory; see the module docstring). ``False`` keeps every
    tile's graph (no second forward, the memory of the whole image). An input that fits one tile is one plain
    call either way. ``on_tile``: called after every tile's forward pass (progress bars).
    ``window``: ``gaussian`` (``sigma`` x the tile) or ``stablesr`` (StableSR's official float64 weights,
    ``ops.tiling.stablesr_window``; ``sigma`` unused); ``order``: the tile order of ``ops.tiling.tile_boxes``
    (``xy`` = StableSR's x-major canvas loop)."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile (got tile={tile}, overlap={overlap})")
    if window not in ("gaussian", "stablesr"):
        raise ValueError(f"tile window must be 'gaussian' or 'stablesr', not {window!r}")

    def fn(x: Tensor, t: Tensor) -> ModelOutput:
        H, W = x.shape[-2:]
        boxes = tile_boxes(H, W, tile, overlap, align, order)

        def run(xi: Tensor, box: Box) -> ModelOutput:
            return model_fn(xi, t, box=box) if pass_box else model_fn(xi, t)

        if len(boxes) == 1:
            out = run(x, boxes[0])
            if on_tile is not None:
                on_tile()
            return out
        h, w = boxes[0].height, boxes[0].width
        if window == "stablesr":  # float64 as the official weights, where the device has it
            mask = stablesr_window(h, w, device=x.device,
                                   dtype=torch.float32 if x.device.type == "mps" else torch.float64)
        else:
            mask = gaussian_window(h, w, sigma, x.device)
        wsum = torch.zeros(H, W, device=x.device, dtype=torch.float32)
        for b in boxes:
            wsum[b.slices] += mask
        shares = [float((mask / wsum[b.slices]).sum()) / (H * W) for b in boxes]
        lay = _Layout(boxes, mask, wsum, shares)
        if checkpoint and torch.is_grad_enabled() and x.requires_grad:
            info: dict = {}
            vals = _TiledVJP.apply(x, run, lay, on_tile, info)
            kind, keys = info["kind"], info["keys"]
        else:
            kind, keys, vals = _blend(run, x, lay, on_tile)
        merged = dict(zip(keys, vals, strict=True))
        extras = {k[6:]: v for k, v in merged.items() if k.startswith("extra:")}
        return ModelOutput(pred=merged["pred"], kind=kind, var_values=merged.get("var_values"), extras=extras)

    return fn
