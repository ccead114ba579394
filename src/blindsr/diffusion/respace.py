"""Timestep respacing (improved DDPM, Nichol & Dhariwal 2021, Sec. 4).

A respaced process keeps a subset S of the original steps and recomputes its betas so that the cumulative
alphas at the kept steps are unchanged: beta'_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}]. Its
``timestep_map`` holds the original indices, which is what the model is called with.
"""

from __future__ import annotations

import torch

from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.schedules import get_betas
from blindsr.errors import BlindSRError


def space_timesteps(num_timesteps: int, spec: int | str | list[int]) -> list[int]:
    """Original step indices to keep, sorted.

    ``spec``: ``"ddimN"`` keeps N steps with a fixed integer stride from 0 (DDIM's "uniform" spacing);
    otherwise a count or comma-separated counts, one per equal section of the original steps, each section
    sampled at evenly spaced positions (the stride accumulated in floats, then rounded, as the official codes)
    including its first and last step (``"500"``: 0, 2, 4, ...).
    """
    T = num_timesteps
    if isinstance(spec, str) and spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        if n == T:
            return list(range(T))
        raise BlindSRError(f"cannot make {n} equally strided steps out of {T} (spec {spec!r})")
    if isinstance(spec, int):
        counts = [spec]
    elif isinstance(spec, str):
        counts = [int(c) for c in spec.split(",") if c.strip()]
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 0 for c in counts):
        raise BlindSRError(f"bad timestep spacing {spec!r}")
    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise BlindSRError(f"cannot take {count} steps from a section of {size} (spacing {spec!r}, T={T})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated in floats, as IDDPM / guided-diffusion / LDM do: round(j * stride) differs
        for _ in range(count):  # for e.g. 199 of 1000 steps
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respaced(diffusion: GaussianDiffusion, use_timesteps: list[int] | set[int],
             table_dtype: torch.dtype = torch.float64) -> GaussianDiffusion:
    """The process restricted to ``use_timesteps`` (indices into ``diffusion``); timestep_map composes.

    ``table_dtype``: the precision in which beta'_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}] is computed.
    float32 reproduces LDM-based code (StableSR's samplers), which respaces from the model's float32
    ``alphas_cumprod`` buffer; its posterior log variances differ from the float64 ones by up to ~6e-6."""
    keep = torch.tensor(sorted(set(int(i) for i in use_timesteps)), dtype=torch.long)
    if keep.numel() == 0 or keep[0] < 0 or keep[-1] >= diffusion.num_timesteps:
        raise BlindSRError(f"respacing indices must lie in [0, {diffusion.num_timesteps})")
    abar = diffusion.alphas_cumprod[keep].to(table_dtype)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return GaussianDiffusion((1.0 - abar / prev).double(), timestep_map=diffusion.timestep_map[keep])


def make_diffusion(steps: int = 1000, schedule: str = "linear", respacing: int | str | None = None,
                   zero_terminal_snr: bool = False) -> GaussianDiffusion:
    """A ``schedule`` process of ``steps`` steps, respaced by ``respacing`` (None or "" keeps all steps)."""
    base = GaussianDiffusion(get_betas(schedule, steps, zero_terminal_snr))
    if respacing in (None, "", steps, str(steps)):
        return base
    return respaced(base, space_timesteps(steps, respacing))
