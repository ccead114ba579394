"""BlindDiff: Algorithm 1 (training_losses) and Algorithm 2 (BlindDiffPipeline) on tiny models."""

from __future__ import annotations

import json
import types

import pytest
import torch

from blindsr.config import to_dict
from blindsr.degradations.kernels import gaussian_kernel
from blindsr.diffusion.parameterization import split
from blindsr.diffusion.respace import make_diffusion
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods import blinddiff
from blindsr.methods.blinddiff import (
    BlindDiffConfig,
    BlindDiffLossConfig,
    BlindDiffPipeline,
    degrade,
    load_pipeline,
    save_pipeline,
    training_losses,
)
from blindsr.methods.blinddiff.losses import fit_kernel
from blindsr.models.mcformer import MCFormer, MCFormerConfig
from blindsr.ops.tiling import tile_boxes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny() -> MCFormer:
    torch.manual_seed(0)
    return MCFormer(MCFormerConfig.tiny()).eval()


@pytest.fixture(scope="module")
def pipe(tiny) -> BlindDiffPipeline:
    return BlindDiffPipeline(tiny, BlindDiffConfig(sample_steps=2))


def _batch(b=2, size=32, seed=0):
    g = gen(seed)
    hr = torch.rand(b, 3, size, size, generator=g)
    k = torch.stack([gaussian_kernel(21, s) for s in (1.0, 2.5, 3.0)[:b]])
    return hr, degrade(hr, k, 4), k


