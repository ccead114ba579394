"""The multi-module trainer on a tiny GAN: a generator MLP maps 2-D N(0, I) noise to a shifted, scaled 2-D
Gaussian, judged by a discriminator MLP. Sub-steps "d" (updates D, starts late) and "g" (updates G: a batch-mean
term from the start, the non-saturating adversarial term switched on with ``term_weight``).

Asserts convergence, exact resume of both sub-steps (also after a Ctrl-C between them), the warm-up,
per-module optimiser settings, the per sub-step skip guard, that gradients never leak from one sub-step into the
next, one grad scaler serving two optimisers, and the exported files.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from blindsr.data.datasets import mix_seed, split_key
from blindsr.errors import BlindSRError
from blindsr.train import checkpoint as ckpt_io
from blindsr.train.config import OptimConfig, TrainConfig
from blindsr.train.logging import read_csv
from blindsr.train.trainer import SubStep, Trainer, lr_at, term_weight

MEAN, STD = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
G_OPTIM = OptimConfig(lr=2e-3, betas=(0.5, 0.99), milestones=[10])
D_OPTIM = OptimConfig(lr=4e-3, betas=(0.5, 0.9), milestones=[], grad_clip=1.0)


class RealSamples(torch.utils.data.Dataset):
    """``n`` keys; item (epoch, i) is a fresh target sample drawn from a generator seeded (seed, epoch, i)."""

    def __init__(self, n: int = 256, seed: int = 0):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> torch.Tensor:
        epoch, i = split_key(key)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
        return MEAN + STD * torch.randn(2, generator=g)


def mlp(sizes: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.2)]
    return torch.nn.Sequential(*layers[:-1])


def gan_steps(d_start: int, adv_start: int, scale_g: dict[int, float] | None = None) -> list[SubStep]:
    """The two sub-steps; ``scale_g[step]`` multiplies the generator's loss terms at that step."""
    def d_loss(models, real, generator, step):
        with torch.no_grad():
            fake = models["g"](torch.randn(real.shape, generator=generator))
        real_logit, fake_logit = models["d"](real), models["d"](fake)
        loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        return {"loss": loss, "real": real_logit.mean(), "fake": fake_logit.mean()}

    def g_loss(models, real, generator, step):
        fake = models["g"](torch.randn(real.shape, generator=generator))
        mom = (fake.mean(0) - real.mean(0)).pow(2).sum()
        adv = F.softplus(-models["d"](fake)).mean()
        f = (scale_g or {}).get(step, 1.0)
        return {"loss": f * (mom + term_weight(step, 1.0, adv_start) * adv), "mom": f * mom, "adv": adv}

    return [SubStep("d", d_loss, ("d",), start=d_start), SubStep("g", g_loss, ("g",))]


def gan_trainer(run_dir, steps: int, d_start: int = 4, adv_start: int = 8, hidden: int = 32, batch_size: int = 16,
                sub_steps: list[SubStep] | None = None, optim: OptimConfig = G_OPTIM, d_optim: OptimConfig = D_OPTIM,
                **train_kw) -> Trainer:
    cfg = TrainConfig(**{"max_steps": steps, "log_every": 1, "ckpt_every": 0, "val_every": 0, "ema_decay": 0.99,
                         "ema_warmup": True, **train_kw})
    return Trainer({"g": mlp([2, hidden, 2], 1), "d": mlp([2, 32, 32, 1], 2)},
                   sub_steps or gan_steps(d_start, adv_start), RealSamples(), run_dir, train=cfg, optim=optim,
                   module_optim={"d": d_optim}, module_ema={"d": 0.0}, batch_size=batch_size, device="cpu",
                   export_metadata={"method": "toy-gan"}, progress=False)


