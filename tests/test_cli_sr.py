"""``blindsr sr`` end to end on a tiny random MCFormer checkpoint (few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.cli.main import main
from blindsr.methods import blinddiff
from blindsr.methods.blinddiff import BlindDiffConfig, BlindDiffPipeline, save_pipeline
from blindsr.models.mcformer import MCFormer, MCFormerConfig


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    # v-prediction, like the shipped models: an untrained eps model at 3 steps amplifies x0 by 1/sqrt(abar)
    # (~160x) and its samples overflow float32
    save_pipeline(BlindDiffPipeline(MCFormer(MCFormerConfig.tiny()), BlindDiffConfig(sample_steps=2, prediction="v")),
                  path)
    return path


def _img(path, shape, mode=None, seed=0):
    a = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    Image.fromarray(a, mode).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    _img(d / "rgb.png", (10, 12, 3))
    _img(d / "gray.png", (8, 9))
    _img(d / "rgba.png", (8, 8, 4), seed=2)
    _img(d / "sub" / "deep.png", (8, 8, 3), seed=3)
    (d / "notes.txt").write_text("not an image")
    return d


def test_sr_folder_end_to_end(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sr", str(inputs), "--ckpt", str(ckpt), "-o", str(out), "--save-kernel", "--seed", "3",
               "--device", "cpu", "--recursive", "--batch-size", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 4
    assert any(line.startswith("rgb.png: 12x10 -> 48x40") for line in lines)
    rgb = Image.open(out / "rgb.png")
    assert rgb.size == (48, 40) and rgb.mode == "RGB"
    gray = Image.open(out / "gray.png")
    assert gray.size == (36, 32) and gray.mode in ("L", "I;16")  # gray in, gray out
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA" and rgba.size == (32, 32)
    assert (out / "sub" / "deep.png").is_file()  # sub-folders of a folder input are kept
    k = np.load(out / "rgb_kernel.npy")
    assert k.shape == (21, 21) and k.sum() == pytest.approx(1.0, abs=1e-4)
    assert (out / "rgb_kernel.png").is_file()
    # same seed, same result, whatever the batch: rerun one image alone
    out2 = tmp_path / "out2"
    assert main(["sr", str(inputs / "rgb.png"), "--ckpt", str(ckpt), "-o", str(out2), "--seed", "3",
                 "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out2 / "rgb.png")), np.asarray(rgb))
    # --kernel-estimate model: the same image, the model's own last-step kernel instead of the fitted Gaussian
    out3 = tmp_path / "out3"
    assert main(["sr", str(inputs / "rgb.png"), "--ckpt", str(ckpt), "-o", str(out3), "--seed", "3", "--device",
                 "cpu", "--save-kernel", "--kernel-estimate", "model"]) == 0
    assert np.array_equal(np.asarray(Image.open(out3 / "rgb.png")), np.asarray(rgb))
    k_model = np.load(out3 / "rgb_kernel.npy")
    assert k_model.sum() == pytest.approx(1.0, abs=1e-4) and not np.allclose(k_model, k, atol=1e-3)


def test_sr_refuses_existing_outputs_and_keeps_going(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sr", str(inputs / "rgb.png"), str(inputs / "gray.png"), "--ckpt", str(ckpt), "-o", str(out),
            "--lambda", "0"]
    assert main(args) == 0
    before = (out / "rgb.png").read_bytes()
    (out / "gray.png").unlink()
    assert main(args) == 3  # rgb.png exists -> fails, gray.png is written again
    err = capsys.readouterr().err
    assert "output exists" in err and (out / "gray.png").is_file()
    assert (out / "rgb.png").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0


def test_sr_save_trajectory(ckpt, inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["sr", str(inputs / "rgb.png"), "--ckpt", str(ckpt), "-o", str(out), "--save-trajectory",
                 "--steps", "3", "--lambda", "0"]) == 0
    assert np.load(out / "rgb_kernels.npy").shape == (3, 21, 21)
    assert Image.open(out / "rgb_trajectory.png").size[0] > 48


def test_sr_never_writes_over_an_input(ckpt, tmp_path, capsys):
    img = _img(tmp_path / "x.png", (8, 8, 3))
    before = img.read_bytes()
    rc = main(["sr", str(img), "--ckpt", str(ckpt), "-o", str(tmp_path), "--overwrite", "--lambda", "0"])
    assert rc == 2 and "input" in capsys.readouterr().err
    assert img.read_bytes() == before


def test_sr_errors(ckpt, tmp_path, capsys, monkeypatch):
    good = _img(tmp_path / "good.png", (8, 8, 3))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    out = tmp_path / "out"
    assert main(["sr", str(bad), str(good), "--ckpt", str(ckpt), "-o", str(out), "--lambda", "0"]) == 3
    err = capsys.readouterr().err
    assert "bad.png" in err and (out / "good.png").is_file() and not (out / "bad.png").exists()

    assert main(["sr", str(good), "--ckpt", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

    monkeypatch.setattr(blinddiff.pipeline, "default_model_path", lambda: tmp_path / "none.safetensors")
    assert main(["sr", str(good), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "default BlindDiff model is not installed" in err and len(err.strip().splitlines()) == 1

    assert main(["sr", str(tmp_path / "nothing-here"), "--ckpt", str(ckpt)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inputs_with_the_same_output_name_are_refused_before_work(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    img.save(src / "ok.png")
    img.save(src / "ok.bmp")
    rc = main(["sr", str(src), "-o", str(tmp_path / "out"), "--ckpt", str(ckpt), "--device", "cpu", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "would both be written" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_processes_split_a_folder_each_image_once(ckpt, tmp_path):
    """Two processes (WORLD_SIZE/RANK as accelerate launch sets them) share a folder: every image exactly once,
    byte-identical to a single-process run."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"{i}.png")
    base = [sys.executable, "-m", "blindsr.cli.main", "sr", str(src), "--ckpt", str(ckpt), "--device", "cpu",
            "--quiet", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*base, "-o", str(tmp_path / "one")], check=True, env=env)
    procs = [subprocess.Popen([*base, "-o", str(tmp_path / "two")], env={**env, "WORLD_SIZE": "2", "RANK": str(r),
                                                                          "LOCAL_RANK": str(r)})
             for r in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == ["0.png", "1.png", "2.png"] == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_process_shard_reads_the_launcher_variables(monkeypatch):
    from blindsr.cli.common import process_shard

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_shard() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")  # inconsistent: treated as a single process
    assert process_shard() == (0, 1, 0)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_shard() == (2, 4, 0)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "lots"])
