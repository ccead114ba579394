"""StableSR (models/sd/stablesr.py, models/sd/cfw.py) against the official code's fixtures.

``shared/reference/stablesr/stablesr_tiny_ref.pt`` was made by IceClear/StableSR at 398ee93 with random tiny
weights; its README (§3.6) gives the tolerances used here. Full-size parameter counts are checked on the meta
device without the fixtures; the official key layouts need them.
"""

from __future__ import annotations

import ast

import pytest
import torch

from blindsr.diffusion import split
from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.sd import cfw as cf
from blindsr.models.sd import stablesr as ss
from blindsr.models.sd import unet_config_from_ldm, vae_config_from_ldm
from blindsr.ops.colorfix import adain_color_fix, wavelet_color_fix
from blindsr.ops.tiling import stablesr_window, tile_boxes

# README §2: the full official model
FULL = {"unet": 918_930_884, "spade": 53_020_160, "encoder": 52_494_080, "cfw": 128_047_591,
        "fusion": 44_393_728, "cfw_encoder": 34_163_592, "cfw_sd_decoder": 49_490_179}
# README §3.6 (fp32)
TOL = {"feat": 1e-4, "eps": 1e-4, "moments": 1e-4, "cfw": 2e-4, "colorfix": 3e-4, "mean": 5e-5, "x0": 2e-3,
       "schedule": 1e-6}