def sample_stats(g: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = g(torch.randn(8192, 2, generator=torch.Generator().manual_seed(5)))
    return x.mean(0), x.std(0)


def test_gan_converges_and_exports_every_module(tmp_path):
    kw = dict(batch_size=128, log_every=50, skip_loss_factor=None, optim=OptimConfig(lr=2e-3, betas=(0.5, 0.99),
              milestones=[]), d_optim=OptimConfig(lr=4e-3, betas=(0.5, 0.99), milestones=[]))
    tr = gan_trainer(tmp_path / "gan", 600, d_start=10, adv_start=20, **kw)
    res = tr.fit()
    mean, std = sample_stats(tr.emas["g"].model)
    assert (mean - MEAN).abs().max() < 0.1, mean
    assert ((std - STD).abs() / STD).max() < 0.1, std
    # without the adversarial term only the mean is matched: the spread is the GAN's doing
    control = gan_trainer(tmp_path / "mean-only", 600, d_start=600, adv_start=600, **kw)
    control.fit()
    c_mean, c_std = sample_stats(control.emas["g"].model)
    assert (c_mean - MEAN).abs().max() < 0.1 and ((c_std - STD).abs() / STD).max() > 0.3, c_std

    final, final_d = ckpt_io.load_weights(res.final), ckpt_io.load_weights(tmp_path / "gan" / "final_d.safetensors")
    assert all(torch.equal(v, tr.emas["g"].state_dict()[k]) for k, v in final.items())
    d_live = tr.accelerator.unwrap_model(tr.modules["d"]).state_dict()  # EMA decay 0: the latest weights
    assert final_d.keys() == d_live.keys() and all(torch.equal(final_d[k], d_live[k]) for k in d_live)
    from safetensors import safe_open
    with safe_open(str(res.final), "pt") as f:
        assert f.metadata() == {"method": "toy-gan", "step": "600"}
    with safe_open(str(tmp_path / "gan" / "final_d.safetensors"), "pt") as f:
        assert f.metadata() == {"module": "d", "step": "600"}
    rows = read_csv(tmp_path / "gan" / "log.csv")
    assert {"d/loss", "d/real", "d/fake", "g/loss", "g/mom", "g/adv", "lr", "skipped"} <= set(rows[0])
    assert (tmp_path / "gan" / "losses.png").is_file()


def test_gan_resume_reproduces_both_sub_steps_exactly(tmp_path):
    full = gan_trainer(tmp_path / "a", 14, grad_accum=2).fit()
    first = gan_trainer(tmp_path / "b", 6, grad_accum=2).fit()  # stopped after d started, before adv
    resumed = gan_trainer(tmp_path / "b", 14, grad_accum=2)
    second = resumed.fit(resume="auto")
    assert full.history == first.history + second.history
    assert [h["skipped"] for h in full.history] == [0.0] * 14
    log_a, log_b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert log_a == [{**b, "it_s": a["it_s"], "time": a["time"]} for a, b in zip(log_a, log_b, strict=True)]
    for name in ("final.safetensors", "final_d.safetensors"):
        wa, wb = ckpt_io.load_weights(tmp_path / "a" / name), ckpt_io.load_weights(tmp_path / "b" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca = ckpt_io.load_checkpoint(ckpt_io.checkpoint_dir(tmp_path / "a", 14))
    cb = ckpt_io.load_checkpoint(ckpt_io.checkpoint_dir(tmp_path / "b", 14))
    assert ca.state["modules"] == ["g", "d"] and ca.state["guard"] == cb.state["guard"]
    for n in ("g", "d"):
        assert all(torch.equal(ca.weights[n][k], cb.weights[n][k]) for k in ca.weights[n])
        assert all(torch.equal(ca.ema[n][k], cb.ema[n][k]) for k in ca.ema[n])
    with pytest.raises(BlindSRError, match="holds the modules"):
        Trainer.single(mlp([2, 2], 0), lambda m, b, g: {"loss": m(b).sum()}, RealSamples(), tmp_path / "b",
                       train=TrainConfig(max_steps=20), device="cpu", progress=False).fit(resume="auto")


def test_ctrl_c_inside_an_iteration_saves_after_it_and_resumes_exactly(tmp_path):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def interrupting(presses: int, at: int) -> list[SubStep]:
        d, g = gan_steps(2, 4)

        def g_loss(models, real, generator, step):  # between the d and the g update of step `at`
            for _ in range(presses if step == at else 0):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # let the handler run
            return g.loss_fn(models, real, generator, step)

        return [d, SubStep("g", g_loss, ("g",))]

    full = gan_trainer(tmp_path / "a", 10, d_start=2, adv_start=4).fit()
    with pytest.raises(KeyboardInterrupt):
        gan_trainer(tmp_path / "b", 10, sub_steps=interrupting(1, at=5)).fit()
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "b")] == [6]  # step index 5 finished first
    second = gan_trainer(tmp_path / "b", 10, d_start=2, adv_start=4).fit(resume="auto")
    assert second.history == full.history[6:]
    with pytest.raises(KeyboardInterrupt):  # twice: stop at once, and save nothing
        gan_trainer(tmp_path / "c", 10, sub_steps=interrupting(2, at=5)).fit()
    assert not ckpt_io.list_checkpoints(tmp_path / "c")


