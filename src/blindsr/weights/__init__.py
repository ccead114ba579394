"""Weights shipped inside the package: the embedded BlindDiff models. Nothing is ever downloaded.

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


def embedded_path(name: str) -> Path:
    """Path of the embedded model ``name`` (one of :data:`EMBEDDED`)."""
    from blindsr.errors import BlindSRError

    if name not in EMBEDDED:
        raise BlindSRError(f"unknown embedded model {name!r}; choose one of: {', '.join(EMBEDDED)}")
    return HERE / EMBEDDED[name][0]


def default_model_path() -> Path:
    """Path of the default embedded BlindDiff model (``blindsr sr`` with no ``--model`` / ``--ckpt``)."""
    return embedded_path(DEFAULT_MODEL)