def test_max_memory_values_are_checked(ckpt, tmp_path, capsys, value):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rc = main(["sr", str(img), "-o", str(tmp_path / "out"), "--ckpt", str(ckpt), "--device", "cpu",
               "--max-memory", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--max-memory" in err and len(err.splitlines()) == 1


def test_sr_model_list_and_choice_errors(ckpt, tmp_path, capsys):
    from blindsr.weights import DEFAULT_MODEL, EMBEDDED

    with pytest.raises(SystemExit) as e:
        main(["sr", "--model", "list"])
    listed = capsys.readouterr().out
    assert e.value.code == 0 and f"{DEFAULT_MODEL} (default)" in listed
    assert all(name in listed for name in EMBEDDED)
    with pytest.raises(SystemExit) as e:
        main(["sr", "x.png", "--model", "nope"])
    assert e.value.code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    img = _img(tmp_path / "x.png", (8, 8, 3))
    assert main(["sr", str(img), "--model", "blinddiff-s", "--ckpt", str(ckpt), "-o", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err


def test_sr_compile_same_output_and_missing_compiler(ckpt, tmp_path, capsys, monkeypatch):
    """``--compile`` (torch.compile'd blocks) writes what the eager run writes (within one 8-bit level); without
    a C++ compiler it is a one-line error before any work."""
    from blindsr.device import check_compiler
    from blindsr.errors import BlindSRError

    try:
        check_compiler(torch.device("cpu"))
    except BlindSRError as e:
        pytest.skip(str(e))
    src = _img(tmp_path / "small.png", (4, 4, 3), seed=5)  # 16x16 HR: the shapes of test_mcformer's compile test
    outs = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"out{len(outs)}"
        assert main(["sr", str(src), "--ckpt", str(ckpt), "-o", str(out), "--device", "cpu", *extra]) == 0
        outs.append(np.asarray(Image.open(out / "small.png")).astype(int))
    capsys.readouterr()
    assert np.abs(outs[0] - outs[1]).max() <= 1
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert main(["sr", str(src), "--ckpt", str(ckpt), "-o", str(tmp_path / "out9"), "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["blindsr: error: --compile on the CPU needs a C++ compiler (no-such-compiler-xyz) on PATH; "
                   "install one (e.g. apt-get install g++) or drop --compile"]
    assert not (tmp_path / "out9").exists()


def test_sr_compile_without_python_headers_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    """Inductor's C++ kernels include Python.h: without the headers, one line and exit code 2, before any work."""
    import sysconfig

    from blindsr.device import check_compiler
    from blindsr.errors import BlindSRError

    try:  # with a compiler and the real headers; otherwise another line fires first
        check_compiler(torch.device("cpu"))
    except BlindSRError as e:
        pytest.skip(str(e))
    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "include"
                        else real(name, *a, **k))
    src = _img(tmp_path / "small.png", (4, 4, 3), seed=5)
    assert main(["sr", str(src), "--ckpt", str(ckpt), "-o", str(tmp_path / "out"), "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blindsr: error: --compile on the CPU needs Python's C headers ({tmp_path / 'Python.h'} is "
                   "missing); install them (e.g. apt-get install python3-dev) or drop --compile"]
    assert not (tmp_path / "out").exists()
