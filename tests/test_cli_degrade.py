"""``blindsr degrade`` end to end on Set5: layout, manifest, reproducibility, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.cli.degrade import image_seed
from blindsr.cli.main import main
from blindsr.degradations import operators as O
from blindsr.degradations.kernels import gaussian_kernel


def png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def set5(data_dir):
    d = data_dir / "val" / "Set5"
    if not d.is_dir():
        pytest.fail(f"Set5 not found at {d}")
    return d


@pytest.fixture
def small_set(set5, tmp_path):
    """Three Set5 images cropped to odd sizes (fast; exercises modcrop)."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("baby.png", "bird.png", "head.png"):
        Image.open(set5 / name).convert("RGB").crop((0, 0, 67, 53)).save(d / name)
    return d


def test_set5_setting1_end_to_end(set5, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["degrade", "--preset", "blinddiff-setting1", "--input", str(set5), "--output", str(out),
               "--save-kernels", "--device", "cpu", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in set5.iterdir())
    assert sorted(p.name for p in (out / "lr").iterdir()) == names
    assert sorted(p.name for p in (out / "hr").iterdir()) == names
    assert {p.name for p in (out / "kernels").iterdir()} == {n.replace(".png", s) for n in names for s in
                                                              (".png", ".npy")}
    recs = manifest(out)
    assert [r["name"] for r in recs] == names
    preset = json.loads((out / "preset.json").read_text())
    assert preset["preset"] == "blinddiff-setting1" and preset["config"]["sig_max"] == 4.0
    for r in recs:
        src = np.asarray(Image.open(set5 / r["name"]))
        h, w = src.shape[:2]
        hr, lr = png(out / r["hr"]), png(out / r["lr"])
        assert list(hr.shape[-2:]) == r["hr_size"] == [h - h % 4, w - w % 4]
        assert list(lr.shape[-2:]) == r["lr_size"] == [(h - h % 4) // 4, (w - w % 4) // 4]
        p = r["params"]
        k = torch.from_numpy(np.load(out / r["kernel"].replace(".png", ".npy")))
        torch.testing.assert_close(k, gaussian_kernel(21, p["sigma_x"]))
        # the LR is the documented model applied to the written HR: blur, MATLAB bicubic x1/4, 8-bit
        expect = O.quantize(O.imresize(O.blur(hr[None], k), 0.25).clamp(0, 1))[0]
        assert (expect - lr).abs().max() <= 1.5 / 255
        assert r["seed"] == image_seed(3, r["name"])
    # the same run again refuses to overwrite; --overwrite reproduces the same files
    assert main(["degrade", "--preset", "blinddiff-setting1", "--input", str(set5), "--output", str(out),
                 "--device", "cpu", "--seed", "3"]) != 0
    assert "exists" in capsys.readouterr().err
    before = png(out / "lr" / "bird.png")
    assert main(["degrade", "--preset", "blinddiff-setting1", "--input", str(set5), "--output", str(out),
                 "--device", "cpu", "--seed", "3", "--overwrite"]) == 0
    assert torch.equal(png(out / "lr" / "bird.png"), before)


def test_seed_per_image_not_per_batch(small_set, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["degrade", "--preset", "realesrgan", "--input", str(small_set), "--output", str(a),
                 "--device", "cpu"]) == 0
    assert main(["degrade", "--preset", "realesrgan", "--input", str(small_set / "head.png"), "--output", str(b),
                 "--device", "cpu"]) == 0
    assert torch.equal(png(a / "lr" / "head.png"), png(b / "lr" / "head.png"))
    assert manifest(b)[0]["params"] == [r for r in manifest(a) if r["name"] == "head.png"][0]["params"]
    assert main(["degrade", "--preset", "realesrgan", "--input", str(small_set / "head.png"), "--output", str(c),
                 "--device", "cpu", "--seed", "1"]) == 0
    assert not torch.equal(png(a / "lr" / "head.png"), png(c / "lr" / "head.png"))
    assert png(a / "lr" / "head.png").shape[-2:] == (13, 16)  # 53x67 modcropped to 52x64, then /4


def test_gaussian8_layout(small_set, tmp_path):
    out = tmp_path / "g8"
    assert main(["degrade", "--preset", "gaussian8", "--input", str(small_set / "bird.png"), "--output", str(out),
                 "--device", "cpu"]) == 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == [f"sig{s:.1f}" for s in (1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2)]
    assert (out / "sig2.4" / "lr" / "bird.png").is_file() and (out / "sig2.4" / "hr" / "bird.png").is_file()
    assert [r["params"]["sigma"] for r in manifest(out)] == [1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2]
    one = tmp_path / "g8k"
    assert main(["degrade", "--preset", "gaussian8", "--kernel-index", "3", "--input", str(small_set / "bird.png"),
                 "--output", str(one), "--device", "cpu"]) == 0
    assert torch.equal(png(one / "lr" / "bird.png"), png(out / "sig2.4" / "lr" / "bird.png"))


def test_overrides_and_scale(small_set, tmp_path):
    out = tmp_path / "x2"
    assert main(["degrade", "--preset", "classic", "--scale", "2", "--set", "noise_max=5", "--input",
                 str(small_set / "baby.png"), "--output", str(out), "--device", "cpu"]) == 0
    r = manifest(out)[0]
    assert r["lr_size"] == [26, 33] and r["params"]["scale"] == 2 and 0 <= r["params"]["noise_sigma"] <= 5


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "choose one of"),
    (["--preset", "classic", "--kernel-index", "2"], "gaussian8 only"),
    (["--preset", "motion-deblur", "--scale", "2"], "no scale"),
    (["--preset", "classic", "--set", "bogus=1"], "unknown option"),
    (["--preset", "classic", "--set", "a.b=1"], "flat"),
    (["--preset", "classic", "--set", "noise_max"], "KEY"),
    (["--preset", "gaussian8", "--kernel-index", "9"], "kernel_index"),
])
def test_user_errors_are_one_line(small_set, tmp_path, capsys, argv, needle):
    rc = main(["degrade", *argv, "--input", str(small_set), "--output", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_keeps_going_past_a_bad_file(small_set, tmp_path, capsys):
    (small_set / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    shutil.copy(small_set / "bird.png", small_set / "bird2.png")
    out = tmp_path / "o"
    rc = main(["degrade", "--preset", "motion-deblur", "--input", str(small_set), "--output", str(out),
               "--device", "cpu", "--save-kernels"])
    assert rc == 3
    assert "broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "lr").iterdir()) == ["baby.png", "bird.png", "bird2.png", "head.png"]
    assert len(manifest(out)) == 4
    assert (out / "kernels" / "head.npy").is_file()


def test_set_values_are_yaml_or_json():
    from blindsr.cli.degrade import _parse_overrides

    got = _parse_overrides(["kernel_list=[iso, aniso]", "noise-max=5", 'jpeg_range=[50, 95]', "name=x"])
    assert got == {"kernel_list": ["iso", "aniso"], "noise_max": 5, "jpeg_range": [50, 95], "name": "x"}
