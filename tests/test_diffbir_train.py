"""``blindsr train diffbir-stage1|diffbir-stage2``: tiny CLI runs, frozen parts, official-layout exports, resume."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blindsr.cli.main import main
from blindsr.io.weights import load_safetensors_metadata
from blindsr.methods.diffbir import recipe as dr
from blindsr.models import ircontrolnet as icn
from blindsr.models.restorers import RRDBNetConfig, SwinIRConfig, build_restorer, load_restorer
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
STAGE1, STAGE2 = str(REPO / "configs" / "diffbir_stage1_tiny.yaml"), str(REPO / "configs" / "diffbir_stage2_tiny.yaml")


@pytest.fixture()
def hr_folder(make_hr_folder) -> Path:
    return make_hr_folder(4, 72, 80)


def train(config: str, out: Path, hr: Path, *extra: str) -> int:
    return main(["train", Path(config).stem.replace("_tiny", "").replace("_", "-"), "--config", config,
                 "--output", str(out), "--device", "cpu", "--no-progress", "--set", f"data.root={hr}",
                 "--set", "data.val_fraction=0.25", *extra])


def losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in read_csv(run / "log.csv")]


# ------------------------------------------------------------------------------------------------ stage 1
def test_stage1_cli_export_and_exact_resume(tmp_path, hr_folder):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(STAGE1, full, hr_folder) == 0
    assert train(STAGE1, part, hr_folder, "--max-steps", "2") == 0
    assert train(STAGE1, part, hr_folder, "--resume", "auto") == 0  # continues 2 -> 3
    assert len(losses(part)) == 3 and losses(part) == losses(full)  # exact resume (CPU)
    assert all(np.isfinite(losses(full)))
    assert float(read_csv(full / "val.csv")[-1]["psnr"]) > 5
    assert len(json.loads((part / "meta.json").read_text())["runs"]) == 2
    # the export loads with the official loader (strict keys, sizes from the tensors) and equals the run
    model = load_restorer("swinir", full / "final.safetensors")
    assert model.config == SwinIRConfig.tiny()
    assert load_safetensors_metadata(full / "final.safetensors")["method"] == "diffbir-stage1"
    a, b = load_restorer("swinir", part / "final.safetensors"), model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(build_restorer_seeded().state_dict().values(),
                                                      b.state_dict().values(), strict=True))


def build_restorer_seeded():
    torch.manual_seed(0)  # run_training seeds the initial weights with train.seed = 0
    return build_restorer("swinir", SwinIRConfig.tiny())


def test_stage1_x4_cleaner_and_errors(tmp_path, hr_folder, capsys):
    """A x4 BSRNet gets the LQ bicubic-downscaled by 4, so its output is at HR size."""
    out = tmp_path / "bsr"
    assert train(STAGE1, out, hr_folder, "--max-steps", "1", "--set", "model.kind=bsrnet",
                 "--set", "model.preset=tiny", "--set", "train.val_every=0") == 0
    model = load_restorer("bsrnet", out / "final.safetensors")
    assert model.config == RRDBNetConfig.tiny()
    assert train(STAGE1, tmp_path / "e", hr_folder, "--set", "loss.reduction=max") == 2
    assert "loss.reduction" in capsys.readouterr().err
    assert train(STAGE1, tmp_path / "e2", hr_folder, "--set", "model.preset=huge") == 2


# ------------------------------------------------------------------------------------------------ stage 2
def test_controlnet_official_layout_round_trip(reference_dir):
    config = icn.IRControlNetConfig.from_unet_config()  # full SD 2.1 size, on meta tensors
    keys = {}
    for line in (reference_dir / "diffbir" / "controlnet.txt").read_text().splitlines():
        k, shape, _ = line.split("\t")
        keys[k] = torch.empty(ast.literal_eval(shape), device="meta")
    ours = icn.convert_official_controlnet(keys, config)
    back = icn.controlnet_to_official(ours, config)
    assert back.keys() == keys.keys() and all(back[k].shape == keys[k].shape for k in keys)
    with pytest.raises(icn.WeightsError, match="no official name"):
        icn.controlnet_to_official({**ours, "bogus.weight": torch.empty(1)}, config)


@pytest.fixture()
def spy(monkeypatch, tmp_path):
    """Keep the SD parts and cleaner a run loads, with a copy of their weights before training."""
    held = {}
    real_sd, real_cleaner = dr.load_sd, dr.load_cleaner

    def load_sd(model):
        held["sd"] = sd = real_sd(model)
        held["sd_before"] = {n: {k: v.clone() for k, v in m.state_dict().items()}
                             for n, m in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder))}
        return sd

    def load_cleaner(model):
        held["cleaner"] = c = real_cleaner(model)
        held["cleaner_before"] = {k: v.clone() for k, v in c.state_dict().items()}
        return c

    monkeypatch.setattr(dr, "load_sd", load_sd)
    monkeypatch.setattr(dr, "load_cleaner", load_cleaner)
    torch.manual_seed(3)
    cleaner = tmp_path / "cleaner.safetensors"  # a tiny random SwinIR as the frozen stage-1 model
    from blindsr.io.weights import save_safetensors
    save_safetensors(build_restorer("swinir", SwinIRConfig.tiny()).state_dict(), cleaner)
    held["cleaner_path"] = cleaner
    return held


def test_stage2_trains_only_the_controlnet_and_exports_official(tmp_path, hr_folder, spy):
    out = tmp_path / "s2"
    assert train(STAGE2, out, hr_folder, "--max-steps", "2", "--set", f"model.cleaner={spy['cleaner_path']}",
                 "--set", "model.cleaner_kind=swinir", "--set", "train.val_every=2") == 0
    sd = spy["sd"]
    for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder)):
        assert not m.training and not any(p.requires_grad or p.grad is not None for p in m.parameters())
        assert all(torch.equal(v, spy["sd_before"][name][k]) for k, v in m.state_dict().items()), name
    assert all(torch.equal(v, spy["cleaner_before"][k]) for k, v in spy["cleaner"].state_dict().items())
    # the export is in the official layout and loads with the official loader
    ccfg = icn.IRControlNetConfig.from_unet_config(dict(sd.unet.config))
    net = icn.load_official_controlnet(str(out / "final.safetensors"), ccfg)
    init = icn.IRControlNet.from_unet(sd.unet)
    assert not torch.equal(net.conv_in.weight, init.conv_in.weight)
    assert all(c.weight.abs().max() > 0 for c in net.controlnet_down_blocks)  # zero convs have learnt
    # shared weights started as the UNet's; the extra hint channels of conv_in started at zero
    assert torch.equal(init.conv_in.weight[:, :4], sd.unet.conv_in.weight)
    assert float(read_csv(out / "val.csv")[-1]["val_loss"]) > 0
    meta = load_safetensors_metadata(out / "final.safetensors")
    assert meta["method"] == "diffbir-stage2" and meta["prediction"] == "eps"


def test_stage2_resume_continues_exactly(tmp_path, hr_folder):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--set", "train.val_every=0")
    assert train(STAGE2, full, hr_folder, *args) == 0
    assert train(STAGE2, part, hr_folder, "--max-steps", "2", *args) == 0
    assert train(STAGE2, part, hr_folder, "--resume", "auto", *args) == 0
    assert len(losses(part)) == 3 and losses(part) == losses(full)
    assert (part / "checkpoints").is_dir()


def test_stage2_variants_and_sd_folder(tmp_path, hr_folder, capsys):
    """v2.1 settings (v-prediction, zero SNR, noise-augmented condition) and SD from a diffusers folder."""
    torch.manual_seed(0)
    sd = dr.load_sd({"sd_config": "tiny"})
    folder = tmp_path / "sd"
    for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        m.save_pretrained(folder / name)
    out = tmp_path / "v21"
    assert train(STAGE2, out, hr_folder, "--max-steps", "1", "--set", f"model.sd={folder}",
                 "--set", "model.sd_config=null", "--set", "diffusion.prediction=v", "--set", "diffusion.zero_snr=true",
                 "--set", "diffusion.noise_aug=200", "--set", "train.val_every=0") == 0
    assert np.isfinite(losses(out)).all()
    capsys.readouterr()
    assert train(STAGE2, tmp_path / "e1", hr_folder, "--set", "model.sd_config=null") == 2
    assert "model.sd" in capsys.readouterr().err
    assert train(STAGE2, tmp_path / "e2", hr_folder, "--set", "data.crop=48") == 2
    assert train(STAGE2, tmp_path / "e3", hr_folder, "--set", "model.bogus=1") == 2
    assert "model.bogus" in capsys.readouterr().err
