"""Blur kernels and kernel PCA: normalisation, symmetry, moments, rotation, fixed sets, seeding, PCA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from blindsr.degradations import kernels as K
from blindsr.degradations.pca import KernelPCA, fit_pca, fit_random_pca
from blindsr.errors import BlindSRError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_gaussian_matches_dan_formula_and_sums_to_one():
    ax = np.arange(-21 // 2 + 1.0, 21 // 2 + 1.0)  # DAN's grid
    xx, yy = np.meshgrid(ax, ax)
    ref = np.exp(-(xx**2 + yy**2) / (2 * 2.3**2))
    ref /= ref.sum()
    k = K.gaussian_kernel(21, 2.3)
    assert k.shape == (21, 21) and k.dtype == torch.float32
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(k.numpy(), ref, atol=1e-7)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0)) and torch.allclose(k, k.flip(1))


@pytest.mark.parametrize("sx,sy,theta", [(1.5, 1.5, 0.0), (2.0, 1.0, 0.0), (2.5, 1.2, 0.7), (1.0, 2.2, -2.0)])
def test_second_moment_equals_covariance(sx, sy, theta):
    k = K.gaussian_kernel(31, sx, sy, theta)
    mean, cov = K.kernel_moments(k)
    r = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    expected = r @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ r.T
    assert mean.abs().max() < 1e-9
    torch.testing.assert_close(cov, expected, atol=2e-3, rtol=2e-3)


def test_rotation_convention():
    # theta = 0 with sigma_x > sigma_y spreads along the columns (x is horizontal)
    k = K.gaussian_kernel(21, 3.0, 1.0)
    assert k[10, 13] > k[13, 10]
    # a quarter turn swaps the axes; half a turn is the identity; theta = pi/4 lies on the diagonal
    torch.testing.assert_close(K.gaussian_kernel(21, 3.0, 1.0, math.pi / 2), K.gaussian_kernel(21, 1.0, 3.0),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(K.gaussian_kernel(21, 3.0, 1.0, math.pi), k, atol=1e-7, rtol=0)
    d = K.gaussian_kernel(21, 3.0, 1.0, math.pi / 4)
    # +pi/4 rotates +x towards +y (rows grow downwards): mass on the main diagonal
    assert d[13, 13] > d[13, 7] * 10
    torch.testing.assert_close(d, d.T)


def test_generalized_and_plateau():
    q = K.mahalanobis(21, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.3]))[0]
    g = K.bivariate_kernels(21, 2.0, 1.0, 0.3, beta=1.0, kind="generalized")[0]
    torch.testing.assert_close(g, K.gaussian_kernel(21, 2.0, 1.0, 0.3))
    g2 = K.bivariate_kernels(21, 2.0, 1.0, 0.3, beta=2.0, kind="generalized")[0].double()
    ref = torch.exp(-0.5 * q**2)
    torch.testing.assert_close(g2, ref / ref.sum(), atol=1e-7, rtol=1e-5)
    p = K.bivariate_kernels(21, 2.0, 1.0, 0.3, beta=1.5, kind="plateau")[0].double()
    ref = 1 / (1 + q**1.5)
    torch.testing.assert_close(p, ref / ref.sum(), atol=1e-7, rtol=1e-5)
    with pytest.raises(BlindSRError):
        K.bivariate_kernels(21, 1.0, kind="box")
    with pytest.raises(BlindSRError):
        K.gaussian_kernel(20, 1.0)


def test_random_gaussian_kernels_settings():
    k, params = K.random_gaussian_kernels(64, 21, 0.2, 4.0, rate_iso=1.0, generator=gen())
    assert k.shape == (64, 21, 21) and len(params) == 64
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(64))
    assert all(p["kernel_type"] == "iso" and 0.2 <= p["sigma_x"] <= 4.0 and p["theta"] == 0 for p in params)
    torch.testing.assert_close(k, k.transpose(1, 2))
    k2, params2 = K.random_gaussian_kernels(64, 21, 0.6, 5.0, rate_iso=0.0, generator=gen())
    assert all(p["kernel_type"] == "aniso" and -math.pi <= p["theta"] <= math.pi for p in params2)
    sig = torch.tensor([[p["sigma_x"], p["sigma_y"]] for p in params2])
    assert sig.min() >= 0.6 and sig.max() <= 5.0 and (sig[:, 0] != sig[:, 1]).all()
    # each kernel equals the formula with its reported parameters
    p = params2[5]
    torch.testing.assert_close(k2[5], K.gaussian_kernel(21, p["sigma_x"], p["sigma_y"], p["theta"]))
    # mixed: roughly rate_iso of them isotropic
    _, pm = K.random_gaussian_kernels(400, 21, rate_iso=0.3, generator=gen(1))
    frac = sum(q["kernel_type"] == "iso" for q in pm) / 400
    assert 0.2 < frac < 0.4


def test_random_disturb_is_bounded_multiplicative_noise():
    clean, _ = K.random_gaussian_kernels(8, 21, 0.6, 5.0, rate_iso=0.0, random_disturb=False, generator=gen(3))
    noisy, _ = K.random_gaussian_kernels(8, 21, 0.6, 5.0, rate_iso=0.0, random_disturb=True, generator=gen(3))
    torch.testing.assert_close(noisy.sum((1, 2)), torch.ones(8))
    for n, c in zip(noisy, clean, strict=True):
        ratio = n[c > 1e-20] / c[c > 1e-20]  # (1 + U(0, .25)) / Z with Z in [1, 1.25]
        ratio = ratio / ratio.min()
        assert ratio.max() <= 1.25 + 1e-4 and ratio.max() > 1.2
    assert not torch.allclose(noisy, clean)


def test_seeding():
    a, pa = K.random_gaussian_kernels(4, generator=gen(7), rate_iso=0.5, random_disturb=True)
    b, pb = K.random_gaussian_kernels(4, generator=gen(7), rate_iso=0.5, random_disturb=True)
    c, _ = K.random_gaussian_kernels(4, generator=gen(8), rate_iso=0.5, random_disturb=True)
    assert torch.equal(a, b) and pa == pb and not torch.equal(a, c)
    m1, _ = K.random_motion_kernels(3, generator=gen(1))
    m2, _ = K.random_motion_kernels(3, generator=gen(1))
    m3, _ = K.random_motion_kernels(3, generator=gen(2))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_gaussian8():
    k = K.gaussian8_kernels()
    assert k.shape == (8, 21, 21)
    assert K.GAUSSIAN8_SIGMAS == tuple(np.round(np.linspace(1.8, 3.2, 8), 1))
    for i, s in enumerate(np.linspace(1.8, 3.2, 8)):
        torch.testing.assert_close(k[i], K.gaussian_kernel(21, float(s)))
    # centre values fall as sigma grows; exact value of the first one from the closed form
    assert (k[:-1, 10, 10] > k[1:, 10, 10]).all()
    ax = np.arange(-10, 11.0)
    g = np.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * 1.8**2))
    assert k[0, 10, 10].item() == pytest.approx(1 / g.sum(), rel=1e-6)


def test_mixed_kernels_types_and_params():
    g = gen(4)
    seen = set()
    for _ in range(60):
        k, p = K.random_mixed_kernel(15, generator=g)
        seen.add(p["kernel_type"])
        assert k.shape == (15, 15) and k.sum().item() == pytest.approx(1, abs=1e-5)
        assert 0.2 <= p["sigma_x"] <= 3.0
        if p["kernel_type"].endswith("_iso") or p["kernel_type"] == "iso":
            torch.testing.assert_close(k, k.T)
        if p["kernel_type"].startswith("generalized"):
            assert 0.5 <= p["beta"] <= 4.0
        if p["kernel_type"].startswith("plateau"):
            assert 1.0 <= p["beta"] <= 2.0
    assert {"iso", "aniso", "generalized_iso", "plateau_iso"} <= seen
    k, _ = K.random_mixed_kernel(11, ["iso"], [1.0], noise_range=(0.75, 1.25), generator=gen(0))
    assert k.sum().item() == pytest.approx(1, abs=1e-5) and not torch.allclose(k, k.T)


def test_sinc_kernel():
    wc, size = math.pi / 2, 13
    k = K.circular_lowpass_kernel(wc, size).double()
    assert k.sum().item() == pytest.approx(1, abs=1e-6)
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(k, k.flip(0))
    assert (k < 0).any()  # ringing lobes
    # independent closed form (scipy's Bessel J1), normalised
    ax = np.arange(size) - (size - 1) / 2
    r = np.hypot(ax[:, None], ax[None])
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = wc * scipy.special.j1(wc * r) / (2 * np.pi * r)
    ref[r == 0] = wc**2 / (4 * np.pi)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), atol=1e-6)
    padded = K.circular_lowpass_kernel(wc, size, pad_to=21)
    assert padded.shape == (21, 21) and torch.equal(padded[4:17, 4:17], k.float())
    # a low-pass: the frequency response at Nyquist is far below DC
    f = torch.fft.fft2(padded.double()).abs()
    assert f[10, 10] < 0.2 * f[0, 0]


def test_motion_kernels():
    k, params = K.random_motion_kernels(6, 21, intensity=0.5, generator=gen(0))
    assert k.shape == (6, 21, 21) and (k >= 0).all()
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(6))
    assert all(p["kernel_type"] == "motion" for p in params)
    # centred on the grid (centroid near the middle)
    mean, _ = K.kernel_moments(k)
    assert mean.abs().max() < 2.0
    # intensity 0 is a straight line: the covariance is (nearly) rank 1; intensity 1 is not
    _, c0 = K.kernel_moments(K.random_motion_kernels(16, 21, 0.0, generator=gen(1))[0])
    _, c1 = K.kernel_moments(K.random_motion_kernels(16, 21, 1.0, generator=gen(1))[0])
    lin0 = torch.linalg.eigvalsh(c0)
    lin1 = torch.linalg.eigvalsh(c1)
    assert (lin0[:, 0] / lin0[:, 1]).max() < 0.12
    assert (lin1[:, 0] / lin1[:, 1]).median() > 0.1
    with pytest.raises(BlindSRError):
        K.random_motion_kernels(1, 21, intensity=2.0)


def test_choice_follows_probabilities():
    g = gen(0)
    draws = [K.choice(["a", "b", "c"], g, [0.7, 0.3, 0.0]) for _ in range(500)]
    assert draws.count("c") == 0 and 0.6 < draws.count("a") / 500 < 0.8


# -------------------------------------------------------------------------------------------- PCA
def test_pca_reconstruction_and_dan_convention(tmp_path):
    pca = fit_random_pca(n=3000, dim=10, generator=gen(0))  # DAN setting 1 (iso, sigma in [0.2, 4])
    assert pca.matrix.shape == (441, 10) and pca.kernel_size == 21
    torch.testing.assert_close(pca.matrix.T @ pca.matrix, torch.eye(10), atol=1e-5, rtol=0)
    test, _ = K.random_gaussian_kernels(200, generator=gen(1))
    rec = pca.decode(pca.encode(test, affine=True), affine=True)
    rel = ((rec - test).norm(dim=(1, 2)) / test.norm(dim=(1, 2))).max()
    assert rel < 0.02, rel
    # DAN convention: code = k @ P (no mean), decode = code @ P^T; equals the affine code shifted by mean @ P
    code = pca.encode(test)
    torch.testing.assert_close(code, test.reshape(200, -1) @ pca.matrix)
    torch.testing.assert_close(code - pca.mean @ pca.matrix, pca.encode(test, affine=True), atol=1e-6, rtol=0)
    assert pca.decode(code).shape == (200, 21, 21)
    # kernels of another setting (anisotropic, disturbed) reconstruct worse than the fitted setting
    other, _ = K.random_gaussian_kernels(200, sig_min=0.6, sig_max=5, rate_iso=0, random_disturb=True,
                                         generator=gen(2))
    rel_other = ((pca.decode(pca.encode(other, True), True) - other).norm(dim=(1, 2)) /
                 other.norm(dim=(1, 2))).max()
    assert rel_other > 2 * rel
    # save / load round trip
    path = tmp_path / "pca.safetensors"
    pca.save(path)
    back = KernelPCA.load(path)
    assert torch.equal(back.matrix, pca.matrix) and torch.equal(back.mean, pca.mean) and back.kernel_size == 21


def test_pca_errors(tmp_path):
    with pytest.raises(BlindSRError):
        fit_pca(torch.rand(10, 5, 4), dim=2)
    with pytest.raises(BlindSRError):
        fit_pca(torch.rand(10, 5, 5), dim=30)
    with pytest.raises(BlindSRError):
        KernelPCA.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BlindSRError):
        KernelPCA.load(bad)
    pca = fit_pca(K.gaussian8_kernels(), dim=3)
    with pytest.raises(BlindSRError):
        pca.encode(torch.rand(2, 100))
