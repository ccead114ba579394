"""The pixel-space diffusion prior (``methods/prior``): architecture, null context, SD-Turbo's schedule, training
with exact resume, deterministic sampling, strict save/load, and an IRControlNet that fits it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from blindsr.cli.main import main
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.prior import (
    Prior,
    PriorDiffusion,
    PriorUNetConfig,
    load_prior,
    null_context,
    sample_prior,
)
from blindsr.methods.prior.model import generators, save_prior, unet_prediction
from blindsr.models import ircontrolnet as icn
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "prior_tiny.yaml")


@pytest.fixture(scope="module")
def prior() -> Prior:
    torch.manual_seed(0)
    p = Prior.new(PriorUNetConfig.tiny(), PriorDiffusion(sample_steps=3))
    p.unet.eval()
    return p


def test_architecture_and_parameter_counts(prior):
    u = prior.unet
    assert sum(p.numel() for p in u.parameters()) == 63_627
    assert [type(b).__name__ for b in u.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert type(u.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in u.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert unet_prediction(u, x, torch.tensor([10, 900])).shape == (2, 3, 16, 24)
    with torch.device("meta"):
        small = Prior.new(PriorUNetConfig.small()).unet
        control = icn.IRControlNet(icn.IRControlNetConfig.from_unet_config(small.config, hint_channels=3))
    assert sum(p.numel() for p in small.parameters()) == 4_084_339  # Prior-S: 16.3 MB in fp32
    assert control.config.num_controls() == 9 and control.conv_in.weight.shape == (16, 6, 3, 3)


def test_null_context_is_fixed_zeros(prior):
    u = prior.unet
    c = null_context(u, 3)
    assert c.shape == (3, 1, 8) and c.eq(0).all() and c.dtype == torch.float32
    assert null_context(u, 1, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    with torch.no_grad():
        direct = u(x, t, encoder_hidden_states=torch.zeros(2, 1, 8)).sample
        assert torch.equal(unet_prediction(u, x, t), direct)


def test_schedule_is_sd_turbos():
    from diffusers import DDPMScheduler

    abar = PriorDiffusion().process().alphas_cumprod
    assert abar.numel() == 1000
    assert abs(float(abar[100]) - 0.8942) < 1e-4 and abs(float(abar[500]) - 0.2763) < 1e-4
    sd = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(abar.float(), sd.alphas_cumprod, atol=1e-6)


def test_config_errors():
    with pytest.raises(BlindSRError, match="one entry per level"):
        PriorUNetConfig(block_out_channels=[8, 16, 32])
    with pytest.raises(BlindSRError, match="mirror"):
        dataclasses.replace(PriorUNetConfig.tiny(), up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    with pytest.raises(BlindSRError, match="spacing"):
        PriorDiffusion(spacing="trailing")


def test_sampling_is_seeded_and_batch_independent(prior):
    a = sample_prior(prior, 2, 16, generator=generators(5, 2))
    b = sample_prior(prior, 2, 16, generator=generators(5, 2))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    one = sample_prior(prior, 1, 16, generator=generators(6, 1))
    assert torch.allclose(one[0], a[1], atol=1e-5)  # sample i comes from generator i alone
    assert not torch.equal(a, sample_prior(prior, 2, 16, generator=generators(7, 2)))
    assert not torch.equal(a, sample_prior(prior, 2, 16, generator=generators(5, 2), eta=1.0))
    with pytest.raises(BlindSRError, match="multiples of 2"):
        sample_prior(prior, 1, 15)


def test_save_load_round_trip_is_strict(prior, tmp_path):
    path = save_prior(prior, tmp_path / "p.safetensors")
    back = load_prior(path)
    assert back.unet_config == prior.unet_config and back.diffusion == prior.diffusion
    assert not any(p.requires_grad for p in back.unet.parameters()) and not back.unet.training
    own = prior.unet.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in back.unet.state_dict().items())
    assert torch.equal(sample_prior(back, 1, 16, generator=generators(1, 1)),
                       sample_prior(prior, 1, 16, generator=generators(1, 1)))
    from blindsr.io.weights import save_safetensors

    meta = {"config": back.config_dict()}
    for name, sd in (("missing", {k: v for k, v in own.items() if not k.startswith("conv_out")}),
                     ("unexpected", {**own, "extra.weight": torch.zeros(1)})):
        bad = save_safetensors(sd, tmp_path / f"{name}.safetensors", metadata=meta)
        with pytest.raises(WeightsError, match=name):
            load_prior(bad)
    with pytest.raises(WeightsError, match="not found"):
        load_prior(tmp_path / "none.safetensors")


def test_ircontrolnet_fits_the_prior(prior):
    u = prior.unet
    ccfg = icn.IRControlNetConfig.from_unet_config(u.config, hint_channels=3)
    assert (ccfg.in_channels, ccfg.down_block_types, ccfg.norm_num_groups) == (3, list(u.config.down_block_types), 4)
    net = icn.IRControlNet.from_unet(u, hint_channels=3)
    assert net.conv_in.weight.shape == (8, 6, 3, 3) and torch.equal(net.conv_in.weight[:, :3], u.conv_in.weight)
    g = torch.Generator().manual_seed(2)
    x, hint, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g), torch.tensor([5, 400])
    ctx = null_context(u, 2)
    with torch.no_grad():
        controls = net(x, t, hint, ctx)
        assert len(controls) == ccfg.num_controls() == 5
        assert [tuple(c.shape[1:]) for c in controls] == [(8, 16, 16), (8, 16, 16), (8, 8, 8), (16, 8, 8), (16, 8, 8)]
        plain = unet_prediction(u, x, t)
        assert torch.allclose(icn.controlled_unet(u, x, t, ctx, controls), plain, atol=1e-6)  # zero convs: a no-op
        random = [torch.randn(c.shape, generator=g) for c in controls]  # residual shapes fit the prior's skips
        assert (icn.controlled_unet(u, x, t, ctx, random) - plain).abs().max() > 1e-3


def _train(out: Path, hr: Path, *extra: str) -> int:
    return main(["train", "prior", "--config", TINY, "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"data.root={hr}", *extra])


def test_train_resume_is_exact_and_exports_a_prior(tmp_path, make_hr_folder):
    hr = make_hr_folder(4, 20, 24)
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(full, hr) == 0
    assert _train(part, hr, "--max-steps", "2") == 0
    assert _train(part, hr, "--resume", "auto") == 0
    losses = [[float(r["loss"]) for r in read_csv(run / "log.csv")] for run in (full, part)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert float(read_csv(full / "val.csv")[-1]["val_loss"]) > 0
    a, b = load_prior(full / "final.safetensors"), load_prior(part / "final.safetensors")
    assert a.unet_config == PriorUNetConfig.tiny() and a.diffusion.sample_steps == 4
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(),
                                                 strict=True))
    assert _train(tmp_path / "e", hr, "--set", "loss.x=1") == 2
    assert _train(tmp_path / "e2", hr, "--set", "data.crop=17") == 2
    assert _train(tmp_path / "e3", hr, "--set", "model.preset=huge") == 2


def test_embedded_prior_s_loads():
    from blindsr.weights import EMBEDDED, PRIORS, prior_path

    assert "prior-s" in PRIORS and "prior-s" not in EMBEDDED  # not an SR model: not under `sr --model`
    if not prior_path().is_file():
        pytest.skip("Prior-S is not installed")
    p = load_prior()
    assert p.unet_config == PriorUNetConfig.small() and p.diffusion == PriorDiffusion()
    assert prior_path().stat().st_size < 25e6
    with pytest.raises(BlindSRError, match="unknown embedded prior"):
        prior_path("prior-xl")
