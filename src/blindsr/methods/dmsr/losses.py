"""DM-SR's training losses (Sec. 3, Eqs. 3-9) and the estimator's target (Sec. 3.1), for both backends.

Generator side (E_θ and T update; μψ, the VAE and D are frozen here):

    L_Z   = w_l1 L1(Z_SR, X_HR^0) + w_per L_per + w_adv L_adv + w_dm L_dm                         (Eq. 3)
    L_eps = || μψ(sqrt(ᾱ) X_HR^0 + sqrt(1-ᾱ) sg(ε_SR), t̂) - ε_SR ||²                            (Eq. 8)
    L_dm  = ½ || Z_SR - sg(Z_SR - g) ||²,  g = μψ(Z̃_SR, t) - μψ(X̃_HR, t) with shared noise,  (Eqs. 6-7)
            Z̃_SR = sqrt(ᾱ_t) Z_SR + sqrt(1-ᾱ_t) n, X̃_HR likewise, t ~ U[dm_t_range]
    L_tot = L_Z + w_eps L_eps + w_t |t̂ - t_gt| / t_max

The gradients reach E_θ only where the paper puts them: through ε_SR and Z_SR (which go back through the
frozen μψ of Eq. 2 into E_θ); the score difference g and the L_eps target are computed without a graph.
Discriminator side: ``d_loss(D(X_HR^0, LR), D(sg(Z_SR), LR))``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.diffusion.parameterization import noised
from blindsr.methods.dmsr.config import LossConfig
from blindsr.methods.dmsr.core import FrozenPrior, decompose
from blindsr.methods.dmsr.nets import g_loss


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """``module``'s parameters need no gradient inside the block (restored after it)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _gauss(channels: int, device, dtype, size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)


def ssim_per_image(a: Tensor, b: Tensor) -> Tensor:
    """Differentiable SSIM (B,) of images in [0, 1] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, valid
    part only, channel mean). A loss, not the BasicSR metric of ``blindsr.metrics`` (which is float64 numpy)."""
    c = a.shape[1]
    w = _gauss(c, a.device, a.dtype)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def timestep_target(lr_up: Tensor, hr: Tensor, cfg: LossConfig, t_max: int, lpips=None) -> Tensor:
    """t̂'s ground truth (Sec. 3.1): the distance of the bicubic-upsampled LR to the HR, normalised by
    ``cfg.t_target_scale`` and clipped to [0, 1], times ``t_max`` (less degraded -> smaller t̂). ``lpips``: a
    callable (a, b) -> (B,) for ``t_target: lpips`` (e.g. pyiqa's, with its weights)."""
    with torch.no_grad():
        a, b = lr_up.float().clamp(0, 1), hr.float()
        if cfg.t_target == "ssim":
            d = 1 - ssim_per_image(a, b)
        elif cfg.t_target == "l2":
            d = (a - b).pow(2).flatten(1).mean(1).sqrt()
        else:
            if lpips is None:
                from blindsr.errors import BlindSRError

                raise BlindSRError("dmsr: loss.t_target lpips needs an LPIPS model (pyiqa and its weights); "
                                   "use ssim or l2 offline")
            d = lpips(a, b).reshape(-1)
        return (d / cfg.t_target_scale).clamp(0, 1) * (t_max - 1)


def dm_gradient(prior: FrozenPrior, z_sr: Tensor, x_hr: Tensor, cfg: LossConfig,
                generator: torch.Generator) -> Tensor:
    """g of Eqs. 6-7: the frozen denoiser's noise estimates on Z_SR and X_HR^0 noised with the SAME noise at
    the same t ~ U[dm_t_range], their difference (optionally normalised per image by mean |Z_SR - X_HR|, DMD's
    weighting). No graph."""
    from blindsr.diffusion.samplers import randn

    with torch.no_grad():
        b = z_sr.shape[0]
        lo, hi = cfg.dm_t_range
        t = torch.randint(lo, hi + 1, (b,), generator=generator, device=generator.device).to(z_sr.device)
        n = randn(tuple(z_sr.shape), generator, z_sr.device)
        a = prior.abar(t.float()).reshape(-1, 1, 1, 1)
        g = prior.eps(noised(z_sr, n, a), t.float()) - prior.eps(noised(x_hr, n, a), t.float())
        if cfg.dm_normalize:
            g = g / (z_sr - x_hr).abs().flatten(1).mean(1).clamp_min(1e-4).reshape(-1, 1, 1, 1)
        return g


