"""``blindsr train uddm``: a tiny run on unpaired folders -- each sub-step updates its own module, exports, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blindsr.cli.main import main
from blindsr.io.weights import load_safetensors_metadata, load_state_dict
from blindsr.methods.uddm import recipe as ur
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "uddm_tiny.yaml")


@pytest.fixture()
def folders(make_hr_folder, tmp_path) -> tuple[Path, Path]:
    hr = make_hr_folder(3, 48, 56)
    from PIL import Image
    lr = tmp_path / "real-lr"
    lr.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(lr / f"photo{i}.png")
    return lr, hr


def train(out: Path, folders, *extra: str) -> int:
    lr, hr = folders
    return main(["train", "uddm", "--config", TINY, "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"data.root={hr}", "--set", f"data.lr_root={lr}", *extra])


def losses(run: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items() if "/" in k} for r in read_csv(run / "log.csv")]  # loss terms


def test_each_sub_step_trains_its_own_module_and_resume_is_exact(tmp_path, folders, monkeypatch):
    seen = {}
    real = ur.uddm_recipe

    def spy(cfg):
        r = real(cfg)
        seen["before"] = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in r.modules.items()}
        seen["recipe"] = r
        return r
    monkeypatch.setattr(ur, "uddm_recipe", spy)  # the registry resolves "module:attr" at call time
    full = tmp_path / "full"
    assert train(full, folders) == 0
    rows = losses(full)
    assert len(rows) == 3 and set(rows[0]) == {"ddm/loss", "d/loss", "pddm/loss", "pddm/rec", "pddm/adv",
                                                 "pddm/live"}
    final = {"ddm": load_state_dict(full / "final.safetensors"),
             "pddm": load_state_dict(full / "final_pddm.safetensors")}
    for name in ("ddm", "pddm"):  # both learnt
        assert any(not torch.equal(v, seen["before"][name][k]) for k, v in final[name].items()), name
    meta = load_safetensors_metadata(full / "final.safetensors")
    assert meta["method"] == "uddm" and '"s": 4' in meta["config"]
    part = tmp_path / "part"
    assert train(part, folders, "--max-steps", "2") == 0
    assert train(part, folders, "--resume", "auto") == 0
    assert losses(part) == rows
    off = tmp_path / "off"  # the live-range penalty is 0 while P-DDM's heads are in range: the same run exactly
    assert train(off, folders, "--set", "loss.live=0") == 0
    assert all(r.pop("pddm/live") == 0 for r in rows) and losses(off) == rows
    assert all(torch.equal(v, final["pddm"][k]) for k, v in load_state_dict(off / "final_pddm.safetensors").items())


def test_the_sub_steps_touch_only_their_modules(tmp_path, folders):
    from blindsr.train.config import load_config

    lr, hr = folders
    cfg = load_config(TINY, [f"data.root={hr}", f"data.lr_root={lr}"])
    r = ur.uddm_recipe(cfg)
    batch = {"lr": torch.rand(2, 3, 8, 8), "hr": torch.rand(2, 3, 32, 32)}
    for sub in r.steps:
        for m in r.modules.values():
            m.zero_grad(set_to_none=True)
        sub.loss_fn(r.modules, batch, torch.Generator().manual_seed(0), 0)["loss"].backward()
        got = {n for n, m in r.modules.items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                       for p in m.parameters())}
        # D's loss sees P-DDM's output detached; P-DDM's adversarial term reaches D's weights, but only P-DDM
        # is stepped by that sub-step (the trainer zeroes every module's gradients after each sub-step)
        expected = {"ddm": {"ddm"}, "d": {"discriminator"}, "pddm": {"pddm", "discriminator"}}[sub.name]
        assert got == expected, (sub.name, got)
        assert sub.update == {"ddm": ("ddm",), "d": ("discriminator",), "pddm": ("pddm",)}[sub.name]


def test_config_errors(tmp_path, folders, capsys):
    assert train(tmp_path / "a", folders, "--set", "data.lr_root=null") == 2
    assert "data.lr_root" in capsys.readouterr().err
    assert train(tmp_path / "b", folders, "--set", "data.crop=36") == 2
    assert "multiple" in capsys.readouterr().err
    assert train(tmp_path / "c", folders, "--set", "model.pddm.scale=2") == 2
    assert "differs from data.scale" in capsys.readouterr().err


def test_fusion_is_eq1_and_the_preset_writes_pairs_like_every_other(tmp_path, folders):
    import json

    from blindsr.methods.uddm.model import load_uddm

    run = tmp_path / "run"
    assert train(run, folders) == 0
    model = load_uddm(run)
    hr = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(3))

    def g() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(2)]
    ddm, pddm, mix = model(hr, 0.0, g()), model(hr, 1.0, g()), model(hr, 0.5, g())
    assert ddm.shape == pddm.shape == (2, 3, 8, 10) and not torch.allclose(ddm, pddm)
    # each part draws from its own copy of the generators here, the fused call from one: compare piece by piece
    from blindsr.methods.uddm.ddm import condition, synthesize
    gg = g()
    d_part = synthesize(model.ddm, model.ddm_config, condition(hr, 16, (8, 10)), gg)
    p_part = model.pddm(hr, gg)
    assert torch.allclose(mix, (0.5 * d_part + 0.5 * p_part).clamp(0, 1), atol=1e-6)
    assert torch.allclose(ddm, d_part, atol=1e-6)
    out = tmp_path / "pairs"
    _, hr_dir = folders
    assert main(["degrade", "--preset", "uddm", "--ckpt", str(run), "--w", "0.5", "--set", "steps=2",
                 "--input", str(hr_dir), "--output", str(out), "--save-kernels"]) == 0
    names = sorted(p.name for p in (out / "lr").iterdir())
    assert names == sorted(p.name for p in (out / "hr").iterdir()) and len(names) == 3
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["params"]["w"] == 0.5
    assert json.loads((out / "preset.json").read_text())["preset"] == "uddm"
    assert (out / "kernels").is_dir()
    # a long image shows the reverse diffusion's own progress: one report per DDM step
    from blindsr.degradations.pipelines import get_preset
    deg, reports = get_preset("uddm", ckpt=str(run), w=0.5, steps=3), []
    deg.progress = lambda done, total: reports.append((done, total))
    deg(hr, torch.Generator().manual_seed(0))
    assert reports == [(i, 3) for i in range(4)]


def test_the_preset_refuses_a_missing_model(tmp_path, folders, capsys):
    _, hr_dir = folders
    assert main(["degrade", "--preset", "uddm", "--input", str(hr_dir), "--output", str(tmp_path / "o")]) == 2
    assert "--set ckpt=" in capsys.readouterr().err
    assert main(["degrade", "--preset", "classic", "--w", "0.5", "--input", str(hr_dir), "--output",
                 str(tmp_path / "o")]) == 2
    assert "--preset uddm only" in capsys.readouterr().err
    assert main(["degrade", "--preset", "uddm", "--set", f"ckpt={tmp_path}", "--input", str(hr_dir),
                 "--output", str(tmp_path / "o2")]) != 0
    err = capsys.readouterr().err
    assert "UDDM weights not found" in err and err.count("\n") == 1, err


def test_uddm_fit_command(tmp_path, folders, capsys):
    lr, hr = folders
    tiny = ["--set", "model.ddm.preset=tiny", "--set", "model.pddm.width=8", "--set", "model.pddm.blocks=1",
            "--set", "model.discriminator.width=8", "--set", "data.crop=32", "--set", "data.batch_size=2",
            "--set", "data.cache=false", "--set", "train.max_steps=2"]
    run = tmp_path / "cam"
    assert main(["uddm", "fit", "--real-lr", str(lr), "--hr", str(hr), "-o", str(run), "--no-progress",
                 "--device", "cpu", *tiny]) == 0
    assert "blindsr degrade --preset uddm" in capsys.readouterr().out
    assert (run / "final.safetensors").is_file() and (run / "final_pddm.safetensors").is_file()
    assert main(["uddm", "fit", "--real-lr", str(tmp_path / "none"), "--hr", str(hr), "-o", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--real-lr" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["uddm", "fit", "--real-lr", str(empty), "--hr", str(hr), "-o", str(tmp_path / "e"), *tiny]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err


def test_adapt_runs_the_three_steps_and_the_report_and_resumes(tmp_path, folders, capsys):
    import json

    lr, hr = folders
    fit = ["model.ddm.preset=tiny", "model.pddm.width=8", "model.pddm.blocks=1", "model.discriminator.width=8",
           "data.crop=32", "data.batch_size=2", "data.cache=false", "train.max_steps=2"]
    srn = ["model.preset=tiny", "data.crop=32", "data.batch_size=2", "train.max_steps=2"]
    argv = ["adapt", "--real-lr", str(lr), "--hr", str(hr), "-o", str(tmp_path / "m"), "--steps", "2",
            "--no-progress", "--device", "cpu", *[x for s in fit for x in ("--fit-set", s)],
            *[x for s in srn for x in ("--srnet-set", s)]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    m = tmp_path / "m"
    for f in ("uddm/final.safetensors", "uddm/final_pddm.safetensors", "pairs/preset.json", "srnet/final.safetensors",
              "report/report.md", "report/distribution.png", "report/side_by_side.png", "adapt.json"):
        assert (m / f).is_file(), f
    swd = json.loads((m / "adapt.json").read_text())["swd"]
    assert set(swd) == {"UDDM", "realesrgan"} and all(v > 0 for v in swd.values())
    assert "blindsr sr --ckpt" in out
    before = (m / "srnet" / "final.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # finished steps are skipped
    assert "1/4" not in capsys.readouterr().out and (m / "srnet" / "final.safetensors").stat().st_mtime_ns == before


def test_fit_takes_gray_16_bit_tiny_and_mixed_size_photos(tmp_path, folders):
    """Real LR photos as they come: 16-bit gray, smaller than the crop (reflect-padded), any sizes."""
    import numpy as np
    from PIL import Image

    _, hr = folders
    lr = tmp_path / "odd"
    lr.mkdir()
    Image.fromarray((np.random.default_rng(0).random((30, 26)) * 65535).astype(np.uint16)).save(lr / "gray16.png")
    Image.fromarray((np.random.default_rng(1).random((5, 6, 3)) * 255).astype(np.uint8)).save(lr / "tiny.png")
    Image.fromarray((np.random.default_rng(2).random((40, 17, 3)) * 255).astype(np.uint8)).save(lr / "tall.jpg")
    assert train(tmp_path / "r", (lr, hr), "--max-steps", "2") == 0
    assert (tmp_path / "r" / "final_pddm.safetensors").is_file()


def test_fit_on_one_photo_and_refuses_an_empty_folder(tmp_path, folders, capsys):
    """A camera with one LR photo still trains (crops repeat); an empty real-LR folder is one error line."""
    lr, hr = folders
    one = tmp_path / "one"
    one.mkdir()
    (one / "photo0.png").write_bytes((lr / "photo0.png").read_bytes())
    assert train(tmp_path / "r1", (one, hr), "--max-steps", "2") == 0
    assert len(losses(tmp_path / "r1")) >= 1 and (tmp_path / "r1" / "final_pddm.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert train(tmp_path / "r2", (empty, hr), "--max-steps", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0]
