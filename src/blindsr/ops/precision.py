"""Mixed precision with fp32 norms: cast a module to fp16/bf16 but keep GroupNorm / LayerNorm in fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _FP32GroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class _FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def cast_keep_norms_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` but keep GroupNorm / LayerNorm parameters and math in fp32 (DiffBIR's ``cast_dtype``)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    nn.Module.to(module, dtype)  # plain nn.Module.to: diffusers' override would warn about fp32 modules
    for m in module.modules():
        if type(m) in (nn.GroupNorm, nn.LayerNorm):
            m.float()
            m.__class__ = _FP32GroupNorm if isinstance(m, nn.GroupNorm) else _FP32LayerNorm
    return module
