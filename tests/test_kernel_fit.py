"""The reported BlindDiff kernel: the anisotropic Gaussian fitted to (SR, LR) by least squares (kernel_fit.py)."""

from __future__ import annotations

import math

import pytest
import torch

from blindsr.degradations import kernel_fit
from blindsr.degradations.kernel_fit import fit_gaussian_kernel, gaussian_bank, normal_equations
from blindsr.degradations.kernels import gaussian_kernel
from blindsr.errors import BlindSRError
from blindsr.methods.blinddiff import BlindDiffPipeline, degrade
from blindsr.models.mcformer import MCFormer, MCFormerConfig


def texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A seeded image with detail at every scale (a blur is identifiable from it), (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g)
    for s in (2, 4, 8):
        x = x + torch.nn.functional.interpolate(torch.rand(1, 3, h // s, w // s, generator=g), size=(h, w),
                                                mode="bilinear", align_corners=False)
    return x / 4


@pytest.mark.parametrize("down", ["bicubic", "stride"])
def test_normal_equations_reproduce_the_measurement_operator(down):
    """kᵀGk - 2bᵀk + yᵀy is ||y - degrade(x, k)||² on the pixels away from the border, for any kernel."""
    x, y = texture(48, 40), torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    g, b = normal_equations(x[0], y[0], 21, 4, down, border=3)
    k = torch.rand(21, 21, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = (y - degrade(x.double(), k[None], 4, down))[..., 3:-3, 3:-3]
    quad = k.flatten() @ g @ k.flatten() - 2 * b @ k.flatten() + y[..., 3:-3, 3:-3].double().pow(2).sum()
    assert quad.item() == pytest.approx(r.pow(2).sum().item(), rel=1e-9)


@pytest.mark.parametrize(("sx", "sy", "theta", "down"), [(2.5, 1.2, math.pi / 6, "bicubic"), (1.8, 1.8, 0.0, "bicubic"),
                                                         (3.2, 2.0, 2 * math.pi / 3, "stride")])
def test_fit_recovers_the_kernel_from_the_true_hr(sx, sy, theta, down):
    """Noise-free and with 8-bit rounding, a kernel of the bank is found again from (HR, LR); also on a large image
    (only its centre is used)."""
    hr = texture(640, 480)
    k = gaussian_kernel(21, sx, sy, theta)
    lr = degrade(hr, k[None], 4, down)
    for y in (lr, (lr * 255).round() / 255):
        k_hat = fit_gaussian_kernel(hr, y, 4, down=down, max_lr=48)
        assert k_hat.shape == (1, 21, 21) and abs(k_hat.sum().item() - 1) < 1e-5
        assert (k_hat[0] - k).abs().sum().item() < 0.02


def test_fit_per_image_and_only_from_the_centre():
    """Each image of a batch gets its own kernel; what lies outside the centre max_lr² crop does not matter."""
    hr = torch.cat([texture(160, 160, 0), texture(160, 160, 1)])
    ks = torch.stack([gaussian_kernel(21, 1.5), gaussian_kernel(21, 3.0, 1.0, math.pi / 4)])
    lr = degrade(hr, ks, 4)
    k_hat = fit_gaussian_kernel(hr, lr, 4, max_lr=24)
    assert (k_hat - ks).abs().flatten(1).sum(1).max().item() < 0.02
    spoiled = lr.clone()
    spoiled[..., :4, :] = 0  # rows outside the centre 24² (+ margin) of the 40² LR
    torch.testing.assert_close(fit_gaussian_kernel(hr, spoiled, 4, max_lr=24), k_hat)


def test_bank_and_errors():
    bank = gaussian_bank(21)
    assert bank.shape[1] == 441 and torch.allclose(bank.sum(1), torch.ones(len(bank), dtype=bank.dtype))
    with pytest.raises(BlindSRError, match="not 4x"):
        fit_gaussian_kernel(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 12, 12), 4)
    with pytest.raises(BlindSRError, match="too small"):
        kernel_fit.normal_equations(torch.rand(3, 16, 16), torch.rand(3, 4, 4), 21, 4, border=2)


def test_pipeline_reports_the_fit_or_the_models_estimate():
    torch.manual_seed(0)
    pipe = BlindDiffPipeline(MCFormer(MCFormerConfig.tiny()).eval())
    lr = texture(16, 16)
    g = [torch.Generator().manual_seed(0)]
    fit = pipe(lr, steps=2, generator=g, return_trajectory=True)
    model = pipe(lr, steps=2, generator=[torch.Generator().manual_seed(0)], kernel_estimate="model")
    torch.testing.assert_close(fit.sr, model.sr)  # only the reported kernel differs
    torch.testing.assert_close(model.kernel, fit.kernels_traj[-1])
    torch.testing.assert_close(fit.kernel, fit_gaussian_kernel(fit.sr, lr, 4))


@pytest.mark.parametrize("down", ["bicubic", "stride"])
def test_normal_equations_strided_view_equals_resizing_every_shifted_copy(down, monkeypatch):
    """The fast construction (one filtering, A a strided view) gives the same G and b as resizing each of the
    size² shifted copies; an LR image too small for shift-invariant edge taps takes the per-copy path."""
    x, y = texture(64, 56)[0], torch.rand(3, 16, 14, generator=torch.Generator().manual_seed(3))
    fast = normal_equations(x, y, 21, 4, down, border=3)
    monkeypatch.setattr(kernel_fit, "_shift_invariant_taps", lambda *a: None)
    slow = normal_equations(x, y, 21, 4, down, border=3)
    for f, s in zip(fast, slow, strict=True):
        assert torch.allclose(f, s, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    assert kernel_fit._shift_invariant_taps(16, 4, 4, "bicubic", 0, 4) is None  # the edge rows are mirrored
