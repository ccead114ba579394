"""blindsr.io.weights: safe loading of every checkpoint layout, clear mismatch errors, atomic safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from blindsr.errors import WeightsError
from blindsr.io.weights import (
    load_into,
    load_safetensors_metadata,
    load_state_dict,
    save_safetensors,
    select_prefix,
    strip_prefix,
)


def tiny_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
            "norm.running_mean": torch.randn(4, generator=g), "norm.num_batches_tracked": torch.tensor(7)}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line(exc_info, name: str | None = None) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    if name:
        assert name in msg, msg
    return msg


class Payload:
    """Unpickling this would create a marker file: proof that no pickle code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------- loading

def test_safetensors_roundtrip_with_metadata(tmp_path):
    sd = tiny_sd()
    save_safetensors(sd, tmp_path / "w.safetensors", metadata={"model": "mcformer", "cfg": {"dim": 48}})
    assert_same(load_state_dict(tmp_path / "w.safetensors"), sd)
    assert load_safetensors_metadata(tmp_path / "w.safetensors") == {"model": "mcformer", "cfg": '{"dim": 48}'}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_save_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "view": base[1], "t": base.t()}  # aliases + a view + a transpose
    save_safetensors(sd, tmp_path / "s.safetensors")
    got = load_state_dict(tmp_path / "s.safetensors")
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_save_overwrite_flag(tmp_path):
    p = save_safetensors(tiny_sd(0), tmp_path / "w.safetensors")
    save_safetensors(tiny_sd(1), p)  # overwrite=True by default (training checkpoints)
    assert_same(load_state_dict(p), tiny_sd(1))
    with pytest.raises(WeightsError, match="--overwrite"):
        save_safetensors(tiny_sd(2), p, overwrite=False)
    assert_same(load_state_dict(p), tiny_sd(1))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin"])
def test_plain_pickle(tmp_path, suffix):
    torch.save(tiny_sd(), tmp_path / f"w{suffix}")
    assert_same(load_state_dict(tmp_path / f"w{suffix}"), tiny_sd())


def test_lightning_checkpoint(tmp_path):
    ckpt = {"epoch": 3, "global_step": 1000, "state_dict": tiny_sd(),
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}], "hyper_parameters": {"a": 1}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert_same(load_state_dict(tmp_path / "last.ckpt"), tiny_sd())


def test_basicsr_prefers_params_ema(tmp_path):
    torch.save({"params": tiny_sd(0), "params_ema": tiny_sd(1)}, tmp_path / "net_g.pth")
    assert_same(load_state_dict(tmp_path / "net_g.pth"), tiny_sd(1))
    assert_same(load_state_dict(tmp_path / "net_g.pth", key="params"), tiny_sd(0))
    torch.save({"params": tiny_sd(0)}, tmp_path / "plain.pth")
    assert_same(load_state_dict(tmp_path / "plain.pth"), tiny_sd(0))


def test_nested_and_explicit_key(tmp_path):
    torch.save({"ema": {"model": tiny_sd(2)}, "model": tiny_sd(3), "step": 5}, tmp_path / "n.pt")
    assert_same(load_state_dict(tmp_path / "n.pt"), tiny_sd(2))  # EMA before raw weights
    assert_same(load_state_dict(tmp_path / "n.pt", key="model"), tiny_sd(3))
    assert_same(load_state_dict(tmp_path / "n.pt", key="ema.model"), tiny_sd(2))
    with pytest.raises(WeightsError, match="no entry 'generator'") as e:
        load_state_dict(tmp_path / "n.pt", key="generator")
    assert "ema, model, step" in one_line(e, "n.pt")


def test_ddp_and_compile_prefixes_stripped(tmp_path):
    torch.save({"module." + k: v for k, v in tiny_sd().items()}, tmp_path / "ddp.pth")
    assert_same(load_state_dict(tmp_path / "ddp.pth"), tiny_sd())
    save_safetensors({"_orig_mod." + k: v for k, v in tiny_sd().items()}, tmp_path / "c.safetensors")
    assert_same(load_state_dict(tmp_path / "c.safetensors"), tiny_sd())
    partial = {"module.a": torch.zeros(1), "b": torch.ones(1)}  # not shared by every key: kept
    torch.save(partial, tmp_path / "p.pth")
    assert sorted(load_state_dict(tmp_path / "p.pth")) == ["b", "module.a"]


