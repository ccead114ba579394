"""A trained SR network as a pipeline (``blindsr sr --method srnet --ckpt FILE``): one tiled forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blindsr.errors import WeightsError
from blindsr.methods.base import SRResult
from blindsr.ops.progress import Progress


class SRNetPipeline:
    """``pipe(lr (B,3,h,w) in [0, 1]) -> SRResult`` with Gaussian-blended tiles of ``tile`` LR pixels."""

    def __init__(self, net: nn.Module, tile: int = 256, tile_overlap: int = 32):
        self.net, self.tile, self.tile_overlap = net.eval().requires_grad_(False), tile, tile_overlap
        self.scale = round(float(net.config.scale))
        self.config = None

    @torch.no_grad()
    def __call__(self, lr: Tensor, *, generator: Any = None, progress: Progress = False, tile: int | None = None,
                 tile_overlap: int | None = None) -> SRResult:
        from blindsr.models.restorers import restore_tiled

        ref = next(self.net.parameters())
        x = lr.to(ref.device, ref.dtype)
        t = self.tile if tile is None else tile
        o = self.tile_overlap if tile_overlap is None else tile_overlap
        out = restore_tiled(self.net, x, t, min(o, t - 1), progress=progress) if t > 0 else self.net(x)
        return SRResult(sr=out.float().clamp(0, 1))


def load_pipeline(ckpt: str | Path | None = None, device: str | torch.device = "cpu", **_: Any) -> SRNetPipeline:
    """A restorer checkpoint (``blindsr train srnet``'s ``final.safetensors``, or any RRDBNet / SwinIR / SCUNet
    file; the architecture is read from its tensors)."""
    from blindsr.models.restorers import load_restorer

    if ckpt is None:
        raise WeightsError("--method srnet needs --ckpt FILE (e.g. runs/srnet/final.safetensors)")
    return SRNetPipeline(load_restorer("auto", ckpt, device=device))


__all__ = ["SRNetPipeline", "load_pipeline"]
