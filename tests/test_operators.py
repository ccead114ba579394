"""Operators: blur and imresize against the BlindDiff fixture and a hand-written MATLAB formula, noise, USM,
quantisation, JPEG (real encoder and differentiable model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blindsr.degradations import jpeg as J
from blindsr.degradations import operators as O
from blindsr.degradations.kernels import gaussian_kernel
from blindsr.errors import BlindSRError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def consumer(reference_dir):
    path = reference_dir / "blinddiff" / "tiny_ref.pt"
    if not path.is_file():
        pytest.fail(f"fixture missing: {path}")
    return torch.load(path, weights_only=True)["kernel_consumer"]


# ------------------------------------------------------------------------------------------ blur
def test_blur_matches_blinddiff_batchblur(consumer):
    k = consumer["kernel"].view(21, 21)
    out = O.blur(consumer["img"], k)
    torch.testing.assert_close(out, consumer["blurred"], atol=1e-6, rtol=0)
    # cross-correlation, no flip: an impulse comes out as the kernel rotated by 180 degrees
    d = O.blur(consumer["delta"], k)
    torch.testing.assert_close(d, consumer["delta_blurred"], atol=1e-7, rtol=0)
    torch.testing.assert_close(d[0, 0, 10:31, 10:31], torch.rot90(k, 2), atol=1e-7, rtol=0)
    assert not torch.allclose(torch.rot90(k, 2), k)  # the fixture kernel is asymmetric, so this can fail


def test_blur_per_sample_and_broadcast():
    x = torch.rand(3, 2, 24, 20, generator=gen())
    ks = torch.stack([gaussian_kernel(7, s) for s in (0.5, 1.0, 2.0)])
    per = O.blur(x, ks)
    for i in range(3):
        torch.testing.assert_close(per[i:i + 1], O.blur(x[i:i + 1], ks[i]))
    torch.testing.assert_close(O.blur(x, ks[1]), O.blur(x, ks[1:2].expand(3, -1, -1)))
    # a constant image stays constant (kernel sums to 1, reflect padding)
    torch.testing.assert_close(O.blur(torch.full((1, 3, 8, 8), 0.3), ks[2]), torch.full((1, 3, 8, 8), 0.3))
    # tiny images fall back to replicate padding instead of failing
    assert O.blur(torch.rand(1, 1, 4, 4), gaussian_kernel(21, 2.0)).shape == (1, 1, 4, 4)
    with pytest.raises(BlindSRError):
        O.blur(x, torch.rand(2, 5, 5))


def test_blur_gradients_are_autograds():
    """blur's own backward (both gradients as forward convolutions) passes gradcheck in float64 for per-sample,
    shared, odd and even kernels, and equals conv2d's autograd in float32 on a 21 x 21 guidance-sized case."""
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64, generator=gen(), requires_grad=True)
    for k in (torch.rand(2, 5, 4, dtype=torch.float64, generator=gen()), torch.rand(5, 5, dtype=torch.float64)):
        assert torch.autograd.gradcheck(O.blur, (x, k.requires_grad_(True)))
    x = torch.rand(2, 3, 40, 36, generator=gen(), requires_grad=True)
    k = torch.rand(2, 21, 21, generator=gen(), requires_grad=True)
    g = torch.randn(2, 3, 40, 36, generator=gen())
    ours = torch.autograd.grad(O.blur(x, k), (x, k), g)
    xp = torch.nn.functional.pad(x.reshape(1, 6, 40, 36), (10, 10, 10, 10), mode="reflect")
    ref = torch.nn.functional.conv2d(xp, k.repeat_interleave(3, dim=0).unsqueeze(1), groups=6).view(2, 3, 40, 36)
    for a, b in zip(ours, torch.autograd.grad(ref, (x, k), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------- imresize
def matlab_imresize_1d(v: list[float], out_len: int, scale: float, antialias: bool = True) -> list[float]:
    """Independent scalar transcription of MATLAB's imresize contributions (bicubic) for one line."""
    def cubic(t):
        a = abs(t)
        if a <= 1:
            return 1.5 * a**3 - 2.5 * a**2 + 1
        if a <= 2:
            return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
        return 0.0

    n = len(v)
    if scale < 1 and antialias:
        def h(t):
            return scale * cubic(scale * t)
        width = 4.0 / scale
    else:
        h, width = cubic, 4.0
    out = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + j for j in range(math.ceil(width) + 2)]
        w = [h(u - t) for t in taps]
        s = sum(w)
        acc = 0.0
        for t, wt in zip(taps, w, strict=True):
            m = (t - 1) % (2 * n)  # mirror [1..n, n..1]
            idx = m if m < n else 2 * n - 1 - m
            acc += wt / s * v[idx]
        out.append(acc)
    return out


def matlab_imresize_2d(a: np.ndarray, oh: int, ow: int, sh: float, sw: float, antialias=True) -> np.ndarray:
    rows = np.array([matlab_imresize_1d(list(col), oh, sh, antialias) for col in a.T]).T
    return np.array([matlab_imresize_1d(list(r), ow, sw, antialias) for r in rows])


@pytest.mark.parametrize("shape,scale,size,antialias", [
    ((9, 11), 0.25, None, True), ((10, 9), 1 / 3, None, True), ((5, 6), 2.0, None, True),
    ((7, 8), 0.5, None, False), ((10, 9), None, (7, 5), True), ((6, 6), None, (13, 9), True)])
def test_imresize_matches_hand_formula(shape, scale, size, antialias):
    a = np.random.default_rng(0).random(shape)
    if size is None:
        oh, ow = math.ceil(shape[0] * scale), math.ceil(shape[1] * scale)
        sh = sw = scale
    else:
        (oh, ow), sh, sw = size, size[0] / shape[0], size[1] / shape[1]
    ref = matlab_imresize_2d(a, oh, ow, sh, sw, antialias)
    x = torch.from_numpy(a)[None, None]
    out = O.imresize(x, scale=scale, size=size, antialias=antialias)
    assert out.shape[-2:] == (oh, ow) and out.dtype == torch.float64
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-12)
    out32 = O.imresize(x.float(), scale=scale, size=size, antialias=antialias)
    np.testing.assert_allclose(out32[0, 0].numpy(), ref, atol=1e-5)


