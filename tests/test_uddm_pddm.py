"""UDDM's P-DDM: each operator against the library's own blur / decimation / noise / JPEG, the generator's start,
determinism and where the gradients go."""

from __future__ import annotations

import pytest
import torch

from blindsr.degradations.jpeg import jpeg_torch
from blindsr.degradations.kernels import gaussian_kernel
from blindsr.degradations.operators import blur, gaussian_noise, imresize, quantize
from blindsr.errors import BlindSRError
from blindsr.methods.uddm import pddm as P


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hr(b: int = 2, h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=gen(seed))


def params(b: int = 2, k: torch.Tensor | None = None, h: int = 8, w: int = 10) -> P.PDDMParams:
    k = gaussian_kernel(21, 2.0).float()[None].expand(b, -1, -1) if k is None else k
    return P.PDDMParams(kernel=k, gain=torch.tensor([[0.9, 1.0, 1.1]] * b), bias=torch.tensor([[0.02, 0.0, -0.03]] * b),
                        posterize=torch.full((b,), 0.5), sigma=torch.full((b, 1, h, w), 0.03),
                        gray=torch.tensor([0.0, 1.0][:b]), quality=torch.tensor([40.0, 80.0][:b]))


@pytest.mark.parametrize("down", ["bicubic", "stride"])
def test_blur_and_downsampling_is_the_librarys_blur_then_resize(down):
    x, k = hr(), gaussian_kernel(21, 2.0).float()
    ref = imresize(blur(x, k), 0.25) if down == "bicubic" else blur(x, k)[..., ::4, ::4]
    assert torch.allclose(P.blur_down(x, k[None].expand(2, -1, -1), 4, down), ref, atol=1e-6)
    spatial = k.flatten()[None, :, None, None].expand(2, -1, 8, 10)  # the same kernel at every LR pixel
    assert torch.allclose(P.blur_down(x, spatial, 4, down), ref, atol=1e-5)
    delta = torch.zeros(2, 21 * 21, 8, 10)
    delta[:, 21 * 10 + 10] = 1  # a centred delta: the plain resize (Eq. 5's target for bicubic)
    plain = imresize(x, 0.25) if down == "bicubic" else x[..., ::4, ::4]
    assert torch.allclose(P.blur_down(x, delta, 4, down), plain, atol=1e-6)
    odd = hr(1, 32, 28)
    assert P.blur_down(odd, delta[:1, :, :8, :7], 4, down).shape == (1, 3, 8, 7)


def test_fading_is_an_affine_map_then_a_smooth_staircase():
    x = hr()
    g, b = torch.tensor([[0.9, 1.0, 1.1]] * 2), torch.tensor([[0.02, 0.0, -0.03]] * 2)
    affine = x * g[..., None, None] + b[..., None, None]
    assert torch.allclose(P.fade(x, g, b, torch.zeros(2), 32, 5), affine)
    # β = 1 with many Fourier terms is rounding to 1/L steps (the library's quantize with L = 2^bits - 1 levels)
    one, L = torch.ones(2), 31
    stair = P.fade(x, torch.ones(2, 3), torch.zeros(2, 3), one, L, 2000)
    frac = (x * L) - (x * L).floor()
    away = (frac - 0.5).abs() > 0.05  # the series converges to the midpoint at each jump
    assert torch.allclose(stair[away], quantize(x, bits=5)[away], atol=2e-3)


def test_noise_is_the_librarys_gaussian_field_times_the_sigma_map():
    x = hr()
    gray = torch.tensor([0.0, 1.0])
    got = P.add_noise(x, torch.full((2, 1, 32, 40), 0.05), gray, gen(3))
    assert torch.allclose(got, x + gaussian_noise(x, 0.05, gray, gen(3)), atol=1e-7)
    sig = torch.rand(2, 1, 32, 40, generator=gen(4)) * 0.1  # spatially varying
    assert torch.allclose(P.add_noise(x, sig, gray, gen(3)) - x, gaussian_noise(x, 1.0, gray, gen(3)) * sig,
                          atol=1e-6)


def test_the_chain_composes_the_operators_in_order():
    x, p = hr(), params()
    c = P.PDDMConfig()
    manual = imresize(blur(x, p.kernel), 0.25)
    manual = P.fade(manual, p.gain, p.bias, p.posterize, c.levels, c.terms)
    manual = manual + gaussian_noise(manual, 1.0, p.gray, gen(5)) * p.sigma
    manual = jpeg_torch(manual, p.quality, model="diffjpeg", rounding="cubic")
    assert torch.allclose(P.degrade(x, p, c, gen(5)), manual, atol=1e-6)
    only_jpeg = P.PDDMConfig(scale=1, ops=["jpeg"])
    assert torch.equal(P.degrade(x, params(h=32, w=40), only_jpeg),
                       jpeg_torch(x, p.quality, model="diffjpeg", rounding="cubic"))
    none = P.PDDMConfig(ops=[])
    assert torch.allclose(P.degrade(x, p, none), imresize(x, 0.25).clamp(0, 1))
    assert torch.equal(P.degrade(x, p, P.PDDMConfig(ops=[], down="stride")), x[..., ::4, ::4])


