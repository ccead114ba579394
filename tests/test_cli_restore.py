"""``blindsr restore`` end to end with tiny random-weight models written to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.cli.main import main
from blindsr.io.weights import save_safetensors
from blindsr.models.restorers import RRDBNetConfig, build_restorer

WEIGHT_ENVS = ["BLINDSR_SD21", "BLINDSR_DIFFBIR_V2", "BLINDSR_BSRNET", "BLINDSR_SCUNET_PSNR", "BLINDSR_SWINIR_FACE"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user config or weight variables leak in."""
    monkeypatch.setenv("BLINDSR_CONFIG", str(tmp_path / "no-such-config.json"))
    for env in WEIGHT_ENVS:
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def cleaner_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "rrdb_tiny.safetensors"
    save_safetensors(build_restorer("rrdbnet", RRDBNetConfig.tiny()).state_dict(), path)
    return path


def write_inputs(folder, sizes=((16, 16),), gray: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    if gray:
        Image.fromarray(rng.integers(0, 255, (12, 20), dtype=np.uint8)).save(folder / "gray.png")
    return folder


def test_stage1_only_with_a_tiny_rrdbnet(tmp_path, cleaner_file, capsys):
    inp = write_inputs(tmp_path / "in", gray=True)
    rc = main(["restore", str(inp), "-o", str(tmp_path / "out"), "--stage1-only", "--cleaner", str(cleaner_file),
               "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rgb, gray = Image.open(tmp_path / "out" / "img0.png"), Image.open(tmp_path / "out" / "gray.png")
    assert rgb.size == (64, 64) and rgb.mode == "RGB"
    assert gray.size == (80, 48) and gray.mode == "L"
    rc = main(["restore", str(inp), "-o", str(tmp_path / "out"), "--stage1-only", "--cleaner", str(cleaner_file),
               "--quiet", "--device", "cpu"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err  # existing outputs are kept


def test_missing_weights_are_one_line_errors(tmp_path, capsys):
    inp = write_inputs(tmp_path / "in")
    rc = main(["restore", str(inp), "-o", str(tmp_path / "out"), "--stage1-only", "--version", "v2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--cleaner" in err and "BLINDSR_BSRNET" in err
    rc = main(["restore", str(inp), "-o", str(tmp_path / "out"), "--cleaner", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not found" in err and "nope.pth" in err


def test_weights_from_config_file_and_environment(tmp_path, cleaner_file, monkeypatch, capsys):
    inp = write_inputs(tmp_path / "in")
    config = tmp_path / "weights.json"
    config.write_text(json.dumps({"bsrnet": str(cleaner_file)}))
    monkeypatch.setenv("BLINDSR_CONFIG", str(config))
    v2 = ["--backend", "sd", "--version", "v2"]  # v2's sr cleaner is BSRNet ("bsrnet" / BLINDSR_BSRNET)
    assert main(["restore", str(inp), "-o", str(tmp_path / "a"), "--stage1-only", "--quiet", "--device", "cpu",
                 *v2]) == 0
    monkeypatch.setenv("BLINDSR_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("BLINDSR_BSRNET", str(cleaner_file))
    assert main(["restore", str(inp), "-o", str(tmp_path / "b"), "--stage1-only", "--quiet", "--device", "cpu",
                 *v2]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "img0.png")) for d in "ab")
    assert np.array_equal(a, b)


def test_full_pipeline_with_tiny_models(tmp_path, reference_dir, cleaner_file, capsys):
    from test_diffbir_pipeline import load_tiny_cldm

    ref, models, _ = load_tiny_cldm(reference_dir)
    sd_dir = tmp_path / "tiny-sd"
    models.unet.save_pretrained(sd_dir / "unet")
    models.vae.save_pretrained(sd_dir / "vae")
    models.text_encoder.save_pretrained(sd_dir / "text_encoder")
    cn_path = tmp_path / "v2_tiny.pth"  # official layout: a bare ControlNet state dict
    torch.save({k[len("controlnet."):]: v for k, v in ref["cldm_state"].items() if k.startswith("controlnet.")},
               cn_path)
    inp = write_inputs(tmp_path / "in", sizes=((16, 16), (16, 16)))
    base = ["restore", str(inp), "--sd", str(sd_dir), "--controlnet", str(cn_path), "--cleaner", str(cleaner_file),
            "--steps", "2", "--min-size", "64", "--quiet", "--device", "cpu", "--seed", "7"]
    assert main([*base, "-o", str(tmp_path / "b1")]) == 0, capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "b2"), "--batch-size", "2", "--save-stage1"]) == 0
    one, two = (np.asarray(Image.open(tmp_path / d / "img0.png")) for d in ("b1", "b2"))
    assert one.shape == (64, 64, 3)
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1  # per-image generators: batching does not matter
    assert (tmp_path / "b2" / "img1_stage1.png").is_file()


def test_guidance_defaults_come_from_the_preset():
    from blindsr.cli.main import build_parser
    from blindsr.cli.restore import build_config

    def config(*flags):
        return build_config(build_parser().parse_args(["restore", "x.png", *flags]), torch.device("cpu")).guidance

    pixel, sd, off = config(), config("--version", "v2"), config("--guidance-scale", "0")
    assert (pixel.scale, pixel.norm_elements) == (1.0, 16384)  # pixel: guided, size-independent
    assert (sd.scale, sd.norm_elements) == (0.0, 0)  # SD presets: the official default and mean
    assert (off.scale, off.norm_elements) == (0.0, 16384)