def test_imresize_matches_blinddiff_fixture(consumer):
    lr = O.imresize(consumer["blurred"], 1 / 4)
    assert lr.shape == consumer["lr"].shape
    torch.testing.assert_close(lr, consumer["lr"], atol=1e-6, rtol=0)
    # and the whole consumer chain: blur then MATLAB bicubic x1/4
    lr2 = O.imresize(O.blur(consumer["img"], consumer["kernel"].view(21, 21)), 1 / 4)
    torch.testing.assert_close(lr2, consumer["lr"], atol=1e-6, rtol=0)


def test_imresize_properties():
    c = torch.full((2, 3, 12, 16), 0.7)
    torch.testing.assert_close(O.imresize(c, 0.25), torch.full((2, 3, 3, 4), 0.7))
    torch.testing.assert_close(O.imresize(c, 3), torch.full((2, 3, 36, 48), 0.7))
    x = torch.rand(1, 1, 16, 16, generator=gen())
    assert O.imresize(x, 1.0).allclose(x, atol=1e-6)
    # antialiasing matters when downsampling, not when upsampling
    assert not torch.allclose(O.imresize(x, 0.5), O.imresize(x, 0.5, antialias=False))
    torch.testing.assert_close(O.imresize(x, 2.0), O.imresize(x, 2.0, antialias=False))
    assert O.imresize(x.to(torch.bfloat16), 0.5).dtype == torch.bfloat16
    with pytest.raises(BlindSRError):
        O.imresize(x)
    with pytest.raises(BlindSRError):
        O.imresize(x, scale=0.5, size=(4, 4))


