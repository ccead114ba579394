"""Training recipes of BlindDiff (Algorithm 1) and of its regression baseline, for the generic trainer."""

from __future__ import annotations

import dataclasses
import json

import torch

from blindsr.config import from_dict, to_dict
from blindsr.data.datasets import mix_seed
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.blinddiff.config import BlindDiffConfig, BlindDiffLossConfig
from blindsr.methods.blinddiff.losses import training_losses
from blindsr.methods.blinddiff.pipeline import BlindDiffPipeline
from blindsr.methods.blinddiff.regression import RegressionPipeline, regression_losses
from blindsr.models.mcformer import MCFormer, MCFormerConfig
from blindsr.train.common import degrade_fn, hr_dataset, split_data, sr_validation
from blindsr.train.config import RunConfig


def mcformer_config(cfg: RunConfig):
    """``cfg.model``: a preset (full | small | tiny) plus field overrides, checked against ``data.scale``."""
    model_d = dict(cfg.model)
    preset = model_d.pop("preset", "full")
    if preset not in ("full", "small", "tiny"):
        raise BlindSRError(f"config: model.preset {preset!r}: choose full, small or tiny")
    model_cfg = MCFormerConfig.from_official({**to_dict(getattr(MCFormerConfig, preset)()), **model_d})
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
    model, resolved_model = MCFormer(model_cfg), to_dict(model_cfg)
    if model_cfg.variant == "paper":
        n_pca = PCA_KERNELS if n_pca is None else n_pca
        pca = kernel_pca(degrade, model_cfg, n_pca, cfg.train.seed)
        model.set_pca(pca.matrix, pca.mean)  # mean + code @ basisᵀ = KernelPCA.decode(affine=True)
        resolved_model["pca_kernels"] = n_pca
    if loss_cfg.kernel_head_only:  # only the kernel head learns; the optimiser and EMA see the rest frozen
        if not cfg.train.init_from:
            raise BlindSRError("config: loss.kernel_head_only trains the head of a finished model: set train.init_from")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("predictor."))
    train_files, val_files = split_data(cfg)
    d, dataset = cfg.data, hr_dataset(cfg, train_files)
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
    cfg = dataclasses.replace(cfg, model=resolved_model, diffusion=to_dict(bd_cfg),
                              loss=to_dict(loss_cfg))
    meta = {"config": json.dumps({"model": to_dict(model_cfg), "blinddiff": to_dict(bd_cfg)}),
            "method": "blinddiff", "degradation": d.degradation, "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(model, loss_fn, dataset, validate_fn=validate, export_metadata=meta, config=cfg)


def regression_recipe(cfg: RunConfig) -> Recipe:
    """The regression baseline: the same MCFormer run once on bicubic↑y, L1 to the HR crop, same data and
    degradation as BlindDiff (``regression.py``)."""
    if cfg.diffusion or cfg.loss:
        raise BlindSRError("config: method regression takes no diffusion/loss sections (its loss is plain L1)")
    model_cfg = mcformer_config(cfg)
    degrade = degrade_fn(cfg)
    train_files, val_files = split_data(cfg)
    d, dataset = cfg.data, hr_dataset(cfg, train_files)

    def loss_fn(model: torch.nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
            deg = degrade(hr.float(), generator)
        return regression_losses(model, deg.hr, deg.lr)

    def sample(model, lr, generator):
        return RegressionPipeline(model)(lr).sr

    validate = sr_validation(sample, val_files, degrade, cfg) if val_files and cfg.train.val_every else None
    cfg = dataclasses.replace(cfg, model=to_dict(model_cfg))
    meta = {"config": json.dumps({"model": to_dict(model_cfg)}), "method": "regression",
            "degradation": d.degradation, "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(MCFormer(model_cfg), loss_fn, dataset, validate_fn=validate, export_metadata=meta,
                         config=cfg)
