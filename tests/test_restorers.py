"""DiffBIR stage-1 restorers: key conformance with the official checkpoints, window attention behaviour,
forward shapes, checkpoint loading, and tiling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.restorers import (
    RRDBNet,
    RRDBNetConfig,
    SCUNet,
    SCUNetConfig,
    SwinIR,
    SwinIRConfig,
    build_restorer,
    load_restorer,
    restore_tiled,
)
from blindsr.models.restorers import rrdbnet as rrdb_mod
from blindsr.models.restorers.scunet import Block as SCUNetBlock
from blindsr.models.restorers.swinir import (
    SwinTransformerBlock,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from blindsr.ops.tiling import Box, gaussian_window, ramp_window, tile_starts

# (kind, dump file, state-dict entries, their total size incl. buffers, parameters only)
FULL = [("swinir", "swinir", 732, 22_280_651, 15_792_587),
        ("bsrnet", "bsrnet", 702, 16_697_987, 16_697_987),
        ("scunet", "scunet", 540, 17_946_072, 17_946_072)]


def read_dump(path):
    rows = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


@pytest.mark.parametrize("kind,dump,n_keys,n_total,n_params", FULL)
def test_full_config_matches_official_keys(kind, dump, n_keys, n_total, n_params, reference_dir):
    """Same keys, order, shapes and dtypes as the official model (registered buffers included)."""
    with torch.device("meta"):
        model = build_restorer(kind)
    sd = model.state_dict()
    ours = [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()]
    assert ours == read_dump(reference_dir / "diffbir" / f"{dump}.txt")
    assert len(sd) == n_keys
    assert sum(v.numel() for v in sd.values()) == n_total
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_swinir_buffers_are_persistent_and_mean_is_not():
    with torch.device("meta"):
        model = build_restorer("swinir")
    buffers = dict(model.named_buffers())
    in_sd = [k for k in model.state_dict() if k in buffers]
    assert len(in_sd) == 72
    assert sum(k.endswith("attn_mask") for k in in_sd) == 24  # the odd (shifted) blocks of 8 RSTBs
    assert "mean" in buffers and "mean" not in model.state_dict()
    assert model.config.scale == 1 and model.config.pad_multiple == 64


# ---------------------------------------------------------------------------------------------------------
# Window attention

def test_relative_position_index_brute_force():
    ws = 3
    idx = relative_position_index(ws)
    for i in range(ws * ws):
        for j in range(ws * ws):
            dy, dx = i // ws - j // ws, i % ws - j % ws
            assert idx[i, j] == (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, 4)
    assert w.shape == (2 * 6, 16, 5)
    assert torch.equal(w[1], x[0, :4, 4:8].reshape(16, 5))  # second window of the first row
    assert torch.equal(window_reverse(w, 4, 8, 12), x)


def test_shifted_window_mask_separates_wrapped_tokens():
    """Tokens may attend to each other iff neither or both of their coordinates wrapped around in the roll."""
    h, w, ws, s = 8, 12, 4, 2
    mask = shifted_window_mask(h, w, ws, s)
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    wrap = torch.stack([rows >= h - s, cols >= w - s], -1).float()  # positions after torch.roll(-s)
    wrap_win = window_partition(wrap[None], ws)  # (nW, N, 2)
    expected = (wrap_win[:, :, None, :] != wrap_win[:, None, :, :]).any(-1)
    assert torch.equal(mask, expected)
    assert mask[: (h // ws - 1) * (w // ws) - 1].sum() == 0  # windows away from the far borders are free


def _randomise(module):
    """O(1) weights, so that every attention path has a visible effect."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _influence(block, x, pos):
    """Which tokens of block(x) change when the token at ``pos`` changes."""
    y0 = block(x)
    x2 = x.clone()
    x2[:, pos[0], pos[1]] += torch.linspace(-1, 1, x.shape[-1])  # not constant: LayerNorm would remove it
    return (block(x2) - y0).abs().amax(dim=(0, -1)) > 1e-6


@pytest.mark.parametrize("shift", [False, True])
def test_swin_block_locality(shift):
    """W-MSA mixes tokens only inside a window; SW-MSA of the top-left token only reaches the s x s tokens
    that were rolled into the same region (the roll and mask are right)."""
    torch.manual_seed(0)
    h = w = 8
    block = _randomise(SwinTransformerBlock(6, input_resolution=h, num_heads=2, window_size=4, shift=shift,
                                            mlp_ratio=2))
    x = torch.randn(1, h, w, 6)
    infl = _influence(lambda t: block(t.reshape(1, h * w, 6), (h, w)).reshape(1, h, w, 6), x, (0, 0))
    expected = torch.zeros(h, w, dtype=torch.bool)
    if shift:
        expected[:2, :2] = True
    else:
        expected[:4, :4] = True
    assert torch.equal(infl, expected)


