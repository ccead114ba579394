"""Names -> ``"module:attr"`` for everything the CLI and configs pick by name. Torch-free: ``blindsr --help`` reads
the names without importing any model code; :func:`resolve` imports the target when it is used.

Adding a method is one package (``methods/<name>/``) and one line per entry point below.
"""

from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, dict[str, Any]] = {
    # `blindsr sr --method NAME`: NAME -> loader(ckpt, device) -> Pipeline
    "sr": {
        "blinddiff": "blindsr.methods.blinddiff.pipeline:load_pipeline",
        "dmsr": "blindsr.methods.dmsr.pipeline:load_pipeline",
        "srnet": "blindsr.methods.srnet.pipeline:load_pipeline",
        "stablesr": "blindsr.methods.stablesr.pipeline:load_pipeline",
    },
    # `blindsr train NAME`: NAME -> recipe(RunConfig) -> Recipe
    "recipe": {
        "blinddiff": "blindsr.methods.blinddiff.recipe:blinddiff_recipe",
        "regression": "blindsr.methods.blinddiff.recipe:regression_recipe",
        "diffbir-stage1": "blindsr.methods.diffbir.recipe:diffbir_stage1_recipe",
        "diffbir-stage2": "blindsr.methods.diffbir.recipe:diffbir_stage2_recipe",
        "prior": "blindsr.methods.prior.recipe:prior_recipe",
        "dmsr": "blindsr.methods.dmsr.recipe:dmsr_recipe",
        "uddm": "blindsr.methods.uddm.recipe:uddm_recipe",
        "srnet": "blindsr.methods.srnet.recipe:srnet_recipe",
        "stablesr": "blindsr.methods.stablesr.recipe:stablesr_recipe",
    },
    # `--preset NAME`, `data.degradation`: NAME -> a degradations.pipelines.PresetSpec
    "preset": {
        "bicubic": "blindsr.degradations.pipelines:BICUBIC",
        "classic": "blindsr.degradations.pipelines:CLASSIC",
        "blinddiff-setting1": "blindsr.degradations.pipelines:BLINDDIFF_SETTING1",
        "blinddiff-setting2": "blindsr.degradations.pipelines:BLINDDIFF_SETTING2",
        "blinddiff-real": "blindsr.degradations.pipelines:BLINDDIFF_REAL",
        "gaussian8": "blindsr.degradations.pipelines:GAUSSIAN8",
        "diffbir-stage1": "blindsr.degradations.pipelines:DIFFBIR_STAGE1",
        "realesrgan": "blindsr.degradations.pipelines:REALESRGAN",
        "stablesr": "blindsr.degradations.pipelines:STABLESR",
        "resshift": "blindsr.degradations.pipelines:RESSHIFT",
        "motion-deblur": "blindsr.degradations.pipelines:MOTION_DEBLUR",
        "uddm": "blindsr.methods.uddm.model:UDDM",
    },
}

# Choices that are not importable objects but still belong in --help without importing torch; the library
# modules import these (one list each).
SAMPLERS = ("ddpm", "ddim", "dpm++_2m", "dpm++_3m_sde", "euler")  # blindsr.diffusion.samplers.make_stepper
BLINDDIFF_SAMPLERS = ("ddpm", "ddim")  # the two with the kernel-aware gradient
BLINDDIFF_NORMS = ("l2", "l2sq")  # guidance norm: official (DPS) | paper (squared)
BLINDDIFF_DOWNS = ("bicubic", "stride")  # downsampling in the guidance operator
BLINDDIFF_KERNEL_MODES = ("estimated", "bicubic")  # guidance kernel: the model's | identity (ablation)
BLINDDIFF_KERNEL_ESTIMATES = ("fit", "model")  # reported kernel: Gaussian fitted to (SR, LR) | last step's k_t
DIFFBIR_SAMPLERS = ("ddpm", "ddim", "dpm++_2m", "dpm++_3m_sde")
DIFFBIR_VERSIONS = ("v1", "v2", "v2.1")  # the SD backend's; the pixel backend is the preset "pixel"
DIFFBIR_BACKENDS = ("pixel", "sd")
DIFFBIR_TASKS = ("sr", "denoise", "face")
DIFFBIR_START_POINTS = ("noise", "cond")
DIFFBIR_COLOR_FIXES = ("wavelet", "adain", "none")
DIFFBIR_GUIDANCE_SPACES = ("rgb", "latent")
DIFFBIR_GUIDANCE_LOSSES = ("w_mse", "mse")
RESTORER_KINDS = ("swinir", "bsrnet", "rrdbnet", "realesrgan", "scunet")


def names(kind: str) -> list[str]:
    """The registered names of ``kind`` (sr, recipe, preset), in registration order."""
    return list(REGISTRY[kind])


def register(kind: str, name: str, target: Any) -> None:
    """Add (or replace) ``name``: ``"module:attr"`` (imported when used) or the object itself (e.g. a learned
    degradation registered as a preset at run time)."""
    REGISTRY.setdefault(kind, {})[name] = target


def resolve(kind: str, name: str) -> Any:
    """Import and return the object registered as ``name`` under ``kind``."""
    from blindsr.errors import BlindSRError

    if name not in REGISTRY.get(kind, {}):
        raise BlindSRError(f"unknown {kind} {name!r}; choose one of: {', '.join(names(kind))}")
    target = REGISTRY[kind][name]
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
