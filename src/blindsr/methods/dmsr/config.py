"""DM-SR configuration ("Bridging the distribution gap to harness pre-trained diffusion priors for SR", ICLR
2026; no public code: built from the paper and ``shared/research/dmsr.md``).

Where the paper is silent, the choice is ours, written here and behind a switch:

- **ᾱ at a non-integer t̂** (``DMSRProcess.interpolation``): ``loglinear`` (default) interpolates log ᾱ linearly
  between the two integer timesteps -- exact for a piecewise-constant continuous-time beta, and monotone;
  ``linear`` interpolates ᾱ itself; ``round`` takes the nearest integer (what an integer-only scheduler does).
  The UNet's sinusoidal time embedding takes the float t̂ as it is.
- **Multi-step** (Table 4, ``InferenceConfig.reuse_eps``): DDIM from t̂ over ``t_k = t̂ (N - k) / N``; the
  re-noising to the next t_k uses ε_SR of the first call (``True``, the paper's "reusing the same ε_SR") or
  each step's own prediction (``False``, plain DDIM). One step is the decomposition of Eq. 2 alone.
- **Perceptual term** (``LossConfig.perceptual``): InvSR's latent LPIPS needs trained weights nobody can get
  offline, so the default is ``ssim`` (1 - SSIM, on the decoded images for the SD backend, on the images for the
  pixel one); ``none`` switches it off.
- **t̂ ground truth** (``LossConfig.t_target``, Sec. 3.1 / Table 5): ``lpips`` (the paper's; needs pyiqa and its
  weights), ``ssim`` (1 - SSIM; the offline default: the best of the three the package can compute offline) or
  ``l2`` (RMSE); the distance between bicubic-upsampled LR and HR, divided by ``t_target_scale`` and clipped to
  [0, 1], times ``t_max``.
- The estimator's t̂ reaches the encoder without a gradient (``LossConfig.t_hat_grad``): T is trained by its
  own regression to the ground truth (App. A.5 reports its RMSE), the encoder by Eqs. 3-9.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from blindsr.errors import BlindSRError

DEFAULT_PROMPT = ("High-quality, high-contrast, photo-realistic, clean, sharp, highly-detailed, perfect, 8k, "
                  "ultra HD")  # the paper's fixed prompt
INTERPOLATIONS = ("loglinear", "linear", "round")
PERCEPTUAL = ("ssim", "none")
T_TARGETS = ("lpips", "ssim", "l2")
ADV_LOSSES = ("hinge", "bce")


@dataclass
class DMSRProcess:
    """The frozen denoiser's variance-preserving process (SD-Turbo's; the pixel prior trains on the same)."""

    diffusion_steps: int = 1000  # T
    schedule: str = "scaled_linear"  # SD's betas 0.00085 -> 0.012
    t_max: int = 500  # t̂ lives in [0, t_max - 1] (App. A.1: 500 bins)
    interpolation: str = "loglinear"  # ᾱ(t̂) between integer steps: loglinear | linear | round

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise BlindSRError(f"dmsr: interpolation {self.interpolation!r}: choose {', '.join(INTERPOLATIONS)}")
        if not 1 < self.t_max <= self.diffusion_steps:
            raise BlindSRError("dmsr: t_max must be in (1, diffusion_steps]")

    def alphas_cumprod(self) -> Tensor:
        from blindsr.diffusion.schedules import get_betas

        return torch.cumprod(1 - get_betas(self.schedule, self.diffusion_steps).double(), 0)


@dataclass
class InferenceConfig:
    """One run's settings (``blindsr sr --method dmsr`` flags)."""

    steps: int = 1  # 1 = the paper's default; Table 4 compares 2, 5, 10
    t_hat: float | None = None  # force this timestep for every image (Table 3's fixed t); None: the estimator's
    reuse_eps: bool = True  # multi-step re-noising with the first call's ε_SR (paper) or each step's own
    color_fix: str = "none"  # wavelet | adain | none, against the bicubic-upsampled input
    tile: int | None = 512  # HR tile in pixels, for larger images (InvSR's 128-pixel LR chops); None: whole
    #                          image at once. t̂ is always one per image, from the whole LR
    tile_overlap: int = 64
    tile_margin: int = 32  # HR pixels of context around each tile, computed and cropped away
    prompt: str = DEFAULT_PROMPT  # SD backend only (the pixel prior is unconditional)

    def __post_init__(self) -> None:
        from blindsr.registry import DIFFBIR_COLOR_FIXES

        if self.steps < 1:
            raise BlindSRError("dmsr: --steps must be at least 1")
        if self.t_hat is not None and not 0 <= self.t_hat <= 999:
            raise BlindSRError(f"dmsr: --t-hat {self.t_hat:g} must be a timestep in [0, 999] (the paper's t̂: "
                               "[0, 500))")
        if self.color_fix not in DIFFBIR_COLOR_FIXES:
            raise BlindSRError(f"dmsr: colour fix {self.color_fix!r}: choose {', '.join(DIFFBIR_COLOR_FIXES)}")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile or self.tile_margin < 0:
            raise BlindSRError("dmsr: the tile overlap must be in [0, tile) and the margin >= 0")


@dataclass
class LossConfig:
    """Eqs. 3-9 and the estimator's loss; every term has its weight (Table 8) and can be switched off (Table 6)
    with a weight of 0."""

    w_l1: float = 1.0  # L1(Z_SR, X_HR^0)                           (Eq. 3)
    w_per: float = 2.0  # perceptual                                 (Eq. 3)
    w_adv: float = 0.1  # generator term of the LR-conditioned GAN   (Eqs. 4-5)
    w_dm: float = 0.5  # distribution matching, stop-gradient form  (Eqs. 6-7)
    w_eps: float = 1.0  # L_eps: the prior predicts eps_SR on the re-noised HR (Eq. 8)
    w_t: float = 1.0  # the estimator's L1 to its ground truth     (Sec. 3.1)
    perceptual: str = "ssim"  # ssim | none (see the module docstring)
    adv_loss: str = "hinge"  # hinge (InvSR's) | bce (the log-loss the paper's Eqs. 4-5 write)
    dm_t_range: list[int] = field(default_factory=lambda: [1, 500])  # t of L_dm, uniform (paper: [1, 500])
    dm_normalize: bool = True  # DMD's normalisation of the score difference by mean |Z_SR - X_HR|
    t_target: str = "ssim"  # lpips (paper) | ssim (offline default) | l2
    t_target_scale: float = 1.0  # distance that maps to t_max (ssim/lpips: 1; l2: about 0.25 is typical)
    t_hat_grad: bool = False  # let E's losses reach the estimator through t̂
    adv_start: int = 0  # iteration from which the generator's adversarial term is on (InvSR: 10k)

    def __post_init__(self) -> None:
        for name, value, choices in (("perceptual", self.perceptual, PERCEPTUAL),
                                     ("t_target", self.t_target, T_TARGETS), ("adv_loss", self.adv_loss, ADV_LOSSES)):
            if value not in choices:
                raise BlindSRError(f"dmsr: loss.{name} {value!r}: choose {', '.join(choices)}")
        lo, hi = self.dm_t_range
        if not 0 <= lo <= hi:
            raise BlindSRError("dmsr: loss.dm_t_range must be [lo, hi] with 0 <= lo <= hi")
        if min(self.w_l1, self.w_per, self.w_adv, self.w_dm, self.w_eps, self.w_t) < 0:
            raise BlindSRError("dmsr: loss weights must be >= 0")