@pytest.mark.parametrize("shift", [False, True])
def test_scunet_block_locality(shift):
    torch.manual_seed(0)
    block = _randomise(SCUNetBlock(8, head_dim=4, window_size=4, shifted=shift))
    x = torch.randn(1, 8, 8, 8)
    infl = _influence(block, x, (0, 0))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[: (2 if shift else 4), : (2 if shift else 4)] = True
    assert torch.equal(infl, expected)


def test_swinir_mask_buffer_equals_recomputed_and_other_sizes_run():
    model = SwinIR(SwinIRConfig.tiny()).eval()
    blk = model.layers[0].residual_group.blocks[1]
    assert blk.attn_mask is not None and blk.attn_mask.shape == (4, 16, 16)
    assert torch.equal(blk.attn_mask, blk.additive_mask((8, 8)))
    assert set(blk.attn_mask.unique().tolist()) == {0.0, -100.0}


# ---------------------------------------------------------------------------------------------------------
# Forward shapes and semantics

@pytest.mark.parametrize("size", [(16, 16), (13, 21), (40, 24)])
def test_swinir_pads_and_crops_back(size):
    """DiffBIR's SwinIR is x1 at any size (padded to a multiple of window*unshuffle internally)."""
    torch.manual_seed(0)
    model = SwinIR(SwinIRConfig.tiny()).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_swinir_pad_modes_differ_only_by_padding():
    torch.manual_seed(0)
    cfg = SwinIRConfig.tiny()
    a = SwinIR(cfg).eval()
    b = SwinIR(SwinIRConfig(**{**cfg.__dict__, "pad_mode": "reflect"})).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 16, 16)  # already a multiple of 8: no padding, identical outputs
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x[..., :13, :13]), b(x[..., :13, :13]))


def test_rrdbnet_x4_shape_and_residual_scaling():
    """With conv5 of every dense block zeroed, each RDB is the identity and each RRDB multiplies by 1.2."""
    torch.manual_seed(0)
    cfg = RRDBNetConfig.tiny()
    model = RRDBNet(cfg).eval()
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 40, 48)
        for name, p in model.named_parameters():
            if ".conv5." in name:
                p.zero_()
        fea = model.conv_first(x)
        fea = fea + model.trunk_conv(fea * 1.2 ** cfg.nb)
        for up in (model.upconv1, model.upconv2):
            fea = F.leaky_relu(up(F.interpolate(fea, scale_factor=2, mode="nearest")), 0.2)
        expected = model.conv_last(F.leaky_relu(model.HRconv(fea), 0.2))
        torch.testing.assert_close(model(x), expected)


def test_rrdbnet_unshuffle_variant_scale():
    cfg = RRDBNetConfig(nf=8, nb=1, gc=4, unshuffle=2)  # Real-ESRGAN x2plus layout
    assert cfg.scale == 2
    with torch.no_grad():
        assert RRDBNet(cfg)(torch.rand(1, 3, 9, 10)).shape == (1, 3, 18, 20)


def test_scunet_shape():
    torch.manual_seed(0)
    model = SCUNet(SCUNetConfig.tiny()).eval()
    x = torch.rand(1, 3, 20, 36)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_rrdbnet_key_layouts_round_trip():
    sd = RRDBNet(RRDBNetConfig.tiny()).state_dict()
    basic = rrdb_mod.to_basicsr_keys(sd)
    assert "body.1.rdb3.conv5.weight" in basic and "conv_body.bias" in basic and "conv_up2.weight" in basic
    assert "conv_hr.weight" in basic and not any(k.startswith(("RRDB_trunk", "HRconv", "upconv")) for k in basic)
    assert list(rrdb_mod.to_kair_keys(basic)) == list(sd)
    assert rrdb_mod.to_kair_keys(sd).keys() == sd.keys()
    assert rrdb_mod.config_from_state_dict(basic) == RRDBNetConfig.tiny()


# ---------------------------------------------------------------------------------------------------------
# Loading

TINY = {"swinir": (SwinIR, SwinIRConfig.tiny), "rrdbnet": (RRDBNet, RRDBNetConfig.tiny),
        "scunet": (SCUNet, SCUNetConfig.tiny)}


@pytest.mark.parametrize("kind,wrapper", [(k, w) for k in TINY for w in ("safetensors", "lightning", "params_ema")]
                         + [("rrdbnet", "basicsr-keys")])
