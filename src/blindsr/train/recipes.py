"""Method recipes: a :class:`RunConfig` -> model, loss, data and validation for the generic :class:`Trainer`.

``RECIPES[method](cfg)`` returns a :class:`Recipe`; :func:`run_training` wires it to the trainer and writes the
resolved config and run metadata. BlindDiff is here; DiffBIR / UDDM add one function each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blindsr.data.datasets import FixedLRSet, HRFolderDataset, list_hr_files, mix_seed, split_holdout
from blindsr.errors import BlindSRError
from blindsr.train.config import RunConfig, from_dict, save_config, to_dict
from blindsr.train.trainer import LossFn, Trainer, TrainResult, ValidateFn


@dataclass
class Recipe:
    model: torch.nn.Module
    loss_fn: LossFn
    dataset: torch.utils.data.Dataset
    validate_fn: ValidateFn | None = None
    export_metadata: dict[str, str] = field(default_factory=dict)  # metadata of final.safetensors
    config: RunConfig | None = None  # the run config with its model/diffusion/loss sections fully resolved
    export_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # final's key layout


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


def mcformer_config(cfg: RunConfig):
    """``cfg.model``: a preset (full | small | tiny) plus field overrides, checked against ``data.scale``."""
    from blindsr.models.mcformer import MCFormerConfig

    model_d = dict(cfg.model)
    preset = model_d.pop("preset", "full")
    if preset not in ("full", "small", "tiny"):
        raise BlindSRError(f"config: model.preset {preset!r}: choose full, small or tiny")
    model_cfg = MCFormerConfig.from_dict({**getattr(MCFormerConfig, preset)().to_dict(), **model_d})
    if model_cfg.scale != cfg.data.scale:
        raise BlindSRError(f"config: model.scale {model_cfg.scale} differs from data.scale {cfg.data.scale}")
    return model_cfg


PCA_KERNELS = 30_000  # DAN/IKC creat_PCA: random kernels the paper variant's kernel PCA is fitted on


def kernel_pca(degrade, model_cfg, n: int, seed: int):
    """The paper variant's kernel PCA (DAN/IKC ``creat_PCA``): ``n`` random Gaussian kernels of the training
    degradation's setting (kernel size, sigma range, rate_iso, disturbance), ``model_cfg.pca_dim`` directions.
    Seeded from the run seed, so a resumed run refits the same basis."""
    from blindsr.degradations.pca import fit_random_pca

    c = degrade.config
    if not all(hasattr(c, f) for f in ("kernel_size", "sig_min", "sig_max", "rate_iso", "random_disturb")):
        raise BlindSRError(f"config: model.variant paper fits its kernel PCA on random Gaussian kernels, but "
                           f"data.degradation {degrade.name} has no Gaussian kernel setting "
                           "(use classic or blinddiff-setting1/2)")
    if c.kernel_size != model_cfg.kernel_size:
        raise BlindSRError(f"config: model.kernel_size {model_cfg.kernel_size} differs from the degradation's "
                           f"kernel_size {c.kernel_size} (the PCA is fitted on the degradation's kernels)")
    g = torch.Generator().manual_seed(mix_seed(seed, "kernel-pca"))
    return fit_random_pca(n, model_cfg.pca_dim, c.kernel_size, c.sig_min, c.sig_max, c.rate_iso,
                          c.random_disturb, generator=g)


def blinddiff_recipe(cfg: RunConfig) -> Recipe:
    """BlindDiff (Algorithm 1): MCFormer, LR + kernel synthesised on the device each step, kernel-aware
    sampling (Algorithm 2) with ``train.val_steps`` steps for validation.

    ``model.variant: paper`` fits the kernel PCA on ``model.pca_kernels`` (default 30,000) random kernels of the
    training degradation and stores basis + mean as model buffers (saved in every checkpoint and in
    ``final.safetensors``). The paper's kernel loss is L1: set ``loss.kernel_loss: l1`` (default: the official MSE).
    """
    from blindsr.methods.blinddiff import (
        BlindDiffConfig,
        BlindDiffLossConfig,
        BlindDiffPipeline,
        training_losses,
    )
    from blindsr.models.mcformer import MCFormer

    model_d = dict(cfg.model)
    n_pca = model_d.pop("pca_kernels", None)
    model_cfg = mcformer_config(dataclasses.replace(cfg, model=model_d))
    if n_pca is not None and model_cfg.variant != "paper":
        raise BlindSRError("config: model.pca_kernels only applies to model.variant paper")
    if not isinstance(n_pca, int | None) or isinstance(n_pca, bool):
        raise BlindSRError(f"config: model.pca_kernels must be an integer, got {n_pca!r}")
    bd_cfg = from_dict(BlindDiffConfig, cfg.diffusion, "diffusion")
    loss_cfg = from_dict(BlindDiffLossConfig, cfg.loss, "loss")
    degrade = degrade_fn(cfg)
    model, resolved_model = MCFormer(model_cfg), model_cfg.to_dict()
    if model_cfg.variant == "paper":
        n_pca = PCA_KERNELS if n_pca is None else n_pca
        pca = kernel_pca(degrade, model_cfg, n_pca, cfg.train.seed)
        model.set_pca(pca.matrix, pca.mean)  # mean + code @ basisᵀ = KernelPCA.decode(affine=True)
        resolved_model["pca_kernels"] = n_pca
    train_files, val_files = split_data(cfg)
    d = cfg.data
    dataset = HRFolderDataset(train_files, d.crop, d.flip, d.rot, d.scale, d.cache, seed=cfg.train.seed)
    diffusion = bd_cfg.train_diffusion()

    def loss_fn(model: torch.nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):  # degrade in fp32 (feed_data)
            deg = degrade(hr.float(), generator)
        kernel = deg.kernel if loss_cfg.kernel_weight > 0 else None
        return training_losses(model, diffusion, deg.hr, deg.lr, kernel, generator=generator, cfg=loss_cfg,
                               prediction=bd_cfg.prediction)

    def sample(model, lr, generator):
        return BlindDiffPipeline(model, bd_cfg)(lr, steps=cfg.train.val_steps, generator=generator).sr

    validate = sr_validation(sample, val_files, degrade, cfg) if val_files and cfg.train.val_every else None
    cfg = dataclasses.replace(cfg, model=resolved_model, diffusion=bd_cfg.to_dict(),
                              loss=dataclasses.asdict(loss_cfg))
    meta = {"config": json.dumps({"model": model_cfg.to_dict(), "blinddiff": bd_cfg.to_dict()}),
            "method": "blinddiff", "degradation": d.degradation, "train_config": json.dumps(to_dict(cfg))}
    return Recipe(model, loss_fn, dataset, validate, meta, cfg)


def regression_recipe(cfg: RunConfig) -> Recipe:
    """The regression baseline: the same MCFormer run once on bicubic↑y, L1 to the HR crop, same data and
    degradation as BlindDiff (``blindsr.methods.regression``)."""
    from blindsr.methods.regression import RegressionPipeline, regression_losses
    from blindsr.models.mcformer import MCFormer

    if cfg.diffusion or cfg.loss:
        raise BlindSRError("config: method regression takes no diffusion/loss sections (its loss is plain L1)")
    model_cfg = mcformer_config(cfg)
    degrade = degrade_fn(cfg)
    train_files, val_files = split_data(cfg)
    d = cfg.data
    dataset = HRFolderDataset(train_files, d.crop, d.flip, d.rot, d.scale, d.cache, seed=cfg.train.seed)

    def loss_fn(model: torch.nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
            deg = degrade(hr.float(), generator)
        return regression_losses(model, deg.hr, deg.lr)

    def sample(model, lr, generator):
        return RegressionPipeline(model)(lr).sr

    validate = sr_validation(sample, val_files, degrade, cfg) if val_files and cfg.train.val_every else None
    cfg = dataclasses.replace(cfg, model=model_cfg.to_dict())
    meta = {"config": json.dumps({"model": model_cfg.to_dict()}), "method": "regression",
            "degradation": d.degradation, "train_config": json.dumps(to_dict(cfg))}
    return Recipe(MCFormer(model_cfg), loss_fn, dataset, validate, meta, cfg)


def _diffbir_stage1(cfg: RunConfig) -> Recipe:
    from blindsr.train.diffbir_recipes import diffbir_stage1_recipe

    return diffbir_stage1_recipe(cfg)


def _diffbir_stage2(cfg: RunConfig) -> Recipe:
    from blindsr.train.diffbir_recipes import diffbir_stage2_recipe

    return diffbir_stage2_recipe(cfg)


RECIPES: dict[str, Callable[[RunConfig], Recipe]] = {"blinddiff": blinddiff_recipe, "regression": regression_recipe,
                                                     "diffbir-stage1": _diffbir_stage1,
                                                     "diffbir-stage2": _diffbir_stage2}


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
    """Build ``cfg.method``'s recipe, save ``config.yaml`` + ``meta.json`` in the run dir, and train."""
    from blindsr import __version__

    if cfg.method not in RECIPES:
        raise BlindSRError(f"config: method {cfg.method!r}: choose one of {', '.join(RECIPES)}")
    torch.manual_seed(cfg.train.seed)  # the model's initial weights (everything else has its own generators)
    recipe = RECIPES[cfg.method](cfg)
    if cfg.train.init_from:  # before the trainer copies the model into its EMA
        from blindsr.io.weights import load_into, load_state_dict

        load_into(recipe.model, load_state_dict(cfg.train.init_from))
    trainer = Trainer(recipe.model, recipe.loss_fn, recipe.dataset, cfg.output, train=cfg.train, optim=cfg.optim,
                      batch_size=cfg.data.batch_size, workers=cfg.data.workers, validate_fn=recipe.validate_fn,
                      device=device, export_metadata=recipe.export_metadata, progress=progress)
    if trainer.is_main:
        run_dir = Path(cfg.output)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(recipe.config or cfg, run_dir / "config.yaml")
        acc = trainer.accelerator
        meta = {"blindsr": __version__, "git_commit": git_commit(), "argv": sys.argv, "resume": resume,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
                "processes": acc.num_processes, "device": str(acc.device), "mixed_precision": cfg.train.mixed_precision,
                "train_images": len(recipe.dataset), "model_parameters": sum(p.numel() for p in recipe.model.parameters())}
        path = run_dir / "meta.json"  # one entry per start (fresh or resumed)
        runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
        path.write_text(json.dumps({"runs": [*runs, meta]}, indent=2) + "\n")
    result = trainer.fit(resume)
    if recipe.export_keys is not None and result.final is not None and trainer.is_main:
        rewrite_export(result.final, recipe.export_keys)
    trainer.accelerator.wait_for_everyone()
    return result


__all__ = ["RECIPES", "Recipe", "blinddiff_recipe", "regression_recipe", "run_training", "git_commit"]
