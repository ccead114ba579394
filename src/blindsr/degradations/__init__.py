"""Degradation models: kernels, operators (blur, MATLAB imresize, noise, USM, quantise), JPEG, kernel PCA,
and named presets (``get_preset``). Submodules import torch; import them directly."""

from __future__ import annotations

__all__ = ["kernels", "operators", "jpeg", "pca", "pipelines"]
