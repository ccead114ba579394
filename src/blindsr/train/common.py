"""Pieces every training recipe uses: the degradation of the run, the train/validation split, the HR crop
dataset and SR validation (PSNR/SSIM on fixed LR images)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from blindsr.data.datasets import FixedLRSet, HRFolderDataset, list_hr_files, mix_seed, split_holdout
from blindsr.errors import BlindSRError
from blindsr.train.config import RunConfig
from blindsr.train.trainer import ValidateFn


def degrade_fn(cfg: RunConfig):
    """The degradation preset of ``cfg.data`` (its scale must match ``data.scale``)."""
    from blindsr.degradations.pipelines import get_preset

    degrade = get_preset(cfg.data.degradation, **cfg.data.degradation_overrides)
    if degrade.scale != cfg.data.scale:
        raise BlindSRError(f"config: data.degradation {cfg.data.degradation} has scale {degrade.scale}, "
                           f"but data.scale is {cfg.data.scale}")
    return degrade


def split_data(cfg: RunConfig) -> tuple[list[Path], list[Path]]:
    """(training files, validation files): ``data.val_root`` if given, else the hold-out part of ``data.root``."""
    d = cfg.data
    train, held = split_holdout(list_hr_files(d.root), d.val_fraction, d.val_names, seed=cfg.train.seed)
    return train, (list_hr_files(d.val_root) if d.val_root else held)


def sr_validation(sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor], files: list[Path], degrade,
                  cfg: RunConfig) -> ValidateFn:
    """PSNR/SSIM (Y channel, border = scale: the BasicSR/BlindDiff convention) of ``sample(lr, generator)``
    on fixed LR images; the pairs are synthesised on the first call (main process only)."""
    from blindsr.metrics import psnr, ssim

    d, state = cfg.data, {}

    def validate(model: torch.nn.Module) -> dict[str, float]:
        if "set" not in state:
            state["set"] = FixedLRSet(files, degrade, d.scale, d.val_crop, cfg.train.seed, d.val_max_images)
        device = next(model.parameters()).device
        ps, ss = [], []
        for i, (_, lr, hr) in enumerate(state["set"]):
            g = torch.Generator(device=device).manual_seed(mix_seed(cfg.train.seed, "val-sample", i))
            sr = sample(model, lr[None].to(device), g)[0].detach().float().cpu()
            ps.append(psnr(sr, hr, crop_border=d.scale, y_channel=True))
            ss.append(ssim(sr, hr, crop_border=d.scale, y_channel=True))
        return {"psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss)}

    return validate


def hr_dataset(cfg: RunConfig, files: list[Path]) -> HRFolderDataset:
    """Seeded random HR crops of ``files`` with the run's ``data`` settings."""
    d = cfg.data
    return HRFolderDataset(files, d.crop, d.flip, d.rot, d.scale, d.cache, seed=cfg.train.seed)
