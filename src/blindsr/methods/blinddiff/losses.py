"""BlindDiff Algorithm 1: the training loss (hybrid diffusion loss + kernel constraint)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.diffusion.gaussian import GaussianDiffusion, hybrid_loss, mean_flat
from blindsr.diffusion.parameterization import check_kind
from blindsr.diffusion.samplers import Generators, randn
from blindsr.errors import BlindSRError
from blindsr.methods.blinddiff.config import BlindDiffLossConfig
from blindsr.models.mcformer import predicted_kernels


def fit_kernel(kernel: Tensor, size: int) -> Tensor:
    """Ground-truth kernels (B, h, w) centred in a (B, size, size) canvas (e.g. 11x11 x2 kernels in 21x21)."""
    kernel = kernel.reshape(kernel.shape[0], *kernel.shape[-2:]) if kernel.ndim == 3 else \
        kernel.reshape(kernel.shape[0], size, size)
    h, w = kernel.shape[-2:]
    if h > size or w > size or (size - h) % 2 or (size - w) % 2:
        raise BlindSRError(f"kernel of size {h}x{w} cannot be centred in the model's {size}x{size} kernel")
    ph, pw = (size - h) // 2, (size - w) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def uniform_t(n: int, b: int, generator: Generators, device: torch.device) -> Tensor:
    """t ~ U{0..n-1} per sample (one generator, or one per sample), drawn on the generator's device."""
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.randint(0, n, (b,), generator=generator, device=gdev).to(device)
    return torch.cat([uniform_t(n, 1, g, device) for g in generator])


def kernel_term(model: torch.nn.Module, k_raw: Tensor, kernel: Tensor | None, cfg: BlindDiffLossConfig) -> Tensor:
    """The kernel constraint per sample: mean over the k*k entries of (k̂ - k)² (official) or |k̂ - k| (paper)."""
    if kernel is None:
        raise BlindSRError("the kernel loss needs ground-truth kernels (or set kernel_weight=0)")
    k_hat = predicted_kernels(model, k_raw)
    diff = k_hat - fit_kernel(kernel.to(k_hat), k_hat.shape[-1])
    return mean_flat(diff**2 if cfg.kernel_loss == "mse" else diff.abs())


def training_losses(model: torch.nn.Module, diffusion: GaussianDiffusion, hr: Tensor, lr: Tensor,
                    kernel: Tensor | None, *, generator: Generators = None,
                    cfg: BlindDiffLossConfig | None = None, prediction: str = "eps") -> dict[str, Tensor]:
    """Algorithm 1 on a batch: scalar ``mse``, ``vb`` (learn_sigma), ``kernel`` (weight > 0) and ``loss``.

    ``diffusion`` is the RESPACED training process (``BlindDiffConfig().train_diffusion()``); t is uniform
    over its steps and the model sees the original timesteps. hr (B, 3, H, W), lr (B, 3, H/s, W/s) in
    [0, 1]; kernel (B, h, w) ground-truth blur kernels (or None when the kernel weight is 0).
    ``prediction``: the regression target of the first 3 output channels — eps (Algorithm 1), x0 or v
    (``blindsr.diffusion.parameterization.target``); the VB term sees the same x0 estimate either way.
    """
    cfg = cfg or BlindDiffLossConfig()
    check_kind(prediction)
    b, c = hr.shape[:2]
    t = uniform_t(diffusion.num_timesteps, b, generator, hr.device)
    noise = randn(hr.shape, generator, hr.device, hr.dtype)
    x_t = diffusion.q_sample(hr, t, noise)  # Eq. 2
    if cfg.kernel_head_only:  # the head sees what it sees inside forward; the denoiser is not run
        k_raw = model(x_t, diffusion.original_t(t), lr, kernel_only=True)[1]  # through any DDP wrapper
        terms = {"kernel": kernel_term(model, k_raw, kernel, cfg)}
        return {"kernel": terms["kernel"].mean(), "loss": (cfg.kernel_weight * terms["kernel"]).mean()}
    out, k_raw = model(x_t, diffusion.original_t(t), lr)
    var_values = None
    if cfg.learn_sigma:
        if out.shape[1] != 2 * c:
            raise BlindSRError("learn_sigma=True needs a model with out_channels = 2 * in_channels")
        var_values = out[:, c:]
    terms = hybrid_loss(diffusion, out[:, :c], prediction, var_values, noise, hr, x_t, t, bins=cfg.nll_bins)
    loss = cfg.mse_weight * terms["mse"] + (cfg.vb_weight * terms["vb"] if "vb" in terms else 0.0)
    if cfg.kernel_weight > 0:
        terms["kernel"] = kernel_term(model, k_raw, kernel, cfg)
        loss = loss + cfg.kernel_weight * terms["kernel"]
    terms["loss"] = loss
    return {k: v.mean() for k, v in terms.items()}
