"""Blur kernels: Gaussian (DAN/IKC and BasicSR conventions), generalized/plateau, sinc, motion, Gaussian8.

Conventions (every function here):
- A kernel is a float tensor ``(h, w)`` (one) or ``(B, h, w)`` (a batch) that sums to 1.
- Sizes are odd; the grid is ``ax = arange(-(l//2), l//2 + 1)`` (DAN's ``arange(-l//2+1, l//2+1)``).
- Row index = vertical offset ``y``, column index = horizontal offset ``x`` (``meshgrid(ax, ax)`` as in
  numpy's default ``xy`` indexing), so ``theta`` rotates counter-clockwise in (x, y) coordinates.
- Covariance (BlindDiff/DAN and BasicSR): ``Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T`` and
  ``q = p^T Sigma^{-1} p``. Gaussian: ``exp(-q/2)``; generalized: ``exp(-q^beta/2)``; plateau: ``1/(1+q^beta)``.
- Random draws come from a ``torch.Generator``; each random function also returns JSON-serialisable
  per-sample parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from blindsr.errors import BlindSRError

GAUSSIAN8_SIGMAS = tuple(round(1.8 + 0.2 * i, 1) for i in range(8))  # np.linspace(1.8, 3.2, 8)
MIXED_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _check_size(size: int) -> int:
    if int(size) != size or size < 1 or size % 2 == 0:
        raise BlindSRError(f"kernel size must be a positive odd integer, got {size}")
    return int(size)


def uniform(n: int, lo: float, hi: float, generator: torch.Generator | None,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` draws from U[lo, hi) in float64 on ``device`` (the generator's device by default)."""
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def rand01(generator: torch.Generator | None) -> float:
    """One U[0, 1) draw as a Python float (for branch decisions)."""
    return float(uniform(1, 0.0, 1.0, generator)[0])


def grid(size: int, device=None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xx, yy)`` of shape (size, size): ``xx`` varies along columns, ``yy`` along rows."""
    ax = torch.arange(size, device=device, dtype=dtype) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _normalise(k: torch.Tensor) -> torch.Tensor:
    return k / k.sum(dim=(-2, -1), keepdim=True)


def mahalanobis(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``q = p^T Sigma^{-1} p`` on the kernel grid, for a batch of (sx, sy, theta): (B, size, size)."""
    sigma_x, sigma_y, theta = (t.to(torch.float64).reshape(-1, 1, 1) for t in (sigma_x, sigma_y, theta))
    xx, yy = grid(size, device=sigma_x.device)
    c, s = torch.cos(theta), torch.sin(theta)
    # Rotate p into the kernel's principal axes: u = R^T p, then q = (u1/sx)^2 + (u2/sy)^2.
    u1 = c * xx + s * yy
    u2 = -s * xx + c * yy
    return (u1 / sigma_x) ** 2 + (u2 / sigma_y) ** 2


def bivariate_kernels(size: int, sigma_x, sigma_y=None, theta=0.0, beta=1.0, kind: str = "gaussian",
                      device=None) -> torch.Tensor:
    """Batched bivariate kernels (B, size, size), float32, each summing to 1.

    ``kind``: ``gaussian`` exp(-q/2); ``generalized`` exp(-q^beta/2); ``plateau`` 1/(1+q^beta) (BasicSR).
    Scalars or (B,) tensors are accepted for every parameter; ``sigma_y`` defaults to ``sigma_x``.
    """
    size = _check_size(size)
    sx = torch.as_tensor(sigma_x, dtype=torch.float64, device=device).reshape(-1)
    sy = sx if sigma_y is None else torch.as_tensor(sigma_y, dtype=torch.float64, device=sx.device).reshape(-1)
    th = torch.as_tensor(theta, dtype=torch.float64, device=sx.device).reshape(-1)
    b = torch.as_tensor(beta, dtype=torch.float64, device=sx.device).reshape(-1, 1, 1)
    n = max(sx.numel(), sy.numel(), th.numel(), b.numel())
    sx, sy, th = sx.expand(n), sy.expand(n), th.expand(n)
    if (sx <= 0).any() or (sy <= 0).any():
        raise BlindSRError("kernel sigma must be positive")
    q = mahalanobis(size, sx, sy, th)
    if kind == "gaussian":
        k = torch.exp(-0.5 * q)
    elif kind == "generalized":
        k = torch.exp(-0.5 * q.pow(b))
    elif kind == "plateau":
        k = 1.0 / (1.0 + q.pow(b))
    else:
        raise BlindSRError(f"unknown kernel kind {kind!r} (choose gaussian, generalized, plateau)")
    return _normalise(k).float()


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> torch.Tensor:
    """One Gaussian kernel (size, size), float32, sum 1 (DAN/IKC convention)."""
    return bivariate_kernels(size, sigma_x, sigma_y, theta)[0]


