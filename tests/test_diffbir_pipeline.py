"""DiffBIR two-stage pipeline with tiny random-weight models (the official tiny ControlLDM fixture) on CPU."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from blindsr.diffusion.respace import space_timesteps
from blindsr.diffusion.samplers import timesteps_for
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods import diffbir as db
from blindsr.methods.diffbir.config import SDProcess
from blindsr.methods.diffbir.denoiser import CLDMDenoiser
from blindsr.methods.diffbir.guidance import GuidanceConfig
from blindsr.models import ircontrolnet as icn
from blindsr.models import sd
from blindsr.models.restorers import RRDBNetConfig, SwinIRConfig, build_restorer
from blindsr.models.sd.vae_tiling import VAETiling, tiled_decode, tiled_encode
from blindsr.ops import colorfix


def load_tiny_cldm(reference_dir):
    """The fixture's SD parts and IRControlNet (official tiny configs, well-conditioned random weights)."""
    ref = torch.load(reference_dir / "diffbir" / "tiny_cldm_ref_strong.pt", weights_only=True)
    c = ref["configs"]
    cfg = {"unet": sd.unet_config_from_ldm(c["unet"]), "vae": sd.vae_config_from_ldm(c["vae"]),
           "text_encoder": sd.text_config_from_openclip(c["clip"])}
    models = sd.load_sd_checkpoint(ref["cldm_state"], cfg)
    ccfg = icn.IRControlNetConfig.from_unet_config(cfg["unet"], c["controlnet"]["hint_channels"])
    controlnet = icn.load_official_controlnet(
        {k: v for k, v in ref["cldm_state"].items() if k.startswith("controlnet.")}, ccfg)
    return ref, models, controlnet


@pytest.fixture(scope="module")
def tiny(reference_dir):
    ref, models, controlnet = load_tiny_cldm(reference_dir)
    torch.manual_seed(0)
    cleaner = build_restorer("rrdbnet", RRDBNetConfig.tiny())
    config = db.DiffBIRConfig.from_preset("v2", "sr", steps=3, min_size=64, tiling=db.Tiling.off())
    pipe = db.DiffBIRPipeline(cleaner, models, controlnet, config)
    lq = F.interpolate(ref["x"][:1], size=(16, 16), mode="area")  # -> 64x64 output, 8x8 latent
    return pipe, lq, ref


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ presets
def test_presets_and_schedule():
    v2 = db.DiffBIRConfig.from_preset("v2", "sr")
    assert (v2.sampler, v2.steps, v2.cfg, v2.pos_prompt, v2.upscale) == ("ddpm", 50, 4.0, "", 4)
    assert v2.neg_prompt == "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
    v1, v21 = db.DiffBIRConfig.from_preset("v1", "face"), db.DiffBIRConfig.from_preset("v2.1", "denoise")
    assert (v1.cfg, v1.upscale, v1.prediction) == (1.0, 1, "eps")
    assert (v21.prediction, v21.zero_snr, v21.sampler, v21.steps) == ("v", True, "dpm++_3m_sde", 10)
    betas = SDProcess().betas()
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert SDProcess().process().alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=1e-5)
    assert SDProcess(prediction="v", zero_snr=True).process().alphas_cumprod[-1].item() == 0.0
    spaced = space_timesteps(1000, "50")
    assert spaced[:5] == [0, 20, 41, 61, 82] and spaced[-2:] == [979, 999] and len(spaced) == 50
    assert timesteps_for("leading", 50, 1000)[:3] == [1, 21, 41] and timesteps_for("leading", 50, 1000)[-1] == 981
    assert timesteps_for("linspace", 50, 1000) == spaced
    assert db.DiffBIRConfig.from_preset("v1", "sr", sampler="spaced").sampler == "ddpm"  # the earlier name
    with pytest.raises(BlindSRError, match="v-prediction"):
        db.DiffBIRConfig.from_preset("v2", "sr", zero_snr=True)
    with pytest.raises(BlindSRError, match="sampler"):
        db.DiffBIRConfig.from_preset("v2", "sr", sampler="euler")
    with pytest.raises(BlindSRError, match="version"):
        db.DiffBIRConfig.from_preset("v3", "sr")


