"""DM-SR (blindsr.methods.dmsr): ᾱ at a continuous t̂, the decomposition algebra, where each loss sends its
gradient, one- vs multi-step, tiling, the checkpoint round trip, and both backends (a tiny pixel prior and tiny
random SD-2.x parts) through the same code; full-size SD-Turbo parameter counts on the meta device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from blindsr.diffusion.parameterization import noised
from blindsr.methods.dmsr import core, losses, pipeline
from blindsr.methods.dmsr.config import DMSRProcess, InferenceConfig, LossConfig
from blindsr.methods.dmsr.nets import (
    DiscriminatorConfig,
    EncoderConfig,
    EstimatorConfig,
    LRDiscriminator,
    TimeAwareEncoder,
    TimestepEstimator,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ stand-ins
class ConstEps(nn.Module):
    """A "UNet" that predicts a fixed noise (UNet2DConditionModel's call signature)."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = nn.Parameter(eps, requires_grad=False)

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.eps.expand_as(x))


class LocalEps(nn.Module):
    """A translation-equivariant "UNet": one 3x3 conv (receptive field 1 pixel each side)."""

    def __init__(self, c: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.conv(x) * 0.1)


class LocalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.config = EncoderConfig.pixel_s()

    def forward(self, x, t_hat):
        return self.conv(x * 2 - 1)


def tiny_pixel_prior() -> core.FrozenPrior:
    from blindsr.methods.prior.config import PriorUNetConfig
    from blindsr.methods.prior.model import build_unet, null_context

    cfg = PriorUNetConfig.tiny()
    torch.manual_seed(0)
    unet = build_unet(cfg)
    return core.FrozenPrior(unet, null_context(unet, 1), DMSRProcess(), multiple=cfg.multiple)


def tiny_nets(pixel: bool = True, latent: int = 3):
    torch.manual_seed(3)
    est = TimestepEstimator(EstimatorConfig(width_mult=0.0625, n_bins=500))
    enc_cfg = EncoderConfig.pixel_s() if pixel else EncoderConfig(
        out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, double_z=True,
        use_quant_conv=True, downsample=True, mid_attention=False, t_embed_dim=16)
    if pixel:
        enc_cfg = EncoderConfig(**{**enc_cfg.__dict__, "block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4,
                                   "t_embed_dim": 16})
    enc = TimeAwareEncoder(enc_cfg)
    for lin in enc.t_levels:  # not the zero init: t̂ must matter in these tests
        nn.init.normal_(lin.weight, std=0.02)
    disc = LRDiscriminator(DiscriminatorConfig(in_channels=latent, channels=(8, 8, 8, 8), blocks_per_level=1,
                                               norm_num_groups=4, hint_channels=(4, 8)))
    return est, enc, disc


# ------------------------------------------------------------------------------------------ algebra
def test_alpha_bar_at_integer_and_between():
    table = DMSRProcess().alphas_cumprod()
    t = torch.tensor([0.0, 100.0, 499.0])
    for mode in ("loglinear", "linear", "round"):
        assert torch.allclose(core.alpha_bar_at(table, t, mode), table[[0, 100, 499]].float())
    half = core.alpha_bar_at(table, torch.tensor([100.5]))
    assert table[101] < half < table[100]
    assert half == pytest.approx((table[100] * table[101]).sqrt().item(), rel=1e-6)  # geometric mean
    grid = core.alpha_bar_at(table, torch.linspace(0, 999, 4001))
    assert (grid[1:] <= grid[:-1]).all()  # monotone
    assert core.alpha_bar_at(table, torch.tensor([100.0]))[0] == pytest.approx(0.8942, abs=1e-4)  # SD-Turbo's


