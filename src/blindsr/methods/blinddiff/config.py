"""BlindDiff configs: the diffusion process + Algorithm-2 sampling defaults, and the Algorithm-1 loss weights.

Paper vs official code (lifengcs/BlindDiff; see research/blinddiff_uddm.md §1.3-1.5), each a switch:

==========================  ===========================  ==========================  ==========
item                        paper                        official code               default
==========================  ===========================  ==========================  ==========
kernel loss                 L1                           MSE on the 441 vector       mse (code)
guidance norm               ||.||^2                      ||.|| (DPS, non-squared)    l2 (code)
downsampling in A(x0)       "↓s"                         MATLAB bicubic x1/4         bicubic
extra 0.1 ||x0_hat|| term   absent                       present                     0.1 (code)
==========================  ===========================  ==========================  ==========

Sampler defaults follow the official code because that code produced the published numbers (and the
non-squared norm is the DPS form whose step size does not depend on the image size); the paper's
variants are one argument away (``norm="l2sq", x0_reg=0``).
Pixel space is [0, 1] (no [-1, 1] rescale) and x0_hat is never clipped inside the loop (official).
Configs are read and written with ``blindsr.config.from_dict`` / ``to_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.parameterization import check_kind
from blindsr.diffusion.respace import make_diffusion
from blindsr.errors import BlindSRError
from blindsr.registry import (
    BLINDDIFF_DOWNS,
    BLINDDIFF_KERNEL_ESTIMATES,
    BLINDDIFF_KERNEL_MODES,
    BLINDDIFF_NORMS,
    BLINDDIFF_SAMPLERS,
)

NORMS, DOWNS, KERNEL_MODES, SAMPLERS = BLINDDIFF_NORMS, BLINDDIFF_DOWNS, BLINDDIFF_KERNEL_MODES, BLINDDIFF_SAMPLERS
# fields that define the model's diffusion process: fixed when the model is loaded, not per call
PROCESS_FIELDS = ("diffusion_steps", "schedule", "train_respacing", "prediction")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BlindSRError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class BlindDiffConfig:
    """Diffusion process and Algorithm-2 defaults of a BlindDiff model (every field can be overridden per call)."""

    diffusion_steps: int = 1000  # T of the base DDPM process
    schedule: str = "linear"  # DDPM linear betas 1e-4 -> 0.02
    train_respacing: str = "500"  # official: train AND sample on the same 500-step respacing (DiT style)
    sample_steps: int = 500  # default number of sampling steps (official: 500), evenly spaced ("linspace")
    lam: float = 1.0  # step size of the kernel-aware gradient (official alpha = 1)
    lam_ref_steps: int | None = None  # None: lam per step (official). N: lam * N / steps per step, i.e. the total
    #                                   pull of N steps at lam, whatever the step count (same as official at N)
    norm: str = "l2"  # "l2" (official, DPS) | "l2sq" (paper's squared norm)
    down: str = "bicubic"  # "bicubic" (MATLAB, official) | "stride" (s-fold subsampling)
    x0_reg: float = 0.1  # official extra 0.1 * ||x0_hat||_2 in the guidance loss; 0 = paper
    kernel_mode: str = "estimated"  # "estimated" (k_t from the model) | "bicubic" (identity kernel, ablation)
    kernel_estimate: str = "fit"  # the kernel reported (SRResult.kernel, --save-kernel): "fit" = the anisotropic
    #                               Gaussian that best re-degrades the SR output into the LR input (blindsr,
    #                               degradations/kernel_fit.py) | "model" = MCFormer's k_t of the last step (paper)
    tile: int | None = None  # HR tile size of the denoiser for large images (None = whole image)
    tile_overlap: int = 32  # HR pixels of overlap between tiles when tiling is on
    sampler: str = "ddpm"  # "ddpm" (ancestral, learned variance: official) | "ddim" (deterministic, eta 0)
    start: float = 1.0  # 1 = from pure noise (Algorithm 2); s < 1: from bicubic↑y noised to s·T (SDEdit/StableSR-style)
    prediction: str = "eps"  # what the network's first 3 channels predict: "eps" (official, paper) | "x0" |
    #                          "v"; guided-diffusion's predict_xstart switch (x0) and Salimans & Ho's v

    def __post_init__(self) -> None:
        check_kind(self.prediction)
        check_choice("norm", self.norm, NORMS)
        check_choice("down", self.down, DOWNS)
        check_choice("kernel_mode", self.kernel_mode, KERNEL_MODES)
        check_choice("kernel_estimate", self.kernel_estimate, BLINDDIFF_KERNEL_ESTIMATES)
        check_choice("sampler", self.sampler, SAMPLERS)
        if not 0.0 < self.start <= 1.0:
            raise BlindSRError(f"start must be in (0, 1], got {self.start}")
        if self.sample_steps < 1:
            raise BlindSRError("--steps must be at least 1")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise BlindSRError(f"--tile-overlap must be in [0, tile), got tile={self.tile} overlap={self.tile_overlap}")

    def train_diffusion(self) -> GaussianDiffusion:
        return make_diffusion(self.diffusion_steps, self.schedule, self.train_respacing)

    def base_diffusion(self) -> GaussianDiffusion:
        return make_diffusion(self.diffusion_steps, self.schedule)


@dataclass
class BlindDiffLossConfig:
    """Algorithm 1 loss weights and the paper's ablation switches."""

    mse_weight: float = 1.0  # MSE of the prediction (eps in Algorithm 1)
    vb_weight: float = 1.0  # learned-range VB term (improved-DDPM hybrid loss, mean detached)
    kernel_weight: float = 1.0  # kernel constraint; 0 = "w/o kernel constraint" ablation
    kernel_loss: str = "mse"  # "mse" (official, flat 441 vector) | "l1" (paper)
    learn_sigma: bool = True  # use the variance half of the output (needs out_channels = 6)
    nll_bins: str = "pm1"  # decoder NLL bins at t = 0: "pm1" (official constants) | "unit" ([0, 1] 8-bit)
    kernel_head_only: bool = False  # True: train only the kernel head (MCFormer.predictor) on the kernel loss;
    #                                 the denoiser is frozen and not run (a finished model's head, trained
    #                                 further at a fraction of a full step's cost; needs train.init_from)

    def __post_init__(self) -> None:
        check_choice("kernel_loss", self.kernel_loss, ("mse", "l1"))
        if self.kernel_head_only and self.kernel_weight <= 0:
            raise BlindSRError("loss.kernel_head_only trains the kernel head on the kernel loss: kernel_weight must be > 0")
