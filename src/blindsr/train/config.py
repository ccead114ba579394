"""Training run configuration: YAML -> dataclasses, ``--set`` overrides, one-line errors.

A run config has the sections ``model``, ``diffusion``, ``loss`` (free dicts, checked against the method's own
dataclasses by the recipe), and ``data``, ``optim``, ``train`` (the dataclasses below). Any unknown key, in any
section, is a :class:`BlindSRError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blindsr.config import apply_overrides, from_dict, to_dict
from blindsr.errors import BlindSRError

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "RunConfig", "load_config", "save_config", "apply_overrides",
           "from_dict", "to_dict"]


@dataclass
class DataConfig:
    root: str = "../shared/data/train-hr"  # folder of HR images (recursive); LR is synthesised on the fly
    lr_root: str | None = None       # unpaired methods (UDDM): a folder of real LR photos, cropped crop/scale
    crop: int = 128                  # HR crop size (official gt_size 128); a multiple of `scale`
    scale: int = 4
    flip: bool = True                # random horizontal flip
    rot: bool = True                 # random vertical flip + transpose (with flip: all 8 dihedral transforms)
    cache: bool = True               # keep the decoded images in memory as uint8
    degradation: str = "blinddiff-setting1"  # a `blindsr.degradations.pipelines` preset
    degradation_overrides: dict[str, Any] = field(default_factory=dict)  # passed to get_preset(name, **overrides)
    batch_size: int = 10             # per process (official: 10 per GPU x 4 GPUs)
    workers: int = 2                 # DataLoader worker processes (0 = load in the main process)
    val_root: str | None = None      # a separate validation folder; None = hold out from `root`
    val_fraction: float = 0.0        # fraction of `root` held out for validation (never trained on)
    val_names: list[str] = field(default_factory=list)  # explicit held-out file names (stems or names)
    val_max_images: int = 4          # validation images used (sampling is slow)
    val_crop: int | None = 128       # centre-crop validation HR images (None = full image)


@dataclass
class OptimConfig:
    name: str = "adam"                         # adam (BasicSR/BlindDiff) | adamw (decoupled decay: DiffBIR, SD)
    lr: float = 5e-5                           # Adam, official default (FFHQ and the March yml: 2e-4)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [100_000, 200_000, 300_000, 400_000, 500_000])
    gamma: float = 0.5                         # MultiStepLR factor at each milestone
    warmup_steps: int = 0                      # linear warm-up (0 = none, as in the official code)
    grad_clip: float | None = None             # max gradient norm (None = no clipping, as in the official code)


@dataclass
class TrainConfig:
    max_steps: int = 1_000_000       # optimiser steps (official total_iter)
    grad_accum: int = 1              # micro-batches per optimiser step
    mixed_precision: str = "no"      # no | fp16 | bf16
    seed: int = 0
    ema_decay: float = 0.999         # applied every step (0 disables EMA: the EMA model is the model)
    ema_warmup: bool = False         # decay min(ema_decay, (1+n)/(10+n)): for short runs (official: off)
    skip_loss_factor: float | None = 100.0  # skip a step whose loss > factor x the previous loss (official guard)
    log_every: int = 100
    ckpt_every: int = 5000
    keep_checkpoints: int | None = 3 # keep the newest N step checkpoints (None = all)
    val_every: int = 5000            # 0 disables validation
    val_steps: int = 50              # sampler steps used for validation
    deterministic: bool = False      # deterministic CUDA kernels: bitwise-exact resume on GPUs too (slower)
    time_limit_min: float | None = None  # also stop (and export) after this many minutes of training, counted
    #                                      over all starts of the run (a resumed run continues the clock)
    init_from: str | None = None     # start from these weights (safetensors/.pth/.pt; fine-tuning); resume wins


@dataclass
class RunConfig:
    method: str = "blinddiff"
    output: str = "runs/blinddiff"   # run directory: checkpoints, logs, final.safetensors
    model: dict[str, Any] = field(default_factory=dict)      # model config fields (plus optional `preset`)
    diffusion: dict[str, Any] = field(default_factory=dict)  # diffusion config fields
    loss: dict[str, Any] = field(default_factory=dict)       # loss config fields and weights
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BlindSRError(f"--config {path}: no such file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise BlindSRError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise BlindSRError(f"--config {path}: the top level must be a mapping of sections")
    apply_overrides(data, list(overrides))
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back with :func:`load_config`)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