def test_decomposition_round_trips():
    g = gen()
    z, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    prior = core.FrozenPrior(ConstEps(eps), torch.zeros(1, 1, 4))
    t = torch.tensor([37.25, 412.8])
    x = noised(z, eps, prior.abar(t).reshape(-1, 1, 1, 1))
    eps_back, z_back = core.decompose(prior, x, t)
    assert torch.allclose(eps_back, eps) and torch.allclose(z_back, z, atol=1e-5)
    # multi-step with an exact denoiser keeps Z; one step of restore_latent is the decomposition itself
    z1, e1 = core.restore_latent(prior, x, t, steps=1)
    assert torch.equal(z1, z_back) and torch.equal(e1, eps_back)
    z5, _ = core.restore_latent(prior, x, t, steps=5)
    assert torch.allclose(z5, z, atol=1e-4)


def test_multi_step_reuse_switch_matters_for_a_real_denoiser():
    prior = tiny_pixel_prior()
    x = torch.randn(1, 3, 8, 8, generator=gen())
    t = torch.tensor([300.0])
    a, _ = core.restore_latent(prior, x, t, steps=3, reuse_eps=True)
    b, _ = core.restore_latent(prior, x, t, steps=3, reuse_eps=False)
    c, _ = core.restore_latent(prior, x, t, steps=1)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------ losses
def _batch(h: int = 8, scale: int = 4):
    from blindsr.degradations.operators import imresize

    hr = torch.rand(2, 3, h * scale, h * scale, generator=gen(5))
    lr = imresize(hr, scale=1 / scale).clamp(0, 1)
    return lr, imresize(lr, scale=scale).clamp(0, 1), hr


def _grads(modules: dict[str, nn.Module]) -> dict[str, bool]:
    return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for k, m in modules.items()}


@pytest.mark.parametrize("term", ["l1", "per", "adv", "dm", "eps", "l_t"])
def test_each_loss_sends_its_gradient_only_where_the_paper_puts_it(term):
    prior = tiny_pixel_prior()
    est, enc, disc = tiny_nets()
    lr, up, hr = _batch()
    weights = {f"w_{k}": 0.0 for k in ("l1", "per", "adv", "dm", "eps", "t")}
    weights["w_t" if term == "l_t" else f"w_{term}"] = 1.0
    cfg = LossConfig(**weights)
    terms = losses.generator_losses(prior, enc, est, disc, lr, up, hr, cfg, gen(), step=0)
    assert terms["loss"].requires_grad and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    got = _grads({"encoder": enc, "estimator": est, "discriminator": disc, "prior": prior.unet})
    want = {"encoder": term != "l_t", "estimator": term == "l_t", "discriminator": False, "prior": False}
    assert got == want


def test_dm_gradient_is_the_score_difference():
    prior = tiny_pixel_prior()
    z, x = torch.randn(1, 3, 8, 8, generator=gen(1)), torch.randn(1, 3, 8, 8, generator=gen(2))
    cfg = LossConfig(dm_t_range=[200, 200], dm_normalize=False)
    g = losses.dm_gradient(prior, z, x, cfg, gen(9))
    assert losses.dm_gradient(prior, x, x, cfg, gen(9)).abs().max() == 0  # Z_SR = X_HR: nothing to match
    assert g.abs().max() > 0
    zz = z.clone().requires_grad_(True)
    (0.5 * torch.nn.functional.mse_loss(zz, (zz - g).detach())).backward()
    assert torch.allclose(zz.grad, g / g.numel())


def test_discriminator_step_sees_hr_as_real_and_detached_sr_as_fake():
    from blindsr.methods.dmsr.nets import d_loss

    prior = tiny_pixel_prior()
    est, enc, disc = tiny_nets()
    lr, up, hr = _batch()
    terms = losses.generator_losses(prior, enc, est, disc, lr, up, hr, LossConfig(), gen(), step=0)
    assert not terms["z_sr"].requires_grad
    loss = d_loss(disc(terms["x_hr"], lr), disc(terms["z_sr"], lr))
    loss.backward()
    assert _grads({"d": disc, "e": enc}) == {"d": True, "e": False}


