"""Training checkpoints: weights in safetensors, the rest in a ``weights_only``-loadable ``.pt``.

Layout of ``run_dir/checkpoints/step_000001000/`` (format 2), for every module the run updates::

    <name>.safetensors       training weights of module <name>
    <name>.ema.safetensors   its EMA weights
    state.pt                 format (2), step, modules (names), optimizers {name: optimiser state},
                             guard {sub-step: last accepted loss}, grad scaler, elapsed time, world size,
                             global RNG of rank 0
    rng_<rank>.pt            the global RNG of each other rank (multi-process runs)

Format 1 (one model: ``model.safetensors``, ``ema.safetensors``, ``state.pt`` with ``optimizer`` and
``last_loss``) is still read, as a run with one module ``model`` and one sub-step ``main`` (what
``Trainer.single`` builds).

A checkpoint directory is written under a temporary name and renamed when complete, so a kill mid-save never
leaves a half checkpoint that ``--resume auto`` would pick.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blindsr.errors import BlindSRError

STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT = 2
StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """A loaded checkpoint, whatever its format, in the format-2 shape."""

    path: Path
    weights: dict[str, StateDict]  # module name -> training weights
    ema: dict[str, StateDict]      # module name -> EMA weights
    state: dict[str, Any]          # state.pt: step, optimizers, guard, scaler, elapsed, world, rng

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_weights(sd: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, CPU, un-aliased)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: str | Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:09d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` as (step, dir), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = STEP_RE.match(d.name)
        if m and (d / "state.pt").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``None`` -> no resume; ``auto`` -> latest checkpoint in ``run_dir`` (None if there is none);
    a checkpoint dir -> itself; a run dir -> its latest checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(resume)
    if (p / "state.pt").is_file():
        return p
    ckpts = list_checkpoints(p) if p.is_dir() else []
    if not ckpts:
        raise BlindSRError(f"--resume {resume}: not a checkpoint directory or a run directory with checkpoints")
    return ckpts[-1][1]


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and, when present, the current CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt: Path, weights: dict[str, StateDict], ema: dict[str, StateDict],
                    state: dict[str, Any]) -> None:
    """Write one checkpoint directory atomically (temp dir + rename); ``weights`` and ``ema`` are keyed by
    module name, and ``state`` gets ``format`` and ``modules`` added."""
    if weights.keys() != ema.keys():
        raise ValueError(f"checkpoint: weights for {sorted(weights)} but EMA for {sorted(ema)}")
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in weights:
        save_weights(weights[name], tmp / f"{name}.safetensors")
        save_weights(ema[name], tmp / f"{name}.ema.safetensors")
    torch.save({**state, "format": FORMAT, "modules": list(weights)}, tmp / "state.pt")
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)


def load_checkpoint(ckpt: Path) -> Checkpoint:
    """Read a checkpoint directory (format 1 or 2); the state loads with ``weights_only``."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if state.get("format", 1) == 1:
            weights = {"model": load_weights(ckpt / "model.safetensors")}
            ema = {"model": load_weights(ckpt / "ema.safetensors")}
            state = {**{k: v for k, v in state.items() if k not in ("optimizer", "last_loss")},
                     "format": FORMAT, "modules": ["model"], "optimizers": {"model": state["optimizer"]},
                     "guard": {"main": state.get("last_loss")}}
        else:
            weights = {n: load_weights(ckpt / f"{n}.safetensors") for n in state["modules"]}
            ema = {n: load_weights(ckpt / f"{n}.ema.safetensors") for n in state["modules"]}
    except (OSError, RuntimeError, KeyError) as e:
        raise BlindSRError(f"checkpoint {ckpt}: cannot be read ({type(e).__name__}: {e})") from None
    return Checkpoint(ckpt, weights, ema, state)


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``None`` keeps all)."""
    if keep is None:
        return
    ckpts = list_checkpoints(run_dir)
    for _, d in ckpts[:max(len(ckpts) - keep, 0)]:
        shutil.rmtree(d, ignore_errors=True)
