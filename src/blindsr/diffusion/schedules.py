"""Noise schedules: beta sequences as float64 tensors (cast to the model dtype on use).

- ``linear_betas``: DDPM (Ho et al. 2020, Sec. 4) linear 1e-4 -> 0.02 over T = 1000 steps, scaled by
  1000 / T for other T (the improved-DDPM / guided-diffusion convention; BlindDiff uses T = 1000).
- ``scaled_linear_betas``: Stable Diffusion / LDM "linear": linspace(sqrt(b0), sqrt(b1))**2, 0.00085 -> 0.012.
- ``cosine_betas``: improved DDPM (Nichol & Dhariwal 2021, Eq. 17), betas clipped at 0.999.
- ``rescale_zero_terminal_snr``: Lin et al. 2024 (Algorithm 1), makes alpha_bar_T exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from blindsr.errors import BlindSRError


def linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DDPM linear schedule; the end points are scaled by 1000 / T so any T spans the same process."""
    scale = 1000.0 / T
    return torch.linspace(scale * start, scale * end, T, dtype=torch.float64)


def scaled_linear_betas(T: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """LDM / Stable Diffusion schedule: linear in sqrt(beta)."""
    return torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64) ** 2


def betas_for_alpha_bar(T: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1]: beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i)."""
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule, alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2) (Eq. 17)."""
    return betas_for_alpha_bar(T, lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2, max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that it ends at 0 and keeps its first value (Lin et al. 2024)."""
    abar_sqrt = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def get_betas(name: str, T: int = 1000, zero_terminal_snr: bool = False) -> torch.Tensor:
    """Betas of a named schedule (``linear``, ``scaled_linear``, ``cosine``), optionally zero-terminal-SNR."""
    if name not in SCHEDULES:
        raise BlindSRError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    betas = SCHEDULES[name](T)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
