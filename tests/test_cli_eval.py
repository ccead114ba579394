"""``blindsr eval`` end to end on tiny folders written with Pillow."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from blindsr.cli.main import main
from blindsr.metrics import psnr, ssim


def _img(rng, h=24, w=28, gray=False):
    return rng.integers(0, 256, (h, w) if gray else (h, w, 3)).astype(np.uint8)


def _noisy(rng, a, amp=12):
    return np.clip(a.astype(int) + rng.integers(-amp, amp + 1, a.shape), 0, 255).astype(np.uint8)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folders(tmp_path):
    """gt/{a,b,g(gray)}.png and pred/{a,b,g(RGB)}_x4.png plus an extra prediction; returns arrays too."""
    rng = np.random.default_rng(0)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    arrays = {}
    for name in ("a", "b"):
        g = _img(rng)
        p = _noisy(rng, g, amp=8 if name == "a" else 30)
        _save(gt / f"{name}.png", g)
        _save(pred / f"{name}_x4.png", p)
        arrays[name] = (p, g)
    g = _img(rng, gray=True)
    p = np.repeat(_noisy(rng, g)[..., None], 3, axis=2)
    p[..., 0] = np.clip(p[..., 0].astype(int) + 3, 0, 255)  # a slightly tinted prediction of a gray GT
    _save(gt / "g.png", g)
    _save(pred / "g_x4.png", p)
    arrays["g"] = (p, np.repeat(g[..., None], 3, axis=2))
    _save(pred / "extra_x4.png", _img(rng))
    return gt, pred, arrays


def test_end_to_end_reports(folders, tmp_path, capsys):
    gt, pred, arrays = folders
    out = tmp_path / "rep" / "x4"
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4", "--crop-border", "2",
               "--y-channel", "--output", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "mean (3)" in cap.out and "extra" in cap.err  # unpaired prediction reported, not an error
    expect = {n: (psnr(p, g, 2, True), ssim(p, g, 2, True)) for n, (p, g) in arrays.items()}
    assert expect["a"][0] > expect["b"][0]

    data = json.loads((tmp_path / "rep" / "x4.json").read_text())
    assert data["count"] == 3 and data["unpaired_pred"] == ["extra"] and data["failed"] == []
    assert data["settings"]["crop_border"] == 2 and data["settings"]["y_channel"] is True
    for row in data["images"]:
        # files are 8-bit, read as float32: agrees with the uint8 computation to ~1e-6 dB
        assert row["psnr"] == pytest.approx(expect[row["name"]][0], abs=1e-5)
        assert row["ssim"] == pytest.approx(expect[row["name"]][1], abs=1e-6)
    assert data["mean"]["psnr"] == pytest.approx(np.mean([v[0] for v in expect.values()]), abs=1e-5)

    rows = list(csv.DictReader((tmp_path / "rep" / "x4.csv").open()))
    assert [r["image"] for r in rows] == ["a", "b", "g", "mean"]
    assert float(rows[-1]["ssim"]) == pytest.approx(data["mean"]["ssim"], rel=1e-12)
    md = (tmp_path / "rep" / "x4.md").read_text()
    assert md.count("\n| ") == 5 and "**mean (3)**" in md
    assert not list((tmp_path / "rep").glob("*.tmp"))

    # reports are not overwritten without --overwrite
    args = ["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4", "--output", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "rep" / "x4.json").read_text())["settings"]["y_channel"] is False


def test_size_mismatch_keeps_going_and_modcrop(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    g_ok, g_odd = _img(rng, 32, 32), _img(rng, 34, 35)  # 34x35 is not a multiple of 4
    _save(gt / "ok.png", g_ok)
    _save(pred / "ok.png", _noisy(rng, g_ok))
    _save(gt / "odd.png", g_odd)
    p_odd = _noisy(rng, g_odd[:32, :32])
    _save(pred / "odd.png", p_odd)

    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--json", str(tmp_path / "r.json")]) == 3
    err = capsys.readouterr().err
    assert "odd" in err and "--modcrop" in err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["count"] == 1 and data["failed"][0]["name"] == "odd"

    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--modcrop", "4"]) == 0
    assert "mean (2)" in capsys.readouterr().out
    assert main(["eval", "--pred", str(pred / "odd.png"), "--gt", str(gt / "odd.png"), "--modcrop", "4",
                 "--json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["images"][0]
    assert one["psnr"] == pytest.approx(psnr(p_odd, g_odd[:32, :32]), abs=1e-5)


def test_exit_codes_and_errors(folders, tmp_path, capsys):
    gt, pred, _ = folders
    # no suffix given: nothing pairs
    assert main(["eval", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "--pred-suffix" in capsys.readouterr().err
    # a GT without prediction -> 3
    _save(gt / "lonely.png", _img(np.random.default_rng(2)))
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4"]) == 3
    assert "lonely" in capsys.readouterr().err
    # every pair failing -> 2
    small = tmp_path / "small"
    for n in ("a", "b", "g"):
        _save(small / f"{n}_x4.png", _img(np.random.default_rng(3), 8, 8))
    assert main(["eval", "--pred", str(small), "--gt", str(gt), "--pred-suffix", "_x4"]) == 2
    # option errors: one line, exit 2
    bad = [["--output", str(tmp_path / "o"), "--csv", str(tmp_path / "c.csv")], ["--metrics", "psnr,bogus"],
           ["--metrics", "ssimc"], ["--crop-border", "-1"], ["--csv", str(gt / "a.png"), "--overwrite"]]
    for extra in bad:
        capsys.readouterr()
        assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("blindsr: error:") and "\n" not in err, err
    assert main(["eval", "--pred", str(tmp_path / "nope"), "--gt", str(gt)]) == 2


def test_learned_metric_without_pyiqa(folders, monkeypatch, capsys):
    gt, pred, _ = folders
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4", "--metrics", "psnr,lpips"])
    assert rc == 2 and "blindsr[metrics]" in capsys.readouterr().err


def test_recursive_pairs_by_relative_path(tmp_path, capsys):
    rng = np.random.default_rng(5)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for sub in ("set5", "set14"):
        g = _img(rng)
        _save(gt / sub / "img.png", g)
        _save(pred / sub / "img.png", g)  # identical: PSNR inf
    assert main(["eval", "--pred", str(pred), "--gt", str(gt)]) == 2  # nothing at the top level
    capsys.readouterr()
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--recursive", "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["name"] for r in data["images"]) == ["set14/img", "set5/img"]
    assert data["mean"]["psnr"] == "inf" and data["mean"]["ssim"] == 1.0
    assert "inf" in capsys.readouterr().out
    assert math.isinf(float(data["images"][0]["psnr"]))


def test_learned_metrics_through_fake_pyiqa(folders, tmp_path, monkeypatch, capsys):
    """The call path with a stand-in pyiqa: weights checked, per-image LPIPS column, dataset-level FID."""
    import types

    import torch

    gt, pred, _ = folders
    calls = []

    def create_metric(name, device=None, **opts):
        def net(*args):
            calls.append((name, args))
            return torch.tensor(7.0) if isinstance(args[0], str) else (args[0] - args[1]).abs().mean((1, 2, 3))
        net.lower_better = True
        return net

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    weights = tmp_path / "weights"
    args = ["eval", "--pred", str(pred), "--gt", str(gt), "--pred-suffix", "_x4", "--crop-border", "2",
            "--metrics", "psnr,lpips,fid", "--weights-dir", str(weights), "--device", "cpu",
            "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")]
    assert main(args) == 2
    assert "LPIPS_v0.1_alex-df73285e.pth" in capsys.readouterr().err and not calls
    for rel in ("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth",
                "pyiqa/pt_inception-2015-12-05-6726825d.pth"):
        (weights / "hub" / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / "hub" / rel).write_bytes(b"x")
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["dataset"] == {"fid": 7.0} and all(0 < r["lpips"] < 0.2 for r in data["images"])
    lp = [a for n, a in calls if n == "lpips"]
    assert len(lp) == 3 and lp[0][0].shape == (1, 3, 20, 24)  # 24x28 cropped by 2 on each side
    assert ("fid", (str(pred), str(gt))) in calls
    assert "fid (dataset): 7.0000" in (tmp_path / "r.md").read_text()
