"""Colour correction of a diffusion output against a reference (DiffBIR's post-processing).

Latent diffusion drifts in colour; DiffBIR keeps the *high* frequencies of its output and takes the *low*
frequencies (colour, shading) from the stage-1 image:

- ``wavelet_color_fix``: a 5-level à-trous ("with holes") wavelet pyramid. Level i blurs with the 3x3 binomial
  kernel [[1,2,1],[2,4,2],[1,2,1]]/16 dilated by 2**i (replicate padding); the detail bands are the differences
  between successive blurs. Result = detail bands of ``content`` + residual low band of ``reference``.
  The decomposition is exact: ``sum(details) + low == image``.
- ``adain_color_fix``: per-channel mean/std of ``content`` replaced by those of ``reference`` (AdaIN,
  Huang & Belongie 2017); v1's ``--color_fix_type adain``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.errors import BlindSRError

ColorFix = Literal["wavelet", "adain", "none"]
BINOMIAL = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))  # / 16


def binomial_blur(x: Tensor, dilation: int) -> Tensor:
    """Depthwise 3x3 binomial blur with holes of size ``dilation`` (replicate padding), any channel count."""
    c = x.shape[1]
    k = torch.tensor(BINOMIAL, dtype=x.dtype, device=x.device).div(16).expand(c, 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, k, groups=c, dilation=dilation)


def wavelet_decompose(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """(sum of the detail bands, residual low band) of an à-trous pyramid; they add up to ``x``."""
    high, low = torch.zeros_like(x), x
    for i in range(levels):
        blurred = binomial_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(content: Tensor, reference: Tensor, levels: int = 5) -> Tensor:
    """High frequencies of ``content`` + low frequencies of ``reference``; (B,C,H,W) of the same size, fp32 math."""
    _check_pair(content, reference)
    dtype = content.dtype
    high, _ = wavelet_decompose(content.float(), levels)
    _, low = wavelet_decompose(reference.float(), levels)
    return (high + low).to(dtype)


def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and std (unbiased variance + eps, as the official AdaIN)."""
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain_color_fix(content: Tensor, reference: Tensor) -> Tensor:
    """Normalise ``content`` per channel and give it ``reference``'s mean and std."""
    _check_pair(content, reference, same_size=False)
    dtype = content.dtype
    c_mean, c_std = channel_stats(content.float())
    r_mean, r_std = channel_stats(reference.float())
    return ((content.float() - c_mean) / c_std * r_std + r_mean).to(dtype)


def color_fix(content: Tensor, reference: Tensor, kind: ColorFix = "wavelet") -> Tensor:
    """Dispatch on ``kind``: ``wavelet`` (DiffBIR v2/v2.1, always on there), ``adain`` or ``none``."""
    if kind == "wavelet":
        return wavelet_color_fix(content, reference)
    if kind == "adain":
        return adain_color_fix(content, reference)
    if kind == "none":
        return content
    raise BlindSRError(f"unknown colour fix {kind!r}; choose wavelet, adain or none")


def _check_pair(content: Tensor, reference: Tensor, same_size: bool = True) -> None:
    if content.ndim != 4 or reference.ndim != 4 or content.shape[:2] != reference.shape[:2]:
        raise BlindSRError(f"colour fix needs two (B,C,H,W) batches, got {tuple(content.shape)} and "
                           f"{tuple(reference.shape)}")
    if same_size and content.shape != reference.shape:
        raise BlindSRError(f"wavelet colour fix needs images of one size, got {tuple(content.shape[-2:])} and "
                           f"{tuple(reference.shape[-2:])}")
