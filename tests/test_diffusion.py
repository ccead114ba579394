"""The shared diffusion core: schedules, algebra, respacing, samplers, guidance hook, tiling."""

from __future__ import annotations

import math

import pytest
import torch

from blindsr.diffusion import gaussian, schedules
from blindsr.diffusion.gaussian import GaussianDiffusion, hybrid_loss
from blindsr.diffusion.parameterization import split, target
from blindsr.diffusion.respace import make_diffusion, respaced, space_timesteps
from blindsr.diffusion.samplers import DDIMStepper, DDPMStepper, GuidanceResult, ModelOutput, randn, sample
from blindsr.diffusion.tiling import tiled
from blindsr.errors import BlindSRError
from blindsr.ops.resize import pad_to_multiple
from blindsr.ops.tiling import tile_boxes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ schedules
def test_linear_schedule_endpoints_and_dtype():
    b = schedules.linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    # other T keep the same process shape (guided-diffusion scaling by 1000 / T)
    assert schedules.linear_betas(500)[-1].item() == pytest.approx(0.04)


@pytest.mark.parametrize("ours, theirs", [
    (lambda: schedules.scaled_linear_betas(1000), dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012)),
    (lambda: schedules.linear_betas(1000), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    (lambda: schedules.cosine_betas(1000), dict(beta_schedule="squaredcos_cap_v2")),
    (lambda: schedules.rescale_zero_terminal_snr(schedules.scaled_linear_betas(1000)),
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)),
])
def test_schedules_match_diffusers(ours, theirs):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs).betas.double()
    # diffusers computes in float32 (its zero-SNR rescale loses ~1e-4 relative); ours is float64
    rtol = 1e-3 if theirs.get("rescale_betas_zero_snr") else 1e-5
    torch.testing.assert_close(ours(), ref, rtol=rtol, atol=1e-7)