def test_timestep_target_orders_by_degradation():
    hr = torch.rand(1, 3, 32, 32, generator=gen(4))
    mild = (hr + 0.02 * torch.randn(hr.shape, generator=gen(5))).clamp(0, 1)
    bad = (hr + 0.3 * torch.randn(hr.shape, generator=gen(6))).clamp(0, 1)
    for kind in ("ssim", "l2"):
        cfg = LossConfig(t_target=kind)
        t0, t1, t2 = (losses.timestep_target(x, hr, cfg, 500) for x in (hr, mild, bad))
        assert t0.item() == pytest.approx(0, abs=1e-3) and t0 < t1 < t2 <= 499
    with pytest.raises(Exception, match="LPIPS"):
        losses.timestep_target(hr, hr, LossConfig(t_target="lpips"), 500)


# ------------------------------------------------------------------------------------------ pipeline
def test_tiled_equals_untiled_on_a_translation_equivariant_stand_in():
    prior = core.FrozenPrior(LocalEps(), torch.zeros(1, 1, 4), multiple=1)
    est = TimestepEstimator(EstimatorConfig(width_mult=0.0625))
    pipe = pipeline.DMSRPipeline(est, LocalEncoder(), prior, InferenceConfig(t_hat=250.0))
    lr = torch.rand(1, 3, 24, 20, generator=gen(7))
    whole = pipe(lr).sr
    tiled = pipe(lr, tile=40, tile_overlap=16, tile_margin=8).sr
    assert whole.shape == (1, 3, 96, 80)
    assert torch.allclose(whole, tiled, atol=1e-5)


def test_pixel_pipeline_checkpoint_round_trip_and_t_hat(tmp_path):
    from blindsr.methods.prior.config import PriorUNetConfig
    from blindsr.methods.prior.model import Prior, save_prior

    prior = tiny_pixel_prior()
    ppath = save_prior(Prior(prior.unet, PriorUNetConfig.tiny()), tmp_path / "prior.safetensors")
    est, enc, _ = tiny_nets()
    pipe = pipeline.DMSRPipeline(est.eval(), enc.eval(), pipeline.pixel_prior(str(ppath)), InferenceConfig())
    lr = torch.rand(2, 3, 6, 10, generator=gen(8))
    res = pipe(lr)
    assert res.sr.shape == (2, 3, 24, 40) and res.t_hat.shape == (2,) and (0 <= res.t_hat).all()
    assert (res.t_hat <= 499).all()
    f = pipeline.save_pipeline(pipe, tmp_path / "dmsr.safetensors", "pixel", prior=str(ppath))
    back = pipeline.load_pipeline(f)
    assert torch.equal(back(lr).sr, res.sr)
    forced = back(lr, t_hat=123.0)
    assert torch.equal(forced.t_hat, torch.full((2,), 123.0)) and not torch.equal(forced.sr, res.sr)