def test_warm_up_and_per_module_optimisers(tmp_path):
    d0 = mlp([2, 32, 32, 1], 2).state_dict()
    tr = gan_trainer(tmp_path, 4, d_start=4, adv_start=8)  # stops just before "d" starts
    res = tr.fit()
    assert all(not any(k.startswith("d/") for k in h) for h in res.history)
    assert all(h["g/loss"] == h["g/mom"] for h in res.history)  # adversarial weight 0 before adv_start
    ckpt = ckpt_io.load_checkpoint(ckpt_io.checkpoint_dir(tmp_path, 4))
    assert all(torch.equal(ckpt.weights["d"][k], d0[k]) for k in d0) and not ckpt.state["optimizers"]["d"]["state"]
    assert ckpt.state["guard"] == {"d": None, "g": res.history[-1]["g/loss"]}

    res = gan_trainer(tmp_path, 12, d_start=4, adv_start=8).fit(resume="auto")
    assert all("d/loss" in h for h in res.history) and all(h["g/loss"] != h["g/mom"] for h in res.history[4:])
    rows = read_csv(tmp_path / "log.csv")  # the d columns appear at step 5; earlier rows leave them blank
    assert [r["d/loss"] == "" for r in rows] == [True] * 4 + [False] * 8
    assert [h["lr"] for h in res.history] == [lr_at(s, G_OPTIM) for s in range(4, 12)] == [2e-3] * 6 + [1e-3] * 2
    tr = gan_trainer(tmp_path / "fresh", 11)
    tr.fit()
    d_opt, g_opt = tr.optimizers["d"].optimizer, tr.optimizers["g"].optimizer
    assert d_opt.param_groups[0]["lr"] == 4e-3 and d_opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert g_opt.param_groups[0]["lr"] == 1e-3 and g_opt.param_groups[0]["betas"] == (0.5, 0.99)
    assert d_opt.param_groups[0]["params"] == list(tr.modules["d"].parameters())


def test_skip_guard_is_per_sub_step(tmp_path):
    # the generator's loss is 1000x the discriminator's throughout and explodes once more at step 3
    steps = gan_steps(0, 0, scale_g={s: 1e3 * (1e4 if s == 3 else 1.0) for s in range(6)})
    res = gan_trainer(tmp_path, 6, sub_steps=steps).fit()
    assert [h["skipped"] for h in res.history] == [0, 0, 0, 1, 0, 0]
    assert res.history[3]["g/loss"] > 1e6 and res.history[3]["d/loss"] < 10


def test_gradients_never_leak_between_sub_steps(tmp_path):
    """Each sub-step starts with no gradients anywhere; a module no sub-step updates is prepared and in training
    mode but never optimised, checkpointed or exported."""
    entered = []

    def checked(sub: SubStep) -> SubStep:
        def loss_fn(models, batch, generator, step):
            entered.append((sub.name, all(p.grad is None for m in models.values() for p in m.parameters()),
                            models["aux"].training))
            terms = sub.loss_fn(models, batch, generator, step)
            return {**terms, "loss": terms["loss"] + models["aux"](batch).pow(2).mean()}

        return SubStep(sub.name, loss_fn, sub.update, sub.start)

    aux = mlp([2, 1], 3)
    aux0 = {k: v.clone() for k, v in aux.state_dict().items()}
    cfg = TrainConfig(max_steps=5, log_every=1, ckpt_every=0, val_every=0)
    tr = Trainer({"g": mlp([2, 8, 2], 1), "d": mlp([2, 8, 1], 2), "aux": aux}, [checked(s) for s in gan_steps(1, 0)],
                 RealSamples(), tmp_path, train=cfg, batch_size=8, device="cpu", progress=False)
    tr.fit()
    assert entered == [("g", True, True)] + [("d", True, True), ("g", True, True)] * 4
    assert all(p.grad is None for m in tr.modules.values() for p in m.parameters())
    assert all(torch.equal(aux.state_dict()[k], v) for k, v in aux0.items())
    assert sorted(tr.optimizers) == sorted(tr.emas) == ["d", "g"]
    assert ckpt_io.load_checkpoint(ckpt_io.checkpoint_dir(tmp_path, 5)).state["modules"] == ["g", "d"]
    assert not (tmp_path / "final_aux.safetensors").exists() and (tmp_path / "final_d.safetensors").is_file()


def test_one_grad_scaler_serves_a_sub_step_that_updates_two_modules(tmp_path):
    """fp16's grad scaler (here a CPU one with power-of-2 scales, so that scaling is exact) must unscale each
    optimiser once and update once per backward: then the run is bitwise the run without a scaler."""
    def joint(models, real, generator, step):
        fake = models["g"](torch.randn(real.shape, generator=generator))
        mom = (fake.mean(0) - real.mean(0)).pow(2).sum()
        d_loss = F.softplus(-models["d"](real)).mean() + F.softplus(models["d"](fake.detach())).mean()
        return {"loss": mom + d_loss, "mom": mom, "d": d_loss}

    clip = OptimConfig(lr=1e-2, milestones=[], grad_clip=0.5)
    runs = []
    for name, scaler in (("plain", None), ("scaled", torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1))):
        tr = gan_trainer(tmp_path / name, 6, sub_steps=[SubStep("joint", joint, ("g", "d"))], optim=clip, d_optim=clip,
                         grad_accum=2)
        tr.accelerator.scaler = scaler
        runs.append((tr.fit(), tr))
    (plain, _), (scaled, tr) = runs
    assert tr.accelerator.scaler.get_scale() == 2.0 ** 14  # grew once per step: one update per backward
    assert plain.history == scaled.history
    for n in ("g", "d"):
        wa = ckpt_io.load_weights(tmp_path / "plain" / "checkpoints" / "step_000000006" / f"{n}.safetensors")
        wb = ckpt_io.load_weights(tmp_path / "scaled" / "checkpoints" / "step_000000006" / f"{n}.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
