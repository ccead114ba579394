"""Padding and resizing helpers shared by the pipelines."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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


def resize_short_edge(x: Tensor, size: int) -> Tensor:
    """DiffBIR's official ``resize_short_edge_to``: bicubic (antialiased) so that the short side is ``size``."""
    h, w = x.shape[-2:]
    if h == w:
        out = (size, size)
    elif h < w:
        out = (size, int(w * size / h))
    else:
        out = (int(h * size / w), size)
    return F.interpolate(x, size=out, mode="bicubic", antialias=True)