def generator_losses(prior: FrozenPrior, encoder, estimator, discriminator, lr: Tensor, lr_up: Tensor,
                     hr: Tensor, cfg: LossConfig, generator: torch.Generator, step: int,
                     lpips=None, use_prior: bool = True) -> dict[str, Tensor]:
    """Every generator-side term (module docstring) and their weighted sum ``loss``; also ``z_sr`` and
    ``x_hr`` (detached) for the discriminator step. ``use_prior=False``: the "no prior" baseline, Z_SR = X_SR
    (no call of μψ; L_eps and L_dm must be off)."""
    t_hat, _ = estimator(lr)
    t_gt = timestep_target(lr_up, hr, cfg, prior.process.t_max, lpips)
    t_in = t_hat if cfg.t_hat_grad else t_hat.detach()
    with torch.no_grad():
        x_hr = prior.to_space(hr)
    x_sr = encoder(lr_up, t_in)  # X_SR^t̂, meant to match the noisy HR at t̂ (Eq. 1)
    if use_prior:
        eps_sr, z_sr = decompose(prior, x_sr, t_in)  # Eq. 2 (the gradient goes back through the frozen μψ)
    else:
        if cfg.w_dm > 0 or cfg.w_eps > 0:
            from blindsr.errors import BlindSRError

            raise BlindSRError("dmsr: without the prior (model.use_prior false) set loss.w_dm and loss.w_eps to 0")
        eps_sr, z_sr = None, x_sr
    terms: dict[str, Tensor] = {"t_hat": t_hat.detach().mean(), "t_rmse": (t_hat - t_gt).pow(2).mean().sqrt()}
    terms["l_t"] = (t_hat - t_gt).abs().mean() / prior.process.t_max  # L1 in units of t_max
    terms["l1"] = (z_sr - x_hr).abs().mean()
    zero = z_sr.new_zeros(())
    terms["per"] = zero
    if cfg.w_per > 0 and cfg.perceptual == "ssim":
        terms["per"] = (1 - ssim_per_image(prior.to_image(z_sr).clamp(0, 1), hr)).mean()
    terms["adv"] = zero
    w_adv = cfg.w_adv if step >= cfg.adv_start else 0.0
    if w_adv > 0:  # only E_θ learns from the generator term: D is frozen for it
        with frozen(discriminator):
            terms["adv"] = g_loss(discriminator(z_sr, lr), cfg.adv_loss)
    terms["dm"] = zero
    if cfg.w_dm > 0:
        g = dm_gradient(prior, z_sr.detach(), x_hr, cfg, generator)
        terms["dm"] = 0.5 * F.mse_loss(z_sr, (z_sr - g).detach())  # its gradient is g / numel
    terms["eps"] = zero
    if cfg.w_eps > 0:
        a = prior.abar(t_in).reshape(-1, 1, 1, 1)
        with torch.no_grad():
            target = prior.eps(noised(x_hr, eps_sr.detach(), a), t_in.detach())
        terms["eps"] = F.mse_loss(eps_sr, target)
    terms["loss"] = (cfg.w_l1 * terms["l1"] + cfg.w_per * terms["per"] + w_adv * terms["adv"]
                     + cfg.w_dm * terms["dm"] + cfg.w_eps * terms["eps"] + cfg.w_t * terms["l_t"])
    terms["z_sr"], terms["x_hr"] = z_sr.detach(), x_hr
    return terms