# ------------------------------------------------------------------------------------------------ Algorithm 1
def test_training_losses_finite_and_backprop(tiny):
    model = MCFormer(MCFormerConfig.tiny()).train()
    model.load_state_dict(tiny.state_dict())
    diffusion = BlindDiffConfig().train_diffusion()
    assert diffusion.num_timesteps == 500 and int(diffusion.timestep_map[-1]) == 999
    hr, lr, k = _batch()
    terms = training_losses(model, diffusion, hr, lr, k, generator=gen(0))
    assert set(terms) == {"mse", "vb", "kernel", "loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"] + terms["kernel"])
    terms["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["predictor.0.weight"].abs().sum() > 0  # the kernel branch is trained by the kernel loss
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # same generator, same loss
    again = training_losses(model, diffusion, hr, lr, k, generator=gen(0))
    assert again["loss"].item() == terms["loss"].item()


def test_training_losses_ablation_switches(tiny):
    diffusion = BlindDiffConfig().train_diffusion()
    hr, lr, k = _batch()
    with torch.no_grad():
        mse = training_losses(tiny, diffusion, hr, lr, k, generator=gen(1))
        l1 = training_losses(tiny, diffusion, hr, lr, k, generator=gen(1), cfg=BlindDiffLossConfig(kernel_loss="l1"))
        off = training_losses(tiny, diffusion, hr, lr, None, generator=gen(1),
                              cfg=BlindDiffLossConfig(kernel_weight=0, learn_sigma=False))
    out, k_hat = tiny(*_noisy(diffusion, hr, gen(1)), lr)
    diff = k_hat - k.flatten(1)
    assert mse["kernel"].item() == pytest.approx(diff.pow(2).mean().item(), rel=1e-5)  # official: MSE on 441
    assert l1["kernel"].item() == pytest.approx(diff.abs().mean().item(), rel=1e-5)  # paper: L1
    assert set(off) == {"mse", "loss"} and off["loss"].item() == pytest.approx(mse["mse"].item(), rel=1e-6)
    with pytest.raises(BlindSRError, match="ground-truth kernels"):
        training_losses(tiny, diffusion, hr, lr, None, generator=gen(1))


def _noisy(diffusion, hr, g):
    """Reproduce training_losses' draws: t, then noise, from the same generator."""
    t = torch.randint(0, diffusion.num_timesteps, (hr.shape[0],), generator=g)
    noise = torch.randn(hr.shape, generator=g)
    return diffusion.q_sample(hr, t, noise), diffusion.original_t(t)


def test_smaller_kernels_are_centred_in_the_model_kernel():
    k11 = gaussian_kernel(11, 1.0)[None]
    k21 = fit_kernel(k11, 21)
    assert k21.shape == (1, 21, 21) and k21.sum().item() == pytest.approx(1.0)
    assert torch.equal(k21[0, 5:16, 5:16], k11[0])
    with pytest.raises(BlindSRError):
        fit_kernel(torch.ones(1, 10, 10), 21)


# ------------------------------------------------------------------------------------------------ Algorithm 2
def test_pipeline_shapes_and_determinism(pipe):
    lr = torch.rand(1, 3, 9, 7, generator=gen(0))  # odd sizes: padded to a multiple of 2, cropped back
    a = pipe(lr, generator=gen(5))
    b = pipe(lr, generator=gen(5))
    c = pipe(lr, generator=gen(6))
    assert a.sr.shape == (1, 3, 36, 28) and a.kernel.shape == (1, 21, 21)
    assert a.sr.min() >= 0 and a.sr.max() <= 1
    assert a.kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(a.sr, b.sr) and not torch.equal(a.sr, c.sr)


def test_start_from_noised_bicubic_skips_the_high_noise_steps(tiny):
    """start < 1: x_{t0} = q_sample(bicubic↑y, t0), then only the steps t0..0 run; start = 1 is Algorithm 2."""
    calls = []
    hook = tiny.register_forward_hook(lambda module, args, out: calls.append(int(args[1][0])))
    pipe10 = BlindDiffPipeline(tiny, BlindDiffConfig(sample_steps=10))
    lr = torch.rand(1, 3, 8, 8, generator=gen(0))
    full = pipe10(lr, lam=0, generator=gen(3))
    n_full, calls[:] = len(calls), []
    a = pipe10(lr, lam=0, start=0.4, generator=gen(3))
    assert n_full == 10 and len(calls) == 5  # respaced indices 4..0 (round(0.4 * 9) = 4)
    b = pipe10(lr, lam=0, start=0.4, generator=gen(3))
    assert torch.equal(a.sr, b.sr) and not torch.equal(a.sr, full.sr)
    assert torch.equal(pipe10(lr, lam=0, start=1.0, generator=gen(3)).sr, full.sr)
    with pytest.raises(BlindSRError):
        pipe10(lr, lam=0, start=0.0, generator=gen(3))
    hook.remove()


def test_batch_of_two_equals_two_single_runs(pipe):
    lr = torch.rand(2, 3, 8, 8, generator=gen(0))
    batch = pipe(lr, generator=[gen(1), gen(2)])
    for i in range(2):
        single = pipe(lr[i:i + 1], generator=[gen(i + 1)])
        # batched vs single convolutions differ by ~1e-7, amplified by 1/sqrt(abar_T) ~ 150 at the first step
        torch.testing.assert_close(batch.sr[i:i + 1], single.sr, atol=2e-4, rtol=0)
        torch.testing.assert_close(batch.kernel[i:i + 1], single.kernel, atol=1e-6, rtol=1e-4)


def test_lambda_zero_runs_without_autograd(tiny):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = tiny, tiny.config

        def forward(self, x, t, cond):
            seen.append(torch.is_grad_enabled())
            return self.inner(x, t, cond)
    p = BlindDiffPipeline(Spy(), BlindDiffConfig(sample_steps=2))
    p(torch.rand(1, 3, 8, 8), lam=0, generator=gen(0))
    p(torch.rand(1, 3, 8, 8), lam=1, generator=gen(0))
    assert seen == [False, False, True, True]
    assert p.model.training  # sampling runs in eval mode and restores the caller's mode


def test_guidance_loss_is_the_official_formula():
    """B = 1: ||y - bicubic_x1/4(blur(x0, k))||_2 + 0.1 ||x0||_2 (HEAD p_sample_loop_progressive)."""
    from blindsr.degradations.operators import blur, imresize

    g = gen(0)
    x0, y = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 8, 8, generator=g)
    k = torch.softmax(torch.randn(1, 441, generator=g), 1)
    guide = blinddiff.KernelGuidance(y, 4, lambda raw: raw.reshape(-1, 21, 21), x0_reg=0.1)
    want = torch.linalg.norm(y - imresize(blur(x0, k.view(1, 21, 21)), 1 / 4)) + 0.1 * torch.linalg.norm(x0)
    assert guide.loss(x0, k).item() == pytest.approx(want.item(), rel=1e-6)
    sq = blinddiff.KernelGuidance(y, 4, lambda raw: raw.reshape(-1, 21, 21), norm="l2sq", x0_reg=0)
    assert sq.loss(x0, k).item() == pytest.approx((y - imresize(blur(x0, k.view(1, 21, 21)), 1 / 4)).square().sum()
                                                  .item(), rel=1e-6)


