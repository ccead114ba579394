"""A generic Accelerate trainer: any model, any ``loss_fn(model, batch, generator) -> {"loss": ..., ...}``.

One process, one GPU, many GPUs or many nodes (``accelerate launch``), mixed precision, gradient accumulation,
Adam + MultiStepLR, EMA, gradient clipping, the official "skip a step whose loss explodes" guard, checkpoints
and an *exact* resume.

Exact resume, by construction (on GPUs with ``train.deterministic``): every random draw of a step comes from generators seeded with
``(seed, step, micro-batch, rank)`` (the loss generator: degradation, noise, timesteps) or ``(seed, epoch,
index)`` (the data: order, crops, flips), the learning rate is a pure function of the step, and a checkpoint
holds weights, EMA, optimiser, grad scaler, guard state and the global RNG. A run killed at step k and resumed
produces the same per-step losses as a run that never stopped.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blindsr.data.datasets import make_loader, mix_seed
from blindsr.errors import BlindSRError
from blindsr.train import checkpoint as ckpt_io
from blindsr.train.config import OptimConfig, TrainConfig
from blindsr.train.ema import EMA
from blindsr.train.logging import CSVLog, TensorBoard, plot_losses

LossFn = Callable[[torch.nn.Module, Any, torch.Generator], dict[str, torch.Tensor]]
ValidateFn = Callable[[torch.nn.Module], dict[str, float]]


def lr_at(step: int, cfg: OptimConfig) -> float:
    """MultiStepLR (``lr * gamma^#milestones passed``) with an optional linear warm-up, as a pure function."""
    lr = cfg.lr * cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def make_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for ``device`` (auto|cpu|cuda) and ``mixed_precision`` (no|fp16|bf16).

    Under ``accelerate launch`` the launcher decides the devices; ``--device cpu`` forces the CPU. Creating a
    second trainer in one process (tests, notebooks) resets accelerate's per-run state first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from blindsr.device import resolve_device

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise BlindSRError(f"--mixed-precision {mixed_precision}: choose no, fp16 or bf16")
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda") and device != "auto":
        raise BlindSRError(f"--device {device}: training supports auto, cpu and cuda")
    if dev.type == "cuda" and dev.index not in (None, 0) and device != "auto":
        raise BlindSRError(f"--device {device}: pick the GPU with CUDA_VISIBLE_DEVICES and use --device cuda")
    cpu = dev.type == "cpu"
    if mixed_precision == "fp16" and cpu:
        raise BlindSRError("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def use_deterministic_kernels() -> None:
    """Deterministic CUDA kernels (cuBLAS workspace, no cuDNN autotuning); ops without one only warn.

    CPU training is deterministic anyway; on a GPU, atomics in some backward kernels otherwise make the
    last bits of the loss differ from run to run (and so between a resumed and an uninterrupted run).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class TrainResult:
    step: int                                     # the last completed step
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)  # per step: losses (mean over processes), lr, skipped
    final: Path | None = None                     # final.safetensors (EMA weights), when the run completed
    validation: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Train ``model`` on ``dataset`` by minimising ``loss_fn(model, batch, generator)["loss"]``.

    Writes to ``run_dir``: ``checkpoints/step_*/``, ``log.csv`` (step, loss components, lr, it/s, time),
    ``val.csv`` (step, ``validate_fn`` metrics of the EMA model), ``losses.png``, ``tb/`` (when TensorBoard is
    installed) and at the end ``final.safetensors`` (EMA weights, with ``export_metadata``).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, dataset: torch.utils.data.Dataset,
                 run_dir: str | Path, *, train: TrainConfig | None = None, optim: OptimConfig | None = None,
                 batch_size: int = 1, workers: int = 0, validate_fn: ValidateFn | None = None,
                 device: str = "auto", export_metadata: dict[str, str] | None = None, progress: bool = True):
        self.cfg, self.optim_cfg = train or TrainConfig(), optim or OptimConfig()
        if self.cfg.grad_accum < 1 or batch_size < 1 or self.cfg.max_steps < 0:
            raise BlindSRError("train: grad_accum and batch_size must be >= 1 and max_steps >= 0")
        self.model, self.loss_fn, self.dataset = model, loss_fn, dataset
        self.run_dir = Path(run_dir)
        self.batch_size, self.workers = batch_size, workers
        self.validate_fn, self.export_metadata = validate_fn, dict(export_metadata or {})
        if self.cfg.deterministic:
            use_deterministic_kernels()
        self.accelerator = make_accelerator(device, self.cfg.mixed_precision)
        self.progress = progress

    # ------------------------------------------------------------------ setup / state
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _setup(self, resume: str | None) -> int:
        """Build optimiser/EMA, load a checkpoint if resuming, prepare for the accelerator; returns start step."""
        acc = self.accelerator
        ckpt = ckpt_io.resolve_resume(resume, self.run_dir)
        if ckpt is None and ckpt_io.list_checkpoints(self.run_dir):
            raise BlindSRError(f"{self.run_dir} already holds checkpoints: use --resume auto, or another --output")
        state: dict[str, Any] = {}
        self.ema = EMA(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)
        if ckpt is not None:
            model_sd, ema_sd, state = ckpt_io.load_checkpoint(ckpt)
            self.model.load_state_dict(model_sd)
            self.ema.load_state_dict(ema_sd)
            if state.get("world", acc.num_processes) != acc.num_processes and self.is_main:
                print(f"blindsr: warning: resuming a {state['world']}-process run on {acc.num_processes} "
                      "processes: the data order will differ from an uninterrupted run", file=sys.stderr)
        o = self.optim_cfg
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if o.name not in optimizers:
            raise BlindSRError(f"config: optim.name {o.name!r}: choose adam or adamw")
        optimizer = optimizers[o.name]([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                       betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.ema.model.to(acc.device)
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            rng_file = ckpt / f"rng_{acc.process_index}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else state["rng"]
            ckpt_io.set_rng_state(rng)
        self.last_loss: float | None = state.get("last_loss")
        self.elapsed0 = float(state.get("elapsed", 0.0))
        if ckpt is not None and self.is_main:
            print(f"blindsr: resuming from {ckpt} (step {state['step']})", file=sys.stderr)
        return int(state.get("step", 0))

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step_<step>/`` (all processes must call this)."""
        acc = self.accelerator
        path = ckpt_io.checkpoint_dir(self.run_dir, step)
        acc.wait_for_everyone()
        if self.is_main:
            state = {"step": step, "optimizer": self.optimizer.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "last_loss": self.last_loss, "elapsed": self._elapsed(), "world": acc.num_processes,
                     "rng": ckpt_io.rng_state(), "format": 1}
            ckpt_io.save_checkpoint(path, acc.unwrap_model(self.model).state_dict(), self.ema.state_dict(), state)
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        if not self.is_main:
            torch.save(ckpt_io.rng_state(), path / f"rng_{acc.process_index}.pt")
        return path

    def _elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    # ------------------------------------------------------------------ one step
    def _micro_step(self, batch: Any, generator: torch.Generator, last: bool) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
        with sync:
            with acc.autocast():
                terms = self.loss_fn(self.model, batch, generator)
            if "loss" not in terms:
                raise KeyError("loss_fn must return a dict with the key 'loss'")
            acc.backward(terms["loss"] / self.cfg.grad_accum)
        return {k: v.detach().float().mean() for k, v in terms.items()}

    def _should_skip(self, loss: float) -> bool:
        """The official guard: skip a step whose loss exceeds ``factor`` x the previous one (or is not finite)."""
        if not math.isfinite(loss):
            return True
        f = self.cfg.skip_loss_factor
        return f is not None and self.last_loss is not None and loss > f * self.last_loss

    def train_step(self, step: int, batches) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns the (process-mean) loss terms."""
        acc, cfg = self.accelerator, self.cfg
        lr = lr_at(step, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), acc.device)
            g = torch.Generator(device=acc.device)
            g.manual_seed(mix_seed(cfg.seed, "step", step, micro, acc.process_index))
            terms = self._micro_step(batch, g, last=micro == cfg.grad_accum - 1)
            for k, v in terms.items():
                total[k] = total.get(k, 0.0) + v / cfg.grad_accum
        keys = sorted(total)
        reduced = acc.reduce(torch.stack([total[k] for k in keys]), reduction="mean").tolist()
        out = dict(zip(keys, reduced, strict=True))
        skipped = self._should_skip(out["loss"])
        if not skipped:
            if self.optim_cfg.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            self.optimizer.step()
            self.ema.update(acc.unwrap_model(self.model), step)
            self.last_loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        out.update(lr=lr, skipped=float(skipped))
        return out

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> TrainResult:
        """Train up to ``train.max_steps`` (resuming from ``resume``: a checkpoint, a run dir or ``auto``)."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        step = self._setup(resume)
        self.t0 = time.perf_counter()
        log = CSVLog(self.run_dir / "log.csv") if self.is_main else None
        val_log = CSVLog(self.run_dir / "val.csv") if self.is_main else None
        if log is not None:
            log.truncate_after(step)
            val_log.truncate_after(step)
        tb = TensorBoard(self.run_dir / "tb") if self.is_main else None
        result = TrainResult(step=step, run_dir=self.run_dir)
        loader = make_loader(self.dataset, self.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                             start_batch=step * cfg.grad_accum, workers=self.workers,
                             pin_memory=acc.device.type == "cuda")
        batches = iter(loader)
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (self.is_main and self.progress),
                   dynamic_ncols=True, desc="train")
        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        self.model.train()
        try:
            while step < cfg.max_steps:
                row = self.train_step(step, batches)
                step += 1
                result.step = step
                result.history.append({"step": step, **row})
                window.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    mean = {k: sum(r[k] for r in window) / len(window) for k in window[0] if k != "lr"}
                    entry = {"step": step, **mean, "lr": row["lr"], "it_s": len(window) / max(now - t_window, 1e-9),
                             "time": self._elapsed()}
                    if log is not None:
                        log.log(entry)
                        tb.log(entry, step)
                    window, t_window = [], now
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                    self.save_checkpoint(step)
                if self.validate_fn and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.max_steps):
                    result.validation.append(self.validate(step, val_log, tb))
                if cfg.time_limit_min is not None and self._time_is_up(cfg.time_limit_min):
                    if self.is_main:
                        print(f"\nblindsr: time limit of {cfg.time_limit_min} min reached at step {step}",
                              file=sys.stderr)
                    break
        except KeyboardInterrupt:
            if result.step > 0:
                path = self.save_checkpoint(result.step)
                if self.is_main:
                    print(f"\nblindsr: interrupted; saved {path} (continue with --resume auto)", file=sys.stderr)
            raise
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        self.save_checkpoint(step)
        result.final = self.export(step)
        if self.is_main and (self.run_dir / "log.csv").is_file():
            plot_losses(self.run_dir / "log.csv", self.run_dir / "losses.png")
        return result

    def _time_is_up(self, minutes: float) -> bool:
        """True on every process once the main process has trained ``minutes`` (one decision for all)."""
        flag = torch.tensor([float(self._elapsed() >= 60.0 * minutes)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def validate(self, step: int, val_log: CSVLog | None = None, tb: TensorBoard | None = None) -> dict[str, float]:
        """Run ``validate_fn`` on the EMA model (main process only; the others wait)."""
        metrics: dict[str, float] = {}
        if self.is_main:
            metrics = {"step": step, **self.validate_fn(self.ema.model)}
            if val_log is not None:
                val_log.log(metrics)
            if tb is not None:
                tb.log(metrics, step, prefix="val")
            text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
            print(f"blindsr: step {step} validation: {text}", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        return metrics

    def export(self, step: int) -> Path:
        """``final.safetensors``: the EMA weights with ``export_metadata`` (+ the step)."""
        path = self.run_dir / "final.safetensors"
        if self.is_main:
            meta = {**self.export_metadata, "step": str(step)}
            ckpt_io.save_weights(self.ema.state_dict(), path, metadata={k: str(v) for k, v in meta.items()})
        self.accelerator.wait_for_everyone()
        return path
