"""``run_training``: build a method's recipe (by name, through ``blindsr.registry``), save the resolved config and
run metadata, and train it with the generic :class:`~blindsr.train.trainer.Trainer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blindsr.errors import BlindSRError
from blindsr.train.config import RunConfig, save_config
from blindsr.train.trainer import Trainer, TrainResult


def rewrite_export(path: Path, convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Rename the keys of ``final.safetensors`` in place (e.g. to an official layout), keeping its metadata."""
    from safetensors.torch import load_file

    from blindsr.io.weights import load_safetensors_metadata
    from blindsr.train.checkpoint import save_weights

    save_weights(convert(load_file(str(path))), path, metadata=load_safetensors_metadata(path))


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (the package by default), with ``-dirty`` if modified."""
    cwd = path or Path(__file__).resolve().parent
    if os.environ.get("BLINDSR_GIT_COMMIT"):  # a copy of the tree without .git (e.g. a remote GPU machine)
        return os.environ["BLINDSR_GIT_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_training(cfg: RunConfig, *, device: str = "auto", resume: str | None = None,
                 progress: bool = True) -> TrainResult:
    """Build ``cfg.method``'s recipe (``blindsr.registry``), save ``config.yaml`` + ``meta.json`` in the run dir,
    and train it."""
    from blindsr import __version__, registry

    if cfg.method not in registry.names("recipe"):
        raise BlindSRError(f"config: method {cfg.method!r}: choose one of {', '.join(registry.names('recipe'))}")
    torch.manual_seed(cfg.train.seed)  # the model's initial weights (everything else has its own generators)
    recipe = registry.resolve("recipe", cfg.method)(cfg)
    trainer = Trainer(recipe.modules, recipe.steps, recipe.dataset, cfg.output, train=cfg.train, optim=cfg.optim,
                      module_optim=recipe.module_optim, module_ema=recipe.module_ema, export=recipe.export,
                      batch_size=cfg.data.batch_size, workers=cfg.data.workers, validate_fn=recipe.validate_fn,
                      device=device, export_metadata=recipe.export_metadata, progress=progress)
    export = trainer.export_name
    if cfg.train.init_from:  # before fit() copies the model into its EMA
        from blindsr.io.weights import load_into, load_state_dict

        load_into(recipe.modules[export], load_state_dict(cfg.train.init_from))
    if trainer.is_main:
        run_dir = Path(cfg.output)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(recipe.config or cfg, run_dir / "config.yaml")
        acc = trainer.accelerator
        meta = {"blindsr": __version__, "git_commit": git_commit(), "argv": sys.argv, "resume": resume,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                "processes": acc.num_processes, "device": str(acc.device), "mixed_precision": cfg.train.mixed_precision,
                "train_images": len(recipe.dataset),
                "model_parameters": sum(p.numel() for p in recipe.modules[export].parameters())}
        path = run_dir / "meta.json"  # one entry per start (fresh or resumed)
        runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
        path.write_text(json.dumps({"runs": [*runs, meta]}, indent=2) + "\n")
    result = trainer.fit(resume)
    if recipe.export_keys is not None and result.final is not None and trainer.is_main:
        rewrite_export(result.final, recipe.export_keys)
    trainer.accelerator.wait_for_everyone()
    return result


__all__ = ["git_commit", "rewrite_export", "run_training"]
