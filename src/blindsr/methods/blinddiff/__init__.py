"""BlindDiff (Li et al., "BlindDiff: Empowering Degradation Modelling in Diffusion Models for Blind Image
Super-Resolution", 2024): ``config.py`` (process, sampling defaults, paper-vs-code switches), ``losses.py``
(Algorithm 1), ``pipeline.py`` (Algorithm 2, loading), ``recipe.py`` (training), ``regression.py`` (the
same backbone as a plain L1 regressor: the honest baseline)."""

from blindsr.methods.blinddiff.config import BlindDiffConfig, BlindDiffLossConfig
from blindsr.methods.blinddiff.losses import training_losses
from blindsr.methods.blinddiff.pipeline import (
    BlindDiffPipeline,
    KernelGuidance,
    default_model_path,
    degrade,
    load_pipeline,
    read_config,
    save_pipeline,
)

__all__ = ["BlindDiffConfig", "BlindDiffLossConfig", "BlindDiffPipeline", "KernelGuidance", "default_model_path",
           "degrade", "load_pipeline", "read_config", "save_pipeline", "training_losses"]
