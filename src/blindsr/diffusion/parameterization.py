"""The prediction algebra, once: what a denoiser's raw output means and what it is trained to regress.

A network predicts one of (``kind``):

- ``eps``: the noise (Ho et al. 2020, Eq. 11);
- ``x0``: the clean sample (guided-diffusion's ``predict_xstart``);
- ``v``: ``sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022, Sec. 4).

With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (Ho et al. Eq. 4), :func:`split` returns both ``(eps, x0)``
straight from the raw output — one formula per kind, no x0 -> eps -> x0 round trip — and :func:`target` is the
regression target of each kind. ``abar`` is alpha_bar_t already broadcast to the sample's shape.

Zero terminal SNR (``abar = 0``, Lin et al. 2024): ``v`` and ``x0`` are exact there (``v = -x0``, ``eps = x_t``);
``eps`` cannot give x0 at ``abar = 0`` (division by zero), which is why schedules refuse eps with zero SNR.
"""

from __future__ import annotations

from torch import Tensor

from blindsr.errors import BlindSRError

PREDICTIONS = ("eps", "x0", "v")


def check_kind(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise BlindSRError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {kind!r}")
    return kind


def split(pred: Tensor, kind: str, x_t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """``(eps, x0)`` of a raw prediction ``pred`` of ``kind`` at the sample ``x_t``."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "eps":
        return pred, (x_t - s * pred) / a  # Ho et al. Eq. 4 solved for x0
    if kind == "x0":
        return (x_t - a * pred) / s, pred
    if kind == "v":
        return s * x_t + a * pred, a * x_t - s * pred  # Salimans & Ho Eq. 10 and its eps counterpart
    raise BlindSRError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {kind!r}")


def noised(x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (Ho et al. Eq. 4), for any (also non-integer) timestep's
    ``abar``; :func:`split` of an ``eps`` prediction inverts it."""
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def eps_from_x0(x_t: Tensor, x0: Tensor, abar: Tensor) -> Tensor:
    """The noise consistent with an x0 that was changed after :func:`split` (clipping, guidance)."""
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def target(kind: str, x0: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """What a ``kind`` network regresses for the clean sample ``x0`` noised with ``eps``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0
    raise BlindSRError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {kind!r}")
