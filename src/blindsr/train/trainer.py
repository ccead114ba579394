"""A generic Accelerate trainer: named modules, ordered sub-steps, one optimiser / LR schedule / EMA per module.

One process, one GPU, many GPUs or many nodes (``accelerate launch``), mixed precision, gradient accumulation,
Adam + MultiStepLR, EMA, gradient clipping, the official "skip a step whose loss explodes" guard, checkpoints
and an *exact* resume.

The sub-step model. A run trains the modules ``modules`` (name -> ``nn.Module``) with a list of sub-steps
(:class:`SubStep`). One iteration (= one step of the step counter) fetches ``train.grad_accum`` micro-batches
and then runs, in order, every sub-step whose ``start <= step``: for each micro-batch, ``loss_fn(models, batch,
generator, step)`` and a backward pass of ``loss / grad_accum``; then the skip guard, gradient clipping, an
optimiser step and an EMA update for the modules in ``update``, and all gradients are dropped. All sub-steps of
an iteration see the same micro-batches. A plain model is one module ``model`` with one sub-step ``main``
(:meth:`Trainer.single`); a GAN is a sub-step ``d`` updating the discriminator followed by a sub-step ``g``
updating the generator. A loss term that switches on after N steps is weighted by :func:`term_weight`; a whole
sub-step that starts later has ``start = N``.

Gradients between sub-steps: every module's gradients are ``None`` when a sub-step starts and are dropped when
it ends, so what a sub-step's backward leaves in a module it does not update (the discriminator's gradients of
the generator loss) never reaches a later optimiser step. Under DDP only the updated modules' gradients are
all-reduced, and only on the last micro-batch.

Exact resume, by construction (on GPUs with ``train.deterministic``): every random draw of a step comes from
generators seeded with ``(seed, step, micro-batch, rank)`` -- ``(seed, step, sub-step, micro-batch, rank)``
when there are several sub-steps -- (the loss generator: degradation, noise, timesteps) or ``(seed, epoch,
index)`` (the data: order, crops, flips); every learning rate and loss-term weight is a pure function of the
step; and a checkpoint holds, per module, weights, EMA and optimiser state, plus per sub-step guard state, the
grad scaler and the global RNG. A run killed at step k and resumed produces the same per-step losses as a run
that never stopped. A Ctrl-C is held until the running iteration has finished (:func:`deferred_interrupt`), so
the checkpoint it saves never has some sub-steps of an iteration applied and others not.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
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

LossFn = Callable[[dict[str, torch.nn.Module], Any, torch.Generator, int], dict[str, torch.Tensor]]
SingleLossFn = Callable[[torch.nn.Module, Any, torch.Generator], dict[str, torch.Tensor]]
ValidateFn = Callable[[torch.nn.Module], dict[str, float]]
NAME_RE = re.compile(r"[A-Za-z0-9_-]+")  # module names become file names, sub-step names log columns


@dataclass
class SubStep:
    """One backward pass + optimiser step per iteration.

    ``loss_fn(models, batch, generator, step)`` returns ``{"loss": scalar, other terms...}``; ``models`` maps
    every module name to its prepared, training-mode module (frozen helpers belong in the closure). The batch
    is shared with the iteration's other sub-steps: do not modify it in place. After the backward the
    optimisers of the modules in ``update`` step. The sub-step runs for steps ``>= start`` only.
    """

    name: str
    loss_fn: LossFn
    update: tuple[str, ...]
    start: int = 0


def single_step(loss_fn: SingleLossFn) -> SubStep:
    """The one sub-step ``main`` of a plain run: ``loss_fn(model, batch, generator)`` on the module ``model``."""
    def main(models: dict[str, torch.nn.Module], batch: Any, generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        return loss_fn(models["model"], batch, generator)

    return SubStep("main", main, ("model",))


def term_weight(step: int, weight: float, start: int = 0) -> float:
    """0 before ``start``, ``weight`` from then on: a loss term enabled after N steps."""
    return weight if step >= start else 0.0


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
        # accelerate has no public way to reset its process-wide state; without this a second Accelerator with
        # another mixed_precision in the same process raises "AcceleratorState has already been initialized".
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


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, then raise it.

    An interrupted run so stops between iterations, never between two sub-steps of one (which would checkpoint
    some modules one update ahead); a second Ctrl-C raises at once. Only where Python's own SIGINT handler is
    in place, in the main thread; elsewhere the block runs as is.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def build_optimizer(name: str, module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.name`` (adam | adamw) over the trainable parameters of ``module``."""
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.name not in optimizers:
        raise BlindSRError(f"config: optim.name {cfg.name!r}: choose adam or adamw")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise BlindSRError(f"trainer: module {name!r} is updated by a sub-step but has no trainable parameters")
    return optimizers[cfg.name](params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@dataclass
class TrainResult:
    step: int                                     # the last completed step
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)  # per step: losses (mean over processes), lr, skipped
    final: Path | None = None                     # final.safetensors (EMA weights), when the run completed
    validation: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Train ``modules`` on ``dataset`` with the sub-steps ``steps`` (see the module docstring).

    Only modules named in some ``SubStep.update`` get an optimiser (``module_optim[name]``, else ``optim``),
    an EMA (decay ``module_ema[name]``, else ``train.ema_decay``; 0 = the latest weights) and checkpoint
    entries; every module is moved to the device, prepared and put in training mode. ``export`` (default: the
    first updated module) is the module whose EMA weights ``validate_fn`` sees and ``final.safetensors`` holds.

    Writes to ``run_dir``: ``checkpoints/step_*/``, ``log.csv`` (step, loss terms, lr, skipped, it/s, time),
    ``val.csv`` (step, ``validate_fn`` metrics), ``losses.png``, ``tb/`` (when TensorBoard is installed) and at
    the end ``final.safetensors`` (with ``export_metadata``) and ``final_<name>.safetensors`` for every other
    updated module. With one sub-step the logged terms are the loss_fn's keys; with several they are prefixed
    with ``<sub-step>/`` (``d/loss``, ``g/adv``), ``lr`` is the export module's and ``skipped`` counts the
    skipped sub-steps; a sub-step that has not started yet logs nothing.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], steps: list[SubStep],
                 dataset: torch.utils.data.Dataset, run_dir: str | Path, *, train: TrainConfig | None = None,
                 optim: OptimConfig | None = None, module_optim: dict[str, OptimConfig] | None = None,
                 module_ema: dict[str, float] | None = None, export: str | None = None, batch_size: int = 1,
                 workers: int = 0, validate_fn: ValidateFn | None = None, device: str = "auto",
                 export_metadata: dict[str, str] | None = None, progress: bool = True):
        self.cfg = train or TrainConfig()
        if self.cfg.grad_accum < 1 or batch_size < 1 or self.cfg.max_steps < 0:
            raise BlindSRError("train: grad_accum and batch_size must be >= 1 and max_steps >= 0")
        self.modules, self.steps = dict(modules), list(steps)
        self.updated = [n for n in self.modules if any(n in s.update for s in self.steps)]  # in `modules` order
        self.export_name = export or (self.updated[0] if self.updated else None)
        self._check(module_optim or {}, module_ema or {})
        optim = optim or OptimConfig()
        self.optim_cfgs = {n: (module_optim or {}).get(n, optim) for n in self.updated}
        self.ema_decays = {n: (module_ema or {}).get(n, self.cfg.ema_decay) for n in self.updated}
        bad = {n: d for n, d in self.ema_decays.items() if not 0.0 <= d < 1.0}
        if bad:
            raise BlindSRError(f"train: EMA decay {bad}: must be in [0, 1) (0 = no averaging)")
        self.dataset, self.run_dir = dataset, Path(run_dir)
        self.batch_size, self.workers = batch_size, workers
        self.validate_fn, self.export_metadata = validate_fn, dict(export_metadata or {})
        prefix = len(self.steps) > 1
        self._prefix = {s.name: f"{s.name}/" if prefix else "" for s in self.steps}
        first = sorted(self.steps, key=lambda s: self.export_name not in s.update)  # export's sub-steps first
        self._headline = [self._prefix[s.name] + "loss" for s in first]  # progress bar: the first one present
        if self.cfg.deterministic:
            use_deterministic_kernels()
        self.accelerator = make_accelerator(device, self.cfg.mixed_precision)
        self.progress = progress

    def _check(self, module_optim: dict[str, OptimConfig], module_ema: dict[str, float]) -> None:
        """Names: valid, unique sub-steps, ``update`` / ``module_optim`` / ``module_ema`` / ``export`` known."""
        if not self.modules or not self.steps:
            raise BlindSRError("trainer: needs at least one module and one sub-step")
        names = [s.name for s in self.steps]
        for n in [*self.modules, *names]:
            if not NAME_RE.fullmatch(n):
                raise BlindSRError(f"trainer: name {n!r}: use letters, digits, '_' and '-' only")
        if len(set(names)) != len(names):
            raise BlindSRError(f"trainer: sub-step names must be unique, got {names}")
        for s in self.steps:
            if isinstance(s.update, str):
                raise BlindSRError(f"trainer: sub-step {s.name!r}: update must be a tuple of module names")
            unknown = [n for n in s.update if n not in self.modules]
            if unknown or not s.update:
                raise BlindSRError(f"trainer: sub-step {s.name!r} updates {list(s.update)}; "
                                   f"the modules are {list(self.modules)}")
        for what, names_given in (("module_optim", module_optim), ("module_ema", module_ema),
                                  ("export", [self.export_name])):
            stray = [n for n in names_given if n not in self.updated]
            if stray:
                raise BlindSRError(f"trainer: {what} names {stray}, but the updated modules are {self.updated}")

    @classmethod
    def single(cls, model: torch.nn.Module, loss_fn: SingleLossFn, dataset: torch.utils.data.Dataset,
               run_dir: str | Path, **kw) -> Trainer:
        """One module ``model``, one sub-step ``main`` with ``loss_fn(model, batch, generator)``."""
        return cls({"model": model}, [single_step(loss_fn)], dataset, run_dir, **kw)

    # ------------------------------------------------------------------ setup / state
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _setup(self, resume: str | None) -> int:
        """Build optimisers/EMAs, load a checkpoint if resuming, prepare for the accelerator; returns the start step."""
        acc = self.accelerator
        ckpt_path = ckpt_io.resolve_resume(resume, self.run_dir)
        if ckpt_path is None and ckpt_io.list_checkpoints(self.run_dir):
            raise BlindSRError(f"{self.run_dir} already holds checkpoints: use --resume auto, or another --output")
        self.emas = {n: EMA(self.modules[n], self.ema_decays[n], self.cfg.ema_warmup) for n in self.updated}
        ckpt = ckpt_io.load_checkpoint(ckpt_path) if ckpt_path is not None else None
        state: dict[str, Any] = ckpt.state if ckpt is not None else {}
        if ckpt is not None:
            if sorted(ckpt.weights) != sorted(self.updated):
                raise BlindSRError(f"checkpoint {ckpt.path}: holds the modules {sorted(ckpt.weights)}, "
                                   f"but this run trains {sorted(self.updated)}")
            for n in self.updated:
                self.modules[n].load_state_dict(ckpt.weights[n])
                self.emas[n].load_state_dict(ckpt.ema[n])
            if state.get("world", acc.num_processes) != acc.num_processes and self.is_main:
                print(f"blindsr: warning: resuming a {state['world']}-process run on {acc.num_processes} "
                      "processes: the data order will differ from an uninterrupted run", file=sys.stderr)
        optimizers = [build_optimizer(n, self.modules[n], self.optim_cfgs[n]) for n in self.updated]
        # a module without trainable parameters is prepared for evaluation: no DDP wrapper (which refuses it, and
        # which accelerate puts around every model in multi-CPU runs), the same device and autocast
        trainable = [n for n, m in self.modules.items() if any(p.requires_grad for p in m.parameters())]
        prepared = iter(acc.prepare(*(self.modules[n] for n in trainable), *optimizers))
        self.modules = {n: next(prepared) if n in trainable else acc.prepare_model(m, evaluation_mode=True)
                        for n, m in self.modules.items()}
        self.optimizers = {n: next(prepared) for n in self.updated}
        for ema in self.emas.values():
            ema.model.to(acc.device)
        if ckpt is not None:
            for n, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][n])
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            rng_file = ckpt.path / f"rng_{acc.process_index}.pt"
            ckpt_io.set_rng_state(torch.load(rng_file, weights_only=True) if rng_file.is_file() else state["rng"])
            if self.is_main:
                print(f"blindsr: resuming from {ckpt.path} (step {ckpt.step})", file=sys.stderr)
        guard = state.get("guard", {})
        self.last_loss: dict[str, float | None] = {s.name: guard.get(s.name) for s in self.steps}
        self.elapsed0 = float(state.get("elapsed", 0.0))
        return int(state.get("step", 0))

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step_<step>/`` (all processes must call this)."""
        acc = self.accelerator
        path = ckpt_io.checkpoint_dir(self.run_dir, step)
        acc.wait_for_everyone()
        if self.is_main:
            state = {"step": step, "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
                     "guard": dict(self.last_loss), "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "elapsed": self._elapsed(), "world": acc.num_processes, "rng": ckpt_io.rng_state()}
            weights = {n: acc.unwrap_model(self.modules[n]).state_dict() for n in self.updated}
            ckpt_io.save_checkpoint(path, weights, {n: e.state_dict() for n, e in self.emas.items()}, state)
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        if not self.is_main:
            torch.save(ckpt_io.rng_state(), path / f"rng_{acc.process_index}.pt")
        return path

    def _elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    # ------------------------------------------------------------------ one step
    def _seed(self, sub: SubStep, step: int, micro: int) -> int:
        rank = self.accelerator.process_index
        if len(self.steps) == 1:  # the single-model formula: runs from before sub-steps existed reproduce
            return mix_seed(self.cfg.seed, "step", step, micro, rank)
        return mix_seed(self.cfg.seed, "step", step, sub.name, micro, rank)

    def _should_skip(self, loss: float, last: float | None) -> bool:
        """The official guard: skip a step whose loss exceeds ``factor`` x the last accepted one (or is not
        finite). The ratio test needs a positive last loss (a hinge or WGAN loss may be <= 0)."""
        if not math.isfinite(loss):
            return True
        f = self.cfg.skip_loss_factor
        return f is not None and last is not None and last > 0 and loss > f * last

    def _sub_step(self, sub: SubStep, step: int, batches: list[Any]) -> tuple[dict[str, float], bool]:
        """Run ``sub`` over the iteration's micro-batches; returns its (process-mean) terms and whether it stepped."""
        acc, cfg = self.accelerator, self.cfg
        total: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(batches):
            g = torch.Generator(device=acc.device)
            g.manual_seed(self._seed(sub, step, micro))
            sync = set(sub.update) if micro == len(batches) - 1 else set()
            with contextlib.ExitStack() as no_sync:
                for n, m in self.modules.items():
                    if n not in sync:
                        no_sync.enter_context(acc.no_sync(m))
                with acc.autocast():
                    terms = sub.loss_fn(self.modules, batch, g, step)
                if "loss" not in terms:
                    raise KeyError(f"sub-step {sub.name!r}: loss_fn must return a dict with the key 'loss'")
                acc.backward(terms["loss"] / cfg.grad_accum)
            for k, v in terms.items():
                total[k] = total.get(k, 0.0) + v.detach().float().mean() / cfg.grad_accum
        keys = sorted(total)
        reduced = acc.reduce(torch.stack([total[k] for k in keys]), reduction="mean").tolist()
        out = dict(zip(keys, reduced, strict=True))
        accepted = not self._should_skip(out["loss"], self.last_loss[sub.name])
        if accepted:
            self._optimizer_step(sub.update)
            for n in sub.update:
                self.emas[n].update(acc.unwrap_model(self.modules[n]), step)
            self.last_loss[sub.name] = out["loss"]
        for m in self.modules.values():
            m.zero_grad(set_to_none=True)
        return out, accepted

    def _optimizer_step(self, names: tuple[str, ...]) -> None:
        """Clip (per module) and step the optimisers of ``names`` after one backward pass.

        With fp16 the one grad scaler unscales each of these optimisers once and updates once; accelerate's
        ``clip_grad_norm_`` (which unscales every prepared optimiser) and ``optimizer.step()`` (which updates
        the scaler after each optimiser) are only right for one optimiser per backward.
        """
        scaler = self.accelerator.scaler  # fp16 only
        for n in names:
            if self.optim_cfgs[n].grad_clip:
                if scaler is not None:
                    scaler.unscale_(self.optimizers[n].optimizer)
                torch.nn.utils.clip_grad_norm_(self.modules[n].parameters(), self.optim_cfgs[n].grad_clip)
        for n in names:
            if scaler is None:
                self.optimizers[n].step()
            else:
                scaler.step(self.optimizers[n].optimizer)
        if scaler is not None:
            scaler.update()

    def train_step(self, step: int, batches: Iterator[Any]) -> dict[str, float]:
        """One iteration: ``grad_accum`` micro-batches from ``batches``, then every started sub-step in order.

        Returns the log row: the sub-steps' (process-mean) terms, ``lr`` and ``skipped``.
        """
        from accelerate.utils import send_to_device

        acc = self.accelerator
        for n, opt in self.optimizers.items():
            lr = lr_at(step, self.optim_cfgs[n])
            for group in opt.param_groups:
                group["lr"] = lr
        micro = [send_to_device(next(batches), acc.device, non_blocking=True) for _ in range(self.cfg.grad_accum)]
        row: dict[str, float] = {}
        skipped = 0
        for sub in self.steps:
            if step >= sub.start:
                terms, accepted = self._sub_step(sub, step, micro)
                row.update({self._prefix[sub.name] + k: v for k, v in terms.items()})
                skipped += not accepted
        row.update(lr=lr_at(step, self.optim_cfgs[self.export_name]), skipped=float(skipped))
        return row

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
        for m in self.modules.values():
            m.train()
        mid_step = False  # inside an iteration: some sub-steps may have been applied, others not
        try:
            while step < cfg.max_steps:
                mid_step = True
                with deferred_interrupt():
                    row = self.train_step(step, batches)
                    step += 1
                    result.step = step
                    mid_step = False
                result.history.append({"step": step, **row})
                window.append(row)
                bar.update(1)
                loss = next((row[k] for k in self._headline if k in row), math.nan)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    entry = {"step": step, **window_mean(window), "lr": row["lr"],
                             "it_s": len(window) / max(now - t_window, 1e-9), "time": self._elapsed()}
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
            if mid_step and self.is_main:
                print(f"\nblindsr: stopped inside step {step + 1}: not saved", file=sys.stderr)
            elif result.step > 0:
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
        """Run ``validate_fn`` on the export module's EMA model (main process only; the others wait)."""
        metrics: dict[str, float] = {}
        if self.is_main:
            metrics = {"step": step, **self.validate_fn(self.emas[self.export_name].model)}
            if val_log is not None:
                val_log.log(metrics)
            if tb is not None:
                tb.log(metrics, step, prefix="val")
            text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
            print(f"blindsr: step {step} validation: {text}", file=sys.stderr)
        self.accelerator.wait_for_everyone()
        return metrics

    def export(self, step: int) -> Path:
        """``final.safetensors``: the export module's EMA weights with ``export_metadata`` (+ the step);
        ``final_<name>.safetensors``: the EMA weights of every other updated module."""
        path = self.run_dir / "final.safetensors"
        if self.is_main:
            meta = {**self.export_metadata, "step": str(step)}
            ckpt_io.save_weights(self.emas[self.export_name].state_dict(), path,
                                 metadata={k: str(v) for k, v in meta.items()})
            for n in self.updated:
                if n != self.export_name:
                    ckpt_io.save_weights(self.emas[n].state_dict(), self.run_dir / f"final_{n}.safetensors",
                                         metadata={"module": n, "step": str(step)})
        self.accelerator.wait_for_everyone()
        return path


def window_mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key (but ``lr``), the mean over the rows that have it: a sub-step starting mid-window counts from then."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "lr")
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
