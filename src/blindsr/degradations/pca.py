"""Kernel PCA (DAN/IKC/SRMD): a low-dimensional code for blur kernels.

Fit (DAN/IKC ``creat_PCA``): flatten N random kernels of a setting to X (N, h*w), centre by the column mean,
take the top-``dim`` right singular vectors as the (h*w, dim) matrix P (DAN and IKC: N = 30,000, dim = 10;
SRMD: 15).

Encode/decode, two conventions:
- ``affine=False`` (DAN, the default): ``code = k_flat @ P`` and ``k = code @ P^T`` -- no mean at either end.
  P was fitted on centred data, so this is a linear projection of the *uncentred* kernel; the decode is
  not an exact inverse even for kernels in the span (the mean's out-of-span part is lost).
- ``affine=True`` (exact PCA): ``code = (k_flat - mean) @ P`` and ``k = code @ P^T + mean``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from blindsr.errors import BlindSRError


@dataclass
class KernelPCA:
    matrix: torch.Tensor  # (h*w, dim), orthonormal columns
    mean: torch.Tensor  # (h*w,)
    kernel_size: int

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def encode(self, k: torch.Tensor, affine: bool = False) -> torch.Tensor:
        """Kernels (..., h, w) or (..., h*w) -> codes (..., dim)."""
        square = k.dim() >= 2 and tuple(k.shape[-2:]) == (self.kernel_size, self.kernel_size)
        flat = k.reshape(*k.shape[:-2], -1) if square else k
        if flat.shape[-1] != self.matrix.shape[0]:
            raise BlindSRError(f"kernel of {flat.shape[-1]} values does not match the PCA "
                               f"({self.kernel_size}x{self.kernel_size})")
        p = self.matrix.to(flat)
        if affine:
            flat = flat - self.mean.to(flat)
        return flat @ p

    def decode(self, code: torch.Tensor, affine: bool = False, as_image: bool = True) -> torch.Tensor:
        """Codes (..., dim) -> kernels (..., h, w) (or flat (..., h*w) with ``as_image=False``)."""
        flat = code @ self.matrix.to(code).T
        if affine:
            flat = flat + self.mean.to(flat)
        return flat.reshape(*code.shape[:-1], self.kernel_size, self.kernel_size) if as_image else flat

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write ``matrix``/``mean`` as safetensors (atomic: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"kernel_size": str(self.kernel_size), "dim": str(self.dim), "format": "blindsr.kernel_pca"}
        meta.update(metadata or {})
        tmp = path.with_name(path.name + ".tmp")
        save_file({"matrix": self.matrix.contiguous().float(), "mean": self.mean.contiguous().float()},
                  str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> KernelPCA:
        """Read a basis written by ``save`` (or any safetensors with a (h*w, dim) ``matrix``)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BlindSRError(f"PCA file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if "matrix" not in keys:
                    raise BlindSRError(f"{path}: no 'matrix' tensor (keys: {sorted(keys)})")
                matrix = f.get_tensor("matrix")
                mean = f.get_tensor("mean") if "mean" in keys else torch.zeros(matrix.shape[0])
        except BlindSRError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise BlindSRError(f"{path}: not a readable safetensors file ({e})") from e
        size = round(matrix.shape[0] ** 0.5)
        if size * size != matrix.shape[0]:
            raise BlindSRError(f"{path}: PCA matrix has {matrix.shape[0]} rows, not a square kernel")
        return cls(matrix, mean, size)


def fit_pca(kernels: torch.Tensor, dim: int = 10) -> KernelPCA:
    """Fit the PCA basis of kernels (N, h, w) (DAN/IKC recipe: centre, SVD, top-``dim`` directions;
    computed as the eigenvectors of the scatter matrix).

    Each direction's sign is fixed so its largest-magnitude entry is positive (deterministic output).
    """
    if kernels.dim() != 3 or kernels.shape[-1] != kernels.shape[-2]:
        raise BlindSRError(f"fit_pca expects square kernels (N, h, h), got {tuple(kernels.shape)}")
    n, size = kernels.shape[0], kernels.shape[-1]
    if not 0 < dim <= min(n, size * size):
        raise BlindSRError(f"PCA dim must be in [1, {min(n, size * size)}], got {dim}")
    x = kernels.reshape(n, -1).to(torch.float64)
    mean = x.mean(dim=0)
    xc = x - mean
    # Right singular vectors of Xc = eigenvectors of Xc^T Xc (441x441, float64): same basis, much faster.
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    p = evecs[:, evals.argsort(descending=True)[:dim]]  # (h*w, dim)
    sign = torch.sign(p.gather(0, p.abs().argmax(dim=0, keepdim=True)))
    return KernelPCA((p * sign).float(), mean.float(), size)


def fit_random_pca(n: int = 30000, dim: int = 10, size: int = 21, sig_min: float = 0.2, sig_max: float = 4.0,
                   rate_iso: float = 1.0, random_disturb: bool = False,
                   generator: torch.Generator | None = None) -> KernelPCA:
    """DAN/IKC ``creat_PCA``: fit on ``n`` random Gaussian kernels of a setting (defaults: setting 1, x4)."""
    from blindsr.degradations.kernels import random_gaussian_kernels

    k, _ = random_gaussian_kernels(n, size, sig_min, sig_max, rate_iso, random_disturb, generator)
    return fit_pca(k, dim)
