"""Weights shipped inside the package: the embedded BlindDiff models (:data:`EMBEDDED`) and the parts of the
offline pixel backends (:data:`PRIORS`: the pixel-space diffusion prior; :data:`PARTS`: DiffBIR's stage-1 cleaner
and IRControlNet), kept apart from the SR models. Nothing is ever downloaded.

Each ``<name>.safetensors`` holds EMA weights with the JSON config in its metadata; ``<name>.json`` beside it
holds the same config plus how it was trained (command, commit, steps, hardware). ``blindsr sr --model NAME``
picks one; :data:`DEFAULT_MODEL` is used when no model or checkpoint is named.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (file, what it is for)
EMBEDDED: dict[str, tuple[str, str]] = {
    "blinddiff-s-real": ("blinddiff_s_real.safetensors",
                         "real photos: BlindDiff-S fine-tuned on anisotropic blur + noise + JPEG"),
    "blinddiff-s": ("blinddiff_s.safetensors",
                    "Gaussian blur only, no noise: the paper's benchmark setting (Set5/Set14-Gaussian8)"),
}
DEFAULT_MODEL = "blinddiff-s-real"

# Embedded weights that are not SR models (not offered by `blindsr sr --model`): name -> (file, what it is for)
PRIORS: dict[str, tuple[str, str]] = {
    "prior-s": ("prior_s.safetensors", "unconditional pixel-space diffusion prior (DM-SR / DiffBIR pixel backends)"),
}

# The offline pixel backends' models and parts, not offered by `blindsr sr --model` (DM-SR-S is
# `blindsr sr --method dmsr`; the other two are DiffBIR's): name -> (file, what it is for)
PARTS: dict[str, tuple[str, str]] = {
    "dmsr-s": ("dmsr_s.safetensors", "DM-SR-S: timestep estimator + time-aware encoder on Prior-S (--method dmsr)"),
    "swinir-s": ("swinir_s.safetensors", "DiffBIR stage 1: SwinIR-S cleaner trained on the diffbir-stage1 degradation"),
    "diffbir-control-s": ("diffbir_control_s.safetensors", "DiffBIR stage 2: IRControlNet on Prior-S"),
}


def _path(table: dict[str, tuple[str, str]], name: str, what: str) -> Path:
    from blindsr.errors import BlindSRError

    if name not in table:
        raise BlindSRError(f"unknown embedded {what} {name!r}; choose one of: {', '.join(table)}")
    return HERE / table[name][0]


def embedded_path(name: str) -> Path:
    """Path of the embedded model ``name`` (one of :data:`EMBEDDED`)."""
    return _path(EMBEDDED, name, "model")


def prior_path(name: str = "prior-s") -> Path:
    """Path of the embedded diffusion prior ``name`` (one of :data:`PRIORS`)."""
    return _path(PRIORS, name, "prior")


def default_model_path() -> Path:
    """Path of the default embedded BlindDiff model (``blindsr sr`` with no ``--model`` / ``--ckpt``)."""
    return embedded_path(DEFAULT_MODEL)


def part_path(name: str) -> Path:
    """Path of the embedded pixel-backend part ``name`` (one of :data:`PARTS`)."""
    return _path(PARTS, name, "part")