def tiny_sd_prior() -> core.FrozenPrior:
    """Random tiny SD-2.x parts: a 4-channel UNet2DConditionModel with cross-attention and a 2-level VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4,
                                use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4)
    context = torch.randn(1, 77, 16, generator=gen(11))
    return core.FrozenPrior(unet, context, DMSRProcess(), vae=vae, scaling=0.18215, multiple=2)


def test_sd_backend_runs_the_same_code_as_the_pixel_backend(monkeypatch):
    calls = []
    real = pipeline.restore_latent
    monkeypatch.setattr(pipeline, "restore_latent", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    est, enc_px, _ = tiny_nets(pixel=True)
    _, enc_sd, _ = tiny_nets(pixel=False, latent=4)
    lr = torch.rand(1, 3, 8, 8, generator=gen(12))
    sd_pipe = pipeline.DMSRPipeline(est, enc_sd, tiny_sd_prior())
    px_pipe = pipeline.DMSRPipeline(est, enc_px, tiny_pixel_prior())
    for pipe in (sd_pipe, px_pipe):
        out = pipe(lr, steps=2)
        assert out.sr.shape == (1, 3, 32, 32) and torch.isfinite(out.sr).all()
    assert [c.vae is not None for c in calls] == [True, False]
    tiled = sd_pipe(lr, tile=16, tile_overlap=8)  # tiles through the encoder, μψ and the decoder
    assert tiled.sr.shape == (1, 3, 32, 32) and torch.isfinite(tiled.sr).all()


def test_sd_backend_losses_reach_only_the_encoder():
    prior = tiny_sd_prior()
    est, enc, disc = tiny_nets(pixel=False, latent=4)
    lr, up, hr = _batch(h=4)
    terms = losses.generator_losses(prior, enc, est, disc, lr, up, hr, LossConfig(w_t=0), gen(), step=0)
    terms["loss"].backward()
    got = _grads({"encoder": enc, "unet": prior.unet, "vae": prior.vae, "disc": disc, "est": est})
    assert got == {"encoder": True, "unet": False, "vae": False, "disc": False, "est": False}


def test_missing_weights_are_one_line_errors(tmp_path, monkeypatch):
    from blindsr.errors import WeightsError

    monkeypatch.setattr("blindsr.weights.HERE", tmp_path)  # a copy of blindsr without the embedded files
    with pytest.raises(WeightsError, match="no embedded DM-SR-S"):
        pipeline.load_pipeline(None)
    with pytest.raises(WeightsError, match="not found"):
        pipeline.load_pipeline(tmp_path / "none.safetensors")
    est, enc, _ = tiny_nets(pixel=False, latent=4)
    pipe = pipeline.DMSRPipeline(est, enc, tiny_sd_prior())
    f = pipeline.save_pipeline(pipe, tmp_path / "sd.safetensors", "sd-turbo")
    with pytest.raises(WeightsError, match="--sd-turbo PATH"):
        pipeline.load_pipeline(f)


def test_full_size_sd_turbo_parts_on_the_meta_device():
    """SD-Turbo = the SD 2.x architecture: UNet 865.9 M, VAE 83.65 M (shared/research/dmsr.md)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from blindsr.models.sd import load_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_config("unet"))
        vae = AutoencoderKL(**load_config("vae"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(unet) / 1e5) / 10 == 865.9
    assert round(count(vae) / 1e4) / 100 == 83.65


def test_cli_sr_method_dmsr(tmp_path, capsys, tiny_dmsr_checkpoint, monkeypatch):
    from PIL import Image

    from blindsr.cli.main import main

    ckpt = tiny_dmsr_checkpoint
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(10, 14, 3, generator=gen(3)) * 255).byte().numpy()).save(img)
    out = tmp_path / "out"
    assert main(["sr", str(img), "-o", str(out), "--method", "dmsr", "--encoder", str(ckpt), "--steps", "2",
                 "--t-hat", "200"]) == 0
    assert "t̂ 200.0" in capsys.readouterr().out
    with Image.open(out / "in.png") as im:
        assert im.size == (56, 40)
    monkeypatch.setattr("blindsr.weights.HERE", tmp_path)  # a copy of blindsr without the embedded files
    for argv, msg in ((["--method", "dmsr"], "no embedded DM-SR-S"),
                      (["--method", "dmsr", "--encoder", str(ckpt), "--lambda", "1"], "--lambda: BlindDiff option"),
                      (["--method", "dmsr", "--encoder", str(ckpt), "--prompt", "x"], "unconditional"),
                      (["--t-hat", "3"], "--t-hat is a DM-SR option")):
        assert main(["sr", str(img), "-o", str(tmp_path / "o2"), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_embedded_dmsr_s_runs_offline(tmp_path, capsys):
    """`blindsr sr --method dmsr photo.png` with nothing else: the embedded DM-SR-S on the embedded Prior-S."""
    from PIL import Image

    from blindsr.cli.main import main
    from blindsr.weights import part_path

    if not part_path("dmsr-s").is_file():
        pytest.skip("this copy of blindsr has no embedded DM-SR-S")
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(20, 28, 3, generator=gen(5)) * 255).byte().numpy()).save(img)
    assert main(["sr", str(img), "-o", str(tmp_path / "out"), "--method", "dmsr", "--device", "cpu"]) == 0
    assert "t̂ " in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "in.png") as im:
        assert im.size == (112, 80)
    pipe = pipeline.load_pipeline(None)
    assert pipe.prior.vae is None and pipe.config.tile == 256  # the pixel backend, its 256-pixel tiles