def test_zero_terminal_snr_properties():
    b = schedules.rescale_zero_terminal_snr(schedules.linear_betas(1000))
    abar = torch.cumprod(1 - b, 0)
    assert abar[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert abar[0].item() == pytest.approx(1 - 1e-4)


def test_unknown_schedule_is_user_error():
    with pytest.raises(BlindSRError, match="unknown noise schedule"):
        schedules.get_betas("quadratic")


# ------------------------------------------------------------------------------------------------ algebra
@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return make_diffusion(1000, "linear")


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_split_inverts_target(diff, kind):
    """split(target(kind, x0, eps)) == (eps, x0) for every parameterisation."""
    x0, eps = torch.randn(4, 3, 5, 5, generator=gen(0)), torch.randn(4, 3, 5, 5, generator=gen(1))
    t = torch.tensor([0, 10, 500, 998])
    x_t = diff.q_sample(x0, t, eps)
    abar = diff.abar(t, x_t)
    eps_hat, x0_hat = split(target(kind, x0, eps, abar), kind, x_t, abar)
    # eps -> x0 divides by sqrt(abar_998) (1/150), x0 -> eps by sqrt(1 - abar_0) (1/0.01)
    tol = {"eps": 2e-4, "x0": 1e-3, "v": 1e-5}[kind]
    torch.testing.assert_close(x0_hat, x0, atol=tol, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=tol, rtol=1e-4)


def test_split_is_exact_at_zero_terminal_snr():
    """v at alpha_bar = 0: x0 = -v and eps = x_t, without dividing by zero (Lin et al. 2024)."""
    z = make_diffusion(1000, "scaled_linear", zero_terminal_snr=True)
    t = torch.tensor([999])
    x_t, v = torch.randn(1, 4, 3, 3, generator=gen(0)), torch.randn(1, 4, 3, 3, generator=gen(1))
    eps, x0 = split(v, "v", x_t, z.abar(t, x_t))
    assert torch.equal(x0, -v) and torch.equal(eps, x_t)
    with pytest.raises(BlindSRError, match="prediction"):
        split(v, "score", x_t, z.abar(t, x_t))


def test_posterior_matches_gaussian_product(diff):
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})."""
    x0, x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 137, 999])
    mean, var, logvar = diff.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        b, a = diff.betas[ti].item(), 1 - diff.betas[ti].item()
        abar_prev = diff.alphas_cumprod[ti - 1].item()
        prec = a / b + 1 / (1 - abar_prev)
        want_mean = (math.sqrt(a) * x_t[i] / b + math.sqrt(abar_prev) * x0[i] / (1 - abar_prev)) / prec
        torch.testing.assert_close(mean[i], want_mean, rtol=1e-9, atol=1e-10)
        assert var[i].flatten()[0].item() == pytest.approx(1 / prec, rel=1e-9)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(1 / prec), rel=1e-9)
    # at t = 0 the variance is 0 and the clipped log variance reuses t = 1
    _, var0, logvar0 = diff.q_posterior(x0[:1], x_t[:1], torch.tensor([0]))
    assert var0.abs().max().item() == 0.0
    assert logvar0.flatten()[0].item() == pytest.approx(math.log(diff.posterior_variance[1].item()))


def test_learned_range_interpolates_between_fixed_variances(diff):
    t = torch.tensor([5, 400])
    like = torch.zeros(2, 3, 2, 2)
    lo = diff.model_logvar(t, like, "fixed_small")
    hi = torch.log(diff.betas[t]).float().view(2, 1, 1, 1).expand_as(like)
    torch.testing.assert_close(diff.learned_range_logvar(-torch.ones_like(like), t), lo)
    torch.testing.assert_close(diff.learned_range_logvar(torch.ones_like(like), t), hi)
    torch.testing.assert_close(diff.learned_range_logvar(torch.zeros_like(like), t), (lo + hi) / 2)


def _approx_cdf(x: float) -> float:
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("bins", ["pm1", "unit"])
def test_hybrid_loss_vb_against_hand_computation(bins):
    d = make_diffusion(1000, "linear", "50")
    x0 = torch.tensor([0.0, 0.3, 1.0, 0.7], dtype=torch.float64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    noise = torch.tensor([0.5, -1.2, 0.1, 2.0], dtype=torch.float64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    t = torch.tensor([0, 17])
    x_t = d.q_sample(x0, t, noise)
    eps_hat = (noise + 0.3).requires_grad_()
    v = torch.tensor([-0.5, 0.2, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    v.requires_grad_()
    terms = hybrid_loss(d, eps_hat, "eps", v, noise, x0, x_t, t, bins=bins)
    assert terms["mse"].detach().tolist() == pytest.approx([0.09, 0.09])
    half, lo, hi = gaussian.NLL_BINS[bins]
    for i, ti in enumerate(t.tolist()):
        abar = d.alphas_cumprod[ti].item()
        abar_prev = d.alphas_cumprod_prev[ti].item()
        beta = d.betas[ti].item()
        post_var = beta * (1 - abar_prev) / (1 - abar)
        min_log = math.log(d.posterior_variance[1].item()) if ti == 0 else math.log(post_var)
        total = 0.0
        for j in range(4):
            xt, x0j, e = x_t[i].flatten()[j].item(), x0[i].flatten()[j].item(), eps_hat[i].flatten()[j].item()
            x0_hat = (xt - math.sqrt(1 - abar) * e) / math.sqrt(abar)
            c1, c2 = beta * math.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
            m_model = c1 * x0_hat + c2 * xt
            frac = (v.detach()[i].flatten()[j].item() + 1) / 2
            lv = frac * math.log(beta) + (1 - frac) * min_log
            if ti == 0:
                inv = math.exp(-0.5 * lv)
                if x0j < lo:
                    p = _approx_cdf(inv * (x0j - m_model + half))
                elif x0j > hi:
                    p = 1 - _approx_cdf(inv * (x0j - m_model - half))
                else:
                    p = _approx_cdf(inv * (x0j - m_model + half)) - _approx_cdf(inv * (x0j - m_model - half))
                total += -math.log(max(p, 1e-12))
            else:
                m_true = c1 * x0j + c2 * xt
                lv_true = math.log(post_var)
                total += 0.5 * (-1 + lv - lv_true + math.exp(lv_true - lv) + (m_true - m_model) ** 2 * math.exp(-lv))
        assert terms["vb"][i].item() == pytest.approx(total / 4 / math.log(2), rel=1e-4)
    # the VB term sees the mean detached: it trains only the variance (improved DDPM Sec. 3.1)
    g_eps, g_v = torch.autograd.grad(terms["vb"].sum(), [eps_hat, v], allow_unused=True)
    assert g_eps is None and g_v.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ respacing
def test_space_timesteps_specs():
    s500 = space_timesteps(1000, "500")
    assert len(s500) == 500 and s500[0] == 0 and s500[-1] == 999 and s500[:3] == [0, 2, 4]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45 and s[0] == 0 and s[9] == 99 and s[10] == 100 and s[-1] == 299
    assert space_timesteps(100, 100) == list(range(100))
    # the stride is accumulated in floats as IDDPM / guided-diffusion / LDM do (round(j * stride) would give 500
    # and 278 here): the official codes' steps for every count, not only for 50, 100, 200, 250, 1000
    assert space_timesteps(1000, 21)[10] == 499 and space_timesteps(1000, 199)[55] == 277
    with pytest.raises(BlindSRError):
        space_timesteps(100, "ddim33")
    with pytest.raises(BlindSRError):
        space_timesteps(100, "101")


@pytest.mark.parametrize("spec", ["500", "50", "ddim25", "7"])
def test_respaced_betas_reproduce_alphas_cumprod(diff, spec):
    keep = space_timesteps(1000, spec)
    r = respaced(diff, keep)
    assert r.num_timesteps == len(keep)
    assert r.timestep_map.tolist() == keep
    torch.testing.assert_close(r.alphas_cumprod, diff.alphas_cumprod[keep], rtol=1e-12, atol=0)
    # respacing a respaced process keeps mapping to ORIGINAL timesteps
    rr = respaced(r, [0, r.num_timesteps - 1])
    assert rr.timestep_map.tolist() == [keep[0], keep[-1]]
    torch.testing.assert_close(rr.alphas_cumprod, diff.alphas_cumprod[[keep[0], keep[-1]]])


# ------------------------------------------------------------------------------------------------ samplers
class ToyDenoiser(torch.nn.Module):
    """Per-sample, per-pixel toy model obeying the contract (eps, var_values, extras)."""

    def __init__(self):
        super().__init__()
        g = gen(123)
        self.w = torch.nn.Parameter(torch.randn(3, 3, generator=g) * 0.3)
        self.s = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> ModelOutput:
        tt = (t.float() / 1000).view(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", self.w, x) * (1 + tt)
        eps = torch.tanh(h) + 0.1 * x
        var = torch.tanh(h.flip(1) + self.s.view(1, 3, 1, 1))
        return ModelOutput(pred=eps, var_values=var, extras={"kernel": torch.softmax(x.mean((2, 3)), 1) + tt[:, 0, 0]})


@pytest.fixture(scope="module")
def toy():
    return ToyDenoiser()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_same_seed_same_output(toy, sampler):
    d = make_diffusion(1000, "linear", "20")

    def run(seed):
        x_T = randn((2, 3, 8, 8), gen(seed))
        if sampler == "ddpm":
            return sample(toy, x_T, DDPMStepper(d), gen(seed))
        return sample(toy, x_T, DDIMStepper(d, eta=1.0), gen(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_ddim_eta0_is_deterministic(toy):
    d = make_diffusion(1000, "linear", "ddim10")
    x_T = randn((1, 3, 8, 8), gen(0))
    a = sample(toy, x_T, DDIMStepper(d), gen(1))
    b = sample(toy, x_T, DDIMStepper(d), gen(99))
    assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("var_type", ["auto", "fixed_small", "fixed_large"])
def test_batch_of_two_equals_two_single_runs(toy, var_type):
    d = make_diffusion(1000, "linear", "10")
    gens = [gen(3), gen(4)]
    x_T = randn((2, 3, 8, 8), gens)
    batch = sample(toy, x_T, DDPMStepper(d, var_type), gens)
    for i, seed in enumerate([3, 4]):
        g = gen(seed)
        single = sample(toy, randn((1, 3, 8, 8), [g]), DDPMStepper(d, var_type), [g])
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_model_receives_original_timesteps():
    d = make_diffusion(1000, "linear", "ddim5")
    seen = []

    def fn(x, t):
        seen.append(t.tolist())
        return ModelOutput(pred=torch.zeros_like(x))
    sample(fn, torch.zeros(2, 1, 2, 2), DDIMStepper(d))
    assert seen == [[800, 800], [600, 600], [400, 400], [200, 200], [0, 0]]


def test_guidance_can_replace_x0():
    d = make_diffusion(1000, "linear", "10")
    target = torch.rand(1, 3, 4, 4, generator=gen(0))

    def guidance(state):
        assert state.out.extras["tag"] == 7
        return GuidanceResult(x0=target)
    guidance.needs_grad = False

    def fn(x, t):
        return ModelOutput(pred=torch.randn_like(x), extras={"tag": 7})
    out = sample(fn, randn((1, 3, 4, 4), gen(1)), DDPMStepper(d, "fixed_small"), gen(2), guidance=guidance)
    torch.testing.assert_close(out, target)  # at t = 0 the posterior mean is x0


def test_dps_gradient_flows_through_the_network():
    """One step at t_start=0: x_prev = x0_hat(x_t) - scale * d/dx_t loss(x0_hat(x_t)), checked by hand."""
    d = make_diffusion(1000, "linear", "10")
    w = torch.tensor(0.7)

    def fn(x, t):
        return ModelOutput(pred=w * x)
    target = torch.full((2, 1, 2, 2), 0.25)
    scale = torch.tensor([0.5, 2.0])

    def guidance(state):
        return GuidanceResult(loss=((state.x0 - target) ** 2).flatten(1).sum(1), scale=scale)
    x = torch.randn(2, 1, 2, 2, generator=gen(0))
    out = sample(fn, x, DDPMStepper(d, "fixed_small", t_start=0), gen(0), guidance=guidance)
    abar = d.alphas_cumprod[0].item()
    c = (1 - math.sqrt(1 - abar) * 0.7) / math.sqrt(abar)  # x0_hat = c * x_t
    want = c * x - scale.view(2, 1, 1, 1) * 2 * (c * x - target) * c
    torch.testing.assert_close(out, want)


def test_no_grad_when_guidance_does_not_need_it(toy):
    flags = []

    def fn(x, t):
        flags.append((torch.is_grad_enabled(), x.requires_grad))
        return toy(x, t)

    def g(state):
        return None
    g.needs_grad = False
    d = make_diffusion(1000, "linear", "3")
    sample(fn, torch.zeros(1, 3, 4, 4), DDPMStepper(d), gen(0), guidance=g)
    sample(fn, torch.zeros(1, 3, 4, 4), DDPMStepper(d), gen(0))
    assert flags == [(False, False)] * 6


# ------------------------------------------------------------------------------------------------ tiling
def test_pad_to_multiple_modes():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)
    assert pad_to_multiple(x, 1) is x  # already a multiple: untouched
    r = pad_to_multiple(x, 4)  # 5x6 -> 8x8, reflection at the bottom / right only
    assert r.shape == (1, 2, 8, 8) and torch.equal(r[..., :5, :6], x)
    assert torch.equal(r[..., 5, :6], x[..., 3, :]) and torch.equal(r[..., :5, 6], x[..., :, 4])
    z = pad_to_multiple(x, 4, mode="zeros")
    assert torch.equal(z[..., :5, :6], x) and z[..., 5:, :].abs().sum() == 0 and z[..., :, 6:].abs().sum() == 0
    tiny = torch.rand(1, 3, 2, 2)  # too small to reflect 6 rows: replicate
    rp = pad_to_multiple(tiny, 8)
    assert rp.shape == (1, 3, 8, 8) and torch.equal(rp[..., 7, 7], tiny[..., 1, 1])


def test_tile_boxes_cover_and_align():
    boxes = tile_boxes(72, 40, tile=32, overlap=8, align=8)
    cover = torch.zeros(72, 40)
    for b in boxes:
        assert b.top % 8 == 0 and b.left % 8 == 0 and (b.height, b.width) == (32, 32)
        cover[b.slices] += 1
    assert cover.min() >= 1
    assert max(b.top + b.height for b in boxes) == 72 and max(b.left + b.width for b in boxes) == 40


def test_tile_covering_the_image_equals_untiled(toy):
    x, t = torch.randn(2, 3, 16, 16, generator=gen(0)), torch.tensor([10, 900])
    a, b = toy(x, t), tiled(toy, tile=64, overlap=8)(x, t)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.var_values, b.var_values)
    assert torch.equal(a.extras["kernel"], b.extras["kernel"])


def test_tiled_matches_untiled_for_a_translation_equivariant_model(toy):
    def pointwise(x, t):  # exactly translation-equivariant, constant global extra
        out = toy(x, t)
        return ModelOutput(out.pred, "eps", out.var_values, {"kernel": torch.ones(x.shape[0], 4) * t.view(-1, 1)})
    x, t = torch.randn(2, 3, 40, 56, generator=gen(0)), torch.tensor([10, 900])
    a, b = pointwise(x, t), tiled(pointwise, tile=24, overlap=8)(x, t)
    torch.testing.assert_close(b.pred, a.pred, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.var_values, a.var_values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.extras["kernel"], a.extras["kernel"])  # shares sum to one


def test_tiled_blends_global_extras_by_tile_share():
    calls = []

    def fn(x, t, box):
        calls.append(box)
        return ModelOutput(torch.zeros_like(x), "eps", None, {"k": torch.full((x.shape[0], 1), float(box.left))})
    out = tiled(fn, tile=16, overlap=8, pass_box=True)(torch.zeros(1, 1, 16, 32), torch.zeros(1))
    assert [b.left for b in calls] == [0, 8, 16]
    # symmetric layout: the middle tile's share is interior, outer tiles mirror -> mean left offset = 8
    assert out.extras["k"].item() == pytest.approx(8.0)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_guidance_gradient_flows_through_every_tile(toy, checkpoint):
    x = torch.randn(1, 3, 32, 32, generator=gen(0), requires_grad=True)
    t = torch.tensor([500])
    (g_full,) = torch.autograd.grad(toy(x, t).pred.square().sum(), x)
    out = tiled(toy, tile=16, overlap=8, checkpoint=checkpoint)(x, t)
    (g_tiled,) = torch.autograd.grad(out.pred.square().sum(), x)
    torch.testing.assert_close(g_tiled, g_full, atol=1e-5, rtol=1e-4)
    assert (g_full != 0).all()


def test_tiled_vjp_equals_keeping_every_tile_graph():
    """The bounded-memory backward (tiles recomputed one at a time) is the exact gradient of the blended output,
    through spatial outputs and the share-weighted global extra, for a model that is not translation-equivariant
    (a 3x3 conv sees the tile borders, the extra depends on the tile's statistics)."""
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3, generator=gen(5))

    def model(x, t):
        h = torch.tanh(conv(x))
        return ModelOutput(h[:, :3], "eps", h[:, 3:], {"kernel": torch.softmax(h.mean((2, 3)), 1)})

    x = torch.randn(2, 3, 40, 56, generator=gen(1))
    t = torch.tensor([10, 900])
    grads = []
    for ckpt in (True, False):
        xi = x.clone().requires_grad_(True)
        out = tiled(model, tile=24, overlap=8, checkpoint=ckpt)(xi, t)
        loss = out.pred.square().sum() + 3 * out.extras["kernel"][:, 0].sum()
        grads.append(torch.autograd.grad(loss, xi)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert (grads[0] != 0).float().mean() > 0.99
