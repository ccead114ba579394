"""The web page's work without a browser (blindsr.web.jobs): uploads, a job with progress and cancel, outputs as
the CLI writes them, and the CLI line that reproduces a job. Needs no Gradio."""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.web import jobs

REPO = Path(__file__).resolve().parents[1]
ZEBRA = REPO / "examples" / "lr" / "zebra_g8sigma2.6_x4.png"


def _png(path: Path, h: int = 20, w: int = 24, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 256, (h, w, ch), dtype=np.uint8), mode).save(path)
    return path


def test_safe_name_keeps_base_names_only_and_unique_stems():
    taken: set[str] = set()
    assert jobs.safe_name("../../etc/passwd", taken) == "passwd"
    assert jobs.safe_name("C:\\x\\photo 1.png", taken) == "photo_1.png"
    assert jobs.safe_name("photo_1.jpg", taken) == "photo_1_2.jpg"  # same stem: two outputs would collide
    assert jobs.safe_name("PHOTO_1.png", taken) == "PHOTO_1_3.png"  # case-insensitive file systems
    assert jobs.safe_name("..", taken) == "image"
    assert jobs.safe_name(".hidden.png", taken) == "hidden.png"


def test_gather_inputs_unpacks_zips_safely(tmp_path):
    a = _png(tmp_path / "a.png")
    z = tmp_path / "batch.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(zipfile.ZipInfo("../../escape.png"), a.read_bytes())  # traversal: only the base name counts
        zf.write(a, "sub/a.png")  # same stem as the loose a.png: renamed, not overwritten
        zf.write(a, "__MACOSX/._a.png")
        zf.writestr("notes.txt", "not an image")
    notes_txt = tmp_path / "readme.png"
    notes_txt.write_text("a text file renamed .png")
    items, notes = jobs.gather_inputs([a, z, notes_txt], tmp_path / "in")
    names = [n for n, _ in items]
    assert names == ["a.png", "escape.png", "a.png", "readme.png"]
    copies = [p for _, p in items]
    assert all(p.parent == tmp_path / "in" for p in copies)
    assert len({p.stem.lower() for p in copies}) == 4
    assert notes == []
    assert not (tmp_path / "escape.png").exists()


def test_gather_inputs_refuses_zip_bombs_and_bad_zips(tmp_path, monkeypatch):
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.png", b"\0" * 10_000)
    monkeypatch.setattr(jobs, "MAX_ZIP_BYTES", 1000)
    items, notes = jobs.gather_inputs([big], tmp_path / "in")
    assert items == [] and "more than" in notes[0] and notes[0].startswith("big.zip:")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("a.txt", "x")
    items, notes = jobs.gather_inputs([empty], tmp_path / "in2")
    assert items == [] and "without images" in notes[0]


def test_gather_inputs_caps_the_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_BATCH", 2)
    files = [_png(tmp_path / f"{i}.png") for i in range(3)]
    items, notes = jobs.gather_inputs(files, tmp_path / "in")
    assert len(items) == 2 and "at most 2" in notes[0]


def test_tracker_reports_fraction_eta_and_cancels():
    seen = []
    t = jobs.Tracker(2, lambda f, s: seen.append((f, s)))
    t.start_image(0, "a.png")
    t.report(0, 4)
    t.report(2, 4)
    assert seen[-1][0] == pytest.approx(0.25) and "ETA" in seen[-1][1] and "image 1/2 (a.png): 2/4" in seen[-1][1]
    t.end_image()
    t.start_image(1, "b.png")
    t.report(4, 4)
    assert seen[-1][0] == pytest.approx(1.0)
    t.cancel.set()
    with pytest.raises(jobs.Cancelled):
        t.report(1, 4)


def test_progress_callable_reaches_the_sampling_loop():
    """ops.progress: a callable gets (0, n) then every step, and raising from it stops the sampling."""
    from blindsr.diffusion.gaussian import GaussianDiffusion
    from blindsr.diffusion.samplers import ModelOutput, make_stepper, sample
    from blindsr.diffusion.schedules import get_betas

    base = GaussianDiffusion(get_betas("linear", 100))
    stepper = make_stepper("ddim", base, 5)

    def fn(x, t):
        return ModelOutput(pred=torch.zeros_like(x), kind="eps")

    calls = []
    sample(fn, torch.zeros(1, 3, 4, 4), stepper, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(i, 5) for i in range(6)]

    def stop(d, n):
        if d == 2:
            raise jobs.Cancelled("cancelled")

    with pytest.raises(jobs.Cancelled):
        sample(fn, torch.zeros(1, 3, 4, 4), stepper, progress=stop)


@pytest.fixture(scope="module")
def models():
    return jobs.Models(torch.device("cpu"))


