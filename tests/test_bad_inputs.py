"""Bad inputs found by a user trial: each case is refused or reported with one clear ``blindsr:`` line.

Fast: no model runs. ``sr`` gets a stand-in pipeline (bicubic x2) or one that fails the test if it is loaded,
``restore`` a ``from_paths`` that fails the test if called.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr import registry
from blindsr.cli.common import collect_inputs, run_batch
from blindsr.cli.main import main
from blindsr.errors import BlindSRError, ImageError
from blindsr.io.images import check_output_path, list_images, load_image, output_path_for


def _png(path, h=8, w=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


class _FakePipe:
    """Stands in for BlindDiff in ``sr``: nearest x2, no kernel."""

    scale = 2

    def __call__(self, lr, generator=None, **opts):
        sr = torch.nn.functional.interpolate(lr, scale_factor=2, mode="nearest")
        return types.SimpleNamespace(sr=sr, kernel=None, x0_traj=None)


@pytest.fixture
def fake_sr(monkeypatch):
    """``sr`` runs with the stand-in pipeline; returns the list of loads."""
    loads = []

    def resolve(kind, name):
        assert kind == "sr"
        return lambda ckpt, device=None: loads.append(name) or _FakePipe()

    monkeypatch.setattr(registry, "resolve", resolve)
    return loads


@pytest.fixture
def no_model(monkeypatch):
    """``sr`` / ``restore`` must refuse before loading anything."""
    from blindsr.methods.diffbir import DiffBIRPipeline

    def fail(*a, **k):
        pytest.fail("a model was loaded before the bad input was refused")

    monkeypatch.setattr(registry, "resolve", fail)
    monkeypatch.setattr(DiffBIRPipeline, "from_paths", fail)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blindsr: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _no_raw_warnings(err: str) -> None:
    assert "Warning" not in err and "warnings.warn" not in err, err
    assert all(line.startswith(("blindsr:", "  ")) for line in err.strip().splitlines()), err


# ------------------------------------------------------------------ 1. -o naming an input file (or a file)

def test_sr_output_naming_the_input_file_is_refused_before_work(tmp_path, capsys, no_model):
    photo = _png(tmp_path / "photo.png")
    before = photo.read_bytes()
    assert main(["sr", str(photo), "-o", str(photo)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "photo.png" in line and "input" in line and "folder" in line
    assert photo.read_bytes() == before


def test_sr_output_naming_another_file_or_the_input_folder(tmp_path, capsys, no_model):
    photo, other = _png(tmp_path / "in" / "photo.png"), _png(tmp_path / "other.png")
    assert main(["sr", str(photo), "-o", str(other)]) == 2
    assert "not a folder" in _one_error_line(capsys.readouterr().err)
    # a folder of PNGs written into itself: every output would be its own input
    assert main(["sr", str(tmp_path / "in"), "-o", str(tmp_path / "in"), "--overwrite"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "photo.png" in line and "input" in line


def test_restore_output_naming_the_input_file_is_refused_before_work(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setenv("BLINDSR_CONFIG", str(tmp_path / "none.json"))
    photo = _png(tmp_path / "photo.png")
    cleaner = tmp_path / "cleaner.safetensors"
    cleaner.write_bytes(b"x")
    assert main(["restore", str(photo), "-o", str(photo), "--stage1-only", "--cleaner", str(cleaner)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "photo.png" in line and "input" in line


def test_degrade_output_naming_the_input_file(tmp_path, capsys):
    photo = _png(tmp_path / "photo.png", 16, 16)
    before = photo.read_bytes()
    assert main(["degrade", "--preset", "classic", "--input", str(photo), "--output", str(photo)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "photo.png" in line and "input" in line and "--output" in line
    assert photo.read_bytes() == before


def test_output_helpers_refuse_files_as_folders(tmp_path):
    photo = _png(tmp_path / "photo.png")
    with pytest.raises(BlindSRError, match="input"):
        output_path_for(photo, None, photo)
    with pytest.raises(BlindSRError, match="input"):
        output_path_for(photo, tmp_path, tmp_path)  # the output would be the input itself
    assert output_path_for(photo, tmp_path, tmp_path / "out") == tmp_path / "out" / "photo.png"
    with pytest.raises(BlindSRError, match="not a folder"):
        check_output_path(photo / "x.png")  # a writer would fail with NotADirectoryError
    with pytest.raises(BlindSRError, match="not a folder"):
        output_path_for(photo, None, photo / "sub")


# ------------------------------------------------------------------ 2. broken symbolic links in folders

def _folder_with_broken_link(tmp_path):
    d = tmp_path / "in"
    _png(d / "good.png", 16, 16)
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    return d


def test_list_images_reports_broken_links(tmp_path):
    d = _folder_with_broken_link(tmp_path)
    with pytest.warns(UserWarning, match="gone.png"):
        files, skipped = list_images(d)
    assert [f.name for f in files] == ["good.png"] and [s.name for s in skipped] == ["gone.png"]
    with pytest.raises(ImageError, match="broken symbolic link"):
        list_images(d / "gone.png")


def test_sr_names_a_broken_link_in_the_end_of_run_report(tmp_path, capsys, fake_sr):
    d = _folder_with_broken_link(tmp_path)
    assert main(["sr", str(d), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "out" / "good.png").is_file()
    assert "gone.png" in err.strip().splitlines()[-1] and "broken" in err.strip().splitlines()[-1], err


def test_degrade_names_a_broken_link(tmp_path, capsys):
    d = _folder_with_broken_link(tmp_path)
    assert main(["degrade", "--preset", "classic", "--input", str(d), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "gone.png" in err and "broken" in err, err
    _no_raw_warnings(err)


# ------------------------------------------------------------------ 3. degrade: duplicates, warnings, sizes

@pytest.mark.parametrize("overwrite", [False, True])
def test_degrade_refuses_inputs_with_the_same_output_name(tmp_path, capsys, overwrite):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(d / "ok.bmp")
    Image.new("RGB", (16, 16), (200, 10, 30)).save(d / "ok.jpg")
    out = tmp_path / "out"
    argv = ["degrade", "--preset", "classic", "--input", str(d), "--output", str(out)]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "ok.bmp" in line and "ok.jpg" in line and "ok.png" in line
    assert not out.exists()


def _corrupt_exif_jpeg(path):
    """A JPEG whose EXIF block makes Pillow warn "Corrupt EXIF data" (the image itself is fine)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        path, exif=exif.tobytes())
    data = bytearray(path.read_bytes())
    i = data.find(b"Exif")
    data[i + 10:i + 30] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


