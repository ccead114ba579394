"""The ``prior`` training recipe: the unconditional pixel-space prior on HR crops, for the generic trainer.

Loss (Ho et al. 2020, Eq. 14, "simple"): ``x0 = 2 * crop - 1``, ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and ``MSE(unet(x_t, t, null context), target)`` with the target of
``diffusion.prediction`` (eps: the noise). Data: random HR crops (``data.crop``, flips / dihedral transforms) of
``data.root`` minus the hold-out split; there is no degradation (``data.degradation`` and ``data.scale`` are not
used). Validation (``val.csv``): the same loss on centre crops of the held-out images at fixed timesteps
(``VAL_TIMESTEPS``) with fixed noise, comparable across steps. ``final.safetensors`` is the EMA UNet with its
config in the metadata: ``methods.prior.load_prior`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.datasets import centre_crop, load_uint8, mix_seed
from blindsr.diffusion import parameterization
from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.prior.config import PRESETS, PriorDiffusion, PriorUNetConfig
from blindsr.methods.prior.model import build_unet, unet_prediction
from blindsr.train.common import hr_dataset, split_data
from blindsr.train.config import RunConfig

VAL_TIMESTEPS = (50, 200, 400, 600, 800)  # validation: the loss at these fixed timesteps


def prior_unet_config(model: dict) -> PriorUNetConfig:
    """``cfg.model``: a ``preset`` (small | tiny) plus field overrides."""
    d = dict(model)
    preset = d.pop("preset", "small")
    if preset not in PRESETS:
        raise BlindSRError(f"config: model.preset {preset!r}: choose {' or '.join(PRESETS)}")
    return from_dict(PriorUNetConfig, {**to_dict(PRESETS[preset]()), **d}, "model")


def prior_loss(unet: nn.Module, diffusion: GaussianDiffusion, prediction: str, hr: torch.Tensor,
               generator: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
    """The simple loss on [0, 1] crops ``hr`` (t drawn uniformly unless given)."""
    dev, B = hr.device, hr.shape[0]
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        x0 = hr.float() * 2 - 1
        if t is None:
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=generator, device=dev)
        eps = torch.randn(x0.shape, generator=generator, device=dev)
        x_t = diffusion.q_sample(x0, t, eps)
        target = parameterization.target(prediction, x0, eps, diffusion.abar(t, x0))
    return F.mse_loss(unet_prediction(unet, x_t, diffusion.original_t(t)).float(), target)


def validation_crops(files: list[Path], crop: int | None, multiple: int, limit: int | None) -> list[torch.Tensor]:
    """Centre crops (3, h, w) in [0, 1] of the held-out images, sides trimmed to ``multiple``."""
    files = files[:limit] if limit else files
    return [centre_crop(load_uint8(Path(f)).float().div(255), crop, multiple=multiple) for f in files]


def prior_recipe(cfg: RunConfig) -> Recipe:
    """The unconditional prior (see the module docstring); ``model``: preset + PriorUNetConfig fields,
    ``diffusion``: PriorDiffusion fields; no ``loss`` section."""
    if cfg.loss:
        raise BlindSRError("config: method prior takes no loss section (its loss is the simple eps MSE)")
    unet_cfg = prior_unet_config(cfg.model)
    dcfg = from_dict(PriorDiffusion, cfg.diffusion, "diffusion")
    diffusion, d = dcfg.process(), cfg.data
    if d.crop % unet_cfg.multiple:
        raise BlindSRError(f"config: data.crop {d.crop} must be a multiple of {unet_cfg.multiple} (the UNet's levels)")
    train_files, val_files = split_data(cfg)
    dataset = hr_dataset(dataclasses.replace(cfg, data=dataclasses.replace(d, scale=1)), train_files)
    unet = build_unet(unet_cfg)

    def loss_fn(model: nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"loss": prior_loss(model, diffusion, dcfg.prediction, hr, generator)}

    state: dict[str, list[torch.Tensor]] = {}

    def validate(model: nn.Module) -> dict[str, float]:
        """The loss on each held-out crop at every ``VAL_TIMESTEPS`` (one batch per image), fixed noise."""
        if "crops" not in state:
            state["crops"] = validation_crops(val_files, d.val_crop, unet_cfg.multiple, d.val_max_images)
        device = next(model.parameters()).device
        t, losses = torch.tensor(VAL_TIMESTEPS, device=device), []
        with torch.no_grad():
            for i, crop in enumerate(state["crops"]):
                g = torch.Generator(device=device).manual_seed(mix_seed(cfg.train.seed, "val-eps", i))
                hr = crop[None].expand(len(VAL_TIMESTEPS), -1, -1, -1).to(device)
                losses.append(prior_loss(model, diffusion, dcfg.prediction, hr, g, t).item())
        return {"val_loss": sum(losses) / len(losses)}

    use_val = bool(val_files) and cfg.train.val_every > 0
    resolved = {"unet": to_dict(unet_cfg), "diffusion": to_dict(dcfg)}
    cfg = dataclasses.replace(cfg, model=to_dict(unet_cfg), diffusion=to_dict(dcfg))
    meta = {"method": "prior", "config": json.dumps(resolved), "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(unet, loss_fn, dataset, validate_fn=validate if use_val else None, export_metadata=meta,
                         config=cfg)


__all__ = ["prior_recipe", "prior_loss", "prior_unet_config", "VAL_TIMESTEPS"]