class Oracle(torch.nn.Module):
    """Exact MMSE denoiser for the prior x0 ~ N(mu, s^2 I), plus the true kernel (Tweedie's formula)."""

    def __init__(self, mu, s, kernel):
        super().__init__()
        self.config = types.SimpleNamespace(scale=4)
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.mu, self.s2, self.kernel = mu, s * s, kernel.reshape(1, -1)
        self.abar = make_diffusion(1000).alphas_cumprod.float()

    def forward(self, x_t, t, cond):
        abar = self.abar[t].view(-1, 1, 1, 1)
        x0 = self.mu + abar.sqrt() * self.s2 / (abar * self.s2 + 1 - abar) * (x_t - abar.sqrt() * self.mu)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1), self.kernel.expand(x_t.shape[0], -1)


def test_kernel_aware_gradient_lowers_the_measurement_residual():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    mu = (0.5 + 0.2 * torch.stack([torch.sin(6 * xx), torch.cos(5 * yy), torch.sin(4 * (xx + yy))]))[None]
    k = gaussian_kernel(21, 2.0)
    x0 = mu + 0.15 * torch.randn(1, 3, 32, 32, generator=gen(0))
    y = degrade(x0, k[None], 4)
    p = BlindDiffPipeline(Oracle(mu, 0.15, k))

    def residual(lam):
        r = p(y, steps=25, lam=lam, x0_reg=0, generator=gen(1), kernel_estimate="model")
        torch.testing.assert_close(r.kernel[0], k)
        return (y - degrade(r.sr, k[None], 4)).norm().item()
    r0, r1, r2 = residual(0), residual(1), residual(2)
    assert r1 < 0.9 * r0 and r2 < 0.9 * r1


def test_options_trajectory_and_errors(pipe):
    lr = torch.rand(1, 3, 8, 8, generator=gen(0))
    # the paper's squared norm has no normalisation: on an untrained net it needs a small step
    r = pipe(lr, generator=gen(0), lam=1e-3, norm="l2sq", down="stride", kernel_mode="bicubic", x0_reg=0,
             return_trajectory=True, kernel_estimate="model")
    assert r.kernels_traj.shape == (2, 1, 21, 21) and r.x0_traj.shape == (2, 1, 3, 32, 32)
    assert r.traj_steps == [0, 1] and torch.equal(r.kernels_traj[-1], r.kernel)
    assert torch.isfinite(r.sr).all()
    with pytest.raises(BlindSRError, match="norm"):
        pipe(lr, norm="l1")
    with pytest.raises(BlindSRError, match="kernel_estimate"):
        pipe(lr, kernel_estimate="mean")
    with pytest.raises(BlindSRError, match="expects LR images"):
        pipe(torch.rand(3, 8, 8))
    with pytest.raises(BlindSRError, match="diverged"):  # a huge squared-norm step: an error, not NaN pixels
        pipe(lr, generator=gen(0), lam=1e30, norm="l2sq")


def test_tiled_sampling(pipe):
    lr = torch.rand(1, 3, 16, 8, generator=gen(0))
    whole = pipe(lr, generator=gen(3), lam=0)
    big_tile = pipe(lr, generator=gen(3), lam=0, tile=64)
    assert torch.equal(whole.sr, big_tile.sr)
    small = pipe(lr, generator=gen(3), tile=32, tile_overlap=8)  # 3 tiles; the guidance gradient spans them
    assert small.sr.shape == whole.sr.shape and torch.isfinite(small.sr).all()
    assert small.kernel.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("scale, size", [(2, (5, 6)), (3, (7, 5)), (1, (12, 9))])
def test_other_scales_and_deblurring(scale, size):
    torch.manual_seed(0)
    p = BlindDiffPipeline(MCFormer(MCFormerConfig.tiny(scale=scale)), BlindDiffConfig(sample_steps=2))
    r = p(torch.rand(1, 3, *size, generator=gen(0)), generator=gen(0))
    assert r.sr.shape == (1, 3, size[0] * scale, size[1] * scale) and torch.isfinite(r.sr).all()