def _run(models, inputs, out, params=None, cancel_after=None):
    seen = []
    tracker = jobs.Tracker(len(inputs), lambda f, s: seen.append((f, s)))
    if cancel_after is not None:
        def sink(f, s):
            seen.append((f, s))
            if len(seen) > cancel_after:
                tracker.cancel.set()
        tracker.sink = sink
    params = params or jobs.BlindDiffParams(steps=1, seed=7)
    return jobs.run_job("blinddiff", params, inputs, out, models, tracker), seen


def test_blinddiff_job_writes_like_the_cli_and_its_cli_line_reproduces_it(tmp_path, models, monkeypatch):
    from blindsr.cli.main import main

    items, _ = jobs.gather_inputs([ZEBRA, _png(tmp_path / "alpha.png", mode="RGBA")], tmp_path / "in")
    res, seen = _run(models, items, tmp_path / "out")
    assert res.errors == [] and not res.cancelled and len(res.images) == 2
    zebra, alpha = res.images
    with Image.open(zebra.output) as im:
        assert im.size == (48 * 4, 48 * 4)
    with Image.open(alpha.output) as im:  # alpha kept, as the CLI keeps it
        assert im.mode == "RGBA" and im.size == (24 * 4, 20 * 4)
    assert zebra.kernel.is_file() and zebra.preview.is_file()
    assert res.peak_bytes > 0 and res.seed == 7
    with zipfile.ZipFile(res.archive) as zf:
        assert sorted(zf.namelist()) == sorted(f.name for r in res.images for f in (r.output, r.kernel))
    fracs = [f for f, _ in seen]
    assert fracs == sorted(fracs) and fracs[-1] == pytest.approx(1.0)
    # the printed line, run in the folder of the inputs, gives the same bytes
    words = res.cli.split()
    assert words[:2] == ["blindsr", "sr"] and "--seed" in words and "--steps" in words
    monkeypatch.chdir(tmp_path / "in")
    out = tmp_path / "cli"
    assert main([*words[1:words.index("-o")], "-o", str(out), *words[words.index("-o") + 2:], "--quiet"]) == 0
    for r in res.images:
        assert (out / r.output.name).read_bytes() == r.output.read_bytes()


