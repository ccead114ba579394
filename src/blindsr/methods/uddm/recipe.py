"""``blindsr train uddm``: UDDM's two degradation models trained together on unpaired data (issue 12).

Data: ``data.lr_root`` = the camera's real LR photos, ``data.root`` = HR images (any, unpaired); each item is a
real-LR crop of ``crop / scale`` and an independent HR crop of ``crop`` (``data.UnpairedDataset``). Every
iteration runs three sub-steps on the same batch:

1. ``ddm``  -- the DDM's ε-MSE on the real LR given its ULR condition (Eq. 3); updates the DDM only.
2. ``d``    -- the patch discriminator: real LR vs P-DDM(HR) (detached); updates D only.
3. ``pddm`` -- Eq. 5: ``‖P-DDM(HR) − HR↓r‖² + α L_adv`` (HR↓r: MATLAB bicubic); updates P-DDM only.

Paper-silent choices (``loss`` section): α = 0.05, the hinge GAN loss, the squared L2 as a mean (MSE), the
adversarial term from the first step; not in the paper, ``live`` = 1: a penalty that keeps P-DDM's bounded heads out
of saturation (``PDDM.saturation``; 0 while they are in range). ``final.safetensors`` is the DDM's EMA UNet, ``final_pddm.safetensors``
P-DDM's (and ``final_discriminator.safetensors``); the metadata ``config`` holds both architectures.

``model.ddm.backend: stablesr`` (``ddm_stablesr.py``) makes the "ddm" module the StableSR DDM's trainable part
(time-aware encoder + SPADE layers; the SD UNet / VAE frozen, outside the module), so only that part is
optimised, EMA'd, checkpointed and exported; the metadata names the base weights (``ddm_base_weights``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.unpaired import UnpairedDataset
from blindsr.degradations.operators import imresize
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.prior.config import PRESETS, PriorDiffusion
from blindsr.methods.prior.model import build_unet
from blindsr.methods.uddm.ddm import DDMConfig, condition, ddm_loss, ddm_unet_config
from blindsr.methods.uddm.pddm import PDDM, PatchDiscriminator, PDDMConfig
from blindsr.train.config import RunConfig
from blindsr.train.gan import check_gan_loss, d_loss, g_loss
from blindsr.train.trainer import SubStep


@dataclass
class UDDMLoss:
    alpha: float = 0.05       # α of Eq. 5 (paper: not given)
    adv_loss: str = "hinge"   # hinge | bce
    adv_start: int = 0        # P-DDM's adversarial term from this step (D trains from the start)
    live: float = 1.0         # weight of P-DDM's live-range penalty on its heads (0 = off; pddm.PDDM.saturation)

    def __post_init__(self) -> None:
        check_gan_loss(self.adv_loss)
        if self.alpha < 0 or self.adv_start < 0 or self.live < 0:
            raise BlindSRError("config: loss.alpha, loss.adv_start and loss.live must be >= 0")


def ddm_config(model: dict) -> DDMConfig:
    """``model.ddm``: ``preset`` (the prior UNet's small | tiny) + ``s``, ``sample_steps``, ``tile``, ``overlap``
    and UNet field overrides under ``unet``; ``backend`` (pixel | stablesr) and the stablesr backend's
    ``stablesr`` section (``ddm.StableSRDDM``)."""
    d = dict(model.get("ddm") or {})
    preset = d.pop("preset", "small")
    if preset not in PRESETS:
        raise BlindSRError(f"config: model.ddm.preset {preset!r}: choose {' or '.join(PRESETS)}")
    unet = {**to_dict(ddm_unet_config(PRESETS[preset]())), **d.pop("unet", {})}
    cfg = from_dict(DDMConfig, {**d, "unet": unet}, "model.ddm")
    if cfg.stablesr.weights:  # the metadata names the base weights: an absolute path, valid from anywhere
        stablesr = dataclasses.replace(cfg.stablesr, weights=str(Path(cfg.stablesr.weights).expanduser().resolve()))
        cfg = dataclasses.replace(cfg, stablesr=stablesr)
    return cfg


def ddm_config_dict(cfg: DDMConfig) -> dict:
    """The config as the checkpoint metadata stores it; the pixel backend's exactly as before the stablesr
    backend existed (no ``backend`` / ``stablesr`` keys), so pixel checkpoints keep their format."""
    out = to_dict(cfg)
    if cfg.backend == "pixel":
        del out["backend"], out["stablesr"]
    return out


def uddm_recipe(cfg: RunConfig) -> Recipe:
    """The DDM, P-DDM and D on ``data.lr_root`` (real LR) + ``data.root`` (HR); see the module docstring."""
    model, d = cfg.model, cfg.data
    if unknown := set(model) - {"ddm", "pddm", "discriminator"}:
        raise BlindSRError(f"config: unknown key(s) model.{', model.'.join(sorted(unknown))} (ddm, pddm, discriminator)")
    if not d.lr_root:
        raise BlindSRError("config: data.lr_root (the folder of real LR photos) is required")
    dcfg = ddm_config(model)
    pcfg = from_dict(PDDMConfig, {"scale": d.scale, **(model.get("pddm") or {})}, "model.pddm")
    if pcfg.scale != d.scale:
        raise BlindSRError(f"config: model.pddm.scale {pcfg.scale} differs from data.scale {d.scale}")
    disc_kw = dict(model.get("discriminator") or {})
    loss_cfg = from_dict(UDDMLoss, cfg.loss, "loss")
    stablesr = dcfg.backend == "stablesr"
    if cfg.diffusion and stablesr:
        raise BlindSRError("config: the stablesr DDM has StableSR's process (LDM linear, 1000 steps): "
                           "no diffusion section")
    if cfg.diffusion:
        dcfg = dataclasses.replace(dcfg, diffusion=from_dict(PriorDiffusion, cfg.diffusion, "diffusion"))
    if stablesr:
        from blindsr.methods.uddm.ddm_stablesr import build_ddm_net, eps_loss, image_multiple
        from blindsr.models.sd.stablesr import base_process

        diffusion, loss_fn = base_process(), eps_loss  # Eq. 3 on latents: (real LR, ULR) as (target, cond)
        multiple, what = image_multiple(dcfg.stablesr), "the VAE's x8 and the UNet's levels"
    else:
        diffusion, loss_fn = dcfg.diffusion.process(), ddm_loss
        multiple, what = dcfg.unet.multiple, "the DDM's levels"
    lr_crop = d.crop // d.scale
    if d.crop % d.scale or lr_crop % multiple:
        raise BlindSRError(f"config: data.crop {d.crop} / scale {d.scale} must be a multiple of "
                           f"{multiple} ({what})")
    dataset = UnpairedDataset(d.lr_root, d.root, lr_crop=lr_crop, hr_crop=d.crop, flip=d.flip, rot=d.rot,
                              cache=d.cache, seed=cfg.train.seed)
    if len(dataset.lr) < 1 or len(dataset.hr) < 1:
        raise BlindSRError(f"config: no images in data.lr_root {d.lr_root} or data.root {d.root}")
    ddm_net = build_ddm_net(dcfg.stablesr) if stablesr else build_unet(dcfg.unet)
    modules = {"ddm": ddm_net, "pddm": PDDM(pcfg), "discriminator": PatchDiscriminator(**disc_kw)}

    def ddm_step(models: dict[str, nn.Module], batch: dict, g: torch.Generator, step: int) -> dict:
        lr = batch["lr"]
        with torch.no_grad():
            cond = condition(lr, dcfg.s)
        return {"loss": loss_fn(models["ddm"], diffusion, lr, cond, g)}

    def d_step(models: dict[str, nn.Module], batch: dict, g: torch.Generator, step: int) -> dict:
        with torch.no_grad():
            fake = models["pddm"](batch["hr"], g)
        disc = models["discriminator"]
        return {"loss": d_loss(disc(batch["lr"]), disc(fake), loss_cfg.adv_loss)}

    def pddm_step(models: dict[str, nn.Module], batch: dict, g: torch.Generator, step: int) -> dict:
        hr = batch["hr"]
        fake, params = models["pddm"].run(hr, g)
        with torch.no_grad():
            target = imresize(hr, scale=1 / d.scale)
        rec = F.mse_loss(fake.float(), target.float())  # Eq. 5's data term
        terms = {"rec": rec, "loss": rec}
        if loss_cfg.alpha > 0 and step >= loss_cfg.adv_start:
            terms["adv"] = g_loss(models["discriminator"](fake), loss_cfg.adv_loss)
            terms["loss"] = terms["loss"] + loss_cfg.alpha * terms["adv"]
        if loss_cfg.live > 0:  # not in the paper: keeps the bounded heads trainable (pddm.py's docstring)
            terms["live"] = PDDM.saturation(params)
            terms["loss"] = terms["loss"] + loss_cfg.live * terms["live"]
        return terms

    steps = [SubStep("ddm", ddm_step, ("ddm",)), SubStep("pddm", pddm_step, ("pddm",))]
    if loss_cfg.alpha > 0:
        steps.insert(1, SubStep("d", d_step, ("discriminator",)))
    resolved = {"ddm": ddm_config_dict(dcfg), "pddm": to_dict(pcfg), "discriminator": disc_kw, "scale": d.scale}
    cfg = dataclasses.replace(cfg, model=resolved, loss=to_dict(loss_cfg))
    meta = {"method": "uddm", "config": json.dumps(resolved), "train_config": json.dumps(to_dict(cfg))}
    if stablesr:  # final.safetensors holds the trainable part only; load_uddm rebuilds the rest from these
        meta.update(ddm_backend="stablesr", ddm_base_weights=dcfg.stablesr.weights, ddm_size=dcfg.stablesr.size)
    return Recipe(modules, steps, dataset, export_metadata=meta, config=cfg, export="ddm")


__all__ = ["uddm_recipe", "UDDMLoss", "ddm_config", "ddm_config_dict"]
