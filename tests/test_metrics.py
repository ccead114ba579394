"""PSNR/SSIM against scikit-image and closed forms; the pyiqa wrapper's offline checks with a fake pyiqa."""

from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from blindsr.errors import BlindSRError, WeightsError
from blindsr.metrics import learned as L
from blindsr.metrics import psnr, rgb_to_y, ssim

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image SSIM in the MATLAB/BasicSR setting. skimage filters the whole image and then averages over
    the interior that excludes a border of (11-1)/2 = 5 px: exactly the 'valid' windows of BasicSR."""
    return structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255,
                                 channel_axis=2 if a.ndim == 3 else None)


def sk_psnr(a, b) -> float:
    return peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=255)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255.0


def noisy_pair(rng, shape, amp=25):
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-amp, amp + 1, shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.fixture(scope="module")
def set5_pairs(data_dir):
    """Two Set5 images and Gaussian-blurred copies, as uint8 RGB arrays."""
    out = []
    for name in ("bird", "butterfly"):
        im = Image.open(data_dir / "val" / "Set5" / f"{name}.png").convert("RGB")
        out.append((np.array(im), np.array(im.filter(ImageFilter.GaussianBlur(1.5)))))
    return out


# ------------------------------------------------------------------------------------------------ PSNR/SSIM


@pytest.mark.parametrize("shape", [(23, 31, 3), (40, 17, 3), (16, 16), (11, 11, 1)])
def test_random_images_match_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    a, b = noisy_pair(rng, shape)
    assert psnr(b, a) == pytest.approx(sk_psnr(a, b), rel=1e-12)
    a2, b2 = (a[..., 0], b[..., 0]) if a.ndim == 3 and a.shape[2] == 1 else (a, b)
    assert ssim(b, a) == pytest.approx(sk_ssim(a2, b2), rel=1e-10)


def test_real_images_rgb_and_y_match_skimage(set5_pairs):
    for gt, blurred in set5_pairs:
        c = 4
        g, p = gt[c:-c, c:-c], blurred[c:-c, c:-c]
        assert psnr(blurred, gt, crop_border=c) == pytest.approx(sk_psnr(g, p), rel=1e-12)
        assert ssim(blurred, gt, crop_border=c) == pytest.approx(sk_ssim(g, p), rel=1e-10)
        # Y from skimage's own BT.601 conversion (an independent implementation of the same matrix)
        gy, py = rgb2ycbcr(g)[..., 0], rgb2ycbcr(p)[..., 0]
        assert psnr(blurred, gt, crop_border=c, y_channel=True) == pytest.approx(sk_psnr(gy, py), rel=1e-10)
        assert ssim(blurred, gt, crop_border=c, y_channel=True) == pytest.approx(sk_ssim(gy, py), rel=1e-9)
        # blur really hurts: sanity on the range
        assert 20 < psnr(blurred, gt, crop_border=c, y_channel=True) < 40
        assert 0.5 < ssim(blurred, gt, crop_border=c, y_channel=True) < 0.99


def test_tensor_and_uint8_inputs_agree(set5_pairs):
    gt, blurred = set5_pairs[0]
    t_gt, t_bl = to_tensor(gt), to_tensor(blurred)
    assert psnr(t_bl, t_gt, 4, True) == pytest.approx(psnr(blurred, gt, 4, True), abs=1e-5)
    assert ssim(t_bl, t_gt, 4, True) == pytest.approx(ssim(blurred, gt, 4, True), abs=1e-7)
    # float64 tensors carry the exact k/255 values
    d_gt, d_bl = (torch.from_numpy(a).permute(2, 0, 1).double() / 255 for a in (gt, blurred))
    assert psnr(d_bl, d_gt) == pytest.approx(psnr(blurred, gt), abs=1e-9)


def test_hand_computed_values():
    a = np.zeros((2, 2), np.uint8)
    b = a.copy()
    b[0, 0] = 255  # MSE = 255^2 / 4 -> PSNR = 10 log10(4)
    assert psnr(b, a) == pytest.approx(10 * math.log10(4), abs=1e-12)
    # constant 11x11 images: one window, zero variance -> SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2 = 100.0, 120.0
    x, y = np.full((11, 11), m1 / 255), np.full((11, 11), m2 / 255)
    assert ssim(x, y) == pytest.approx((2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1), rel=1e-12)
    # 13x13: a 3x3 map, still constant
    x, y = np.full((13, 13, 3), m1 / 255), np.full((13, 13, 3), m2 / 255)
    assert ssim(x, y) == pytest.approx((2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1), rel=1e-12)


def test_floats_are_not_rounded():
    x = torch.full((3, 12, 12), 0.5, dtype=torch.float64)
    y = x + 0.1 / 255  # a tenth of a grey level: rounding would make the images identical
    assert psnr(y, x) == pytest.approx(10 * math.log10(255**2 / 0.01), rel=1e-9)
    assert ssim(y, x) < 1.0


def test_identical_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)
    assert psnr(a, a) == math.inf and psnr(a, a, 2, True) == math.inf
    assert ssim(a, a) == 1.0 and ssim(to_tensor(a), to_tensor(a), 2, True) == 1.0


def test_crop_border_removes_border_differences():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 30, 3)).astype(np.uint8)
    b = a.copy()
    b[:3] = 0
    b[:, -3:] = 255
    assert math.isfinite(psnr(b, a)) and ssim(b, a) < 1
    assert psnr(b, a, crop_border=3) == math.inf and ssim(b, a, crop_border=3) == 1.0
    assert math.isfinite(psnr(b, a, crop_border=2))


def test_rgb_to_y_bt601_limited():
    rgb = torch.tensor([[[0.0, 1.0, 1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0, 0.0, 1.0]]])
    y = rgb_to_y(rgb)
    assert y.shape == (1, 1, 5)
    expect = torch.tensor([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]) / 255
    assert torch.allclose(y.flatten(), expect, atol=1e-6)
    img = np.random.default_rng(2).random((7, 9, 3))
    assert np.allclose(rgb_to_y(img), rgb2ycbcr(img)[..., 0] / 255, atol=1e-12)
    assert rgb_to_y(torch.rand(2, 3, 4, 5)).shape == (2, 1, 4, 5)


def test_y_vs_yiq_offset_is_20log10_255_over_219(set5_pairs):
    """BT.601 limited Y = 16 + 219 * (0.299 R + 0.587 G + 0.114 B): the MSE shrinks by (219/255)^2, so the
    paper (YCbCr) PSNR is exactly 20 log10(255/219) ~ 1.32 dB above pyiqa's default YIQ-gray PSNR."""
    gt, blurred = set5_pairs[1]
    yiq = lambda a: a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    gap = psnr(blurred, gt, y_channel=True) - sk_psnr(yiq(gt), yiq(blurred))
    assert gap == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    assert gap == pytest.approx(1.3219, abs=1e-4)