# ------------------------------------------------------------------------------------------------ loading
def test_save_and_load_pipeline_round_trip(pipe, tmp_path):
    path = tmp_path / "m.safetensors"
    save_pipeline(pipe, path)
    loaded = load_pipeline(path)
    assert loaded.config == pipe.config and loaded.model.config == pipe.model.config
    lr = torch.rand(1, 3, 8, 8, generator=gen(0))
    assert torch.equal(loaded(lr, generator=gen(1)).sr, pipe(lr, generator=gen(1)).sr)


def test_load_pipeline_sidecar_and_official_inference(pipe, tmp_path):
    sd = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    torch.save({"params_ema": sd}, tmp_path / "net.pth")
    inferred = load_pipeline(tmp_path / "net.pth")  # no config: inferred from the weights
    assert inferred.model.config == pipe.model.config
    cfg = {"model": to_dict(pipe.model.config), "blinddiff": {"sample_steps": 7}}
    (tmp_path / "net.json").write_text(json.dumps(cfg))
    assert load_pipeline(tmp_path / "net.pth").config.sample_steps == 7
    # safetensors metadata + a sidecar: the sidecar's sampling defaults win, the rest comes from the metadata
    save_pipeline(BlindDiffPipeline(pipe.model, BlindDiffConfig(sample_steps=3, lam=2.0)), tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text(json.dumps({"model": {"dim": 999}, "blinddiff": {"lam": 0.5, "lam_ref_steps": 9}}))
    c = load_pipeline(tmp_path / "m.safetensors").config
    assert (c.sample_steps, c.lam, c.lam_ref_steps) == (3, 0.5, 9)


def test_load_pipeline_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="checkpoint not found"):
        load_pipeline(tmp_path / "missing.safetensors")
    monkeypatch.setattr(blinddiff.pipeline, "default_model_path", lambda: tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="default BlindDiff model is not installed"):
        load_pipeline()
    (tmp_path / "bad.json").write_text("{")
    torch.save({}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="invalid JSON"):
        load_pipeline(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------ prediction parameterisation
class _Oracle(torch.nn.Module):
    """Returns the exact target of its parameterisation for a known (x0, noise), plus a fixed kernel output."""

    def __init__(self, base, prediction: str, x0: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.base, self.prediction, self.x0, self.noise = base, prediction, x0, noise
        self.w = torch.nn.Parameter(torch.zeros(()))  # pipelines look up the parameters' dtype / device
        self.config = types.SimpleNamespace(scale=4)

    def forward(self, x_t, t, cond):
        abar = self.base.abar(t, x_t).float()
        target = {"eps": self.noise, "x0": self.x0,
                  "v": abar.sqrt() * self.noise - (1 - abar).sqrt() * self.x0}[self.prediction]
        return torch.cat([target, torch.zeros_like(target)], 1) + self.w, torch.zeros(x_t.shape[0], 441)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_targets_and_sampler_contract(prediction):
    cfg = BlindDiffConfig(prediction=prediction)
    train, base = cfg.train_diffusion(), cfg.base_diffusion()
    hr, lr, _ = _batch()
    g = gen(3)
    t = torch.randint(0, train.num_timesteps, (2,), generator=g)
    noise = torch.randn(hr.shape, generator=g)
    x_t = train.q_sample(hr, t, noise)
    oracle = _Oracle(base, prediction, hr, noise)
    # the loss regresses this parameterisation's target: zero for the oracle (t is redrawn from the same seed)
    terms = training_losses(oracle, train, hr, lr, None, generator=gen(3), prediction=prediction,
                            cfg=BlindDiffLossConfig(kernel_weight=0, learn_sigma=False))
    assert terms["mse"].item() < 1e-9
    # the pipeline hands the sampling loop the raw prediction and its kind; split gives the oracle's eps and x0
    pipe = BlindDiffPipeline(oracle, cfg)
    out = pipe.model_fn(lr)(x_t, train.original_t(t))
    assert out.kind == prediction
    eps, x0 = split(out.pred, out.kind, x_t, train.abar(t, x_t))
    torch.testing.assert_close(eps, noise, atol=2e-4, rtol=0)
    torch.testing.assert_close(x0, hr, atol=2e-3, rtol=0)


def test_prediction_x0_wrong_target_is_penalised_and_bad_names_fail():
    hr, lr, _ = _batch()
    cfg = BlindDiffConfig(prediction="x0")
    oracle = _Oracle(cfg.base_diffusion(), "eps", hr, torch.zeros_like(hr))  # predicts 0 where x0 = hr
    terms = training_losses(oracle, cfg.train_diffusion(), hr, lr, None, generator=gen(0), prediction="x0",
                            cfg=BlindDiffLossConfig(kernel_weight=0, learn_sigma=False))
    torch.testing.assert_close(terms["mse"], (hr**2).mean())
    with pytest.raises(BlindSRError, match="prediction"):
        BlindDiffConfig(prediction="score")
    with pytest.raises(BlindSRError, match="prediction"):
        training_losses(oracle, cfg.train_diffusion(), hr, lr, None, prediction="score")


def test_lam_ref_steps_keeps_the_total_pull(tiny):
    lr = torch.rand(1, 3, 8, 8, generator=gen(1))
    scaled = BlindDiffPipeline(tiny, BlindDiffConfig(sample_steps=2, lam_ref_steps=10))
    plain = BlindDiffPipeline(tiny, BlindDiffConfig(sample_steps=2))
    a = scaled(lr, lam=0.01, generator=gen(0)).sr
    torch.testing.assert_close(a, plain(lr, lam=0.01 * 10 / 2, generator=gen(0)).sr, atol=1e-6, rtol=0)
    assert not torch.allclose(a, plain(lr, lam=0.01, generator=gen(0)).sr, atol=1e-4)
    assert torch.equal(scaled(lr, lam=0, generator=gen(0)).sr, plain(lr, lam=0, generator=gen(0)).sr)


def test_process_fields_are_refused_per_call_and_tile_overlap_checked(pipe):
    lr = torch.rand(1, 3, 8, 8, generator=gen(0))
    for change in (dict(prediction="x0"), dict(schedule="cosine"), dict(diffusion_steps=200)):
        with pytest.raises(BlindSRError, match="property of the model"):
            pipe(lr, generator=gen(0), **change)
    same = pipe(lr, generator=gen(0), prediction=pipe.config.prediction).sr  # restating the model's value is fine
    assert torch.equal(same, pipe(lr, generator=gen(0)).sr)
    with pytest.raises(BlindSRError, match="tile-overlap"):
        pipe(lr, generator=gen(0), tile=64, tile_overlap=64)


def test_choose_tile_fits_the_budget():
    from blindsr.ops.tiling import choose_tile

    assert choose_tile(64, 64, 10**9, 1000.0, 100.0) is None  # the whole image fits
    t = choose_tile(1024, 768, 1024**3, 30_000.0, 512.0, align=8, overlap=32)
    assert t % 8 == 0 and t >= 64 and t * t * 30_000 + 1024 * 768 * 512 <= 1024**3
    with pytest.raises(BlindSRError, match="max-memory"):
        choose_tile(4096, 4096, 10 * 1024**2, 30_000.0, 512.0, overlap=32)


def test_max_memory_tiles_the_denoiser_automatically(tiny):
    """A budget below the untiled need makes the pipeline tile (more network calls per step, same result
    as an explicit tile of that size); a budget that fits leaves the image whole."""
    calls = []
    handle = tiny.register_forward_hook(lambda *a: calls.append(1))
    try:
        p = BlindDiffPipeline(tiny, BlindDiffConfig(sample_steps=2, tile_overlap=8))
        lr = torch.rand(1, 3, 32, 32, generator=gen(0))  # 128 x 128 output
        need = 128 * 128 * (tiny.config.activation_bytes_per_pixel(False) + 160)
        whole = p(lr, generator=gen(1), lam=0, max_memory=int(2 * need))
        assert len(calls) == 2
        tile = p.auto_tile(1, 128, 128, int(need / 3), guided=False, overlap=8)
        assert tile is not None and tile < 128
        calls.clear()
        auto = p(lr, generator=gen(1), lam=0, max_memory=int(need / 3))
        n_tiles = len(tile_boxes(128, 128, tile, 8, 8))
        assert len(calls) == 2 * n_tiles > 2
        torch.testing.assert_close(auto.sr, p(lr, generator=gen(1), lam=0, tile=tile).sr, atol=1e-6, rtol=0)
        assert (auto.sr - whole.sr).abs().mean() < 0.05  # tiled ~ untiled (MDTA attention is global per tile)
    finally:
        handle.remove()
