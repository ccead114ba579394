"""Degradation presets: every preset runs and reports its parameters; each matches its definition."""

from __future__ import annotations

import json

import pytest
import torch

from blindsr.degradations import kernels as K
from blindsr.degradations import operators as O
from blindsr.degradations.pipelines import (
    DegradeResult,
    config_dict,
    describe_presets,
    get_preset,
    list_presets,
)
from blindsr.errors import BlindSRError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def hr():
    # smooth-ish content so JPEG/resizes behave like on photos; 2 samples, not a multiple of 4 (modcrop)
    x = torch.rand(2, 3, 18, 17, generator=gen(0))
    return O.imresize(x, size=(66, 70)).clamp(0, 1)


@pytest.mark.parametrize("name", [n for n in list_presets() if n != "uddm"])  # uddm: a learned preset that needs
def test_every_preset_runs_and_reports_params(name, hr):  # a trained model (tests/test_uddm_train.py)
    d = get_preset(name)
    r = d(hr, gen(1))
    assert isinstance(r, DegradeResult)
    n = 16 if name == "gaussian8" else 2
    assert r.lr.shape[0] == r.hr.shape[0] == len(r.params) == n
    s = d.scale
    assert r.hr.shape[-2:] == (66 - 66 % s, 70 - 70 % s)
    assert r.lr.shape[-2:] == (r.hr.shape[-2] // s, r.hr.shape[-1] // s)
    assert r.lr.min() >= 0 and r.lr.max() <= 1 and torch.isfinite(r.lr).all()
    if name == "bicubic":  # no blur kernel: the LR is the MATLAB bicubic of the (modcropped) HR, in 8 bits
        assert r.kernel is None and torch.equal(r.lr, O.quantize(O.imresize(r.hr, 0.25).clamp(0, 1)))
    else:
        assert r.kernel is not None and r.kernel.shape[0] == n
        torch.testing.assert_close(r.kernel.sum((1, 2)), torch.ones(n), atol=1e-5, rtol=0)
    json.dumps(r.params)  # JSON-serialisable
    json.dumps(config_dict(d))
    # same seed same output, different seed different (gaussian8 is deterministic by design)
    again = d(hr, gen(1))
    assert torch.equal(again.lr, r.lr) and again.params == r.params
    if name not in ("gaussian8", "bicubic"):
        assert not torch.equal(d(hr, gen(2)).lr, r.lr)


def test_registry_and_overrides():
    assert set(describe_presets()) == set(list_presets())
    with pytest.raises(BlindSRError, match="classic"):
        get_preset("bicubic-only")
    with pytest.raises(BlindSRError, match="sig_max"):
        get_preset("classic", sigma_max=3.0)
    d = get_preset("blinddiff-setting1", scale=2, sig_max=2.0)
    assert d.scale == 2 and d.config.sig_max == 2.0
    with pytest.raises(BlindSRError):
        get_preset("classic", scale=0)
    with pytest.raises(BlindSRError):
        get_preset("gaussian8", kernel_index=8)
    assert get_preset("realesrgan", jpeg_range=[40, 50]).config.jpeg_range == (40, 50)


def test_blinddiff_settings_are_the_official_ones():
    s1, s2 = get_preset("blinddiff-setting1").config, get_preset("blinddiff-setting2").config
    assert (s1.kernel_size, s1.sig_min, s1.sig_max, s1.rate_iso, s1.random_disturb) == (21, 0.2, 4.0, 1.0, False)
    assert (s2.kernel_size, s2.sig_min, s2.sig_max, s2.rate_iso, s2.random_disturb) == (21, 0.6, 5.0, 0.0, True)
    assert s1.scale == s2.scale == 4 and s1.downsampler == "bicubic" and s1.quantize


def test_setting1_is_blur_bicubic_quantise(hr):
    r = get_preset("blinddiff-setting1")(hr, gen(3))
    expected = O.quantize(O.imresize(O.blur(r.hr, r.kernel), 0.25).clamp(0, 1))
    torch.testing.assert_close(r.lr, expected, atol=1e-6, rtol=0)
    for p, k in zip(r.params, r.kernel, strict=True):
        assert p["kernel_type"] == "iso" and 0.2 <= p["sigma_x"] <= 4.0
        torch.testing.assert_close(k, K.gaussian_kernel(21, p["sigma_x"]))
    r2 = get_preset("blinddiff-setting2")(hr, gen(3))
    assert all(p["kernel_type"] == "aniso" for p in r2.params)
    assert not torch.allclose(r2.kernel, r2.kernel.transpose(1, 2))


def test_classic_noise_and_stride(hr):
    d = get_preset("classic", noise_min=10.0, noise_max=10.0, quantize=False, downsampler="stride")
    r = d(hr, gen(0))
    clean = O.downsample_stride(O.blur(r.hr, r.kernel), 4)
    resid = (r.lr - clean)[clean.gt(0.1) & clean.lt(0.9)]  # away from the clamp
    assert resid.std().item() == pytest.approx(10 / 255, rel=0.15)
    assert all(p["noise_sigma"] == 10.0 for p in r.params)
    with pytest.raises(BlindSRError):
        get_preset("classic", downsampler="nearest")


def test_gaussian8(hr):
    r = get_preset("gaussian8")(hr, None)
    assert [p["kernel_index"] for p in r.params] == list(range(8)) * 2
    assert [p["sigma"] for p in r.params[:8]] == [1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2]
    torch.testing.assert_close(r.kernel[:8], K.gaussian8_kernels())
    assert torch.equal(r.hr[0], r.hr[7]) and torch.equal(r.hr[8], r.hr[15])
    one = get_preset("gaussian8", kernel_index=3)(hr, None)
    assert one.lr.shape[0] == 2 and one.params[0]["sigma"] == 2.4
    torch.testing.assert_close(one.lr[0], r.lr[3])
    torch.testing.assert_close(one.lr[0], O.quantize(O.imresize(O.blur(one.hr[:1], r.kernel[3]), 0.25))[0])


def test_diffbir_stage1_ranges(hr):
    d = get_preset("diffbir-stage1")
    c = d.config
    assert (c.kernel_size, c.blur_sigma, c.downsample_range, c.noise_range, c.jpeg_range) == \
        (41, (0.1, 12.0), (1.0, 12.0), (0.0, 15.0), (30.0, 100.0))
    r = d(hr, gen(5))
    assert r.lr.shape == r.hr.shape and r.kernel.shape[-1] == 41
    for p in r.params:
        assert p["kernel_type"] in ("iso", "aniso") and 1 <= p["downsample"] <= 12
        assert 30 <= p["jpeg_quality"] < 100 and isinstance(p["jpeg_quality"], int)
        assert 0 <= p["noise_sigma"] <= 15
    small = get_preset("diffbir-stage1", resize_back=False)(hr[:1], gen(5))
    assert small.lr.shape[-1] == int(68 // small.params[0]["downsample"])


def test_realesrgan_family(hr):
    big = O.imresize(hr, 2.0).clamp(0, 1)  # 132x140 -> room for the resizes
    r = get_preset("realesrgan")(big, gen(0))
    torch.testing.assert_close(r.hr, O.usm_sharp(O.modcrop(big, 4)))  # RealESRNet: USM'd GT
    torch.testing.assert_close(r.lr * 255, (r.lr * 255).round(), atol=1e-4, rtol=0)  # final 8-bit rounding
    for p in r.params:
        assert {"kernel1", "noise1", "resize1", "jpeg1", "jpeg2", "final_order"} <= set(p)
        assert 30 <= p["jpeg1"] <= 95 and 30 <= p["jpeg2"] <= 95 and p["second_order"] is True
        assert p["resize1"]["mode"] in ("area", "bilinear", "bicubic")
    s = get_preset("stablesr")
    assert s.config.jpeg_range == (60.0, 95.0) and s.config.noise_range2 == (1.0, 12.0)
    rs = s(big, gen(0))
    assert not torch.allclose(rs.lr * 255, (rs.lr * 255).round(), atol=1e-4)  # no final rounding
    z = get_preset("resshift")
    rz = z(big, gen(0))
    assert rz.kernel.shape[-1] == 13 and torch.equal(rz.hr, O.modcrop(big, 4))  # no USM
    assert all(p["second_order"] is False and 80 <= p["jpeg2"] <= 100 for p in rz.params)
    assert all(p["kernel1"]["kernel_type"] in ("iso", "aniso", "sinc") for p in rz.params)
    # the ResShift test degradation is much milder than Real-ESRGAN's
    def err(res):
        return ((res.lr - O.imresize(res.hr, 0.25)) ** 2).mean().item()
    worse = [err(get_preset("realesrgan", use_usm=False)(big, gen(i))) for i in range(3)]
    mild = [err(z(big, gen(i))) for i in range(3)]
    assert sum(mild) < sum(worse)


def test_motion_deblur(hr):
    r = get_preset("motion-deblur")(hr, gen(0))
    assert r.lr.shape == r.hr.shape and r.kernel.shape[-2:] == (21, 21)
    blurred = O.blur(r.hr, r.kernel)
    resid = (r.lr - blurred)[blurred.gt(0.05) & blurred.lt(0.95)]
    assert resid.std().item() == pytest.approx(2.55 / 255, rel=0.2)


def test_device_generator_independence(hr):
    # a CPU generator gives the same numbers whatever device the images are on (here: dtype float64 path)
    d = get_preset("blinddiff-setting2")
    a = d(hr, gen(9))
    b = d(hr.double(), gen(9))
    assert b.lr.dtype == torch.float64
    torch.testing.assert_close(a.kernel.double(), b.kernel, atol=1e-6, rtol=0)