@pytest.mark.parametrize("kernel", ["global", "spatial"])
def test_the_generator_starts_mild_is_seeded_and_content_aware(kernel):
    torch.manual_seed(0)
    net = P.PDDM(P.PDDMConfig(kernel=kernel))
    x = hr()
    with torch.no_grad():
        lr = net(x, gen(1))
        assert lr.shape == (2, 3, 8, 10)
        assert torch.equal(lr, net(x, gen(1))) and not torch.equal(lr, net(x, gen(2)))
        p = net.params(x)  # at the start: Gaussian blur + decimation, no fading, no noise, JPEG at q ~ 95
        k = p.kernel if kernel == "global" else p.kernel[:, :, 0, 0].reshape(2, 21, 21)
        assert torch.allclose(k, gaussian_kernel(21, 0.6).float().expand(2, -1, -1), atol=2e-3)
        start = imresize(blur(x, k), 0.25)
        err = (lr - jpeg_torch(start, p.quality, model="diffjpeg", rounding="cubic")).abs()
        assert err.mean() < 1e-3 and err.max() < 1e-2  # (the tiny start noise moves a few JPEG roundings)
        assert p.quality.min() > 94 and p.sigma.max() < 1e-3 and p.posterize.max() < 0.01
        assert torch.allclose(p.gain, torch.ones(2, 3)) and torch.allclose(p.bias, torch.zeros(2, 3))
        for m in (net.kernel_head, net.global_head, net.sigma_head):  # once trained, the HR content matters
            m.weight.normal_(0, 0.1, generator=gen(6))
        a, b = net.params(x), net.params(hr(seed=9))
        assert not torch.allclose(a.kernel, b.kernel) and not torch.allclose(a.gray, b.gray)
        assert not torch.allclose(a.sigma, b.sigma)
    assert net(hr(1, 32, 28), gen(0)).shape == (1, 3, 8, 7)


def test_gradients_reach_every_head_of_the_generator():
    torch.manual_seed(0)
    net = P.PDDM(P.PDDMConfig(kernel="spatial"))
    x = hr()
    for m in (net.kernel_head, net.global_head, net.sigma_head):
        torch.nn.init.normal_(m.weight, 0, 0.01)
    net(x, gen(0)).square().mean().backward()
    for name in ("kernel_head", "global_head", "sigma_head", "trunk"):
        grads = [q.grad for q in getattr(net, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    rows = net.global_head.weight.grad.abs().sum(1)
    assert (rows > 0).all()  # gain, bias, β, gray and the JPEG quality all get a gradient
    d = P.PatchDiscriminator()
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 7, 7)


def test_the_live_range_penalty_is_zero_in_range_and_pulls_saturated_heads_back():
    torch.manual_seed(0)
    net = P.PDDM()
    x = hr()
    _, p = net.run(x, gen(0))
    assert P.PDDM.saturation(p).item() == 0  # at the start every head is in range (σ, β, quality at ±6)
    with torch.no_grad():  # the RealSRSet failure: a trunk whose features drive the heads to |z| >> 3
        net.global_head.bias.copy_(torch.tensor([40.0, 40, -40, -40, -40, 40, -6, 0, -60]))
    _, p = net.run(x, gen(0))
    assert torch.allclose(p.gain, torch.tensor([1.5, 1.5, 0.5]).expand(2, 3))  # stuck at the bounds ...
    net.zero_grad()
    p.gain.sum().backward(retain_graph=True)
    assert net.global_head.bias.grad.abs().max() < 1e-12  # ... where a loss on the output has no gradient
    net.zero_grad()
    sat = P.PDDM.saturation(p)
    expect = ((40 - 3) ** 2 * 6 + (60 - 8) ** 2) / 9
    assert sat.item() == pytest.approx(expect, rel=1e-5)  # the σ map is still in range
    sat.backward()
    step = -net.global_head.bias.grad  # the penalty's descent direction: every saturated pre-activation to 0
    assert (step[[0, 1, 5]] < 0).all() and (step[[2, 3, 4, 8]] > 0).all() and (step[[6, 7]] == 0).all()


def test_config_errors():
    for bad in (dict(kernel_size=20), dict(kernel="motion"), dict(ops=["blur", "sharpen"]), dict(jpeg_range=(5, 120)),
                dict(down="nearest")):
        with pytest.raises(BlindSRError):
            P.PDDMConfig(**bad)
    with pytest.raises(BlindSRError, match="power of 2"):
        P.PDDM(P.PDDMConfig(scale=3))
