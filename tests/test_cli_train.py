"""``blindsr train``: config parsing and one-line errors, the shipped configs, and a tiny BlindDiff run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blindsr.cli.main import main
from blindsr.train.config import RunConfig, load_config, save_config
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "blinddiff_tiny.yaml")


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("blindsr: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("yaml_text, needle", [
    ("train:\n  max_step: 5\n", "unknown key 'train.max_step'"),
    ("optimizer:\n  lr: 1\n", "unknown key 'optimizer'"),
    ("data:\n  crop: big\n", "data.crop"),
    ("optim:\n  betas: [0.9]\n", "optim.betas"),
    ("method: diffbir\n", "'diffbir' config"),
    ("model:\n  dims: 8\n", "dims"),
    ("train: [1, 2]\n", "train must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_config_errors_are_one_liners(tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert needle in _one_line_error(capsys, ["train", "blinddiff", "--config", str(cfg), "--output",
                                              str(tmp_path / "run")])


def test_set_overrides_are_checked(tmp_path, capsys):
    args = ["train", "blinddiff", "--config", TINY, "--output", str(tmp_path)]
    assert "unknown key 'train.bogus'" in _one_line_error(capsys, [*args, "--set", "train.bogus=1"])
    assert "train.max_steps" in _one_line_error(capsys, [*args, "--set", "train.max_steps=abc"])
    assert "KEY.SUB=VALUE" in _one_line_error(capsys, [*args, "--set", "novalue"])
    assert "no such file" in _one_line_error(capsys, ["train", "blinddiff", "--config", str(tmp_path / "x.yaml")])
    cfg = load_config(TINY, ["optim.lr=1e-3", "data.degradation_overrides={sig_max: 2.0}", "optim.grad_clip=1"])
    assert cfg.optim.lr == 1e-3 and cfg.data.degradation_overrides == {"sig_max": 2.0}
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)


def test_shipped_configs_parse_and_round_trip(tmp_path):
    official = load_config(REPO / "configs" / "blinddiff_setting1.yaml")
    assert (official.data.crop, official.data.batch_size, official.data.degradation) == (128, 10, "blinddiff-setting1")
    assert (official.optim.lr, official.optim.betas, official.optim.weight_decay) == (5e-5, (0.9, 0.99), 0.0)
    assert official.optim.milestones == [100_000, 200_000, 300_000, 400_000, 500_000] and official.optim.gamma == 0.5
    assert (official.train.max_steps, official.train.ema_decay, official.train.skip_loss_factor) == (1_000_000, 0.999, 100)
    assert official.model["preset"] == "full" and official.loss["kernel_weight"] == 1.0
    tiny = load_config(TINY)
    assert tiny.model["preset"] == "tiny" and tiny.data.crop == 32 and tiny.train.max_steps == 3
    save_config(official, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == official
    assert load_config(None) == RunConfig()


@pytest.fixture()
def hr_folder(make_hr_folder) -> Path:
    return make_hr_folder(4, 40, 44)


def test_train_blinddiff_tiny(tmp_path, hr_folder, capsys):
    """The integration: `blindsr train blinddiff --config configs/blinddiff_tiny.yaml` (shortened to 2 steps
    and a 1-step validation sampler to keep the test fast)."""
    run = tmp_path / "run"
    args = ["train", "blinddiff", "--config", TINY, "--output", str(run), "--device", "cpu", "--no-progress",
            "--max-steps", "2", "--set", "train.val_steps=1", "--set", f"data.root={hr_folder}",
            "--set", "data.val_names=[im3]"]
    assert main(args) == 0
    assert "trained to step 2" in capsys.readouterr().out
    rows = read_csv(run / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and {"mse", "vb", "kernel", "loss"} <= set(rows[0])
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    val = read_csv(run / "val.csv")
    assert [r["step"] for r in val] == ["2"] and 0 < float(val[0]["psnr"]) < 60
    assert (run / "losses.png").is_file() and (run / "checkpoints" / "step_000000002" / "state.pt").is_file()
    meta = json.loads((run / "meta.json").read_text())["runs"][0]
    assert meta["train_images"] == 3 and meta["model_parameters"] == 880_496
    assert load_config(run / "config.yaml").model["dim"] == 16  # resolved model config saved

    from blindsr.io.weights import load_safetensors_metadata
    from blindsr.methods.blinddiff import load_pipeline
    md = load_safetensors_metadata(run / "final.safetensors")
    assert md["method"] == "blinddiff" and json.loads(md["config"])["model"]["dim"] == 16
    pipe = load_pipeline(run / "final.safetensors")  # what `blindsr sr --ckpt` loads
    assert pipe.scale == 4 and sum(p.numel() for p in pipe.model.parameters()) == 880_496

    assert "already holds checkpoints" in _one_line_error(capsys, args)  # never clobber a run


@pytest.mark.slow
def test_train_blinddiff_resume_is_exact(tmp_path, hr_folder):
    base = ["train", "blinddiff", "--config", TINY, "--device", "cpu", "--no-progress",
            "--set", f"data.root={hr_folder}", "--set", "train.val_every=0"]
    assert main([*base, "--output", str(tmp_path / "a")]) == 0
    assert main([*base, "--output", str(tmp_path / "b"), "--max-steps", "1"]) == 0
    assert main([*base, "--output", str(tmp_path / "b"), "--resume", "auto"]) == 0
    cols = ("mse", "vb", "kernel", "loss")
    a, b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert [[r[c] for c in cols] for r in a] == [[r[c] for c in cols] for r in b] and len(a) == 3