def gaussian8_kernels(size: int = 21, sigmas: Sequence[float] = GAUSSIAN8_SIGMAS) -> torch.Tensor:
    """The fixed Gaussian8 test kernels (8, 21, 21): isotropic, sigma = linspace(1.8, 3.2, 8) (x4, DAN)."""
    return bivariate_kernels(size, torch.tensor(list(sigmas), dtype=torch.float64))


def random_gaussian_kernels(batch: int, size: int = 21, sig_min: float = 0.2, sig_max: float = 4.0,
                            rate_iso: float = 1.0, random_disturb: bool = False,
                            generator: torch.Generator | None = None, device=None,
                            ) -> tuple[torch.Tensor, list[dict]]:
    """DAN/IKC ``random_batch_kernel``: (B, size, size) float32 kernels and their parameters.

    Per sample: with probability ``rate_iso`` isotropic (sigma ~ U[sig_min, sig_max], theta = 0), else
    anisotropic (sigma_x, sigma_y ~ U[sig_min, sig_max], theta ~ U[-pi, pi]). ``random_disturb``:
    k <- k + U(0, 0.25) * k elementwise, then renormalise (DAN setting 2).
    Draws happen on the generator's device; the result is moved to ``device`` (default: same).
    """
    size = _check_size(size)
    if not 0 < sig_min <= sig_max:
        raise BlindSRError(f"need 0 < sig_min <= sig_max, got [{sig_min}, {sig_max}]")
    iso = uniform(batch, 0, 1, generator) < rate_iso
    sx = uniform(batch, sig_min, sig_max, generator)
    sy = torch.where(iso, sx, uniform(batch, sig_min, sig_max, generator))
    theta = torch.where(iso, torch.zeros_like(sx), uniform(batch, -math.pi, math.pi, generator))
    k = bivariate_kernels(size, sx, sy, theta).to(torch.float64)
    if random_disturb:
        noise = uniform(batch * size * size, 0.0, 0.25, generator).view(batch, size, size)
        k = _normalise(k + noise * k)
    rows = zip(iso.tolist(), sx.tolist(), sy.tolist(), theta.tolist(), strict=True)
    params = [{"kernel_type": "iso" if i else "aniso", "sigma_x": a, "sigma_y": b, "theta": t} for i, a, b, t in rows]
    return k.float().to(device if device is not None else k.device), params


def _draw_beta(lo: float, hi: float, generator) -> float:
    """BasicSR: beta ~ U[lo, 1) or U[1, hi) with probability 1/2 each."""
    return float(uniform(1, lo, 1.0, generator)[0]) if rand01(generator) < 0.5 else \
        float(uniform(1, 1.0, hi, generator)[0])