def test_degrade_leaks_no_raw_warnings(tmp_path, capsys):
    d = tmp_path / "in"
    _png(d / "good.png", 16, 16)
    (d / "notes.txt").write_text("not an image")
    _corrupt_exif_jpeg(d / "exif.jpg")
    assert main(["degrade", "--preset", "classic", "--input", str(d), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    _no_raw_warnings(err)
    assert "notes.txt" in err and "exif.jpg" in err  # both reported, as blindsr lines naming the file


def test_load_image_warning_names_the_file(tmp_path):
    path = _corrupt_exif_jpeg(tmp_path / "exif.jpg")
    with pytest.warns(UserWarning, match="exif.jpg") as record:
        img = load_image(path)
    assert img.rgb.shape == (3, 16, 16) and len(record) == 1  # broken EXIF: orientation ignored


def test_degrade_too_small_names_the_file(tmp_path, capsys):
    d = tmp_path / "in"
    _png(d / "tiny.png", 1, 1)
    _png(d / "good.png", 16, 16)
    assert main(["degrade", "--preset", "classic", "--input", str(d), "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("blindsr: error:")]
    assert len(errors) == 1 and "tiny.png" in errors[0] and "1x1" in errors[0], err


# ------------------------------------------------------------------ 4. eval

def test_eval_messages(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _png(gt / "a.png", 16, 16)
    _png(pred / "a.png", 16, 16, seed=1)
    _png(gt / "b.png", 16, 16)
    _png(pred / "b.png", 16, 12, seed=1)
    (pred / "notes.txt").write_text("x")
    assert main(["eval", "--pred", str(pred), "--gt", str(gt)]) == 3
    err = capsys.readouterr().err
    _no_raw_warnings(err)
    assert "notes.txt" in err
    size = [line for line in err.splitlines() if line.startswith("blindsr: error:") and "size" in line]
    assert len(size) == 1 and str(pred / "b.png") in size[0] and str(gt / "b.png") in size[0], err

    assert main(["eval", "--pred", str(pred / "a.png"), "--gt", str(gt)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--pred {pred / 'a.png'} is a file" in line and f"--gt {gt} is a folder" in line
    assert main(["eval", "--pred", str(pred), "--gt", str(gt / "a.png")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--pred {pred} is a folder" in line and f"--gt {gt / 'a.png'} is a file" in line


# ------------------------------------------------------------------ 5. BLINDSR_MAX_PIXELS governs Pillow's ceiling

def test_max_pixels_setting_governs_pillows_ceiling(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", 20, 20)  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # simulate Pillow's ceiling (2 x 50 = 100 pixels)
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "1000")
    assert load_image(path).rgb.shape == (3, 20, 20)  # raised past Pillow's ceiling
    assert load_image(path, max_pixels=400).rgb.shape == (3, 20, 20)
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "300")
    with pytest.raises(ImageError, match="BLINDSR_MAX_PIXELS") as e:
        load_image(path)
    assert "20x20" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "150")  # a small limit under Pillow's: ours still applies
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 10**9  # Pillow's setting is restored


def test_max_pixels_far_over_a_lowered_pillow_ceiling_is_our_message(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", 40, 40)  # 1600 pixels, > 2 x 300: Pillow's own check would raise
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    monkeypatch.setenv("BLINDSR_MAX_PIXELS", "300")
    with pytest.raises(ImageError, match="BLINDSR_MAX_PIXELS"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == 50


# ------------------------------------------------------------------ 6. explicit non-images, summary lines

def test_sr_explicit_non_image_is_one_line(tmp_path, capsys, no_model):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main(["sr", str(notes)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{notes}: not an image (" in line and "no images found" not in line and "skipped" not in line
    fake = tmp_path / "fake.png"
    fake.write_text("not a png either")
    assert main(["sr", str(fake)]) == 2
    assert f"{fake}: not an image (" in _one_error_line(capsys.readouterr().err)


def test_sr_explicit_non_image_beside_images(tmp_path, capsys, fake_sr):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    good = _png(tmp_path / "good.png")
    assert main(["sr", str(notes), str(good), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{notes}: not an image (" in err and (tmp_path / "out" / "good.png").is_file()
    assert f"{notes}: {notes}" not in err


def test_summary_lines_name_each_input_once(tmp_path, capsys, fake_sr):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    good = _png(tmp_path / "good.png")
    assert main(["sr", str(bad), str(good), "-o", str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"  {bad}: not an image" in err and f"{bad}: {bad}" not in err, err
    # messages that do not name the input get it as a prefix, once
    assert main(["sr", str(good), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"blindsr: error: {good}: {tmp_path / 'out' / 'good.png'}: output exists" in err, err


def test_run_batch_formatting(capsys):
    def fn(item):
        raise BlindSRError(f"{item}: broken" if item == "a.png" else "too small")

    assert run_batch(["a.png", "b.png"], fn) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["blindsr: error: a.png: broken", "blindsr: error: b.png: too small",
                   "blindsr: 2 of 2 input(s) failed:", "  a.png: broken", "  b.png: too small"]


def test_collect_inputs_keeps_order_and_reports(tmp_path, capsys):
    d = _folder_with_broken_link(tmp_path)
    (d / "notes.txt").write_text("x")
    one = _png(tmp_path / "one.png")
    items = collect_inputs([str(one), str(d)], recursive=False)
    assert [(f.name, r) for f, r in items] == [("one.png", None), ("good.png", d)]
    err = capsys.readouterr().err
    assert "notes.txt" in err and "gone.png" in err and "broken" in err


def test_real_stderr_has_no_raw_warnings(tmp_path):
    """Outside pytest's warning capture: what a user sees on stderr is blindsr lines only."""
    import subprocess
    import sys

    d = tmp_path / "in"
    _png(d / "good.png", 16, 16)
    (d / "notes.txt").write_text("not an image")
    _corrupt_exif_jpeg(d / "exif.jpg")
    r = subprocess.run([sys.executable, "-m", "blindsr.cli.main", "degrade", "--preset", "classic", "--input",
                        str(d), "--output", str(tmp_path / "out"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _no_raw_warnings(r.stderr)
    assert f"blindsr: warning: {d / 'exif.jpg'}: Corrupt EXIF data" in r.stderr, r.stderr
    assert "notes.txt" in r.stderr


def test_nan_weights_are_refused_at_load(tmp_path, capsys):
    """A checkpoint with NaN/inf is one line at load time, before any sampling (also with --lambda 0)."""
    from blindsr.methods.blinddiff import BlindDiffConfig, BlindDiffPipeline, save_pipeline
    from blindsr.models.mcformer import MCFormer, MCFormerConfig

    model = MCFormer(MCFormerConfig.tiny())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_pipeline(BlindDiffPipeline(model, BlindDiffConfig(sample_steps=2)), ckpt)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rc = main(["sr", str(img), "-o", str(tmp_path / "out"), "--ckpt", str(ckpt), "--lambda", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "NaN/inf" in err and len(err.splitlines()) == 1


def test_raw_pickle_is_one_line(tmp_path, capsys):
    import pickle

    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    rc = main(["weights", "inspect", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "warning" not in err
