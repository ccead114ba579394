"""Region-adaptive restoration guidance against the official v2.0.0 formulas (shared/reference/diffbir)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blindsr.errors import BlindSRError
from blindsr.methods.diffbir import guidance as rg


@pytest.fixture(scope="module")
def refs(reference_dir):
    d = reference_dir / "diffbir"
    strong = torch.load(d / "tiny_cldm_ref_strong.pt", weights_only=True)["guidance"]
    return {"original": torch.load(d / "guidance_ref.pt", weights_only=True), "strong": strong}


@pytest.mark.parametrize("name", ["original", "strong"])
def test_weight_map_and_gradient_match_official(refs, name):
    ref = refs[name]
    weight = rg.gradient_weight_map((ref["target"] + 1) / 2, patch_size=2)
    assert (weight - ref["weight"]).abs().max() <= 1e-6
    grad = rg.guidance_gradient(ref["pred"], ref["target"], weight, scale=0.5)
    assert (grad - ref["grad"]).abs().max() <= 1e-6
    # the same step through autograd (identity decoder = latent space, coef1 = 1): z0 moves by exactly grad
    out = rg.apply_guidance(ref["pred"], None, ref["target"], 0.5, weight=weight)
    assert (out.z0 - ref["pred"] - ref["grad"]).abs().max() <= 1e-6


def test_losses_match_official_and_sum_over_batch(refs):
    ref = refs["strong"]
    weight = rg.gradient_weight_map((ref["target"] + 1) / 2)
    assert rg.guidance_loss(ref["pred"], ref["target"], weight).item() == pytest.approx(ref["loss"], rel=1e-6)
    assert rg.guidance_loss(ref["pred"], ref["target"]).item() == pytest.approx(ref["loss_mse"], rel=1e-6)
    assert (rg.guidance_gradient(ref["pred"], ref["target"], None, 0.5) - ref["grad_mse"]).abs().max() <= 1e-6
    per_sample = [rg.guidance_loss(ref["pred"][i : i + 1], ref["target"][i : i + 1], weight[i : i + 1]) for i in range(2)]
    assert rg.guidance_loss(ref["pred"], ref["target"], weight) == pytest.approx(sum(per_sample).item(), rel=1e-6)
    assert 0.3 < weight.mean() < 0.7  # the structured target exercises the whole tanh range


def test_weight_map_properties():
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(rg.gradient_weight_map(flat), torch.ones(1, 1, 16, 16), atol=1e-6)  # no edges: weight 1
    img = torch.zeros(1, 3, 16, 16)
    img[..., :, 8:] = 1.0  # a vertical edge between columns 7 and 8
    w = rg.gradient_weight_map(img, patch_size=4)
    assert w.min() >= 0 and w.max() <= 1
    assert w[..., :, 6:10].max() < 0.01 and torch.equal(w[..., :, :4], torch.ones(1, 1, 16, 4))
    blocks = w.unfold(-2, 4, 4).unfold(-2, 4, 4)  # constant inside every 4x4 patch
    assert torch.equal(blocks.amax((-1, -2)), blocks.amin((-1, -2)))
    with pytest.raises(BlindSRError, match="multiple"):
        rg.gradient_weight_map(torch.rand(1, 3, 15, 16))
    with pytest.raises(BlindSRError, match="RGB"):
        rg.gradient_weight_map(torch.rand(1, 4, 16, 16))
    assert rg.latent_weight_map(img, factor=8).shape == (1, 1, 2, 2)


def test_guidance_through_a_decoder_moves_the_posterior_mean_by_the_step():
    g = torch.Generator().manual_seed(0)
    weight_k = torch.randn(3, 4, 3, 3, generator=g) * 0.2

    def decode(z):  # a differentiable stand-in for D(z0 / 0.18215): upsample x2 + conv
        return F.conv2d(F.interpolate(z, scale_factor=2), weight_k, padding=1)

    z0 = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    w = rg.gradient_weight_map((target + 1) / 2)
    coef1 = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
    out = rg.apply_guidance(z0, decode, target, scale=0.01, weight=w, posterior_coef1=coef1)
    # official: pred.backward(g_pixel) gives Δz0 = J^T g_pixel, and z0 <- z0 + Δz0 / coef1
    z = z0.clone().requires_grad_(True)
    pred = decode(z)
    pred.backward(rg.guidance_gradient(pred.detach(), target, w, scale=0.01))
    assert torch.allclose((out.z0 - z0) * coef1, z.grad, atol=1e-6)
    # a small step lowers the loss; repeats keep lowering it
    small = rg.apply_guidance(z0, decode, target, scale=1e-4, weight=w, repeat=3)
    assert rg.guidance_loss(decode(small.z0), target, w) < rg.guidance_loss(decode(z0), target, w)
    assert small.loss == pytest.approx(sum(
        rg.guidance_loss(decode(zz), target, w).item()
        for zz in [z0, rg.apply_guidance(z0, decode, target, 1e-4, weight=w).z0,
                   rg.apply_guidance(z0, decode, target, 1e-4, weight=w, repeat=2).z0]) / 3, rel=1e-5)
    assert not out.z0.requires_grad


def test_guidance_window_follows_official_convention():
    cfg = rg.GuidanceConfig(scale=0.5, start=600, stop=200)
    assert [t for t in (0, 199, 200, 201, 598, 599, 600, 999) if cfg.active(t)] == [200, 201, 598]
    assert all(rg.GuidanceConfig(scale=0.5).active(t) for t in (0, 999))  # defaults: every step
    assert not rg.GuidanceConfig(scale=0.0).active(500)


def test_norm_elements_pulls_equally_hard_at_every_size():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    weight = rg.gradient_weight_map((target + 1) / 2)
    big = [x.repeat(1, 1, 2, 2) for x in (pred, target, weight)]  # the same content on 4x the pixels

    def step(p, t, w, n):
        return rg.apply_guidance(p, None, t, 0.5, weight=w, norm_elements=n).z0 - p

    small_official, big_official = step(pred, target, weight, 0), step(*big, 0)
    assert torch.allclose(big_official, small_official.repeat(1, 1, 2, 2) / 4, atol=1e-7)  # the mean weakens it
    small_fixed, big_fixed = step(pred, target, weight, 4096), step(*big, 4096)
    assert torch.allclose(big_fixed, small_fixed.repeat(1, 1, 2, 2), atol=1e-7)  # the fixed norm does not
    assert torch.allclose(step(pred, target, weight, pred.numel()), small_official, atol=1e-7)  # N = numel: official
    assert torch.allclose(rg.guidance_gradient(*big, 0.5, norm_elements=4096), big_fixed, atol=1e-6)