def test_gray_inputs():
    rng = np.random.default_rng(3)
    g1, g2 = noisy_pair(rng, (24, 24))
    rgb2 = np.repeat(g2[..., None], 3, axis=2)
    # gray vs gray == gray vs the same gray stored as RGB (BasicSR reads gray files as 3 equal channels)
    assert psnr(rgb2, g1) == pytest.approx(psnr(g2, g1), rel=1e-12)
    assert ssim(rgb2, g1) == pytest.approx(ssim(g2, g1), rel=1e-12)
    # Y of a gray image is 16 + 219 g: PSNR rises by 20 log10(255/219)
    assert psnr(rgb2, g1, y_channel=True) - psnr(g2, g1) == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    t1 = torch.from_numpy(g1).float()[None] / 255  # (1, H, W) tensor
    assert psnr(to_tensor(rgb2), t1, y_channel=True) == pytest.approx(psnr(rgb2, g1, y_channel=True), abs=1e-5)


def test_batches_return_per_image_values():
    rng = np.random.default_rng(4)
    pairs = [noisy_pair(rng, (16, 20, 3), amp=5 + 10 * i) for i in range(3)]
    p = torch.stack([to_tensor(b) for _, b in pairs])
    g = torch.stack([to_tensor(a) for a, _ in pairs])
    ps, ss = psnr(p, g, 1, True), ssim(p, g, 1, True)
    assert isinstance(ps, list) and len(ps) == 3 and ps[0] > ps[1] > ps[2]
    for i in range(3):
        assert ps[i] == psnr(p[i], g[i], 1, True) and ss[i] == ssim(p[i], g[i], 1, True)


