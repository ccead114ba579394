"""A plain regression SR baseline on the MCFormer backbone (the honest baseline for BlindDiff-S).

The same network as BlindDiff, used once instead of as a denoiser: its "noisy" input is the bicubic-upsampled
LR image (torch bicubic, exactly the model's own ``cond`` upsampling), the timestep is fixed at 0, and the
first three output channels — which include the global residual ``+ x_in`` — are the SR estimate. Training
is plain L1 to the HR crop on the same data and degradations as BlindDiff. The kernel branch is part of the
forward pass (it modulates every block) but gets no kernel supervision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.errors import BlindSRError
from blindsr.methods.base import SRResult
from blindsr.models.mcformer import predicted_kernels, unwrap_model
from blindsr.ops.resize import pad_to_multiple


def regression_input(lr: Tensor, scale: int) -> Tensor:
    """x_in = bicubic↑s(y), the same upsampling MCFormer applies to its condition."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)


def regression_forward(model: torch.nn.Module, lr: Tensor) -> tuple[Tensor, Tensor]:
    """(SR estimate (B, 3, sH, sW), raw kernel output) for LR sizes whose HR side is a multiple of 8."""
    scale = int(unwrap_model(model).config.scale)
    x_in = regression_input(lr, scale)
    t = torch.zeros(lr.shape[0], device=lr.device, dtype=torch.long)
    out, k = model(x_in, t, lr)
    return out[:, : lr.shape[1]], k


def regression_losses(model: torch.nn.Module, hr: Tensor, lr: Tensor) -> dict[str, Tensor]:
    """L1(model(y), x): the whole loss of the baseline."""
    sr, _ = regression_forward(model, lr)
    l1 = (sr.float() - hr.float()).abs().mean()
    return {"loss": l1, "l1": l1.detach()}


class RegressionPipeline:
    """``pipe(lr) -> SRResult`` with the same padding rules as :class:`BlindDiffPipeline`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, lr: Tensor, **_: object) -> SRResult:
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise BlindSRError(f"regression SR expects LR images (B, 3, h, w), got {tuple(lr.shape)}")
        s = int(unwrap_model(self.model).config.scale)
        dev = next(self.model.parameters()).device
        h, w = lr.shape[-2:]
        lr_p = pad_to_multiple(lr.to(dev, torch.float32), 8 // math.gcd(8, s))
        sr, k = regression_forward(self.model, lr_p)
        return SRResult(sr=sr[..., : s * h, : s * w].clamp(0, 1), kernel=predicted_kernels(self.model, k))
