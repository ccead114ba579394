"""The generic trainer on a tiny stand-in (a 3x3 conv denoiser, ``Trainer.single``): learning, EMA, checkpoints
(format 2 and the old format 1), exact resume, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from blindsr.data.datasets import HRFolderDataset
from blindsr.errors import BlindSRError
from blindsr.train import checkpoint as ckpt_io
from blindsr.train.config import OptimConfig, TrainConfig
from blindsr.train.ema import EMA
from blindsr.train.logging import plot_losses, read_csv
from blindsr.train.trainer import SubStep, Trainer, lr_at


class Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.conv(x)


def denoise_loss(model, hr, generator):
    """Random noise level + noise from the step generator (like timesteps/noise in a diffusion loss)."""
    sigma = 0.05 + 0.2 * torch.rand(hr.shape[0], 1, 1, 1, generator=generator, device=hr.device)
    noisy = hr + sigma * torch.randn(hr.shape, generator=generator, device=hr.device)
    mse = (model(noisy).float() - hr).pow(2).mean()
    return {"loss": mse + 0.0, "mse": mse}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    for i in range(3):
        arr = np.random.default_rng(i).integers(0, 256, (24, 28, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
    return HRFolderDataset(root, crop=16, scale=4, seed=0)


def _trainer(dataset, run_dir, steps, **train_kw):
    cfg = TrainConfig(max_steps=steps, log_every=1, ckpt_every=0, val_every=0, **train_kw)
    optim = OptimConfig(lr=1e-2, milestones=[4], gamma=0.5)
    return Trainer.single(Denoiser(), denoise_loss, dataset, run_dir, train=cfg, optim=optim, batch_size=2,
                   device="cpu", export_metadata={"method": "test"}, progress=False)


def test_loss_falls_on_overfit(tmp_path):
    arr = np.random.default_rng(0).random((16, 16, 3)).round(1)  # a single image, flat-ish colours
    Image.fromarray((arr * 255).astype(np.uint8)).save(tmp_path / "one.png")
    ds = HRFolderDataset(tmp_path, crop=16, scale=4, flip=False, rot=False)
    cfg = TrainConfig(max_steps=100, log_every=10, ckpt_every=0, val_every=0, ema_decay=0.9)
    res = Trainer.single(Denoiser(), denoise_loss, ds, tmp_path / "run", train=cfg, optim=OptimConfig(lr=3e-3),
                  batch_size=4, device="cpu", progress=False).fit()
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 100 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    rows = read_csv(tmp_path / "run" / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(10, 101, 10))
    assert {"loss", "mse", "lr", "it_s", "time", "skipped"} <= set(rows[0])
    png = tmp_path / "run" / "losses.png"
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape == (480, 800, 3) and ((im == (255, 127, 14)).all(-1)).sum() > 100  # the mse line is drawn


def test_ema_math():
    model = torch.nn.Linear(2, 2)
    model.register_buffer("count", torch.tensor(0.0))
    ema = EMA(model, decay=0.9)
    p0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.count.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * p0 + 0.1 * (p0 + 1), rtol=0, atol=1e-6)
    assert ema.model.count.item() == 7 and not ema.model.weight.requires_grad
    ema.update(model)  # e2 = 0.9 e1 + 0.1 p = p0 + 1 - 0.9^2
    torch.testing.assert_close(ema.model.weight, p0 + 1 - 0.81, rtol=0, atol=1e-6)


def test_lr_schedule():
    o = OptimConfig(lr=1.0, milestones=[10, 20], gamma=0.5)
    assert [lr_at(s, o) for s in (0, 9, 10, 19, 20, 10**6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert lr_at(0, OptimConfig(lr=1.0, warmup_steps=4)) == 0.25


def test_resume_reproduces_losses_exactly(dataset, tmp_path):
    full = _trainer(dataset, tmp_path / "a", 6, grad_accum=2).fit()
    first = _trainer(dataset, tmp_path / "b", 3, grad_accum=2).fit()
    with pytest.raises(BlindSRError, match="already holds checkpoints"):
        _trainer(dataset, tmp_path / "b", 6, grad_accum=2).fit()
    second = _trainer(dataset, tmp_path / "b", 6, grad_accum=2).fit(resume="auto")
    assert [h["loss"] for h in full.history] == [h["loss"] for h in first.history + second.history]
    assert [h["lr"] for h in full.history] == [0.01] * 4 + [0.005] * 2
    log_a, log_b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_b) == 6
    wa, wb = ckpt_io.load_weights(full.final), ckpt_io.load_weights(second.final)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_format_1_checkpoint_resumes_exactly(dataset, tmp_path):
    """A checkpoint in the old one-model layout resumes like the format-2 one it was made from."""
    import shutil

    full = _trainer(dataset, tmp_path / "a", 6).fit()
    first = _trainer(dataset, tmp_path / "b", 3).fit()
    ckpt = ckpt_io.checkpoint_dir(tmp_path / "b", 3)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("format", "modules", "optimizers", "guard")}
    torch.save({**old, "format": 1, "optimizer": state["optimizers"]["model"], "last_loss": state["guard"]["main"]},
               ckpt / "state.pt")
    shutil.move(ckpt / "model.ema.safetensors", ckpt / "ema.safetensors")
    second = _trainer(dataset, tmp_path / "b", 6).fit(resume="auto")
    assert [h["loss"] for h in full.history] == [h["loss"] for h in first.history + second.history]
    wa, wb = ckpt_io.load_weights(full.final), ckpt_io.load_weights(second.final)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_round_trip(dataset, tmp_path):
    tr = _trainer(dataset, tmp_path, 4, ema_decay=0.5)
    tr.cfg.ckpt_every, tr.cfg.keep_checkpoints = 2, 1
    res = tr.fit()
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path)] == [4]  # step 2 pruned
    ckpt = ckpt_io.load_checkpoint(ckpt_io.checkpoint_dir(tmp_path, 4))
    assert sorted(p.name for p in ckpt.path.iterdir()) == ["model.ema.safetensors", "model.safetensors", "state.pt"]
    model_sd, ema_sd, state = ckpt.weights["model"], ckpt.ema["model"], ckpt.state
    live = tr.accelerator.unwrap_model(tr.modules["model"]).state_dict()
    assert all(torch.equal(model_sd[k], live[k]) for k in live)
    assert model_sd["calls"].item() == 4  # buffers too: one forward per step
    assert all(torch.equal(ema_sd[k], v) for k, v in ckpt_io.load_weights(res.final).items())
    assert not torch.equal(ema_sd["conv.weight"], model_sd["conv.weight"])
    assert state["step"] == 4 and state["optimizers"]["model"]["state"]
    assert state["format"] == 2 and state["modules"] == ["model"] and state["guard"] == {"main": res.history[-1]["loss"]}
    from safetensors import safe_open
    with safe_open(str(res.final), "pt") as f:
        assert f.metadata() == {"method": "test", "step": "4"}
    with pytest.raises(BlindSRError, match="not a checkpoint"):
        _trainer(dataset, tmp_path / "empty", 4).fit(resume=str(tmp_path / "nothing"))


def test_skip_guard_skips_exploding_and_nan_steps(dataset, tmp_path):
    calls = []

    def loss_fn(model, hr, generator):
        calls.append(1)
        terms = denoise_loss(model, hr, generator)
        factor = {3: 1e4, 5: float("nan")}.get(len(calls), 1.0)
        return {k: v * factor for k, v in terms.items()}

    cfg = TrainConfig(max_steps=6, log_every=1, ckpt_every=0, val_every=0)
    tr = Trainer.single(Denoiser(), loss_fn, dataset, tmp_path, train=cfg, batch_size=2, device="cpu", progress=False)
    res = tr.fit()
    assert [h["skipped"] for h in res.history] == [0, 0, 1, 0, 1, 0]
    assert tr.last_loss == {"main": res.history[-1]["loss"]}


def test_bf16_autocast_on_cpu(dataset, tmp_path):
    seen = []

    def loss_fn(model, hr, generator):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return denoise_loss(model, hr, generator)

    cfg = TrainConfig(max_steps=2, log_every=1, ckpt_every=0, val_every=0, mixed_precision="bf16")
    res = Trainer.single(Denoiser(), loss_fn, dataset, tmp_path, train=cfg, optim=OptimConfig(grad_clip=0.1),
                  batch_size=2, device="cpu", progress=False).fit()
    assert seen == [(True, torch.bfloat16)] * 2 and all(math.isfinite(h["loss"]) for h in res.history)


def test_fp16_on_cpu_is_a_user_error(dataset, tmp_path):
    with pytest.raises(BlindSRError, match="fp16"):
        _trainer(dataset, tmp_path, 1, mixed_precision="fp16")


def test_validate_fn_runs_on_ema(dataset, tmp_path):
    got = []

    def validate(model):
        got.append(model)
        return {"psnr": 20.0}

    tr = _trainer(dataset, tmp_path, 4)
    tr.cfg.val_every, tr.validate_fn = 2, validate
    res = tr.fit()
    assert all(m is tr.emas["model"].model for m in got) and len(got) == 2
    assert [r["step"] for r in read_csv(tmp_path / "val.csv")] == ["2", "4"]
    assert res.validation[-1] == {"step": 4, "psnr": 20.0}


def test_plot_losses_handles_zero_and_single_row(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss,lr\n1,0.0,0.1\n")
    assert plot_losses(tmp_path / "log.csv", tmp_path / "p.png").is_file()


def test_adamw_decouples_weight_decay_and_bad_names_are_user_errors(dataset, tmp_path):
    def build(name, run_dir):
        optim = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, milestones=[])
        return Trainer.single(Denoiser(), denoise_loss, dataset, run_dir, train=TrainConfig(max_steps=1, ckpt_every=0,
                       val_every=0), optim=optim, batch_size=2, device="cpu", progress=False)

    t = build("adamw", tmp_path / "w")
    t.fit()  # the optimiser is built when training starts
    opt = t.optimizers["model"].optimizer  # accelerate wraps it
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(BlindSRError, match="optim.name"):
        build("sgd", tmp_path / "s").fit()


def test_bad_module_and_sub_step_names_are_user_errors(dataset, tmp_path):
    def main(models, batch, generator, step):
        return denoise_loss(models["net"], batch, generator)

    kw = dict(device="cpu", progress=False)
    cases = [
        ({"net": Denoiser()}, [SubStep("main", main, ("other",))], {}, "updates"),
        ({"a/b": Denoiser()}, [SubStep("main", main, ("a/b",))], {}, "letters"),
        ({"net": Denoiser()}, [SubStep("x", main, ("net",)), SubStep("x", main, ("net",))], {}, "unique"),
        ({"net": Denoiser()}, [SubStep("main", main, ("net",))], {"module_optim": {"d": OptimConfig()}}, "module_optim"),
        ({"net": Denoiser()}, [SubStep("main", main, ("net",))], {"export": "d"}, "export"),
        ({"net": Denoiser()}, [SubStep("main", main, ("net",))], {"module_ema": {"net": 1.0}}, "EMA decay"),
    ]
    for modules, steps, extra, match in cases:
        with pytest.raises(BlindSRError, match=match):
            Trainer(modules, steps, dataset, tmp_path, **kw, **extra)
    frozen = Denoiser().requires_grad_(False)
    with pytest.raises(BlindSRError, match="no trainable parameters"):
        Trainer({"net": frozen}, [SubStep("main", main, ("net",))], dataset, tmp_path, **kw).fit()
