"""Shared diffusion core: schedules, Gaussian algebra, respacing, samplers and tiling (all four methods)."""

from blindsr.diffusion.gaussian import GaussianDiffusion, hybrid_loss, mean_flat
from blindsr.diffusion.respace import make_diffusion, respaced, space_timesteps
from blindsr.diffusion.samplers import (
    GuidanceResult,
    ModelOutput,
    StepState,
    ddim_sample,
    ddpm_sample,
    randn,
)
from blindsr.diffusion.schedules import get_betas
from blindsr.diffusion.tiling import tiled

__all__ = [
    "GaussianDiffusion", "GuidanceResult", "ModelOutput", "StepState", "ddim_sample", "ddpm_sample",
    "get_betas", "hybrid_loss", "make_diffusion", "mean_flat", "randn", "respaced", "space_timesteps", "tiled",
]
