"""Exponential moving average of model weights (BasicSR ``model_ema``: applied every step)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` for every parameter; buffers are copied. The trainer keeps
    one per updated module.

    Holds its own copy of the (unwrapped) model in fp32, in eval mode and without gradients; ``decay = 0``
    makes the EMA a plain copy of the latest weights. ``warmup``: use ``min(decay, (1 + n) / (10 + n))`` at
    update ``n`` so a short run's EMA is not dominated by the random initial weights (BasicSR uses the
    plain decay; at 0.999 the initial weights still hold 37% after 1,000 steps).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, n: int = 0) -> None:
        """EMA step number ``n`` (0-based) towards ``model`` (the unwrapped training model)."""
        params = dict(model.named_parameters())
        ema_params = [p for _, p in self.model.named_parameters()]
        src = [params[name].detach().to(p.dtype) for name, p in self.model.named_parameters()]
        torch._foreach_lerp_(ema_params, src, 1.0 - self.decay_at(n))  # one fused launch per dtype/device group
        buffers = dict(model.named_buffers())
        for name, b_ema in self.model.named_buffers():
            b_ema.copy_(buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)