def random_mixed_kernel(size: int, kernel_list: Sequence[str] = MIXED_TYPES,
                        kernel_prob: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                        sigma_range: Sequence[float] = (0.2, 3.0), rotation_range=(-math.pi, math.pi),
                        betag_range: Sequence[float] = (0.5, 4.0), betap_range: Sequence[float] = (1.0, 2.0),
                        noise_range: Sequence[float] | None = None, generator: torch.Generator | None = None,
                        ) -> tuple[torch.Tensor, dict]:
    """One BasicSR ``random_mixed_kernels`` kernel (size, size) float32 and its parameters.

    The type is drawn from ``kernel_list`` with ``kernel_prob``; iso types force sigma_y = sigma_x and theta = 0;
    ``noise_range`` multiplies by U(noise_range) elementwise and renormalises (BasicSR ``noise_range``).
    """
    ktype = choice(list(kernel_list), generator, kernel_prob)
    iso = ktype.endswith("iso") and not ktype.endswith("aniso")
    sx = float(uniform(1, *sigma_range, generator)[0])
    sy = sx if iso else float(uniform(1, *sigma_range, generator)[0])
    theta = 0.0 if iso else float(uniform(1, *rotation_range, generator)[0])
    beta, kind = 1.0, "gaussian"
    if ktype.startswith("generalized"):
        beta, kind = _draw_beta(betag_range[0], betag_range[1], generator), "generalized"
    elif ktype.startswith("plateau"):
        beta, kind = _draw_beta(betap_range[0], betap_range[1], generator), "plateau"
    k = bivariate_kernels(size, sx, sy, theta, beta, kind)[0]
    if noise_range is not None:
        k = _normalise(k * uniform(size * size, *noise_range, generator).view(size, size).float())
    return k, {"kernel_type": ktype, "kernel_size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta,
               "beta": beta}