def test_errors_are_one_line():
    a = np.zeros((20, 20, 3), np.uint8)
    cases = [
        lambda: psnr(a, np.zeros((20, 21, 3), np.uint8)),
        lambda: ssim(torch.rand(3, 20, 20), torch.rand(3, 21, 20)),
        lambda: psnr(np.zeros((20, 20, 4), np.uint8), a),
        lambda: psnr(a, a, crop_border=10),
        lambda: ssim(a, a, crop_border=5),  # 10x10 left: smaller than the 11x11 window
        lambda: psnr(torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)),
        lambda: psnr(a.astype(np.int32), a),
        lambda: psnr([1, 2], [1, 2]),
    ]
    for case in cases:
        with pytest.raises(BlindSRError) as e:
            case()
        assert "\n" not in str(e.value)
    with pytest.raises(BlindSRError, match="21x20"):
        psnr(a, np.zeros((20, 21, 3), np.uint8))


# ------------------------------------------------------------------------------------------------ learned


@pytest.fixture
def clean_hub(monkeypatch, tmp_path):
    """Isolate TORCH_HOME / torch.hub dir / HF offline flag changes made by the wrapper."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "default_torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(L, "_hf_cache_dir", lambda: tmp_path / "hf")
    return tmp_path / "w"


class FakeNet:
    lower_better = True

    def __init__(self, name):
        self.name, self.calls = name, []

    def __call__(self, *args):
        self.calls.append(args)
        if isinstance(args[0], str):
            return torch.tensor(12.5)
        return args[0].mean(dim=(1, 2, 3), keepdim=True).view(-1, 1)  # (B, 1) like pyiqa


@pytest.fixture
def fake_pyiqa(monkeypatch):
    mod = types.ModuleType("pyiqa")
    mod.created = []

    def create_metric(name, device=None, **opts):
        net = FakeNet(name)
        mod.created.append((name, device, opts, net))
        return net

    mod.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", mod)
    return mod


def _touch(root, rel):
    p = root / "hub" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_pyiqa_missing_gives_install_hint(monkeypatch, clean_hub):
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    with pytest.raises(BlindSRError, match=r"blindsr\[metrics\]") as e:
        L.create_learned_metric("lpips", weights_dir=clean_hub)
    assert "\n" not in str(e.value)


def test_refused_and_unknown_names(fake_pyiqa, clean_hub):
    with pytest.raises(BlindSRError, match="1.32 dB"):
        L.create_learned_metric("psnr", weights_dir=clean_hub)
    with pytest.raises(BlindSRError, match="lpips-vgg"):
        L.create_learned_metric("nonsense", weights_dir=clean_hub)
    assert fake_pyiqa.created == []


def test_missing_weights_named_before_creation(fake_pyiqa, clean_hub):
    with pytest.raises(WeightsError, match="LPIPS_v0.1_vgg-a78928a0.pth") as e:
        L.create_learned_metric("lpips-vgg", weights_dir=clean_hub)
    assert "and 1 more" in str(e.value) and "\n" not in str(e.value)
    _touch(clean_hub, "pyiqa/LPIPS_v0.1_vgg-a78928a0.pth")
    with pytest.raises(WeightsError, match="vgg16-397923af.pth"):
        L.create_learned_metric("lpips-vgg", weights_dir=clean_hub)
    assert fake_pyiqa.created == []  # never reached pyiqa, so nothing could be downloaded
    # timm backbones live in the HF cache
    _touch(clean_hub, "pyiqa/ckpt_koniq10k.pt")
    with pytest.raises(WeightsError, match="models--timm--vit_base_patch8_224"):
        L.create_learned_metric("maniqa", weights_dir=clean_hub)


def test_call_path_with_fake_pyiqa(fake_pyiqa, clean_hub):
    _touch(clean_hub, "pyiqa/LPIPS_v0.1_alex-df73285e.pth")
    _touch(clean_hub, "checkpoints/alexnet-owt-7be5be79.pth")
    assert L.missing_files("lpips", clean_hub) == []
    m = L.create_learned_metric("lpips", device="cpu", weights_dir=clean_hub)
    assert os.environ["TORCH_HOME"] == str(clean_hub) and torch.hub.get_dir() == str(clean_hub / "hub")
    name, device, _, net = fake_pyiqa.created[0]
    assert name == "lpips" and device == torch.device("cpu") and m.lower_better and m.mode == "FR"
    x = torch.rand(2, 3, 8, 8)
    scores = m(x, torch.rand(2, 3, 8, 8))
    assert len(scores) == 2 and scores[0] == pytest.approx(float(x[0].mean()), rel=1e-6)
    assert net.calls[-1][0].shape == (2, 3, 8, 8) and len(net.calls[-1]) == 2
    gray = torch.rand(1, 8, 8)
    assert m(gray, gray)[0] == pytest.approx(float(gray.mean()), rel=1e-6)  # gray expanded to RGB
    assert net.calls[-1][0].shape == (1, 3, 8, 8)
    with pytest.raises(BlindSRError, match="full-reference"):
        m(x)
    with pytest.raises(BlindSRError, match="shapes differ"):
        m(x, torch.rand(2, 3, 8, 9))


def test_nr_and_fid_with_fake_pyiqa(fake_pyiqa, clean_hub, tmp_path):
    _touch(clean_hub, "pyiqa/niqe_modelparameters.mat")
    _touch(clean_hub, "pyiqa/pt_inception-2015-12-05-6726825d.pth")
    niqe = L.create_learned_metric("niqe", weights_dir=clean_hub)
    assert len(niqe(torch.rand(3, 8, 8))) == 1 and len(fake_pyiqa.created[-1][3].calls[-1]) == 1
    fid = L.create_learned_metric("fid", weights_dir=clean_hub)
    assert fid.folders(tmp_path / "a", tmp_path / "b") == 12.5
    assert fake_pyiqa.created[-1][3].calls[-1] == (str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(BlindSRError, match="folders"):
        fid(torch.rand(3, 8, 8))


def test_pyiqa_bound_to_other_cache_is_refused(fake_pyiqa, clean_hub, monkeypatch, tmp_path):
    utils = types.ModuleType("pyiqa.utils")
    dl = types.ModuleType("pyiqa.utils.download_util")
    dl.DEFAULT_CACHE_DIR = str(tmp_path / "elsewhere" / "pyiqa")
    monkeypatch.setitem(sys.modules, "pyiqa.utils", utils)
    monkeypatch.setitem(sys.modules, "pyiqa.utils.download_util", dl)
    with pytest.raises(BlindSRError, match="imported earlier"):
        L.create_learned_metric("niqe", weights_dir=clean_hub)


def test_spec_table_is_consistent():
    for name, spec in L.LEARNED_METRICS.items():
        assert spec.mode in ("FR", "NR", "FID") and spec.files, name
        assert all(f.split("/")[0] in ("pyiqa", "checkpoints", "clip") for f in spec.files), name
        assert spec.pyiqa_name not in L.REFUSED