def test_stride_modcrop_resize():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(O.downsample_stride(x, 4), x[..., ::4, ::4])
    assert torch.equal(O.downsample_stride(x, 4, offset=2)[0, 0], torch.tensor([[18.0, 22.0], [50.0, 54.0]]))
    with pytest.raises(BlindSRError):
        O.downsample_stride(x, 4, offset=4)
    assert O.modcrop(torch.rand(3, 13, 10), 4).shape == (3, 12, 8)
    for mode in ("area", "bilinear", "bicubic", "nearest", "matlab"):
        assert O.resize(x, (5, 3), mode).shape == (1, 1, 5, 3)
    with pytest.raises(BlindSRError):
        O.resize(x, (5, 3), "lanczos")


# ------------------------------------------------------------------------------------------ noise
def test_gaussian_noise_statistics():
    x = torch.full((3, 3, 64, 64), 0.5)
    sigma = torch.tensor([0.01, 0.05, 0.1])
    n = O.gaussian_noise(x, sigma, gray=torch.tensor([0.0, 1.0, 0.0]), generator=gen())
    std = n.std(dim=(1, 2, 3))
    torch.testing.assert_close(std, sigma, rtol=0.05, atol=0)
    assert n.mean().abs() < 2e-3
    assert torch.equal(n[1, 0], n[1, 1]) and torch.equal(n[1, 1], n[1, 2])  # gray: the same in every channel
    assert not torch.equal(n[0, 0], n[0, 1])
    y = O.add_gaussian_noise(torch.zeros(1, 3, 8, 8), 0.5, generator=gen())
    assert y.min() >= 0 and y.max() <= 1
    a = O.add_gaussian_noise(x, 0.05, generator=gen(1))
    assert torch.equal(a, O.add_gaussian_noise(x, 0.05, generator=gen(1)))
    assert not torch.equal(a, O.add_gaussian_noise(x, 0.05, generator=gen(2)))


def test_poisson_noise_statistics():
    # signal-dependent: variance = img / vals * scale^2 (vals = 2^ceil(log2(#unique)))
    img = torch.cat([torch.full((1, 3, 64, 32), 0.2), torch.full((1, 3, 64, 32), 0.8)], dim=-1)
    n = O.poisson_noise(img, scale=1.0, generator=gen())
    vals = 2.0  # two unique values
    for sl, level in ((slice(0, 32), 0.2), (slice(32, 64), 0.8)):
        part = n[..., sl]
        assert part.mean().abs() < 0.05
        assert part.var().item() == pytest.approx(level / vals, rel=0.1)
    g = O.poisson_noise(img, scale=1.0, gray=1.0, generator=gen())
    assert torch.equal(g[:, 0], g[:, 1])
    half = O.poisson_noise(img, scale=0.5, generator=gen())
    torch.testing.assert_close(half, n * 0.5)


# ---------------------------------------------------------------------------------- USM, quantise
def test_usm_sharp():
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(O.usm_sharp(flat), flat)
    x = torch.zeros(1, 1, 64, 64)
    x[..., 32:] = 0.6
    x = O.blur(x, gaussian_kernel(9, 2.0)) + 0.2
    y = O.usm_sharp(x)
    assert y.min() >= 0 and y.max() <= 1
    grad = lambda t: (t[..., 1:] - t[..., :-1]).abs().max()  # noqa: E731
    assert grad(y) > 1.2 * grad(x)  # edges get steeper
    assert O.cv2_gaussian_1d(51).numel() == 51
    # OpenCV's sigma for ksize 51: 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8
    k = O.cv2_gaussian_1d(51)
    assert (k[25] / k[26]).item() == pytest.approx(math.exp(1 / (2 * 8.0**2)), rel=1e-9)


def test_quantize():
    x = torch.rand(2, 3, 8, 8, generator=gen(), requires_grad=True)
    q = O.quantize(x)
    torch.testing.assert_close(q * 255, (q * 255).round())
    assert (q - x).abs().max() <= 0.5 / 255 + 1e-7
    s = O.quantize(x, straight_through=True)
    s.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


