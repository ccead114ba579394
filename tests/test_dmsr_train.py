"""``blindsr train dmsr``: a tiny pixel-backend run on a tiny prior file: exact resume, the export is a DM-SR
checkpoint that ``load_pipeline`` reads, and the frozen prior is unchanged by training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blindsr.cli.main import main
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "dmsr_tiny.yaml")


@pytest.fixture()
def prior_file(tmp_path) -> Path:
    from blindsr.methods.prior.config import PriorUNetConfig
    from blindsr.methods.prior.model import Prior, build_unet, save_prior

    cfg = PriorUNetConfig.tiny()
    torch.manual_seed(0)
    return save_prior(Prior(build_unet(cfg), cfg), tmp_path / "prior.safetensors")


def train(out: Path, hr: Path, prior: Path, *extra: str) -> int:
    return main(["train", "dmsr", "--config", TINY, "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"data.root={hr}", "--set", f"model.prior={prior}", *extra])


def test_dmsr_train_resume_export(tmp_path, make_hr_folder, prior_file):
    from blindsr.io.weights import load_state_dict
    from blindsr.methods.dmsr.pipeline import load_pipeline

    hr = make_hr_folder(4, 48, 56)
    before = load_state_dict(prior_file)
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, hr, prior_file) == 0
    assert train(part, hr, prior_file, "--max-steps", "2") == 0
    assert train(part, hr, prior_file, "--resume", "auto") == 0
    rows = read_csv(full / "log.csv")
    losses = [(float(r["g/loss"]), float(r["d/loss"])) for r in rows]
    assert losses == [(float(r["g/loss"]), float(r["d/loss"])) for r in read_csv(part / "log.csv")]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert {f"g/{k}" for k in ("l1", "per", "dm", "eps", "adv", "l_t", "t_rmse")} <= set(rows[0])
    pipe = load_pipeline(full / "final.safetensors")
    res = pipe(torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(0)))
    assert res.sr.shape == (1, 3, 32, 48) and 0 <= res.t_hat.item() <= 499
    after = load_state_dict(prior_file)
    assert all(torch.equal(before[k], after[k]) for k in before)


def tiny_sd_folder(root: Path) -> Path:
    """A diffusers SD-2.x-shaped folder with random tiny parts (unet/, vae/, text_encoder/), as `load_sd` reads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4,
                         use_linear_projection=True).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=49408, max_position_embeddings=77)).save_pretrained(root / "text_encoder")
    return root


def test_dmsr_sd_turbo_backend_trains_resumes_and_infers_tiled(tmp_path, make_hr_folder):
    from blindsr.methods.dmsr.pipeline import load_pipeline

    hr = make_hr_folder(4, 48, 56)
    sd = tiny_sd_folder(tmp_path / "sd-turbo")
    extra = ["--set", "model.backend=sd-turbo", "--set", "model.encoder={t_embed_dim: 16}",
             "--set", "model.discriminator={preset: tiny}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, hr, sd, *extra) == 0
    assert train(part, hr, sd, *extra, "--max-steps", "2") == 0
    assert train(part, hr, sd, *extra, "--resume", "auto") == 0
    get = lambda run: [(float(r["g/loss"]), float(r["d/loss"])) for r in read_csv(run / "log.csv")]  # noqa: E731
    assert get(full) == get(part) and np.isfinite(get(full)).all()
    pipe = load_pipeline(full / "final.safetensors", sd_turbo=sd)
    lr = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    whole, tiled = pipe(lr, tile=None).sr, pipe(lr, tile=16, tile_overlap=8).sr
    assert whole.shape == tiled.shape == (1, 3, 48, 40) and torch.isfinite(tiled).all()


def test_dmsr_no_prior_baseline_never_calls_the_prior(tmp_path, make_hr_folder, prior_file, monkeypatch):
    from blindsr.methods.dmsr import core
    from blindsr.methods.dmsr.pipeline import load_pipeline

    calls = []
    real = core.FrozenPrior.eps
    monkeypatch.setattr(core.FrozenPrior, "eps", lambda self, x, t: calls.append(1) or real(self, x, t))
    hr = make_hr_folder(4, 48, 56)
    out = tmp_path / "l1"
    assert train(out, hr, prior_file, "--set", "model.use_prior=false", "--set", "loss.w_dm=0",
                 "--set", "loss.w_eps=0", "--set", "loss.w_adv=0", "--set", "loss.w_per=0") == 0
    pipe = load_pipeline(out / "final.safetensors")
    assert pipe.use_prior is False
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = pipe.encoder(torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic"), torch.zeros(1))
    assert pipe(lr).sr.shape == (1, 3, 32, 32) and x.shape == (1, 3, 32, 32)
    assert calls == []  # neither training nor inference called μψ
    assert train(tmp_path / "bad", hr, prior_file, "--set", "model.use_prior=false") == 2  # L_dm, L_eps on
