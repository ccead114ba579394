"""Exponential moving average of model weights (BasicSR ``model_ema``: applied every step)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` for every parameter; buffers are copied.

    Holds its own copy of the (unwrapped) model in fp32, in eval mode and without gradients; ``decay = 0``
    makes the EMA a plain copy of the latest weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model`` (the unwrapped training model)."""
        params = dict(model.named_parameters())
        ema_params = [p for _, p in self.model.named_parameters()]
        src = [params[name].detach().to(p.dtype) for name, p in self.model.named_parameters()]
        torch._foreach_lerp_(ema_params, src, 1.0 - self.decay)  # one fused launch per dtype/device group
        buffers = dict(model.named_buffers())
        for name, b_ema in self.model.named_buffers():
            b_ema.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)