# ------------------------------------------------------------------------------------------- JPEG
@pytest.fixture(scope="module")
def photo(data_dir):
    from PIL import Image

    im = Image.open(data_dir / "val" / "Set5" / "butterfly.png").convert("RGB")
    a = np.asarray(im, dtype=np.float32)[:96, :80] / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None]


@pytest.mark.parametrize("backend,kw", [("pil", {}), ("torch", {}), ("torch", {"model": "diffjpeg"})])
def test_jpeg_quality_ordering(photo, backend, kw):
    errs = [((J.jpeg(photo, q, backend, **kw) - photo) ** 2).mean().item() for q in (10, 30, 60, 90, 100)]
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True)), errs
    assert errs[-1] < 2e-4


def psnr(a, b):
    return -10 * math.log10(((a - b) ** 2).mean().item())


def test_jpeg_torch_close_to_real_encoder(photo):
    for q in (25, 75):
        real = J.jpeg_pil(photo, q)
        assert psnr(J.jpeg_torch(photo, q), real) > 38, q
        assert psnr(J.jpeg_torch(photo, q, model="diffjpeg"), real) > 33, q
    # saturated colour detail: libjpeg's fancy chroma upsampling matters (diffjpeg's nearest is far off)
    busy = O.imresize(torch.rand(1, 3, 17, 20, generator=gen(0)), size=(68, 80)).clamp(0, 1)
    busy = O.quantize(busy)
    real = J.jpeg_pil(busy, 60)
    assert psnr(J.jpeg_torch(busy, 60), real) > 36
    assert psnr(J.jpeg_torch(busy, 60), real) > psnr(J.jpeg_torch(busy, 60, model="diffjpeg"), real) + 8
    # per-sample quality in one batch equals separate calls; gray images work
    two = torch.cat([photo, photo.flip(-1)])
    out = J.jpeg_torch(two, torch.tensor([20.0, 80.0]))
    torch.testing.assert_close(out[1:], J.jpeg_torch(photo.flip(-1), 80.0))
    assert J.jpeg_pil(photo[:, :1], 50).shape == (1, 1, 96, 80)
    assert J.jpeg_torch(photo[:, :1, :50, :41], 50).shape == (1, 1, 50, 41)  # padding to 16 and back
    with pytest.raises(BlindSRError):
        J.jpeg(photo, 50, backend="cv2")
    with pytest.raises(BlindSRError):
        J.jpeg_torch(photo, 50, model="mozjpeg")


def test_jpeg_tables():
    qy, qc = J.quant_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert torch.equal(qy[0], torch.tensor(J.LUMA_TABLE, dtype=torch.float64))  # quality 50 = the base table
    assert torch.equal(qy[1], torch.ones(8, 8, dtype=torch.float64))  # quality 100: all ones
    assert qy[2, 0, 0] == math.floor((16 * 500 + 50) / 100)  # libjpeg scaling at quality 10
    assert qc.max() <= 255
    cy, _ = J.quant_tables(torch.tensor([75.0]), tables="diffjpeg")
    torch.testing.assert_close(cy[0], torch.tensor(J.LUMA_TABLE, dtype=torch.float64) * 0.5)
    d = J.dct_matrix(8, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("rounding", ["cubic", "ste"])
def test_jpeg_differentiable(photo, rounding):
    x = photo.clone().mul(0.9).add(0.05).requires_grad_(True)
    y = J.jpeg_torch(x, 40, rounding=rounding)
    loss = ((y - 0.5) ** 2).sum()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    hard = J.jpeg_torch(x.detach(), 40)
    assert ((y.detach() - hard) ** 2).mean() < (1e-12 if rounding == "ste" else 1e-4)  # ~ the hard forward
    lo, hi = (((J.jpeg_torch(photo, q, rounding=rounding) - photo) ** 2).mean() for q in (20, 90))
    assert lo > hi
