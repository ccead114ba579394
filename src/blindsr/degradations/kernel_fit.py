"""The blur kernel that best explains an LR image from its SR estimate: y ≈ (k ⊗ x̂)↓s, k an anisotropic Gaussian.

BlindDiff's MCFormer estimates k from x_t at every step (paper Fig. 7a). On Set14-Gaussian8 that estimate is
biased wide (session 12: σ̂ 2.7-3.3 for σ 1.8-3.2) and its L1 error is worse than always answering the best single
Gaussian. Once sampling has produced x̂, the kernel is instead fitted to the measurement itself, as alternating
blind-SR methods (DAN, Luo et al. 2020) re-estimate it from (SR, LR): the degradation is linear in k,

    A(x̂) k = (k ⊗ x̂)↓s = Σ_ij k_ij (S_ij x̂)↓s          (S_ij: shift by the kernel tap (i, j))

so ||y - A k||² = kᵀ G k - 2 bᵀ k + yᵀy with G = AᵀA (n² × n²) and b = Aᵀy. Every candidate of a bank of
anisotropic Gaussians (σ1 ≥ σ2 in [0.4, 5] by 0.1, θ by 15°; the family BlindDiff's setting-2 kernels come from) is
scored in one matrix product, and the best one is returned. A free-form non-negative fit overfits the SR image's
errors (about twice the Gaussian fit's L1 in the session-14 trial), so the family is the regulariser.

The fit uses at most ``max_lr`` × ``max_lr`` LR pixels (the centre of the image, away from its borders, where the
reflect padding of the measurement is not the camera's): the kernel is one per image, and its cost is bounded
whatever the photo's size.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from blindsr.degradations import operators as O
from blindsr.degradations.kernels import bivariate_kernels
from blindsr.errors import BlindSRError


@functools.lru_cache(maxsize=4)
def gaussian_bank(size: int, sig_min: float = 0.4, sig_max: float = 5.0, sig_step: float = 0.1,
                  angles: int = 12) -> Tensor:
    """(N, size*size) float64 anisotropic Gaussians: every σ1 ≥ σ2 on the grid, θ in steps of 180°/angles
    (one θ for the isotropic ones)."""
    sig = torch.arange(round((sig_max - sig_min) / sig_step) + 1, dtype=torch.float64) * sig_step + sig_min
    sx, sy, th = [], [], []
    for i, a in enumerate(sig.tolist()):
        for b in sig[: i + 1].tolist():
            thetas = [math.pi * t / angles for t in range(angles)] if b < a else [0.0]
            sx += [a] * len(thetas)
            sy += [b] * len(thetas)
            th += thetas
    k = bivariate_kernels(size, torch.tensor(sx), torch.tensor(sy), torch.tensor(th))
    return k.to(torch.float64).flatten(1)


def _shift_invariant_taps(n_in: int, n_out: int, scale: int, down: str, first: int, last: int) -> tuple[Tensor, int] | None:
    """The 1-D downsampling ↓s of output samples ``first..last-1`` as one tap vector ``t`` and offset ``o``:
    ``out[v] = Σ_a t[a] in[s·v + o + a]``; None where those samples do not all share it (mirrored edge taps)."""
    if down != "bicubic":
        return torch.ones(1, dtype=torch.float64), 0  # decimation: in[s·v]
    rows = O.resize_weights(n_in, n_out, 1.0 / scale)[first:last]
    nz = rows[0].nonzero()
    start, stop = int(nz.min()), int(nz.max()) + 1
    taps, offset = rows[0, start:stop], start - scale * first
    dense = torch.zeros_like(rows)
    for v in range(rows.shape[0]):
        lo = scale * (first + v) + offset
        if lo < 0 or lo + taps.numel() > n_in:
            return None
        dense[v, lo:lo + taps.numel()] = taps
    return (taps, offset) if torch.equal(dense, rows) else None


def normal_equations(x: Tensor, y: Tensor, size: int, scale: int, down: str = "bicubic",
                     border: int = 4) -> tuple[Tensor, Tensor]:
    """``(G, b)`` of the least-squares problem min_k ||y - (k ⊗ x)↓s||² over the LR pixels ``border`` away from
    the edge; ``x`` (3, H, W) with H = s·h, ``y`` (3, h, w). The shift convention is :func:`operators.blur`'s
    (reflect padding, cross-correlation), so ``A k`` equals ``degrade(x, k)`` on those pixels.

    Row (i, j) of A is (S_ij x)↓s. Away from the edges ↓s is one tap vector t at stride s in each direction
    (MATLAB's bicubic weights repeat), so (S_ij x)↓s[v, w] = z[i + s·v + o, j + s·w + o] with z = (t ⊗ tᵀ) ⋆ x
    filtered once at full resolution: A is a strided view of z, size² times cheaper than resizing every
    shifted copy. Where the edge weights differ (LR images under about 5 pixels), each copy is resized."""
    _, h, w = y.shape
    if x.shape[-2:] != (scale * h, scale * w):
        raise BlindSRError(f"kernel fit: SR {tuple(x.shape[-2:])} is not {scale}x the LR {(h, w)}")
    if min(h, w) <= 2 * border:
        raise BlindSRError(f"kernel fit: the LR image {(h, w)} is too small")
    H, W = x.shape[-2:]
    pad = (size // 2, size - 1 - size // 2)
    mode = "reflect" if max(pad) < min(H, W) else "replicate"
    xp = torch.nn.functional.pad(x[None].double(), (*pad, *pad), mode=mode)[0]
    yy = y[:, border:h - border, border:w - border].reshape(-1).double()
    hv, wv = h - 2 * border, w - 2 * border
    rows = _shift_invariant_taps(H, h, scale, down, border, h - border)
    cols = _shift_invariant_taps(W, w, scale, down, border, w - border)
    if rows is not None and cols is not None:
        (th, oh), (tw, ow) = rows, cols
        z = torch.nn.functional.conv2d(xp[:, None], th.view(1, 1, -1, 1))
        z = torch.nn.functional.conv2d(z, tw.view(1, 1, 1, -1))[:, 0].contiguous()  # (3, Zh, Zw)
        zh, zw = z.shape[-2:]
        a = z.as_strided((size, size, 3, hv, wv), (zw, 1, zh * zw, scale * zw, scale),
                         (oh + scale * border) * zw + ow + scale * border).reshape(size * size, -1)
    else:
        parts = []
        for i in range(size):  # one row of taps at a time: (size, 3, H, W) shifted copies, downsampled
            shifted = torch.stack([xp[:, i:i + H, j:j + W] for j in range(size)])
            low = O.imresize(shifted, scale=1.0 / scale) if down == "bicubic" else O.downsample_stride(shifted, scale)
            parts.append(low[..., border:h - border, border:w - border].reshape(size, -1))
        a = torch.cat(parts)  # (size², N): row p is the LR image of tap p
    return a @ a.T, a @ yy


def fit_gaussian_kernel(sr: Tensor, lr: Tensor, scale: int, size: int = 21, down: str = "bicubic",
                        max_lr: int = 96) -> Tensor:
    """Per image of ``sr`` (B, 3, sH, sW) / ``lr`` (B, 3, h, w): the anisotropic Gaussian (B, size, size), float32,
    sum 1, that best re-degrades ``sr`` into ``lr`` (least squares on the centre ``max_lr``² LR pixels)."""
    if sr.ndim != 4 or lr.ndim != 4 or sr.shape[0] != lr.shape[0]:
        raise BlindSRError(f"kernel fit expects (B, 3, sH, sW) and (B, 3, h, w), got {tuple(sr.shape)}, "
                           f"{tuple(lr.shape)}")
    bank = gaussian_bank(size)
    h, w = lr.shape[-2:]
    ch, cw = min(h, max_lr), min(w, max_lr)
    top, left = (h - ch) // 2, (w - cw) // 2
    margin = math.ceil(size / 2 / scale) + 2  # HR context the taps need around the LR crop
    t0, l0 = max(top - margin, 0), max(left - margin, 0)
    t1, l1 = min(top + ch + margin, h), min(left + cw + margin, w)
    out = []
    for x, y in zip(sr.detach().cpu(), lr.detach().cpu(), strict=True):
        x = x[:, scale * t0:scale * t1, scale * l0:scale * l1]
        y = y[:, t0:t1, l0:l1]
        border = min(margin, (min(y.shape[-2:]) - 1) // 2)  # LR pixels whose taps reach past the crop
        g, b = normal_equations(x, y, size, scale, down, border=border)
        loss = ((bank @ g) * bank).sum(1) - 2 * bank @ b  # ||y - A k||² - ||y||² for every candidate
        out.append(bank[loss.argmin()].view(size, size))
    return torch.stack(out).float().to(sr.device)