def _choice_index(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn with probabilities ``probs`` from one uniform draw (works for any generator device)."""
    u = rand01(generator)
    cdf = torch.cumsum(probs / probs.sum(), 0)
    return min(int((cdf <= u).sum()), len(probs) - 1)


def choice(options: Sequence, generator: torch.Generator | None, probs: Sequence[float] | None = None):
    """``random.choice``/``random.choices`` on a torch generator."""
    p = torch.ones(len(options), dtype=torch.float64) if probs is None else torch.tensor(list(probs), dtype=torch.float64)
    return options[_choice_index(p, generator)]


def circular_lowpass_kernel(cutoff: float, size: int, pad_to: int = 0) -> torch.Tensor:
    """2-D sinc (circular low-pass) kernel: ``k(r) = w_c J1(w_c r) / (2 pi r)``, centre ``w_c^2 / (4 pi)``.

    Coordinates are measured from the centre ``(size-1)/2``; the kernel is normalised to sum 1 and then
    zero-padded to ``pad_to`` (BasicSR ``circular_lowpass_kernel``). It has negative lobes.
    """
    size = _check_size(size)
    xx, yy = grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    k = _normalise(k)
    if pad_to and pad_to > size:
        k = pad_kernel(k, pad_to)
    return k.float()


def pad_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd kernel (..., h, w) to (..., size, size)."""
    ph, pw = (size - k.shape[-2]) // 2, (size - k.shape[-1]) // 2
    if ph < 0 or pw < 0:
        raise BlindSRError(f"cannot pad a {k.shape[-2]}x{k.shape[-1]} kernel to {size}x{size}")
    return torch.nn.functional.pad(k, (pw, pw, ph, ph))


def random_motion_kernels(batch: int, size: int = 21, intensity: float = 0.5, steps: int = 256,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Random camera-shake kernels (B, size, size) from a 2-D trajectory random walk (our own model).

    A point moves ``steps`` times at constant speed; each step its heading turns by a Gaussian angle
    ("anxiety") whose accumulated std over the whole path is ``2 pi * intensity``, and with probability
    ``2 * intensity / steps`` (about ``2 * intensity`` times per path) by a jerk U[-pi, pi] (abrupt shakes);
    a weak pull towards the start keeps the path compact. The path is centred
    on its centroid, scaled so its extent covers ``U[0.5, 1] * (size - 1) * (0.4 + 0.6 * intensity)`` pixels,
    splatted bilinearly onto the grid and normalised. ``intensity`` in [0, 1]: 0 gives straight linear
    motion, 1 curly, jerky shake (the BlindDPS/BlindDiff motion-deblur setting uses 0.5).
    """
    size = _check_size(size)
    if not 0.0 <= intensity <= 1.0:
        raise BlindSRError(f"motion intensity must be in [0, 1], got {intensity}")
    dev = generator.device if generator is not None else "cpu"
    f64 = torch.float64
    angle = uniform(batch, -math.pi, math.pi, generator, dev)
    pos = torch.zeros(batch, 2, dtype=f64, device=dev)
    path = [pos]
    turn_std = 2 * math.pi * intensity / math.sqrt(steps)
    for _ in range(steps):
        turn = turn_std * torch.randn(batch, generator=generator, device=dev, dtype=f64)
        jerk = uniform(batch, 0, 1, generator, dev) < 2 * intensity / steps
        turn = torch.where(jerk, uniform(batch, -math.pi, math.pi, generator, dev), turn)
        # Pull the heading towards the origin in proportion to how far the point has drifted.
        to_origin = torch.atan2(-pos[:, 1], -pos[:, 0]) - angle
        to_origin = torch.atan2(torch.sin(to_origin), torch.cos(to_origin))
        angle = angle + turn + 0.02 * intensity * pos.norm(dim=1) / steps * to_origin
        pos = pos + torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        path.append(pos)
    traj = torch.stack(path, dim=1)  # (B, T, 2) in (x, y)
    traj = traj - traj.mean(dim=1, keepdim=True)
    extent = (traj.amax(dim=1) - traj.amin(dim=1)).amax(dim=1).clamp_min(1e-6)  # (B,)
    length = uniform(batch, 0.5, 1.0, generator, dev) * (size - 1) * (0.4 + 0.6 * intensity)
    traj = traj * (length / extent).view(batch, 1, 1)
    # Keep the splat inside the grid (the centroid is at the centre; a long one-sided path could overflow).
    half = (size - 1) / 2
    traj = traj * (half / traj.abs().amax(dim=(1, 2)).clamp_min(half)).view(batch, 1, 1)
    k = _splat(traj + half, size)
    params = [{"kernel_type": "motion", "kernel_size": size, "intensity": float(intensity), "length": float(v)}
              for v in length.tolist()]
    return _normalise(k).float(), params


def _splat(points: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear splat of (B, T, 2) points (x, y in pixel coordinates) onto (B, size, size) grids."""
    b, t, _ = points.shape
    x, y = points[..., 0].clamp(0, size - 1), points[..., 1].clamp(0, size - 1)
    x0, y0 = x.floor().clamp(max=size - 2), y.floor().clamp(max=size - 2)
    fx, fy = x - x0, y - y0
    out = torch.zeros(b, size * size, dtype=points.dtype, device=points.device)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        idx = ((y0 + dy) * size + (x0 + dx)).long()
        out.scatter_add_(1, idx, w)
    return out.view(b, size, size)


def kernel_moments(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (..., 2) as (x, y) and covariance (..., 2, 2) of kernels (..., h, w) treated as densities."""
    k = k.to(torch.float64)
    k = k / k.sum(dim=(-2, -1), keepdim=True)
    h, w = k.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float64, device=k.device) - h // 2).view(h, 1).expand(h, w)
    xs = (torch.arange(w, dtype=torch.float64, device=k.device) - w // 2).view(1, w).expand(h, w)
    mx, my = (k * xs).sum((-2, -1)), (k * ys).sum((-2, -1))
    dx, dy = xs - mx[..., None, None], ys - my[..., None, None]
    cxx, cyy, cxy = (k * dx * dx).sum((-2, -1)), (k * dy * dy).sum((-2, -1)), (k * dx * dy).sum((-2, -1))
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return torch.stack([mx, my], -1), cov
