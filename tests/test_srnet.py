"""``blindsr train srnet`` on a folder of pairs written by ``blindsr degrade``: both archs, resume, init, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blindsr.cli.main import main
from blindsr.io.weights import load_state_dict, save_safetensors
from blindsr.models.restorers import RRDBNetConfig, build_restorer, load_restorer
from blindsr.models.restorers.rrdbnet import to_basicsr_keys
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "src" / "blindsr" / "configs" / "srnet_s.yaml")


@pytest.fixture()
def pairs(make_hr_folder, tmp_path) -> Path:
    hr = make_hr_folder(3, 64, 72)
    out = tmp_path / "pairs"
    assert main(["degrade", "--preset", "classic", "--input", str(hr), "--output", str(out)]) == 0
    return out


def train(out: Path, pairs: Path, *extra: str) -> int:
    return main(["train", "srnet", "--config", CONFIG, "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"data.root={pairs / 'hr'}", "--set", f"data.lr_root={pairs / 'lr'}",
                 "--set", "model.preset=tiny", "--set", "data.crop=32", "--set", "data.batch_size=2",
                 "--set", "train.log_every=1", "--set", "train.ckpt_every=2", "--max-steps", "3", *extra])


def losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in read_csv(run / "log.csv")]


@pytest.mark.parametrize("arch", ["rrdbnet", "swinir"])
def test_trains_resumes_exactly_and_exports_a_cleaner(tmp_path, pairs, arch):
    full, part = tmp_path / "full", tmp_path / "part"
    a = ("--set", f"model.arch={arch}")
    assert train(full, pairs, *a) == 0
    assert train(part, pairs, *a, "--max-steps", "2") == 0
    assert train(part, pairs, *a, "--resume", "auto") == 0
    assert len(losses(full)) == 3 and losses(part) == losses(full)
    net = load_restorer("auto", full / "final.safetensors")  # the restorer layout: kind read from the tensors
    x = torch.rand(1, 3, 8, 12)
    assert net(x).shape == (1, 3, 32, 48)


def test_init_from_weights_in_either_key_layout(tmp_path, pairs):
    torch.manual_seed(3)
    src = build_restorer("rrdbnet", RRDBNetConfig(nf=8, nb=1, gc=4))
    f = tmp_path / "init.safetensors"
    save_safetensors(to_basicsr_keys(src.state_dict()), f)  # Real-ESRGAN's (BasicSR) names
    run = tmp_path / "r"  # lr 0 and no EMA: the export is the initial model itself
    assert train(run, pairs, "--set", f"model.init={f}", "--max-steps", "1", "--set", "optim.lr=0",
                 "--set", "train.ema_decay=0") == 0
    got = load_state_dict(run / "final.safetensors")
    assert set(got) == set(src.state_dict()) and all(torch.equal(got[k], v) for k, v in src.state_dict().items())


def test_config_errors(tmp_path, pairs, capsys):
    assert train(tmp_path / "a", pairs, "--set", "data.lr_root=null") == 2
    assert "data.lr_root" in capsys.readouterr().err
    assert train(tmp_path / "b", pairs, "--set", "model.arch=edsr") == 2
    assert "rrdbnet or swinir" in capsys.readouterr().err
    assert train(tmp_path / "c", pairs, "--set", "data.scale=3") == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sr_command_runs_a_trained_network(tmp_path, pairs, capsys):
    from PIL import Image

    run = tmp_path / "r"
    assert train(run, pairs) == 0
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(20, 28, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(img)
    ckpt = str(run / "final.safetensors")
    assert main(["sr", str(img), "-o", str(tmp_path / "o"), "--ckpt", ckpt, "--quiet"]) == 0  # method from the file
    with Image.open(tmp_path / "o" / "in.png") as im:
        assert im.size == (112, 80)
    assert main(["sr", str(img), "-o", str(tmp_path / "t"), "--method", "srnet", "--ckpt", ckpt, "--quiet",
                 "--tile", "64", "--tile-overlap", "16"]) == 0  # tiles of 16 LR pixels
    a, b = (np.asarray(Image.open(tmp_path / d / "in.png")).astype(int) for d in ("o", "t"))
    assert np.abs(a - b).max() <= 2  # the tiny net is local but not translation-invariant at the borders
    for bad, why in ((["--lambda", "1"], "BlindDiff option"), (["--t-hat", "3"], "not an option of --method srnet"),
                     ([], "needs --ckpt")):
        argv = ["sr", str(img), "-o", str(tmp_path / "x"), "--method", "srnet", *bad]
        if why != "needs --ckpt":
            argv += ["--ckpt", ckpt]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
