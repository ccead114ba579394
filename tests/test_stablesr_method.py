"""StableSR as an SR method (tiny StableSR, random weights, CPU): the pipeline (x4, [0, 1], seeded, batch-independent,
the official padding, pixel tiles blend exactly, latent tiles run, colour fix, input_size), the official
checkpoints through the fixture (CFW at dec_w 0 = the SD decoder), the recipe (only encoder + SPADE learn, exact
resume, export -> load_pipeline), ``blindsr sr --method stablesr`` and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.cli.main import main
from blindsr.errors import BlindSRError, WeightsError
from blindsr.io.weights import load_safetensors_metadata, load_state_dict
from blindsr.methods.stablesr import (
    StableSRInference,
    StableSRModel,
    StableSRPipeline,
    load_pipeline,
    official_pad,
)
from blindsr.methods.stablesr import pipeline as sp
from blindsr.methods.stablesr import recipe as sr_recipe
from blindsr.methods.uddm import ddm_stablesr as S
from blindsr.train.logging import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "stablesr_tiny.yaml")
FAST = StableSRInference(input_size=0, steps=3, tile=0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> StableSRPipeline:
    return StableSRPipeline(S.build_ddm_net(StableSRModel(size="tiny")), None, FAST)


def frozen_state(net: S.StableSRDDMNet) -> dict[str, torch.Tensor]:
    unet = {f"unet.{k}": v.clone() for k, v in net.frozen.unet.unet.state_dict().items() if ".spade." not in k}
    return unet | {f"vae.{k}": v.clone() for k, v in net.frozen.vae.state_dict().items()}


# ------------------------------------------------------------------------------------------------ pipeline
def test_output_is_x4_in_range_seeded_and_batch_independent(pipe):
    a, b = torch.rand(1, 3, 12, 16, generator=gen(1)), torch.rand(1, 3, 12, 16, generator=gen(2))
    one = pipe(a, generator=[gen(0)]).sr
    assert one.shape == (1, 3, 48, 64) and one.min() >= 0 and one.max() <= 1
    assert torch.equal(one, pipe(a, generator=[gen(0)]).sr)  # seeded
    pair = pipe(torch.cat([b, a]), generator=[gen(5), gen(0)]).sr
    assert torch.allclose(pair[1:], one, atol=1e-5)  # image i depends on its own generator only
    assert (pipe(a, generator=[gen(1)]).sr - one).abs().max() > 1e-3  # the seed matters
    assert (pipe(b, generator=[gen(0)]).sr - one).abs().max() > 1e-3  # and the input
    odd = pipe(torch.rand(1, 3, 7, 9, generator=gen(3)), generator=gen(0)).sr
    assert odd.shape == (1, 3, 28, 36)  # any size: padded (official, then to whole latent levels), cropped back
    reports = []
    pipe(a, generator=gen(0), steps=2, progress=lambda done, total: reports.append((done, total)))
    assert reports == [(0, 2), (1, 2), (2, 2)]


def test_official_padding():
    x = torch.rand(1, 3, 40, 64)
    assert official_pad(x).shape[-2:] == (64, 96)  # both sides padded, the aligned one by a whole 32
    assert torch.equal(official_pad(x)[..., :40, :64], x)  # bottom / right only
    assert torch.equal(official_pad(x)[..., 40:42, :64], x[..., [38, 37], :])  # reflect
    assert official_pad(torch.rand(1, 3, 64, 32)).shape[-2:] == (64, 32)  # aligned: untouched


def test_pixel_tiles_blend_exactly_and_run_the_whole_chain(pipe, monkeypatch):
    """Placement and blending of the official pixel tiles (vqgantile): with a pixel-local stand-in for the chain
    every tile reproduces its crop of the whole, so tiled == untiled up to float rounding (1e-6)."""
    lr = torch.rand(1, 3, 24, 40, generator=gen(4))  # up 96 x 160 > pixel tile 64: 2 x 3 tiles
    real = pipe.restore
    with monkeypatch.context() as m:
        m.setattr(pipe, "restore", lambda x, cfg, g, progress=False: x.square())
        whole = pipe(lr, pixel_tile=0).sr
        tiled = pipe(lr, pixel_tile=64, pixel_overlap=24).sr
    assert torch.allclose(whole, torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
                          .square(), atol=1e-6)
    assert (tiled - whole).abs().max() <= 1e-6
    assert pipe.restore == real
    out = pipe(lr, generator=gen(0), pixel_tile=64, pixel_overlap=24, steps=2).sr  # the real chain per tile
    assert out.shape == (1, 3, 96, 160) and torch.isfinite(out).all()
    assert not torch.equal(out, pipe(lr, generator=gen(0), steps=2).sr)


def test_latent_aggregation_tiles_run(pipe):
    lr = torch.rand(1, 3, 12, 16, generator=gen(7))  # latent 6 x 8 > tile 4: aggregation tiles
    tiled = pipe(lr, generator=gen(0), tile=4, tile_overlap=2).sr
    whole = pipe(lr, generator=gen(0)).sr
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, whole)
    with pytest.raises(BlindSRError, match="multiple of 2"):
        pipe(lr, tile=5, tile_overlap=2)


def test_colour_fix_is_applied(pipe):
    lr = torch.rand(1, 3, 12, 16, generator=gen(8)) * 0.5 + 0.25
    up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
    none = pipe(lr, generator=gen(0), color_fix="none").sr
    adain = pipe(lr, generator=gen(0), color_fix="adain").sr
    wavelet = pipe(lr, generator=gen(0), color_fix="wavelet").sr
    assert pipe.config.color_fix == "adain"  # the paper's default
    err = (adain.mean((2, 3)) - up.mean((2, 3))).abs().max()
    assert err < 0.02 < (none.mean((2, 3)) - up.mean((2, 3))).abs().max()  # the LR's colour statistics
    low = torch.nn.functional.avg_pool2d
    assert (low(wavelet, 16) - low(up, 16)).abs().mean() < (low(none, 16) - low(up, 16)).abs().mean()
    with pytest.raises(BlindSRError, match="color_fix"):
        pipe(lr, color_fix="nofix")


def test_input_size_upsamples_further_and_comes_back_to_x4(pipe):
    out = pipe(torch.rand(1, 3, 16, 20, generator=gen(9)), generator=gen(0), input_size=96, steps=2).sr
    assert out.shape == (1, 3, 64, 80)  # short side 96 (x6) for the chain, then exactly x4


def test_official_checkpoints_through_the_fixture(reference_dir, tmp_path):
    """The fixture's official stage-1 and CFW state dicts: load_pipeline runs them; CFW at dec_w 0 is the plain
    SD decoder (README §4.7), at 0.5 it changes the output."""
    ref = torch.load(reference_dir / "stablesr" / "stablesr_tiny_ref.pt", weights_only=True)
    stage1, cfw = tmp_path / "stage1.ckpt", tmp_path / "cfw.ckpt"
    torch.save({"state_dict": ref["ldm_state"]}, stage1)
    torch.save({"state_dict": ref["cfw_state"]}, cfw)
    kw = dict(size="tiny", context="zeros")
    with pytest.raises(WeightsError, match="no text encoder"):
        load_pipeline(stage1, size="tiny")
    plain, fused = load_pipeline(stage1, **kw), load_pipeline(stage1, cfw=cfw, **kw)
    assert fused.cfw is not None and fused.cfw.fusion_w == 0.5
    lr = torch.rand(1, 3, 8, 12, generator=gen(10))
    args = dict(input_size=0, steps=2, tile=0, color_fix="none")
    a = plain(lr, generator=gen(0), **args).sr
    assert a.shape == (1, 3, 32, 48)
    assert (fused(lr, generator=gen(0), dec_w=0.0, **args).sr - a).abs().max() < 1e-5
    assert (fused(lr, generator=gen(0), **args).sr - a).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture()
def pairs(make_hr_folder, tmp_path) -> tuple[Path, Path]:
    from blindsr.degradations.operators import imresize
    from blindsr.io.images import read_image, write_image

    hr = make_hr_folder(3, 64, 64)
    lr = tmp_path / "lr"
    lr.mkdir()
    for f in sorted(hr.glob("*.png")):
        write_image(lr / f.name, imresize(read_image(f)[None], scale=0.25)[0].clamp(0, 1))
    return lr, hr


def train(out: Path, pairs, *extra: str) -> int:
    lr, hr = pairs
    return main(["train", "stablesr", "--config", TINY, "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", f"data.root={hr}", "--set", f"data.lr_root={lr}", *extra])


def test_training_updates_only_encoder_and_spade_resumes_exactly_and_exports(tmp_path, pairs, monkeypatch):
    seen = {}
    real = sr_recipe.stablesr_recipe

    def spy(cfg):
        r = real(cfg)
        net = r.modules["model"]
        seen.update(net=net, trainable={k: v.clone() for k, v in net.state_dict().items()}, frozen=frozen_state(net))
        return r
    monkeypatch.setattr(sr_recipe, "stablesr_recipe", spy)
    full = tmp_path / "full"
    assert train(full, pairs) == 0
    net = seen["net"]
    assert isinstance(net, S.StableSRDDMNet)
    assert all(torch.equal(v, frozen_state(net)[k]) for k, v in seen["frozen"].items())  # SD part untouched
    final = load_state_dict(full / "final.safetensors")
    assert set(final) == set(seen["trainable"])  # the export: encoder + SPADE only
    changed = {k.split(".")[0] for k, v in final.items() if not torch.equal(v, seen["trainable"][k])}
    assert changed == {"encoder", "spade"}
    meta = load_safetensors_metadata(full / "final.safetensors")
    assert meta["method"] == "stablesr" and meta["base_weights"] == "" and '"size": "tiny"' in meta["model"]

    rows = [{k: float(v) for k, v in r.items() if "/" in k} for r in read_csv(full / "log.csv")]
    assert len(rows) == 3
    part = tmp_path / "part"
    assert train(part, pairs, "--max-steps", "2") == 0
    assert train(part, pairs, "--resume", "auto") == 0
    assert [{k: float(v) for k, v in r.items() if "/" in k} for r in read_csv(part / "log.csv")] == rows

    loaded = load_pipeline(full / "final.safetensors")  # rebuilds the (seeded random) base, loads the rest
    assert all(torch.equal(v, loaded.net.state_dict()[k]) for k, v in final.items())
    assert all(torch.equal(v, frozen_state(loaded.net)[k]) for k, v in seen["frozen"].items())
    assert loaded.config.steps == 4 and loaded.config.input_size == 0  # the config's inference defaults
    sr = loaded(torch.rand(1, 3, 8, 8, generator=gen(0)), generator=gen(0)).sr
    assert sr.shape == (1, 3, 32, 32)

    # blindsr sr on a tiny PNG: the method is read from the metadata too
    png = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)).save(png)
    for extra in (["--method", "stablesr"], []):
        out = tmp_path / f"out{len(extra)}"
        assert main(["sr", str(png), "--ckpt", str(full / "final.safetensors"), "-o", str(out), "--steps", "2",
                     "--device", "cpu", "--quiet", *extra]) == 0
        assert Image.open(out / "in.png").size == (48, 40)


def test_recipe_config_errors(tmp_path, pairs, capsys):
    assert train(tmp_path / "a", pairs, "--set", "data.crop=24") == 2
    err = capsys.readouterr().err
    assert "multiple of 16" in err and err.count("\n") == 1, err
    missing = tmp_path / "nope.ckpt"
    assert train(tmp_path / "b", pairs, "--set", f"model.weights={missing}") == 2
    err = capsys.readouterr().err
    assert "StableSR base weights not found" in err and str(missing) in err and err.count("\n") == 1, err
    assert train(tmp_path / "c", pairs, "--set", "model.size=huge") == 2
    assert "size 'huge'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CLI errors
def test_cli_errors_are_one_line(tmp_path, capsys):
    png = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    cases = [(["--ckpt", str(tmp_path / "missing.ckpt")], "StableSR checkpoint not found"),
             ([], "needs --ckpt FILE"),
             (["--ckpt", str(junk)], str(junk)),
             (["--ckpt", str(other)], "not a StableSR checkpoint"),
             (["--ckpt", str(other), "--lambda", "1"], "BlindDiff option")]
    for args, message in cases:
        rc = main(["sr", str(png), "--method", "stablesr", "-o", str(tmp_path / "out"), "--device", "cpu", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)
    assert main(["sr", str(png), "--cfw", str(junk), "-o", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    assert "StableSR option" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="not found"):
        sp.load_pipeline(other, cfw=tmp_path / "none.ckpt")
