"""Weights shipped inside the package: the embedded default model, BlindDiff-S.

``blinddiff_s.safetensors`` (EMA weights; its metadata holds the JSON config) and ``blinddiff_s.json`` (the same
config plus how it was trained: command, commit, steps, hardware). Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """Path of the embedded default BlindDiff model (``blindsr sr`` with no ``--ckpt``)."""
    return HERE / "blinddiff_s.safetensors"
