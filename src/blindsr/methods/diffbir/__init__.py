"""DiffBIR (Lin et al., ECCV 2024): ``config.py`` (presets, samplers, SD process), ``weights.py`` (where the weights
are), ``denoiser.py`` (ControlNet + UNet + CFG + tiles), ``guidance.py`` (region-adaptive restoration guidance),
``pipeline.py`` (the two stages), ``recipe.py`` (stage-1 and stage-2 training)."""

from blindsr.methods.diffbir.config import (
    SAMPLERS,
    TASKS,
    VERSIONS,
    DiffBIRConfig,
    SDProcess,
    Tiling,
    presets,
)
from blindsr.methods.diffbir.guidance import GuidanceConfig
from blindsr.methods.diffbir.pipeline import DiffBIRPipeline, DiffBIRResult
from blindsr.methods.diffbir.weights import (
    CONFIG_ENV,
    WeightPaths,
    config_file,
    read_config_file,
    resolve_weight,
    resolve_weights,
)

__all__ = ["CONFIG_ENV", "SAMPLERS", "TASKS", "VERSIONS", "DiffBIRConfig", "DiffBIRPipeline", "DiffBIRResult",
           "GuidanceConfig", "SDProcess", "Tiling", "WeightPaths", "config_file", "presets", "read_config_file",
           "resolve_weight", "resolve_weights"]
