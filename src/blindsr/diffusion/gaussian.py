"""Gaussian diffusion algebra (DDPM, Ho et al. 2020; improved DDPM, Nichol & Dhariwal 2021).

``GaussianDiffusion(betas, timestep_map)`` holds the schedule tensors in float64 and casts them to the
input's dtype/device on use. ``t`` arguments are indices into *this* process (for a respaced process,
respaced indices); ``timestep_map[t]`` gives the original timestep the model was trained on.

Pixel range: the algebra is range-agnostic, except for the discretised decoder NLL at t = 0 whose bins
assume a data range (``NLL_BINS``). BlindDiff works on [0, 1] images but keeps guided-diffusion's
[-1, 1] constants (half-bin 1/255, tails below -0.999 / above 0.999); ``"pm1"`` reproduces that, and
``"unit"`` uses bins matched to 8-bit data in [0, 1] (half-bin 0.5/255, tails at the two end values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from blindsr.diffusion.parameterization import noised, split, target

# (half bin width, lower tail edge, upper tail edge) of the discretised Gaussian decoder (improved DDPM Eq. 13)
NLL_BINS: dict[str, tuple[float, float, float]] = {
    "pm1": (1.0 / 255.0, -0.999, 0.999),  # guided-diffusion / BlindDiff official (built for [-1, 1] data)
    "unit": (0.5 / 255.0, 0.5 / 255.0, 1.0 - 0.5 / 255.0),  # 8-bit data in [0, 1]
}
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def extract(a: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``a[t]`` (float64 schedule) cast to ``like``'s dtype/device and shaped (B, 1, 1, ...) for broadcasting."""
    v = a[t.detach().long().cpu()].to(device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# --- KL and likelihood terms (improved DDPM Sec. 2, Eq. 10-13) ---------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Tanh approximation of the standard normal CDF (as used by improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: str = "pm1") -> Tensor:
    """log P(x) of the bin around x under N(mean, e^(2 log_scale)); the end bins take the whole tails."""
    half, lo, hi = NLL_BINS[bins]
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < lo, log_cdf_plus, torch.where(x > hi, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Schedule tensors (float64) and the forward/posterior algebra of a (possibly respaced) process."""

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be a non-empty 1-D sequence in (0, 1]")
        T = betas.numel()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log variance clipped: the variance is 0 at t = 0, so reuse the t = 1 value there
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.timestep_map = (torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map)).long()
        if self.timestep_map.numel() != T:
            raise ValueError("timestep_map must have one entry per step")

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __repr__(self) -> str:
        return f"GaussianDiffusion(steps={self.num_timesteps}, original={int(self.timestep_map[-1]) + 1})"

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        return extract(self.alphas_cumprod, t, like)

    def original_t(self, t: Tensor) -> Tensor:
        """Original (un-respaced) timestep indices that the model receives."""
        return self.timestep_map.to(t.device)[t.long()]

    # forward process q(x_t | x_0) (Ho et al. Eq. 4)
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return noised(x0, noise, self.abar(t, x0))

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        abar = self.abar(t, x0)
        return abar.sqrt() * x0, (1 - abar).expand_as(x0), torch.log(1 - abar).expand_as(x0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 7)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        var = extract(self.posterior_variance, t, x_t).expand_as(x_t)
        logvar = extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, logvar

    def model_logvar(self, t: Tensor, like: Tensor, var_type: str = "fixed_small",
                     var_values: Tensor | None = None) -> Tensor:
        """log variance of p(x_{t-1} | x_t): fixed small (beta~), fixed large (beta) or learned range."""
        if var_type == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, like).expand_as(like)
        if var_type == "fixed_large":  # beta_t, with beta~_1 at t = 0 for a sane decoder (improved DDPM)
            lv = torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]])) if self.num_timesteps > 1 \
                else torch.log(self.betas)
            return extract(lv, t, like).expand_as(like)
        if var_type == "learned_range":
            if var_values is None:
                raise ValueError("learned_range variance needs the model's var_values")
            return self.learned_range_logvar(var_values, t)
        raise ValueError(f"unknown var_type {var_type!r}; choose one of {VAR_TYPES}")

    def learned_range_logvar(self, var_values: Tensor, t: Tensor) -> Tensor:
        """Improved DDPM Eq. 15: log Sigma = v log beta_t + (1 - v) log beta~_t, with v = (out + 1) / 2."""
        min_log = extract(self.posterior_log_variance_clipped, t, var_values)
        max_log = extract(torch.log(self.betas), t, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vb_terms_bpd(self, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor, model_logvar: Tensor,
                     bins: str = "pm1") -> Tensor:
        """Per-sample L_{t-1} in bits/dim: KL(q posterior || p) for t > 0, decoder NLL at t = 0 (Eq. 10-13)."""
        x0, x_t, model_mean, model_logvar = (a.float() for a in (x0, x_t, model_mean, model_logvar))
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar, bins)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)


def hybrid_loss(diffusion: GaussianDiffusion, pred: Tensor, kind: str, var_values: Tensor | None, noise: Tensor,
                x0: Tensor, x_t: Tensor, t: Tensor, bins: str = "pm1") -> dict[str, Tensor]:
    """Improved-DDPM hybrid loss terms, per sample: ``mse`` = ||target - pred||^2 (mean; the target of the
    prediction ``kind``: eps in Ho et al. / Algorithm 1), and with a learned-range variance ``vb`` = L_vlb with
    the mean detached, so the VB term trains only the variance (Sec. 3.1)."""
    abar = diffusion.abar(t, x_t)
    terms = {"mse": mean_flat((target(kind, x0, noise, abar).float() - pred.float()) ** 2)}
    if var_values is not None:
        _, x0_frozen = split(pred.detach(), kind, x_t, abar)
        mean, _, _ = diffusion.q_posterior(x0_frozen, x_t, t)
        logvar = diffusion.learned_range_logvar(var_values, t)
        terms["vb"] = diffusion.vb_terms_bpd(x0, x_t, t, mean, logvar, bins)
    return terms
