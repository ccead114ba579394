"""``blindsr train stablesr``: StableSR's stage 1 on any folder of pairs (issue 12: "StableSR the SR model").

Data: ``data.root`` = HR images, ``data.lr_root`` = their LR partners (paired by name, aligned crops of
``data.crop`` HR px: ``data.PairedFolderDataset``, as ``srnet``), e.g. the pairs ``blindsr degrade`` writes for
any preset, UDDM's learnt one included. The condition is the LR bicubically upsampled to the HR size (as the
official ``get_input``; clamped), z_c its VAE latent; the target z_0 is the HR latent; the loss the ε-MSE on
StableSR's process (T = 1000, LDM linear), t ~ U{0..999} (``uddm.ddm_stablesr.eps_loss``). Only the time-aware
encoder and the SPADE layers train; SD's UNet, VAE and text encoder are frozen and outside the module
(``StableSRDDMNet``), so the optimiser, the EMA, the checkpoints and ``final.safetensors`` hold only those.

``model``: :class:`~blindsr.methods.stablesr.config.StableSRModel` (``weights``: SD 2.1-base or an official
stage-1 ckpt; ``""`` random, tests) plus ``inference``: :class:`StableSRInference` fields stored in the
checkpoint as the pipeline's defaults. ``final.safetensors``'s metadata: ``method: stablesr``, ``model`` (the
config JSON, naming the base weights), ``base_weights``, ``inference``. No validation pass (sampling 200 steps is
what ``blindsr sr`` / ``blindsr eval`` are for).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.paired import PairedFolderDataset
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.stablesr.config import StableSRInference, StableSRModel
from blindsr.train.config import RunConfig


def upsampled_condition(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The time-aware encoder's image: the LR bicubically upsampled to ``size`` (the HR's), clamped to [0, 1]."""
    return F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def stablesr_recipe(cfg: RunConfig) -> Recipe:
    from blindsr.methods.uddm.ddm_stablesr import build_ddm_net, eps_loss
    from blindsr.models.sd.stablesr import base_process

    d, model = cfg.data, dict(cfg.model)
    if cfg.diffusion or cfg.loss:
        raise BlindSRError("config: method stablesr takes no diffusion/loss sections (StableSR's process, ε-MSE)")
    if not d.lr_root:
        raise BlindSRError("config: data.lr_root (the LR partners of data.root) is required")
    inference = from_dict(StableSRInference, {"upscale": d.scale, **(model.pop("inference", None) or {})},
                          "model.inference")
    if inference.upscale != d.scale:
        raise BlindSRError(f"config: model.inference.upscale {inference.upscale} differs from data.scale {d.scale}")
    model_cfg = from_dict(StableSRModel, model, "model")
    net = build_ddm_net(model_cfg, what="StableSR base", section="model")
    if d.crop % net.multiple:
        raise BlindSRError(f"config: data.crop {d.crop} must be a multiple of {net.multiple} (the VAE's x8 and "
                           "the UNet's levels)")
    dataset = PairedFolderDataset(d.lr_root, d.root, d.scale, d.crop, d.flip, d.rot, d.cache, cfg.train.seed)
    diffusion = base_process()

    def loss_fn(module: nn.Module, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        hr = batch["hr"]
        with torch.no_grad():
            cond = upsampled_condition(batch["lr"], tuple(hr.shape[-2:]))
        return {"loss": eps_loss(module, diffusion, hr, cond, generator)}

    resolved = {**to_dict(model_cfg), "inference": to_dict(inference)}
    cfg = dataclasses.replace(cfg, model=resolved)
    meta = {"method": "stablesr", "model": json.dumps(to_dict(model_cfg)), "base_weights": model_cfg.weights,
            "inference": json.dumps(to_dict(inference)), "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(net, loss_fn, dataset, export_metadata=meta, config=cfg)


__all__ = ["stablesr_recipe", "upsampled_condition"]