def test_load_restorer_round_trip(kind, wrapper, tmp_path):
    torch.manual_seed(0)
    cls, cfg = TINY[kind]
    model = cls(cfg()).eval()
    sd = model.state_dict()
    if wrapper == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif wrapper == "lightning":
        path = tmp_path / "m.ckpt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "global_step": 3}, path)
    elif wrapper == "params_ema":
        path = tmp_path / "m.pth"
        torch.save({"params_ema": sd, "params": {k: torch.zeros_like(v) for k, v in sd.items()}}, path)
    else:  # Real-ESRGAN names
        path = tmp_path / "m.pth"
        torch.save(rrdb_mod.to_basicsr_keys(sd), path)
    loaded = load_restorer(kind, path)
    for field in ("depths", "num_heads", "embed_dim", "window_size", "unshuffle", "upscale", "nb", "gc", "nf",
                  "config", "dim", "head_dim"):
        assert getattr(loaded.config, field, None) == getattr(model.config, field, None)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_swinir_without_derived_buffers(tmp_path):
    model = SwinIR(SwinIRConfig.tiny())
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("attn_mask", "relative_position_index"))}
    torch.save(sd, tmp_path / "m.pth")
    loaded = load_restorer("swinir", tmp_path / "m.pth")  # masks rebuilt (for DiffBIR's grid size, 64)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_load_errors_are_one_line(tmp_path):
    sd = SCUNet(SCUNetConfig.tiny()).state_dict()
    torch.save({k: v for k, v in sd.items() if k != "m_tail.0.weight"}, tmp_path / "missing.pth")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    for name, word in [("missing.pth", "missing"), ("extra.pth", "unexpected")]:
        with pytest.raises(WeightsError) as e:
            load_restorer("scunet", tmp_path / name)
        assert word in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="not a SwinIR"):
        load_restorer("swinir", tmp_path / "extra.pth")
    with pytest.raises(BlindSRError, match="unknown restorer"):
        load_restorer("edsr", tmp_path / "extra.pth")


# ---------------------------------------------------------------------------------------------------------
# Tiling

def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 40, 30) == [0, 30, 60]
    assert tile_starts(101, 40, 30) == [0, 30, 60, 61]
    assert tile_starts(30, 40, 30) == [0]


def test_blend_windows():
    g = gaussian_window(16, 16, sigma=0.1)
    assert (g > 0).all() and g[7:9, 7:9].min() == g.max()
    # DiffBIR's official tile weights: exp(-(i - (n-1)/2)^2 / n^2 / (2 * 0.01)), up to a constant factor
    i = torch.arange(16, dtype=torch.float64)
    official = torch.exp(-((i - 7.5) ** 2) / 16**2 / 0.02)
    torch.testing.assert_close(g.double(), (official[:, None] * official[None, :]), rtol=1e-6, atol=0)
    # a ramp only on the sides that border another window: a box at the left border of a 30-wide grid
    lin = ramp_window(Box(5, 0, 10, 10), (30, 30), 3)
    assert lin[0, 5] == pytest.approx(0.25) and lin[5, 0] == 1 and lin[5, 9] == pytest.approx(0.25)
    assert lin[5, 5] == 1 and (lin > 0).all()
    with pytest.raises(BlindSRError):
        restore_tiled(lambda t: t, torch.rand(1, 3, 40, 40), tile=16, overlap=4, window="cosine")


@pytest.mark.parametrize("blend", ["gaussian", "ramp"])
@pytest.mark.parametrize("scale", [1, 4])
def test_restore_tiled_equals_full_for_local_models(blend, scale):
    """A per-pixel model tiled with overlap gives exactly the untiled result, at x1 and x4."""
    def model(t):
        return F.interpolate(t * 0.5 + t ** 2, scale_factor=scale, mode="nearest")

    x = torch.rand(2, 3, 45, 70)
    out = restore_tiled(model, x, tile=32, overlap=8, window=blend)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)
    single = restore_tiled(model, x[0], tile=32, overlap=8, window=blend)
    assert single.shape == (3, 45 * scale, 70 * scale)


def test_restore_tiled_with_a_restorer_is_close_to_full():
    """x4 RRDBNet: the blended tiles agree with the whole-image output up to small seam effects."""
    torch.manual_seed(0)
    model = RRDBNet(RRDBNetConfig.tiny()).eval()
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        full = model(x)
    tiled = restore_tiled(model, x, tile=16, overlap=8)
    assert tiled.shape == full.shape == (1, 3, 112, 112)
    assert (tiled - full).abs().mean() < 0.05 * full.abs().mean() + 1e-3
    with pytest.raises(BlindSRError):
        restore_tiled(model, x, tile=16, overlap=16)


def test_rrdbnet_loads_with_full_default_sizes(tmp_path):
    """config_from_state_dict recovers BSRNet's full config from shapes alone (meta tensors suffice)."""
    with torch.device("meta"):
        sd = RRDBNet().state_dict()
    assert rrdb_mod.config_from_state_dict(sd) == RRDBNetConfig.bsrnet()
    assert math.isclose(RRDBNetConfig.bsrnet().scale, 4)
