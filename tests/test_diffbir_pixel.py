"""DiffBIR's pixel backend (issue 14): IRControlNet on the pixel-space prior, tiny random models on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blindsr.cli.main import main
from blindsr.diffusion.samplers import make_stepper, randn, sample
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods import diffbir as db
from blindsr.methods.diffbir import recipe as dr
from blindsr.methods.diffbir.guidance import GuidanceConfig, gradient_weight_map
from blindsr.methods.prior.config import PriorUNetConfig
from blindsr.methods.prior.model import Prior
from blindsr.models import ircontrolnet as icn
from blindsr.models.restorers import SwinIRConfig, build_restorer
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "diffbir_pixel_tiny.yaml")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior() -> Prior:
    torch.manual_seed(0)
    p = Prior.new(PriorUNetConfig.tiny())
    p.unet.requires_grad_(False).eval()
    return p


def pipeline(prior: Prior, controlnet=None, **changes) -> db.DiffBIRPipeline:
    torch.manual_seed(1)
    cleaner = build_restorer("swinir", SwinIRConfig.tiny())
    controlnet = controlnet or icn.IRControlNet.from_unet(prior.unet, hint_channels=3)
    config = db.DiffBIRConfig.from_preset("pixel", "sr", **{"steps": 3, "guidance": GuidanceConfig(), **changes})
    return db.DiffBIRPipeline(cleaner, prior, controlnet, config)


def trained_like(prior: Prior) -> icn.IRControlNet:
    """A control branch whose zero convs are no longer zero (as after training)."""
    net = icn.IRControlNet.from_unet(prior.unet, hint_channels=3)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.3, generator=gen(5))
        net.conv_in.weight[:, 3:].normal_(0, 0.3, generator=gen(6))
    return net


# ------------------------------------------------------------------------------------------------ the module
def test_control_copy_starts_as_the_prior_exactly(prior):
    net = icn.IRControlNet.from_unet(prior.unet, hint_channels=3)
    src = prior.unet.state_dict()
    shared = [k for k in net.state_dict() if not k.startswith("controlnet_") and k != "conv_in.weight"]
    assert len(shared) > 20 and all(torch.equal(net.state_dict()[k], src[k]) for k in shared)
    w = net.conv_in.weight
    assert w.shape[1] == 6 and torch.equal(w[:, :3], src["conv_in.weight"]) and not w[:, 3:].any()
    assert all(not c.weight.any() and not c.bias.any() for c in [*net.controlnet_down_blocks, net.controlnet_mid_block])
    assert net.config.num_controls() == len(net.controlnet_down_blocks) + 1 == 1 + 2 + 1 + 1
    v2 = icn.IRControlNet.from_unet(prior.unet, hint_channels=3, condition_xt=False)  # Table 1, Variant 2
    assert torch.equal(v2.conv_in.weight, src["conv_in.weight"])
    x, c, t = torch.randn(1, 3, 16, 16, generator=gen()), torch.rand(1, 3, 16, 16, generator=gen(1)), torch.tensor([9])
    ctx = torch.zeros(1, 1, 8)
    with torch.no_grad():  # Variant 2 ignores x_t
        assert all(torch.equal(a, b) for a, b in zip(v2(x, t, c, ctx), v2(2 * x, t, c, ctx), strict=True))


def test_untrained_pipeline_is_the_bare_prior(prior):
    """Zero convs: stage 2 with an untrained control branch samples exactly what the prior alone samples."""
    pipe = pipeline(prior)
    cond = torch.rand(1, 3, 24, 32, generator=gen(2))
    out, _ = pipe.stage2(cond, gen(3))
    stepper = make_stepper("ddpm", pipe.config.process(), 3, spacing="linspace", var_type="fixed_small")
    g = gen(3)  # x_T, then every step's noise, from one generator (as the pipeline draws them)
    bare = sample(prior.denoiser(), randn((1, 3, 24, 32), g), stepper, g)
    assert torch.allclose(out, (bare + 1) / 2, atol=1e-6)
    trained, _ = pipeline(prior, trained_like(prior)).stage2(cond, gen(3))
    assert (trained - out).abs().max() > 1e-3  # and a trained branch does change it


def test_pixel_pipeline_end_to_end_sizes_seed_and_tiles(prior):
    pipe = pipeline(prior, trained_like(prior))
    lq = torch.rand(1, 3, 10, 14, generator=gen(4))  # 40x56 output: padded to the prior's multiple (2) inside
    a, b, c = pipe(lq, gen(0)), pipe(lq, gen(0)), pipe(lq, gen(1))
    assert a.image.shape == (1, 3, 40, 56) and a.stage1.shape == (1, 3, 40, 56)  # no 512 resize
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    assert a.timings["network_calls"] == 3
    tiled = pipe.with_config(tiling=db.Tiling(diffusion_tile=16, diffusion_overlap=8))(lq, gen(0))
    assert tiled.image.shape == a.image.shape and torch.isfinite(tiled.image).all()
    assert tiled.timings["network_calls"] == 3 * 4 * 6  # 4 x 6 windows of 16² at stride 8 on 40x56


def test_tiled_equals_untiled_on_a_local_stand_in(prior):
    """A conv-only prior (no norm over the image, no attention) is translation-equivariant away from the borders:
    blended tiles then equal the whole image, so tiles see their own crop of the condition."""
    class Local(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = prior.unet.config
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x, t, encoder_hidden_states, down_block_additional_residuals, mid_block_additional_residual):
            import types
            return types.SimpleNamespace(sample=self.conv(x) + down_block_additional_residuals[0][:, :3])

    class Ctrl(torch.nn.Module):
        def forward(self, z, t, c_img, c_txt):
            return [torch.cat([c_img * 0.5, z[:, :1]], 1)] + [torch.zeros(())] * 4  # (unused by Local)

    local = Prior(Local(), prior.unet_config, prior.diffusion)
    whole = pipeline(local, Ctrl(), tiling=db.Tiling(diffusion_tile=0, diffusion_overlap=0))
    tiles = pipeline(local, Ctrl(), tiling=db.Tiling(diffusion_tile=16, diffusion_overlap=8))
    cond = torch.rand(1, 3, 32, 48, generator=gen(7))
    a, _ = whole.stage2(cond, gen(8))
    b, _ = tiles.stage2(cond, gen(8))
    assert torch.allclose(a, b, atol=1e-5)


def test_guidance_lowers_the_weighted_mse_to_the_stage1_image(prior):
    pipe = pipeline(prior, trained_like(prior), color_fix="none")
    lq = torch.rand(1, 3, 8, 8, generator=gen(9))

    def wmse(r) -> float:
        w = gradient_weight_map(r.stage1, 2)
        return (w * (r.image - r.stage1) ** 2).mean().item()

    plain = pipe(lq, gen(0))
    errs = [wmse(pipe.with_config(guidance=GuidanceConfig(scale=s))(lq, gen(0))) for s in (0.0, 0.1, 1.0)]
    assert errs[0] == pytest.approx(wmse(plain))
    assert errs[2] < errs[1] < errs[0]


def test_pixel_config_and_weight_errors(prior, tmp_path):
    with pytest.raises(BlindSRError, match="no text"):
        db.DiffBIRConfig.from_preset("pixel", "sr", cfg=4.0)
    with pytest.raises(BlindSRError, match="multiple of 8"):
        db.DiffBIRConfig.from_preset("pixel", "sr", tiling=db.Tiling(diffusion_tile=100))
    c = db.DiffBIRConfig.from_preset("pixel", "sr")
    assert (c.backend, c.cfg, c.min_size, c.tiling.diffusion_tile, c.prediction) == ("pixel", 1.0, 0, 256, "eps")
    assert (c.guidance.scale, c.guidance.norm_elements) == (1.0, 16384)  # guided by default, size-independent
    with pytest.raises(BlindSRError, match="backend sd needs SD 2.1"):  # an SD config with a pixel prior
        db.DiffBIRPipeline(torch.nn.Identity(), prior, icn.IRControlNet.from_unet(prior.unet, 3),
                           db.DiffBIRConfig.from_preset("v2", "sr"))
    with pytest.raises(BlindSRError, match="--backend sd"):
        db.resolve_weights("pixel", "sr", sd=tmp_path)
    with pytest.raises(BlindSRError, match="--backend pixel"):
        db.resolve_weights("v2", "sr", prior=tmp_path)
    official = tmp_path / "official.safetensors"
    from blindsr.io.weights import save_safetensors
    save_safetensors({"x": torch.zeros(1)}, official)
    with pytest.raises(WeightsError, match="no IRControlNet config"):
        icn.load_controlnet(official)


def test_save_and_load_controlnet_round_trip(prior, tmp_path):
    net = trained_like(prior)
    icn.save_controlnet(net, tmp_path / "c.safetensors")
    back = icn.load_controlnet(tmp_path / "c.safetensors")
    assert back.config == net.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture()
def hr_folder(make_hr_folder) -> Path:
    return make_hr_folder(4, 48, 56)


def train(out: Path, hr: Path, *extra: str) -> int:
    return main(["train", "diffbir-stage2", "--config", TINY, "--output", str(out), "--device", "cpu",
                 "--no-progress", "--set", f"data.root={hr}", "--set", "data.val_fraction=0.25", *extra])


def test_pixel_stage2_trains_only_the_control_branch_and_resumes_exactly(tmp_path, hr_folder, monkeypatch):
    held = {}
    real = dr.load_sd

    def spy(model):
        held["prior"] = p = real(model)
        held["before"] = {k: v.clone() for k, v in p.unet.state_dict().items()}
        return p
    monkeypatch.setattr(dr, "load_sd", spy)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, hr_folder) == 0
    unet = held["prior"].unet
    assert not any(p.requires_grad or p.grad is not None for p in unet.parameters())
    assert all(torch.equal(v, held["before"][k]) for k, v in unet.state_dict().items())
    net = icn.load_controlnet(full / "final.safetensors")  # our layout + config metadata
    assert net.config.hint_channels == 3 and net.conv_in.weight[:, 3:].abs().max() > 0
    assert all(c.weight.abs().max() > 0 for c in net.controlnet_down_blocks)  # the zero convs have learnt
    assert float(read_csv(full / "val.csv")[-1]["val_loss"]) > 0
    args = ("--set", "train.val_every=0")
    assert train(part, hr_folder, "--max-steps", "2", *args) == 0
    assert train(part, hr_folder, "--resume", "auto", *args) == 0
    losses = [[float(r["loss"]) for r in read_csv(d / "log.csv")] for d in (full, part)]
    assert len(losses[1]) == 3 and losses[1] == losses[0]


def test_pixel_stage2_variant_without_xt_and_config_errors(tmp_path, hr_folder, capsys):
    out = tmp_path / "v2"
    assert train(out, hr_folder, "--set", "model.condition_xt=false", "--set", "train.val_every=0") == 0
    net = icn.load_controlnet(out / "final.safetensors")
    assert not net.config.condition_xt and net.conv_in.weight.shape[1] == 3
    assert train(tmp_path / "e", hr_folder, "--set", "diffusion.prediction=v") == 2
    assert "pixel prior" in capsys.readouterr().err
    assert train(tmp_path / "e2", hr_folder, "--set", "data.crop=33") == 2
    assert "multiple of 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the command
def test_restore_cli_pixel_backend_from_files(prior, tmp_path, capsys):
    from PIL import Image

    from blindsr.io.weights import save_safetensors
    from blindsr.methods.prior.model import save_prior

    save_prior(prior, tmp_path / "prior.safetensors")
    icn.save_controlnet(trained_like(prior), tmp_path / "control.safetensors")
    torch.manual_seed(1)
    save_safetensors(build_restorer("swinir", SwinIRConfig.tiny()).state_dict(), tmp_path / "cleaner.safetensors")
    (tmp_path / "in").mkdir()
    Image.fromarray((torch.rand(12, 10, 3, generator=gen()) * 255).byte().numpy()).save(tmp_path / "in" / "a.png")
    files = ["--prior", str(tmp_path / "prior.safetensors"), "--controlnet", str(tmp_path / "control.safetensors"),
             "--cleaner", str(tmp_path / "cleaner.safetensors")]  # the cleaner's kind read from its tensors
    run = ["restore", str(tmp_path / "in"), "--steps", "2", "--quiet", "--device", "cpu", *files]
    assert main([*run, "-o", str(tmp_path / "o1")]) == 0
    assert main([*run, "-o", str(tmp_path / "o2"), "--backend", "pixel"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "a.png")) for d in ("o1", "o2"))
    assert a.shape == (48, 40, 3) and np.array_equal(a, b)
    for bad, why in ((["--backend", "pixel", "--version", "v2"], "--version is for --backend sd"),
                     (["--backend", "sd", "--version", "v2"], "--prior is for --backend pixel"),
                     (["--cfg", "3"], "no text")):
        assert main([*run, "-o", str(tmp_path / "o3"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err
    assert not (tmp_path / "o3").exists()