def test_bad_inputs_are_reported_by_their_names_and_the_job_goes_on(tmp_path, models):
    text = tmp_path / "notes.png"
    text.write_text("a text file renamed .png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(ZEBRA.read_bytes()[:200])
    items, _ = jobs.gather_inputs([text, empty, truncated, ZEBRA], tmp_path / "in")
    res, _ = _run(models, items, tmp_path / "out")
    assert len(res.images) == 1 and len(res.errors) == 3
    for e, name in zip(res.errors, ["notes.png", "empty.png", "cut.png"], strict=True):
        assert e.startswith(name + ":") and str(tmp_path) not in e and "\n" not in e
    assert "not an image" in res.errors[0]


def test_cancel_stops_the_job_and_keeps_what_was_finished(tmp_path, models):
    items, _ = jobs.gather_inputs([ZEBRA, _png(tmp_path / "b.png")], tmp_path / "in")
    res, _ = _run(models, items, tmp_path / "out", jobs.BlindDiffParams(steps=3), cancel_after=5)
    assert res.cancelled and len(res.images) == 1 and res.images[0].name == ZEBRA.name
    assert not (tmp_path / "out" / "b.png").exists()


def test_diffbir_without_weights_names_the_files_it_needs(monkeypatch, tmp_path):
    monkeypatch.setenv("BLINDSR_CONFIG", str(tmp_path / "none.json"))
    for v in ("BLINDSR_BSRNET", "BLINDSR_SD21", "BLINDSR_DIFFBIR_V2"):
        monkeypatch.delenv(v, raising=False)
    msg = jobs.diffbir_missing(jobs.DiffBIRParams(stage1_only=True, version="v2"), {})
    assert msg and "BLINDSR_BSRNET" in msg
    full = jobs.diffbir_missing(jobs.DiffBIRParams(stage1_only=False, version="v2"), {"cleaner": str(ZEBRA)})
    assert full and "BLINDSR_SD21" in full
    assert jobs.diffbir_missing(jobs.DiffBIRParams(stage1_only=True, version="v2"), {"cleaner": str(ZEBRA)}) is None
    # the pixel backend ignores the server's SD paths (they are for the SD versions)
    pixel = jobs.DiffBIRParams(stage1_only=True)
    assert jobs.diffbir_missing(pixel, {"cleaner": str(ZEBRA), "sd": str(ZEBRA), "controlnet": str(ZEBRA)}) is None


def test_diffbir_stage1_job_runs_with_a_cleaner(tmp_path, models):
    from safetensors.torch import save_file

    from blindsr.models.restorers import RRDBNetConfig, build_restorer

    net = build_restorer("rrdbnet", RRDBNetConfig(nf=8, nb=1, gc=4))
    ckpt = tmp_path / "tiny_rrdb.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, ckpt)
    items, _ = jobs.gather_inputs([_png(tmp_path / "a.png")], tmp_path / "in")
    p = jobs.DiffBIRParams(stage1_only=True, version="v2", cleaner_kind="rrdbnet", seed=3)
    tracker = jobs.Tracker(1, lambda f, s: None)
    res = jobs.run_job("diffbir", p, items, tmp_path / "out", models, tracker, {"cleaner": str(ckpt)})
    assert res.errors == [], res.errors
    assert res.images[0].size_out == (96, 80) and res.images[0].kernel is None
    assert res.cli.startswith("blindsr restore a.png -o out/ --backend sd --version v2 --task sr --cleaner-kind rrdbnet")
    assert res.cli.endswith("--stage1-only")


def test_diffbir_cli_line_leaves_the_guidance_default_to_the_preset():
    default = jobs.DiffBIRParams(stage1_only=False).cli(["a.png"])
    assert "--guidance-scale" not in default  # the preset's own s (1 for pixel) applies, as on the page
    assert "--guidance-scale 0.0" in jobs.DiffBIRParams(stage1_only=False, guidance_scale=0.0).cli(["a.png"])


def test_zoom_pair_shows_the_same_window_of_both(tmp_path):
    a = _png(tmp_path / "a.png", 64, 80, seed=1)
    im = jobs.zoom_pair(a, a, 1.0, 0.0, crop=32, factor=2)
    assert im.size == (2 * 64 + 4, 64)
    arr = np.asarray(im)
    assert (arr[:, :64] == arr[:, 68:]).all()
    src = np.asarray(Image.open(a))[0:32, 48:80]  # clamped to the top-right corner
    assert (arr[::2, :64:2] == src).all()


def test_job_threads_do_not_share_cancel_events():
    a, b = jobs.Tracker(1, lambda *_: None), jobs.Tracker(1, lambda *_: None)
    a.cancel.set()
    assert not b.cancel.is_set() and isinstance(b.cancel, threading.Event)


def test_one_linspace_step_starts_from_pure_noise():
    """--steps 1 predicts x0 at t = T-1 (IDDPM's respacing would keep t = 0 only, and return the noise)."""
    from blindsr.diffusion.samplers import timesteps_for

    assert timesteps_for("linspace", 1, 1000) == [999]
    assert timesteps_for("linspace", 3, 1000) == [0, 500, 999]


def test_web_command_errors_are_one_line(capsys, monkeypatch):
    import importlib.util

    from blindsr.cli.main import main

    assert main(["web", "--port", "0"]) == 2
    assert "--port 0: give a port in 1..65535" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["web"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'needs the "web" extra' in err


def test_dmsr_job_and_what_it_needs(tmp_path, models, tiny_dmsr_checkpoint):
    from blindsr.methods.dmsr import pipeline as dp
    from blindsr.weights import part_path

    assert (jobs.dmsr_missing(None, None) is None) == part_path("dmsr-s").is_file()  # the embedded DM-SR-S
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("blindsr.weights.HERE", tmp_path)  # a copy without it
        assert "--dmsr-encoder FILE" in jobs.dmsr_missing(None, None)
    assert jobs.dmsr_missing(str(tiny_dmsr_checkpoint), None) is None
    pipe = dp.load_pipeline(tiny_dmsr_checkpoint)
    sd_ckpt = dp.save_pipeline(pipe, tmp_path / "sd.safetensors", "sd-turbo")
    assert "--sd-turbo PATH" in jobs.dmsr_missing(str(sd_ckpt), None)
    items, _ = jobs.gather_inputs([_png(tmp_path / "a.png")], tmp_path / "in")
    p = jobs.DMSRParams(steps=2, encoder=str(tiny_dmsr_checkpoint))
    res = jobs.run_job("dmsr", p, items, tmp_path / "out", models, jobs.Tracker(1, lambda f, s: None))
    assert res.errors == [] and res.images[0].size_out == (96, 80) and res.images[0].note.startswith("t̂ ")
    assert res.cli == f"blindsr sr a.png -o out/ --method dmsr --encoder {tiny_dmsr_checkpoint} --steps 2 --seed 0"


def test_16_bit_inputs_come_back_16_bit_and_the_pixel_limit_holds(tmp_path, models, monkeypatch):
    deep = tmp_path / "deep.png"
    Image.fromarray((np.random.default_rng(1).integers(0, 65536, (12, 16))).astype(np.uint16)).save(deep)
    items, _ = jobs.gather_inputs([deep], tmp_path / "in")
    res, _ = _run(models, items, tmp_path / "out")
    with Image.open(res.images[0].output) as im:
        assert im.mode.startswith("I;16") and im.size == (64, 48)  # 16-bit gray in, 16-bit gray out
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "100")  # the CLI's decompression-bomb limit governs the page too
    res, _ = _run(models, items, tmp_path / "out2")
    assert res.images == [] and res.errors[0].startswith("deep.png:") and "limit" in res.errors[0]