def test_non_tensor_entries_dropped(tmp_path):
    torch.save({**tiny_sd(), "epoch": 4, "note": "hi"}, tmp_path / "m.pth")
    assert_same(load_state_dict(tmp_path / "m.pth"), tiny_sd())


def test_format_sniffed_for_unknown_suffix(tmp_path):
    save_safetensors(tiny_sd(), tmp_path / "w.safetensors")
    (tmp_path / "w.weights").write_bytes((tmp_path / "w.safetensors").read_bytes())
    torch.save(tiny_sd(1), tmp_path / "w.model")
    assert_same(load_state_dict(tmp_path / "w.weights"), tiny_sd())
    assert_same(load_state_dict(tmp_path / "w.model"), tiny_sd(1))


def test_map_location(tmp_path):
    save_safetensors(tiny_sd(), tmp_path / "w.safetensors")
    assert all(v.device.type == "cpu" for v in load_state_dict(tmp_path / "w.safetensors").values())


# ------------------------------------------------------------------------------------------- refusals

def test_arbitrary_object_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "obj": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="only loads safe pickles") as e:
        load_state_dict(tmp_path / "evil.pth")
    one_line(e, "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("name,content,message", [
    ("missing.pth", None, "not found"),
    ("empty.safetensors", b"", "empty file"),
    ("empty.pth", b"", "empty file"),
    ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a readable safetensors"),
    ("junk.pth", b"this is text, not a checkpoint", "corrupt"),
    ("junk.xyz", b"hello", "unknown checkpoint format"),
])
def test_bad_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        load_state_dict(tmp_path / name)
    one_line(e, name)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    save_safetensors(tiny_sd(), full) if suffix == ".safetensors" else torch.save(tiny_sd(), full)
    data = full.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        load_state_dict(tmp_path / f"cut{suffix}")
    one_line(e, f"cut{suffix}")


def test_no_tensors(tmp_path):
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no tensors found") as e:
        load_state_dict(tmp_path / "meta.pth")
    assert "epoch, lr" in one_line(e)


# ------------------------------------------------------------------------------------------- prefixes

def test_strip_and_select_prefix():
    sd = {"model.diffusion_model.a": torch.zeros(1), "model.diffusion_model.b": torch.ones(1),
          "first_stage_model.c": torch.ones(2), "modelx.d": torch.ones(3)}
    sel = select_prefix(sd, "model.diffusion_model")
    assert sorted(sel) == ["a", "b"]
    assert sorted(select_prefix(sd, "model.")) == ["diffusion_model.a", "diffusion_model.b"]  # not "modelx"
    assert sorted(strip_prefix(sd, "first_stage_model")) == [
        "c", "model.diffusion_model.a", "model.diffusion_model.b", "modelx.d"]


# ------------------------------------------------------------------------------------------- load_into

def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_load_into_exact():
    src, dst = make_model(), make_model()
    load_into(dst, src.state_dict())
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_into_error_message():
    sd = make_model().state_dict()
    del sd["2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(6, 4)
    with pytest.raises(WeightsError) as e:
        load_into(make_model(), sd)
    msg = one_line(e)
    assert msg.startswith("checkpoint does not match Sequential: ")
    assert "1 missing (2.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "1 shape mismatch (0.weight: checkpoint (6, 4) vs model (5, 4))" in msg


def test_load_into_lists_first_names_only():
    sd = {f"k{i}": torch.zeros(1) for i in range(10)}
    with pytest.raises(WeightsError) as e:
        load_into(make_model(), sd)
    msg = one_line(e)
    assert "4 missing (0.weight, 0.bias, 2.weight, ...)" in msg
    assert "10 unexpected (k0, k1, k2, ...)" in msg


def test_load_into_non_strict():
    src = make_model().state_dict()
    del src["2.bias"]
    src["extra"] = torch.zeros(1)
    model = make_model()
    load_into(model, src, strict=False)  # missing / unexpected tolerated
    assert torch.equal(model[0].weight, src["0.weight"])
    src["0.weight"] = torch.zeros(6, 4)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_into(model, src, strict=False)  # shapes never