# ------------------------------------------------------------------------------------------------ colour fix
def test_wavelet_color_fix_takes_low_frequencies_from_the_reference():
    g = gen(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    ref = torch.stack([yy, xx, 0.5 * (yy + xx)])[None] * 0.6 + 0.2
    detail = 0.05 * torch.randn(1, 3, 64, 64, generator=g)  # high frequencies
    shift = torch.tensor([0.2, -0.1, 0.15]).view(1, 3, 1, 1)  # a colour cast: purely low frequency
    out = colorfix.wavelet_color_fix(ref + shift + detail, ref)
    assert (out.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().max() < 2e-3  # the cast is gone
    kept = ((out - ref) - detail).norm() / detail.norm()  # the detail is (mostly) kept
    assert kept < 0.25
    high, low = colorfix.wavelet_decompose(ref + detail)
    assert torch.allclose(high + low, ref + detail, atol=1e-6)  # exact decomposition
    assert torch.equal(colorfix.color_fix(ref, out, "none"), ref)
    ada = colorfix.adain_color_fix(ref + shift, ref)
    assert torch.allclose(ada.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)
    with pytest.raises(BlindSRError, match="one size"):
        colorfix.wavelet_color_fix(ref, ref[..., :32])


# ------------------------------------------------------------------------------------------------ VAE tiling
def test_vae_tiling_reproduces_a_local_network_exactly():
    """Margins, crops and feathering are exact for a network whose receptive field fits in the margin."""
    g = gen(2)
    w_enc, w_mid, w_dec = (torch.randn(*s, generator=g) for s in [(4, 3, 3, 3), (4, 4, 3, 3), (3, 4, 3, 3)])

    def enc(x):  # 3x3 conv then an 8x8 average: receptive field < 2 latents
        return F.avg_pool2d(F.conv2d(x, w_enc, padding=1), 8)

    def dec(z):
        return F.conv2d(F.interpolate(F.conv2d(z, w_mid, padding=1), scale_factor=8), w_dec, padding=1)
    img, z = torch.rand(1, 3, 96, 160, generator=g), torch.randn(1, 4, 12, 20, generator=g)
    assert torch.allclose(tiled_encode(enc, img, 48, 16, 16), enc(img), atol=1e-5)
    assert torch.allclose(tiled_decode(dec, z, 48, 16, 16), dec(z), atol=1e-4)
    assert torch.equal(tiled_encode(enc, img, 160, 16, 16), enc(img))  # one tile: untouched
    with pytest.raises(BlindSRError, match="multiple"):
        tiled_encode(enc, img, 44, 16, 16)


def test_tiled_vae_close_to_untiled_and_better_than_naive_tiles(tiny):
    pipe, _, ref = tiny
    vae = pipe.sd.vae
    img = F.interpolate(ref["x"][:1], size=(128, 128), mode="bilinear")
    with torch.no_grad():
        def enc(x):
            return sd.vae_encode(vae, x)

        def dec(q):
            return sd.vae_decode(vae, q)
        z = enc(img)
        z_ours, z_naive = tiled_encode(enc, img, 64, 32, 32), tiled_encode(enc, img, 64, 0, 0)
        x = dec(z)
        x_ours, x_naive = tiled_decode(dec, z, 64, 32, 32), tiled_decode(dec, z, 64, 0, 0)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    # GroupNorm statistics and mid-block attention are per tile, so this random VAE is only roughly reproduced
    assert rel(z_ours, z) < 0.8 and rel(x_ours, x) < 0.9
    assert rel(z_ours, z) < rel(z_naive, z) and rel(x_ours, x) < rel(x_naive, x)


# ------------------------------------------------------------------------------------------------ pipeline
def test_stage1_sizes(tiny):
    pipe, lq, _ = tiny
    assert pipe.stage1(lq).shape[-2:] == (64, 64)  # BSRNet x4
    assert pipe.stage1(lq, min_size=96).shape[-2:] == (96, 96)  # short side raised, as official
    wide = pipe.stage1(torch.rand(1, 3, 8, 16), min_size=64)
    assert wide.shape[-2:] == (64, 128)
    swin = db.DiffBIRPipeline(build_restorer("swinir", SwinIRConfig.tiny()), None, None,
                              db.DiffBIRConfig.from_preset("v1", "sr", upscale=2, min_size=0))
    assert swin(lq, stage1_only=True).image.shape[-2:] == (32, 32)  # bicubic x2, then the x1 cleaner


def test_end_to_end_deterministic_and_seed_dependent(tiny):
    pipe, lq, _ = tiny
    a, b = pipe(lq, gen(0)), pipe(lq, gen(0))
    c = pipe(lq, gen(1))
    assert a.image.shape == (1, 3, 64, 64) and a.image.min() >= 0 and a.image.max() <= 1
    assert torch.equal(a.image, b.image)
    assert (a.image - c.image).abs().max() > 1e-3
    assert a.timings["network_calls"] == 3  # one batched cond+uncond call per step


def test_cfg_one_is_the_conditional_path_and_cfg_combines_branches(tiny):
    pipe, _, ref = tiny
    unet, cn = pipe.sd.unet, pipe.controlnet
    z, t, c_img = ref["z_t"], ref["t"], ref["c_img"]
    with torch.no_grad():
        cond_only = CLDMDenoiser(unet, cn, c_img, ref["c_txt"])(z, t).pred
        cfg1 = CLDMDenoiser(unet, cn, c_img, ref["c_txt"], ref["c_txt_uncond"], cfg=1.0)(z, t).pred
        cfg4 = CLDMDenoiser(unet, cn, c_img, ref["c_txt"], ref["c_txt_uncond"], cfg=4.0)(z, t).pred
        cfg4_sep = CLDMDenoiser(unet, cn, c_img, ref["c_txt"], ref["c_txt_uncond"], cfg=4.0, batch_cfg=False)(z, t).pred
    assert torch.equal(cfg1, cond_only)
    assert torch.allclose(cond_only, ref["eps"], atol=1e-4)  # the official ControlLDM output
    expected = ref["eps_uncond"] + 4 * (ref["eps"] - ref["eps_uncond"])  # same c_img in both branches
    assert torch.allclose(cfg4, expected, atol=5e-4) and torch.allclose(cfg4, cfg4_sep, atol=1e-4)
    p1 = pipe.with_config(cfg=1.0)
    r1, r1b = p1(torch.rand(1, 3, 16, 16, generator=gen(3)), gen(0)), None
    r1b = p1.with_config(neg_prompt="anything")(torch.rand(1, 3, 16, 16, generator=gen(3)), gen(0))
    assert torch.equal(r1.image, r1b.image) and r1.timings["network_calls"] == 3


def test_tiled_diffusion_crops_the_condition_with_the_tile(tiny):
    """With a pointwise stand-in network tiled == untiled exactly, so every tile saw its own c_img crop."""
    class Net(torch.nn.Module):
        def forward(self, z, t, encoder_hidden_states, down_block_additional_residuals, mid_block_additional_residual):
            return types.SimpleNamespace(sample=2 * z + mid_block_additional_residual)

    class Control(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, z, t, c_img, c_txt):
            return [c_img * self.w + 0 * c_txt.mean()]
    net, ctrl = Net(), Control()
    net.w = torch.nn.Parameter(torch.ones(1))
    g = gen(4)
    z, c_img = torch.randn(2, 4, 24, 40, generator=g), torch.randn(2, 4, 24, 40, generator=g)
    c_txt, c_unc = torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    t = torch.tensor([500, 20])
    whole = CLDMDenoiser(net, ctrl, c_img, c_txt, c_unc, cfg=3.0, strength=0.7)(z, t).pred
    tiles = CLDMDenoiser(net, ctrl, c_img, c_txt, c_unc, cfg=3.0, strength=0.7, tile=16, overlap=8)
    assert torch.allclose(tiles(z, t).pred, whole, atol=1e-5)
    assert torch.allclose(whole, 2 * z + 0.7 * c_img, atol=1e-5)
    assert tiles.calls == 8  # 2 x 4 windows, cond + uncond batched


def test_one_tile_equals_untiled_and_tiling_runs(tiny):
    pipe, lq, _ = tiny
    big = db.Tiling(cleaner_tile=512, diffusion_tile=512, vae=VAETiling(512, 512))  # tiles larger than the image
    a, b = pipe(lq, gen(0)), pipe.with_config(tiling=big)(lq, gen(0))
    assert torch.equal(a.image, b.image)
    small = db.Tiling(cleaner_tile=8, cleaner_overlap=4, diffusion_tile=64, diffusion_overlap=32,
                      vae=VAETiling(encoder_tile=32, decoder_tile=32, overlap=16, encoder_margin=16,
                                    decoder_margin=16))
    lq2 = F.interpolate(lq, size=(16, 24), mode="bilinear")  # 64x96 -> 2 diffusion tiles of 8x8 latents
    r = pipe.with_config(tiling=small, steps=2, guidance=GuidanceConfig(scale=1.0))(lq2, gen(0))
    assert r.image.shape == (1, 3, 64, 96) and torch.isfinite(r.image).all()
    assert r.timings["network_calls"] == 2 * 2 and len(r.guidance_losses) == 2  # guidance through tiled VAE


def test_restoration_guidance_pulls_the_result_toward_stage1(tiny):
    pipe, lq, _ = tiny
    p = pipe.with_config(color_fix="none", cfg=1.0)
    plain = p(lq, gen(0))
    guided = p.with_config(guidance=GuidanceConfig(scale=20))(lq, gen(0))
    assert len(guided.guidance_losses) == 3 and not plain.guidance_losses
    assert guided.guidance_losses[-1] < guided.guidance_losses[0]
    err = [F.mse_loss(r.image, r.stage1).item() for r in (plain, guided)]
    assert err[1] < 0.97 * err[0]  # (this random tiny VAE decoder responds weakly to its latent)
    window = p.with_config(guidance=GuidanceConfig(scale=0.5, start=600, stop=-1))(lq, gen(0))
    assert len(window.guidance_losses) == 2  # t = 999 is outside the window (t + 1 < 600 fails)
    latent = p.with_config(guidance=GuidanceConfig(scale=0.05, space="latent"))(lq, gen(0))
    assert torch.isfinite(latent.image).all() and len(latent.guidance_losses) == 3


@pytest.mark.parametrize("changes", [
    dict(sampler="ddim"), dict(sampler="dpm++_m2"), dict(sampler="dpm++_3m_sde"),
    dict(prediction="v", zero_snr=True), dict(start_point="cond", noise_aug=100, rescale_cfg=True),
])
def test_samplers_and_parameterisations_run_deterministically(tiny, changes):
    pipe, lq, _ = tiny
    p = pipe.with_config(steps=2, **changes)
    a, b = p(lq, gen(5)), p(lq, gen(5))
    assert torch.isfinite(a.image).all() and torch.equal(a.image, b.image)


def test_bf16_keeps_norms_fp32_and_offload_runs(tiny, reference_dir):
    _, lq, _ = tiny
    _, models, controlnet = load_tiny_cldm(reference_dir)
    cfg = db.DiffBIRConfig.from_preset("v2", "sr", steps=2, min_size=64, tiling=db.Tiling.off(),
                                       dtype=torch.bfloat16, offload=True)
    torch.manual_seed(0)
    pipe = db.DiffBIRPipeline(build_restorer("rrdbnet", RRDBNetConfig.tiny()), models, controlnet, cfg)
    norms = [m for m in pipe.sd.unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert pipe.sd.unet.conv_in.weight.dtype == torch.bfloat16 and pipe.sd.vae.dtype == torch.float32
    out = pipe(lq, gen(0))
    assert torch.isfinite(out.image).all() and out.image.dtype == torch.float32


def test_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(db.CONFIG_ENV, str(tmp_path / "weights.json"))
    monkeypatch.delenv("BLINDSR_DIFFBIR_V2", raising=False)
    with pytest.raises(WeightsError) as e:
        db.resolve_weight("diffbir_v2")
    msg = str(e.value)
    assert "\n" not in msg and "--controlnet" in msg and "BLINDSR_DIFFBIR_V2" in msg
    f = tmp_path / "v2.pth"
    f.write_bytes(b"x")
    (tmp_path / "weights.json").write_text(json.dumps({"diffbir_v2": str(f)}))
    assert db.resolve_weight("diffbir_v2") == f
    monkeypatch.setenv("BLINDSR_DIFFBIR_V2", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="not found.*BLINDSR_DIFFBIR_V2"):
        db.resolve_weight("diffbir_v2")
    assert db.resolve_weight("diffbir_v2", f) == f  # the flag wins
