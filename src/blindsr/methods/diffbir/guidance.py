"""DiffBIR region-adaptive restoration guidance (paper v2 §3.3 "region-adaptive restoration guidance"; official v2.0.0 ``cond_fn.py`` + ``apply_cond_fn``).

At each guided step the clean-latent estimate ``z0_hat`` is pulled toward the stage-1 output ``I_s1``:

    W = 1 - tanh(patch_sum(|Sobel(gray(I_s1))|))               (low weight on edges / texture)
    L(z0) = sum_n mean_{c,h,w} W * (D(z0) - I_s1)^2              (pixel space, D = VAE decoder)
    z0 <- z0 - s * 3000 * dL/dz0 / posterior_mean_coef1[t]       (the posterior mean moves by the step)

``s`` is the user scale (CLI ``--g_scale``); the official code multiplies it by 3000 internally, and so do we.
The mean over (C,H,W) makes the pull on each pixel weaken as the image grows; SD always works on its 512 tile,
so the official code does not notice. ``norm_elements = N > 0`` (our extension, the pixel backend's default)
divides the sum by a fixed N instead, so that a given s pulls each pixel equally hard at every image size; it
equals the official mean on an image of exactly N elements. With
``weight=None`` the loss is plain MSE (official ``MSEGuidance``). The latent-space variant uses ``decode_fn=None``
and a latent target; the official code only supports plain MSE there (its weighted loss crashes on 4 channels),
``latent_weight_map`` is our extension that average-pools the pixel weights to latent resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from blindsr.diffusion.samplers import GuidanceResult, StepState
from blindsr.errors import BlindSRError

Tensor = torch.Tensor

INTERNAL_SCALE = 3000.0  # official `Guidance.__init__`: self.scale = scale * 3000
GRAY = (0.2989, 0.5870, 0.1140)  # official RGB -> gray weights
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


@dataclass
class GuidanceConfig:
    """When and how to guide (official v2.0.0 flags in brackets)."""

    scale: float = 0.0  # s [--g_scale]; 0 disables guidance. Multiplied by INTERNAL_SCALE. README example: 0.5
    loss: Literal["w_mse", "mse"] = "w_mse"  # [--g_loss]
    space: Literal["rgb", "latent"] = "rgb"  # [--g_space, official default "latent"; the paper and README use rgb]
    start: int = 1001  # guide while stop < t + 1 < start, t = original timestep [--g_start]
    stop: int = -1  # [--g_stop]
    repeat: int = 1  # gradient steps per sampling step [--g_repeat]
    patch_size: int = 2  # Sobel-sum patch (hard-coded 2 in the official code)
    norm_elements: int = 0  # 0: mean over (C,H,W) as official; N > 0: sum / N, the same pull at every image size

    def active(self, t: int) -> bool:
        """Official window test ``t_stop < t_now < t_start`` with ``t_now = t + 1``."""
        return self.scale != 0 and self.stop < int(t) + 1 < self.start


class Guided(NamedTuple):
    z0: torch.Tensor  # the guided clean-latent estimate
    loss: float  # mean loss over the repeats (before each step)


def rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) with the official luma weights."""
    w = torch.tensor(GRAY, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """sqrt(Gx^2 + Gy^2) of a (N,1,H,W) image; replicate padding, cross-correlation."""
    k = torch.tensor((SOBEL_X, SOBEL_Y), dtype=gray.dtype, device=gray.device)[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return g.pow(2).sum(dim=1, keepdim=True).sqrt()


def gradient_weight_map(img: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """W = 1 - tanh(sum of Sobel magnitudes over each non-overlapping patch), broadcast to pixels.

    ``img``: (N,3,H,W) in [0, 1] (the stage-1 output), H and W multiples of ``patch_size``. Returns (N,1,H,W).
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise BlindSRError(f"gradient_weight_map needs an (N,3,H,W) RGB batch, got shape {tuple(img.shape)}")
    h, w = img.shape[-2:]
    if h % patch_size or w % patch_size:
        raise BlindSRError(f"image size {h}x{w} is not a multiple of the guidance patch size {patch_size}")
    mag = sobel_magnitude(rgb_to_gray(img))
    sums = F.avg_pool2d(mag, patch_size) * patch_size**2
    g = torch.tanh(sums).repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return 1 - g


def latent_weight_map(img: torch.Tensor, factor: int = 8, patch_size: int = 2) -> torch.Tensor:
    """Our extension for the latent variant: the pixel weight map average-pooled by the VAE factor."""
    return F.avg_pool2d(gradient_weight_map(img, patch_size), factor)


def guidance_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  norm_elements: int = 0) -> torch.Tensor:
    """The region-adaptive loss: mean over (C,H,W) of ``weight * (pred - target)^2`` per sample (or the sum over
    ``norm_elements``), summed over the batch."""
    err = (pred - target).pow(2)
    if weight is not None:
        err = err * weight
    err = err.flatten(1)
    return (err.sum(dim=1) / norm_elements if norm_elements else err.mean(dim=1)).sum()


def guidance_gradient(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                      scale: float = 1.0, norm_elements: int = 0) -> torch.Tensor:
    """The official ``cond_fn`` output: ``-dL/dpred * scale * 3000`` (closed form of the autograd result)."""
    n = norm_elements or pred[0].numel()
    g = 2 * (pred - target) / n
    if weight is not None:
        g = g * weight
    return -g * (scale * INTERNAL_SCALE)


def apply_guidance(z0_hat: torch.Tensor, decode_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                   target: torch.Tensor, scale: float, *, weight: torch.Tensor | None = None,
                   posterior_coef1: torch.Tensor | float = 1.0, repeat: int = 1, norm_elements: int = 0) -> Guided:
    """Guide ``z0_hat`` (scaled latent) toward ``target`` (official v2.0.0 ``apply_cond_fn``).

    ``decode_fn`` maps a scaled latent to an image in [-1, 1] (``vae_decode``); ``None`` = latent space (then
    ``target`` is a latent). Each repeat re-decodes, takes ``Δz0 = -s * 3000 * dL/dz0`` and sets
    ``z0 <- z0 + Δz0 / posterior_coef1`` so that the posterior mean ``c1 * z0 + c2 * x_t`` moves by exactly ``Δz0``.
    """
    decode = decode_fn or (lambda z: z)
    z0, losses = z0_hat.detach(), []
    target = target.detach()
    for _ in range(repeat):
        with torch.enable_grad():
            z = z0.clone().requires_grad_(True)
            loss = guidance_loss(decode(z), target, weight, norm_elements)
            (grad,) = torch.autograd.grad(loss, z)
        losses.append(loss.item())
        z0 = z0 - grad * (scale * INTERNAL_SCALE) / posterior_coef1
    return Guided(z0, sum(losses) / max(len(losses), 1))


# ----------------------------------------------------------------------------------------------------------
# As a hook of the shared sampling loop
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GuidanceTarget:
    """What the guidance compares with: the stage-1 image in [0, 1] (rgb) or its latent (latent space)."""

    image: Tensor  # (B,3,H,W) stage-1 output, cropped to the latent's un-padded area x 8
    latent: Tensor | None = None  # c_img (posterior mode), for the latent-space variant


class RestorationGuidance:
    """The region-adaptive guidance step as an x0 hook: x0 moves by ``-s * 3000 * dL/dx0 / c`` where ``c`` is
    the stepper's coefficient of x0 in the next sample (``StepState.x0_weight``: ``posterior_mean_coef1`` for
    ddpm, as official v2.0.0; 1 for the DPM solvers), so the next sample moves by exactly the guidance step.
    ``factor``: image pixels per position of the sampled space (8 for SD's latents, 1 for the pixel backend)."""

    needs_grad = False  # the gradient goes through the VAE decoder only, never through the UNet

    def __init__(self, config: GuidanceConfig, target: GuidanceTarget, decode: Callable[[Tensor], Tensor] | None,
                 factor: int = 8):
        self.config, self.decode, self.factor = config, decode, factor
        self.losses: list[float] = []
        self.target = self.weight = None
        if config.scale != 0:
            if config.space == "rgb":
                self.target = target.image * 2 - 1
                self.weight = gradient_weight_map(target.image, config.patch_size) if config.loss == "w_mse" else None
            else:
                if target.latent is None:
                    raise BlindSRError("latent-space guidance needs the condition latent")
                self.target, self.weight = target.latent, None  # official: w_mse is RGB-only
                if config.loss == "w_mse":
                    self.weight = latent_weight_map(target.image, factor, config.patch_size)

    def guide(self, x0: Tensor, t_orig: int, coef: float) -> Tensor:
        """Return x0 moved by the guidance step when the step is inside [start, stop]."""
        if self.target is None or not self.config.active(t_orig):
            return x0
        h, w = self.target.shape[-2:]
        f = self.factor if self.config.space == "rgb" else 1
        part = x0[..., : h // f, : w // f]  # the padding is not compared
        decode = self.decode if self.config.space == "rgb" else None
        res = apply_guidance(part, decode, self.target, self.config.scale, weight=self.weight,
                             posterior_coef1=coef, repeat=self.config.repeat,
                             norm_elements=self.config.norm_elements)
        self.losses.append(res.loss)
        x0 = x0.clone()
        x0[..., : h // f, : w // f] = res.z0.to(x0.dtype)
        return x0

    def __call__(self, state: StepState) -> GuidanceResult:
        return GuidanceResult(x0=self.guide(state.x0, int(state.t[0]), state.x0_weight))
