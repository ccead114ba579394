"""Shared diffusion core: schedules, the prediction algebra, Gaussian process algebra, respacing, one sampling
loop with pluggable steppers, and the tiled denoiser (all four methods)."""

from blindsr.diffusion.gaussian import GaussianDiffusion, hybrid_loss, mean_flat
from blindsr.diffusion.parameterization import PREDICTIONS, split, target
from blindsr.diffusion.respace import make_diffusion, respaced, space_timesteps
from blindsr.diffusion.samplers import (
    DDIMStepper,
    DDPMStepper,
    GuidanceResult,
    ModelOutput,
    SchedulerStepper,
    StepState,
    make_stepper,
    randn,
    sample,
)
from blindsr.diffusion.schedules import get_betas
from blindsr.diffusion.tiling import tiled

__all__ = [
    "DDIMStepper", "DDPMStepper", "GaussianDiffusion", "GuidanceResult", "ModelOutput", "PREDICTIONS",
    "SchedulerStepper", "StepState", "get_betas", "hybrid_loss", "make_diffusion", "make_stepper", "mean_flat",
    "randn", "respaced", "sample", "space_timesteps", "split", "target", "tiled",
]