def n_params(params) -> int:
    return sum(p.numel() for p in params)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def read_key_dump(path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A ``key<TAB>(shape)<TAB>dtype`` dump as meta tensors, ``prefix`` removed."""
    out = {}
    for line in path.read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key.removeprefix(prefix)] = torch.empty(ast.literal_eval(shape), device="meta")
    return out


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def stablesr_dir(reference_dir):
    return reference_dir / "stablesr"


@pytest.fixture(scope="module")
def ref(stablesr_dir):
    return torch.load(stablesr_dir / "stablesr_tiny_ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def config(ref):
    return ss.StableSRConfig.from_official(ref["config"]["ldm"], ref["config"]["cfw"])


@pytest.fixture(scope="module")
def model(ref, config):
    return ss.load_stablesr(ref["ldm_state"], config)


@pytest.fixture(scope="module")
def cfw_model(ref, config):
    return cf.load_cfw(ref["cfw_state"], config.vae)


@pytest.fixture(scope="module")
def process():
    return ss.sampling_process(200)


# ------------------------------------------------------------------------------------ stage 1: the networks
def test_struct_feats_and_intermediates(ref, model):
    inp, out, mid = ref["inputs"], ref["outputs"], ref["intermediates"]
    with torch.no_grad():
        emb = model.encoder.embed(inp["t"])
        pre = model.encoder.trunk(inp["z_lr"], emb)
        feats = model.encoder(inp["z_lr"], inp["t"])
        unet = model.unet.unet
        unet_temb = unet.time_embedding(unet.time_proj(inp["t"]))
    assert list(feats) == list(out["struct_feats"]) == ["8", "4"]  # keyed by width, high -> low resolution
    for key, value in out["struct_feats"].items():
        assert max_diff(feats[key], value) <= TOL["feat"], key
    assert len(pre) == len(mid["enc_pre_tran"])
    for ours, theirs in zip(pre, mid["enc_pre_tran"], strict=True):
        assert max_diff(ours, theirs) <= TOL["feat"]
    assert max_diff(emb, mid["enc_temb"]) <= TOL["feat"]
    assert max_diff(unet_temb, mid["unet_temb"]) <= TOL["feat"]


def test_eps(ref, model):
    inp = ref["inputs"]
    with torch.no_grad():
        eps = model.eps(inp["z_t"], inp["t"], inp["context"], inp["z_lr"])
        again = model.unet(inp["z_t"], inp["t"], inp["context"], ref["outputs"]["struct_feats"])
    assert max_diff(eps, ref["outputs"]["eps"]) <= TOL["eps"]
    assert max_diff(again, ref["outputs"]["eps"]) <= TOL["eps"]
    assert all(not r.conv2._forward_hooks for r in model.unet.resnets())  # the SFT exists only inside forward
    assert len(model.unet.resnets()) == 2 + 2 + 4  # tiny: every ResnetBlock2D (down, mid, up) has a SPADE


def test_schedules(ref, process):
    s = ref["schedule"]
    base = ss.base_process()
    assert process.timestep_map.tolist() == s["ori_timesteps"].tolist()  # exact (t_replace)
    assert max_diff(base.alphas_cumprod.float(), s["alphas_cumprod_1000"]) <= TOL["schedule"]
    assert max_diff(base.alphas_cumprod.sqrt().float(), s["sqrt_alphas_cumprod_1000"]) <= TOL["schedule"]
    sqrt_1m = (1 - base.alphas_cumprod).sqrt().float()
    assert max_diff(sqrt_1m, s["sqrt_one_minus_alphas_cumprod_1000"]) <= TOL["schedule"]
    assert max_diff(process.betas.float(), s["betas_respaced"]) <= TOL["schedule"]
    assert max_diff(process.alphas_cumprod.float(), s["alphas_cumprod_respaced"]) <= TOL["schedule"]


def test_respaced_step(ref, model, process):
    inp, st = ref["inputs"], ref["outputs"]["step"]
    assert process.original_t(st["ts"]).tolist() == st["t_replace"].tolist() == inp["t"].tolist()
    with torch.no_grad():
        mv = ss.p_mean_variance(process, ss.denoiser(model, inp["z_lr"], inp["context"]), inp["z_t"], st["ts"])
    assert max_diff(mv.mean, st["model_mean"]) <= TOL["mean"]
    assert max_diff(mv.x0, st["x0"]) <= TOL["x0"]
    assert max_diff(mv.variance[:, :1, :1, :1], st["posterior_variance"]) <= TOL["schedule"]
    assert max_diff(mv.log_variance[:, :1, :1, :1], st["posterior_log_variance"]) <= TOL["schedule"]


def test_start_latent(ref):
    inp = ref["inputs"]
    assert max_diff(ss.start_latent(inp["z_lr"], inp["noise_T"]), ref["outputs"]["x_T"]) <= TOL["mean"]


def test_canvas_step(ref, model, process):
    inp, c = ref["inputs"], ref["outputs"]["canvas"]
    T, O = c["tile_size"], c["tile_overlap"]
    H, W = inp["canvas_x"].shape[-2:]
    boxes = tile_boxes(H, W, T, O, order="xy")
    assert [[b.top, b.left] for b in boxes] == c["tile_origins_yx"].tolist()  # exact, x-major call order
    assert stablesr_window(T, T).dtype == torch.float64
    assert max_diff(stablesr_window(T, T), c["tile_weights"]) <= 1e-15
    t = process.original_t(c["ts"])
    assert t.tolist() == c["t_replace"].tolist()
    with torch.no_grad():
        for box, want in zip(boxes, c["tile_eps"], strict=True):
            ys, xs = box.slices
            eps = model.eps(inp["canvas_x"][..., ys, xs], t, inp["canvas_context"], inp["canvas_z_lr"][..., ys, xs])
            assert max_diff(eps[0], want) <= TOL["eps"]
        fn = ss.canvas_denoiser(model, inp["canvas_z_lr"], inp["canvas_context"], T, O)
        mv = ss.p_mean_variance(process, fn, inp["canvas_x"], c["ts"])
    assert max_diff(mv.eps, c["eps_stitched"]) <= TOL["eps"]
    assert max_diff(mv.x0, c["x0"]) <= TOL["x0"]
    assert max_diff(mv.mean, c["model_mean"]) <= TOL["mean"]
    assert max_diff(mv.log_variance[:, :1, :1, :1], c["posterior_log_variance"]) <= TOL["schedule"]


# --------------------------------------------------------------------------------- VAE, CFW and colour fix
def test_vae_and_cfw_encode(ref, model, cfw_model):
    inp, out = ref["inputs"], ref["outputs"]
    with torch.no_grad():
        lr_moments = model.vae.quant_conv(model.vae.encoder(inp["x_lr"]))
        moments, enc_fea = cfw_model.encode(inp["x_lr"])
    assert max_diff(lr_moments, out["lr_moments"]) <= TOL["moments"]
    assert max_diff(moments, out["cfw_moments"]) <= TOL["moments"]
    assert len(enc_fea) == len(out["cfw_enc_fea"]) == 2
    for ours, theirs in zip(enc_fea, out["cfw_enc_fea"], strict=True):
        assert max_diff(ours, theirs) <= TOL["cfw"]
    # z_lr = scale * posterior mode (README §4.1)
    assert max_diff(0.18215 * lr_moments[:, :4], inp["z_lr"]) <= TOL["moments"]


@pytest.mark.parametrize(("w", "key"), [(0.5, "x_sr_dec_w_0p5"), (0.0, "x_sr_dec_w_0p0"), (1.0, "x_sr_dec_w_1p0")])
def test_cfw_decode(ref, model, cfw_model, w, key):
    inp, out = ref["inputs"], ref["outputs"]
    with torch.no_grad():
        x = cfw_model.decode(inp["z_dec"] / 0.18215, out["cfw_enc_fea"], w)
        _, enc_fea = cfw_model.encode(inp["x_lr"])
        end_to_end = cfw_model.decode(inp["z_dec"] / 0.18215, enc_fea, w)
    assert max_diff(x, out[key]) <= TOL["cfw"]
    assert max_diff(end_to_end, out[key]) <= TOL["cfw"]
    if w == 0.0:  # w = 0 is the plain SD decoder
        with torch.no_grad():
            plain = model.vae.decode(inp["z_dec"] / 0.18215).sample
        assert max_diff(x, plain) <= 1e-6


def test_colorfix(ref):
    out, x_lr = ref["outputs"], ref["inputs"]["x_lr"]
    assert max_diff(adain_color_fix(out["x_sr_dec_w_0p5"], x_lr), out["colorfix"]["adain"]) <= TOL["colorfix"]
    assert max_diff(wavelet_color_fix(out["x_sr_dec_w_0p5"], x_lr), out["colorfix"]["wavelet"]) <= TOL["colorfix"]


# ------------------------------------------------------------------------------------ sizes and key layouts
def test_tiny_parameter_counts(ref, config):
    want = ref["param_counts"]
    with torch.device("meta"):
        m = ss.build_stablesr(config)
        cfw = cf.CFWAutoencoder.build(config.vae, config.num_fuse_block)
    assert n_params(m.unet.parameters()) == want["unet_total"]
    assert n_params(m.unet.spade_parameters()) == want["unet_spade"]
    assert n_params(m.encoder.parameters()) == want["encoder"]
    assert n_params(m.vae.parameters()) == want["first_stage_vae"]
    assert n_params(cfw.parameters()) == want["cfw_total"]
    assert n_params(cfw.fusion.parameters()) == want["cfw_fusion_layers"]


@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return ss.build_stablesr(), cf.CFWAutoencoder.build()


def test_full_parameter_counts(full_meta):
    m, cfw = full_meta
    assert n_params(m.unet.parameters()) == FULL["unet"]
    assert n_params(m.unet.spade_parameters()) == FULL["spade"]
    assert len(m.unet.resnets()) == 22
    assert n_params(m.encoder.parameters()) == FULL["encoder"]
    assert n_params(m.encoder.parameters()) + FULL["spade"] == 105_514_240  # the trainable stage-1 part
    assert n_params(cfw.parameters()) == FULL["cfw"]
    assert n_params(cfw.fusion.parameters()) == FULL["fusion"]
    assert n_params(cfw.vae.encoder.parameters()) == FULL["cfw_encoder"]
    assert n_params(cfw.vae.decoder.parameters()) == FULL["cfw_sd_decoder"]


def test_full_key_layouts(full_meta, stablesr_dir):
    m, cfw = full_meta
    enc = read_key_dump(stablesr_dir / "keys_full_encoder.txt", "structcond_stage_model.")
    ours = m.encoder.state_dict()
    assert list(ours) == list(enc)  # our encoder uses the official names, in registration order
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in enc.items())
    unet = read_key_dump(stablesr_dir / "keys_full_unet.txt", "model.diffusion_model.")
    assert ss.load_sft_unet_state(m.unet, unet) == []  # strict
    sd21 = {k: v for k, v in unet.items() if ".spade." not in k}  # = the SD 2.1 UNet's 686 keys
    with torch.device("meta"):
        fresh = ss.SFTUNet.build(cond_channels=256)
    missing = ss.load_sft_unet_state(fresh, sd21, spade=False)
    assert len(missing) == 176 and all(".spade." in k for k in missing)
    with pytest.raises(WeightsError, match="176 missing"):
        ss.load_sft_unet_state(fresh, sd21)
    keys = read_key_dump(stablesr_dir / "keys_full_cfw.txt")
    assert cf.count_fuse_blocks(keys) == 2
    assert cf.load_cfw_state(cfw, keys) == []
    missing = cf.load_cfw_state(cfw, {k: v for k, v in keys.items() if ".fusion_layer_" not in k}, fusion=False)
    assert len(missing) == 156 and all(k.startswith("fusion.") for k in missing)


def test_loading_errors_are_one_line(ref, config):
    state = dict(ref["ldm_state"])
    for bad, match in [({**state, "extra.weight": torch.zeros(1)}, "unexpected key"),
                       ({k: v for k, v in state.items() if not k.endswith("fea_tran.0.in_layers.2.bias")},
                        "missing key"),
                       ({**state, "structcond_stage_model.time_embed.0.bias": torch.zeros(3)}, "wrong shape"),
                       ({k: v for k, v in state.items() if not k.startswith("structcond_stage_model.")},
                        "structcond_stage_model")]:
        with pytest.raises(WeightsError, match=match) as e:
            ss.load_stablesr(bad, config)
        assert "\n" not in str(e.value)
    cfw_state = {k: v for k, v in ref["cfw_state"].items() if "fusion_layer_1.encode_enc_3" not in k}
    with pytest.raises(WeightsError, match="missing key"):
        cf.load_cfw(cfw_state, config.vae)


# -------------------------------------------------------------------------- behaviour (no fixtures needed)
def tiny_config() -> ss.StableSRConfig:
    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "context_dim": 32,
            "use_linear_in_transformer": True}
    vae = {"embed_dim": 4, "ddconfig": {"in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 2],
                                        "num_res_blocks": 1, "attn_resolutions": []}}
    enc = ss.StableSREncoderConfig(model_channels=32, out_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                                   channel_mult=(1, 2), num_heads=2)
    return ss.StableSRConfig(unet=unet_config_from_ldm(unet), encoder=enc, vae=vae_config_from_ldm(vae),
                             num_fuse_block=1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    m = ss.build_stablesr(tiny_config())
    for p in m.encoder.parameters():  # the zero-initialised output convs would hide the encoder
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    return m.to(torch.float32)


def test_sample_latent_runs_and_is_seeded(tiny_model):
    z_lr = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    def run() -> torch.Tensor:
        return ss.sample_latent(tiny_model, z_lr, ctx, steps=3, tile=8, overlap=4,
                                generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        a, b = run(), run()
    assert a.shape == z_lr.shape and torch.isfinite(a).all() and torch.equal(a, b)


def test_canvas_with_one_tile_is_the_plain_denoiser(tiny_model):
    z_lr, x = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 77, 32)
    t = torch.tensor([500])
    with torch.no_grad():
        a = ss.canvas_denoiser(tiny_model, z_lr, ctx, tile=8, overlap=4)(x, t).pred
        b = ss.denoiser(tiny_model, z_lr, ctx)(x, t).pred
    assert torch.equal(a, b)
    eps, x0 = split(b, "eps", x, ss.base_process().abar(t, x))
    assert torch.equal(eps, b) and torch.isfinite(x0).all()


def test_feature_width_must_exist(tiny_model):
    x = torch.randn(1, 4, 8, 8)
    feats = tiny_model.encoder(x, 10)
    del feats["4"]
    with pytest.raises(BlindSRError, match="width 4"):
        tiny_model.unet(x, 10, torch.randn(1, 77, 32), feats)
    assert all(not r.conv2._forward_hooks for r in tiny_model.unet.resnets())  # hooks gone after an error


def test_official_config_checks():
    with pytest.raises(WeightsError, match="use_scale_shift_norm"):
        ss.StableSREncoderConfig.from_official({"model_channels": 32, "use_scale_shift_norm": True})
    with pytest.raises(WeightsError, match="unknown"):
        ss.StableSREncoderConfig.from_official({"model_channels": 32, "bogus": 1})
