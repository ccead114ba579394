"""DM-SR's fixed parts and its algebra: the frozen denoiser μψ in its space (SD-Turbo's latent space, or the pixel
prior's [-1, 1] images), ᾱ at a continuous t̂, the decomposition of Eq. 2 and the one- or multi-step output.

Both backends are one :class:`FrozenPrior`: an eps-prediction ``UNet2DConditionModel`` called with a fixed
``encoder_hidden_states`` (SD-Turbo: the fixed prompt's text embedding, computed once; the pixel prior: its null
token), plus the maps between images in [0, 1] and its space (SD: the frozen VAE, posterior mean x 0.18215; pixel:
``2x - 1``, "the VAE is the identity"). Everything downstream -- decomposition, losses, tiling -- is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from blindsr.diffusion.parameterization import noised, split
from blindsr.methods.dmsr.config import DMSRProcess


def alpha_bar_at(table: Tensor, t: Tensor, mode: str = "loglinear") -> Tensor:
    """ᾱ at (possibly non-integer) timesteps ``t`` (B,) from the integer table (T,): see
    ``DMSRProcess.interpolation``. Returns float32 on ``t``'s device."""
    table = table.to(t.device)
    t = t.double().clamp(0, table.numel() - 1)
    if mode == "round":
        return table[t.round().long()].float()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = t - lo
    if mode == "linear":
        return (table[lo] * (1 - w) + table[hi] * w).float()
    return torch.exp(table[lo].log() * (1 - w) + table[hi].log() * w).float()


@dataclass
class FrozenPrior:
    """μψ with its context and its space (see the module docstring). ``vae``: an ``AutoencoderKL`` (SD backend)
    or None (pixel backend). ``multiple``: sides of the space must be multiples of it (the UNet's levels)."""

    unet: Any
    context: Tensor  # (1, L, D) encoder_hidden_states for every call
    process: DMSRProcess = field(default_factory=DMSRProcess)
    vae: Any | None = None
    scaling: float = 1.0  # SD: 0.18215
    multiple: int = 8

    def __post_init__(self) -> None:
        self._abar = self.process.alphas_cumprod()
        for m in (self.unet, self.vae):
            if m is not None:
                m.requires_grad_(False).eval()

    @property
    def factor(self) -> int:
        """Image pixels per position of the space (8 for SD's latents, 1 for the pixel prior)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def abar(self, t: Tensor) -> Tensor:
        return alpha_bar_at(self._abar, t, self.process.interpolation)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """μψ(x, t): the predicted noise at float timesteps ``t`` (B,)."""
        dtype = next(self.unet.parameters()).dtype
        ctx = self.context.to(x.device, dtype).expand(x.shape[0], -1, -1)
        return self.unet(x.to(dtype), t.to(x.device).float(), encoder_hidden_states=ctx).sample.float()

    def to_space(self, img: Tensor) -> Tensor:
        """An image in [0, 1] in μψ's space: X^0 (SD: the VAE posterior mean x scaling; pixel: 2 img - 1)."""
        if self.vae is None:
            return img * 2 - 1
        return self.vae.encode(img * 2 - 1).latent_dist.mean * self.scaling

    def to_image(self, z: Tensor) -> Tensor:
        """Back to an image in [0, 1] (not clamped: losses see the raw values)."""
        if self.vae is None:
            return (z + 1) / 2
        return (self.vae.decode(z / self.scaling).sample + 1) / 2


def _b(a: Tensor) -> Tensor:
    return a.reshape(-1, 1, 1, 1)


def decompose(prior: FrozenPrior, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 2, one call of μψ: ``ε_SR = μψ(X, t)``, ``Z_SR = (X - sqrt(1 - ᾱ_t) ε_SR) / sqrt(ᾱ_t)``."""
    return split(prior.eps(x, t), "eps", x, _b(prior.abar(t)))


def restore_latent(prior: FrozenPrior, x: Tensor, t_hat: Tensor, steps: int = 1,
                   reuse_eps: bool = True) -> tuple[Tensor, Tensor]:
    """``(Z_SR, ε_SR)`` from the encoder's X_SR^t̂: Eq. 2 at t̂, then (Table 4) DDIM over ``t_k = t̂ (N - k) / N``,
    k = 1..N-1, re-noising with ε_SR (``reuse_eps``) or with each step's own noise estimate."""
    eps0, z = decompose(prior, x, t_hat)
    eps = eps0
    for k in range(1, steps):
        t_k = t_hat * (steps - k) / steps
        eps, z = decompose(prior, noised(z, eps0 if reuse_eps else eps, _b(prior.abar(t_k))), t_k)
    return z, eps0
