"""DiffBIR training recipes: stage 1 (the cleaner) and stage 2 (the IRControlNet), for the generic trainer.

Stage 1 (``train_stage1.py``): a restorer (SwinIR by default) maps the degraded image, at HR size (the
``diffbir-stage1`` degradation resizes it back), to the HR image; loss ``MSE(cleaner(LQ), HR)`` (paper Eq. 2).

Stage 2 (``train_stage2.py``, paper Eq. 4): ``c = E(cleaner(LQ)) * 0.18215`` (VAE posterior mode),
``z0 = E(HR) * 0.18215`` (a posterior sample), ``t ~ U{0..999}``, ``eps ~ N(0, I)``,
``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` and ``loss = ||eps - eps_theta(z_t, t, c, c_txt)||^2``; only the
ControlNet (initialised from the UNet) is trained; UNet, VAE, text encoder and cleaner are frozen.

Official vs paper / variants (``loss`` / ``diffusion`` sections):

| switch                       | default (official)              | other                                  |
|------------------------------|---------------------------------|----------------------------------------|
| stage 1 ``loss.reduction``   | ``sum`` (``F.mse_loss(sum)``)    | ``mean`` (same optimum; Adam is nearly scale-free) |
| stage 2 ``diffusion.prediction`` | ``eps`` (v1/v2)              | ``v`` (v2.1, with ``zero_snr: true``)   |
| stage 2 ``diffusion.noise_aug``  | 0 (v1/v2)                    | 200 (v2.1: ``c <- q_sample(c, U[0, 200))``) |

Checkpoints hold our layout; ``final.safetensors`` is written in the official layout, so that
``blindsr restore --cleaner`` / ``--controlnet`` load it directly.

Pixel backend (issue 14, ``model.backend: pixel``): the frozen UNet is the pixel-space prior (``model.prior``: an
embedded name such as ``prior-s`` or a file; ``prior_config: tiny`` for tests), ``c = 2 cleaner(LQ) - 1`` and
``z0 = 2 HR - 1`` (the identity plays the VAE's role), the text is the prior's null token; the IRControlNet copy
takes ``hint_channels = 3``. ``model.condition_xt: false`` trains Table 1's Variant 2 (no ``z_t`` in the control
input) and ``model.cleaner: identity`` the generation module without a restoration module (Table 6).
``final.safetensors`` keeps our layout with the config in its metadata (``models.ircontrolnet.load_controlnet``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.datasets import FixedLRSet, mix_seed
from blindsr.diffusion import parameterization
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.diffbir.config import SDProcess
from blindsr.train.common import degrade_fn, hr_dataset, split_data, sr_validation
from blindsr.train.config import RunConfig

# A tiny SD (LDM/OpenCLIP kwargs; the conformance fixture's sizes): UNet 1.1 M, VAE 1.3 M, text 0.1 M params.
TINY_SD_LDM = {
    "unet": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
                 channel_mult=[1, 2], num_head_channels=16, use_linear_in_transformer=True, transformer_depth=1,
                 context_dim=32, image_size=32),
    "vae": dict(embed_dim=4, ddconfig=dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                                           ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)),
    "clip": dict(embed_dim=32, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)),
}
VAL_TIMESTEPS = (100, 300, 500, 700, 900)  # stage-2 validation: the eps loss at these fixed timesteps


@dataclass
class Stage1Loss:
    reduction: str = "sum"  # official F.mse_loss(pred, gt, reduction="sum"); "mean" for a size-free number


@dataclass
class Stage2Diffusion(SDProcess):  # + prediction (eps: v1, v2 | v: v2.1) and zero_snr (v2.1; needs v)
    noise_aug: int = 0       # v2.1: 200 (noise the condition latent to a random t_aug < noise_aug)
    prompt: str = ""         # the fixed training prompt (official v2: empty; v2.1 captions are not supported)


# ------------------------------------------------------------------------------------------------ cleaners
def restorer_config(model: dict[str, Any]) -> tuple[str, Any]:
    """``model``: ``kind`` (swinir | bsrnet | rrdbnet | scunet), ``preset`` (diffbir | tiny) + config fields."""
    from blindsr.models.restorers import restorer_spec

    d = dict(model)
    kind, preset = d.pop("kind", "swinir"), d.pop("preset", "diffbir")
    spec = restorer_spec(kind)
    if preset not in ("diffbir", "tiny"):
        raise BlindSRError(f"config: model.preset {preset!r}: choose diffbir or tiny")
    base = spec.default_config() if preset == "diffbir" else type(spec.default_config()).tiny()
    return kind, from_dict(type(base), {**to_dict(base), **d}, "model")


def cleaner_scale(cleaner: nn.Module) -> float:
    return float(getattr(getattr(cleaner, "config", None), "scale", 1))


def cleaner_input(lq: torch.Tensor, scale: float) -> torch.Tensor:
    """The LQ (at HR size) as the cleaner's input: a x``s`` cleaner (BSRNet) gets it bicubic-downscaled by ``s``."""
    from blindsr.degradations.operators import imresize

    return lq if scale == 1 else imresize(lq, 1 / scale)


def diffbir_stage1_recipe(cfg: RunConfig) -> Recipe:
    """Stage 1: MSE between ``cleaner(LQ)`` and HR on the ``data.degradation`` preset (official: diffbir-stage1)."""
    from blindsr.models.restorers import build_restorer

    if cfg.diffusion:
        raise BlindSRError("config: method diffbir-stage1 takes no diffusion section")
    kind, model_cfg = restorer_config(cfg.model)
    loss_cfg = from_dict(Stage1Loss, cfg.loss, "loss")
    if loss_cfg.reduction not in ("sum", "mean"):
        raise BlindSRError(f"config: loss.reduction {loss_cfg.reduction!r}: choose sum or mean")
    model = build_restorer(kind, model_cfg)
    degrade, d = degrade_fn(cfg), cfg.data
    if d.crop % round(model_cfg.scale):
        raise BlindSRError(f"config: data.crop {d.crop} must be a multiple of the cleaner's scale {model_cfg.scale}")
    train_files, val_files = split_data(cfg)
    dataset = hr_dataset(cfg, train_files)

    def loss_fn(model: nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
            deg = degrade(hr.float(), generator)
        pred = model(cleaner_input(deg.lr, model_cfg.scale))
        return {"loss": F.mse_loss(pred.float(), deg.hr, reduction=loss_cfg.reduction)}  # paper Eq. 2

    def sample(model, lq, generator):
        return model(cleaner_input(lq, model_cfg.scale)).clamp(0, 1)

    validate = sr_validation(sample, val_files, degrade, cfg) if val_files and cfg.train.val_every else None
    resolved = {"kind": kind, **to_dict(model_cfg)}
    cfg = dataclasses.replace(cfg, model=resolved, loss=to_dict(loss_cfg))
    meta = {"method": "diffbir-stage1", "kind": kind, "config": json.dumps(resolved), "degradation": d.degradation,
            "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(model, loss_fn, dataset, validate_fn=validate, export_metadata=meta,
                         config=cfg)  # restorer keys are the official ones


# ------------------------------------------------------------------------------------------------ stage 2
def load_sd(model: dict[str, Any]):
    """``model.sd`` (SD 2.1 .ckpt/.safetensors or a diffusers folder) or ``model.sd_config: tiny`` (random);
    with ``backend: pixel`` the prior (``model.prior``, default ``prior-s``, or ``prior_config: tiny``)."""
    from pathlib import Path

    from blindsr.models import sd as sdm

    if model.get("backend", "sd") == "pixel":
        from blindsr.methods.prior.config import PriorUNetConfig
        from blindsr.methods.prior.model import Prior, load_prior
        from blindsr.weights import PRIORS, prior_path

        if model.get("prior_config") == "tiny":
            prior = Prior.new(PriorUNetConfig.tiny())
            prior.unet.requires_grad_(False)
            return prior
        name = model.get("prior", "prior-s")
        return load_prior(prior_path(name) if name in PRIORS else name)
    path, config = model.get("sd"), model.get("sd_config")
    if path is not None:
        if not Path(path).exists():
            raise BlindSRError(f"config: model.sd {path}: no such file or folder")
        return sdm.load_sd(path)
    if config != "tiny":
        raise BlindSRError("config: give model.sd (an SD 2.1 checkpoint or diffusers folder) or model.sd_config: tiny")
    t = TINY_SD_LDM
    unet = sdm.build_unet(sdm.unet_config_from_ldm(t["unet"]))
    vae = sdm.build_vae(sdm.vae_config_from_ldm(t["vae"]))
    text = sdm.build_text_encoder(sdm.text_config_from_openclip(t["clip"]))
    sdm.freeze(unet, vae, text)
    return sdm.StableDiffusion(unet, vae, text)


def load_cleaner(model: dict[str, Any]) -> nn.Module:
    """``model.cleaner``: the frozen stage-1 weights (kind ``model.cleaner_kind``) or ``identity`` (tests)."""
    from blindsr.models.restorers import load_restorer
    from blindsr.weights import PARTS, part_path

    path = model.get("cleaner")
    if path is None:
        raise BlindSRError("config: model.cleaner is required (stage-1 weights, an embedded name, or 'identity')")
    if path == "identity":
        return nn.Identity()
    if path in PARTS:
        path = part_path(path)
    return load_restorer(model.get("cleaner_kind", "swinir"), path)


def prompt_tokens(prompt: str) -> torch.Tensor:
    """(1, 77) CLIP ids; the empty prompt needs no BPE vocabulary ([SOT, EOT, 0, ...])."""
    from blindsr.models.sd.tokenizer import load_tokenizer, pack_tokens

    return pack_tokens([[]]) if prompt == "" else load_tokenizer()([prompt])


class FrozenParts(nn.Module):
    """UNet, VAE, text encoder and cleaner: eval mode, no gradients, never in a checkpoint. A pixel prior has
    no VAE and no text encoder (``vae is None``: the identity space)."""

    def __init__(self, sd, cleaner: nn.Module):
        super().__init__()
        self.unet, self.cleaner = sd.unet, cleaner
        self.vae, self.text_encoder = getattr(sd, "vae", None), getattr(sd, "text_encoder", None)
        self.scale_factor = getattr(sd, "scale_factor", 1.0)
        self.eval().requires_grad_(False)

    def to_space(self, img: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                 ) -> torch.Tensor:
        """An image in [0, 1] in the UNet's space: the VAE latent (posterior mode, or a sample) x 0.18215, or
        ``2 img - 1`` for a pixel prior."""
        from blindsr.models.sd import vae_encode

        if self.vae is None:
            return img * 2 - 1
        return vae_encode(self.vae, img, sample=sample, generator=generator, scale_factor=self.scale_factor)

    def train(self, mode: bool = True) -> FrozenParts:  # official `disabled_train`: always eval
        return super().train(False)


def stage2_loss(controlnet: nn.Module, frozen: FrozenParts, diffusion, dcfg: Stage2Diffusion, c_txt: torch.Tensor,
                lq: torch.Tensor, hr: torch.Tensor, g: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
    """DiffBIR Eq. 4 on one batch (``t`` drawn from U{0..T-1} unless given)."""
    from blindsr.models.ircontrolnet import controlled_unet

    dev, B = hr.device, hr.shape[0]
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        cond = frozen.cleaner(cleaner_input(lq, cleaner_scale(frozen.cleaner)))
        c_img = frozen.to_space(cond)  # posterior mode
        z0 = frozen.to_space(hr, sample=True, generator=g)
        if t is None:
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g, device=dev)
        eps = torch.randn(z0.shape, generator=g, device=dev)
        z_t = diffusion.q_sample(z0, t, eps).float()  # Ho et al. Eq. 4
        if dcfg.noise_aug > 0:  # v2.1
            t_aug = torch.randint(0, dcfg.noise_aug, (B,), generator=g, device=dev)
            c_img = diffusion.q_sample(c_img, t_aug, torch.randn(c_img.shape, generator=g, device=dev)).float()
        target = parameterization.target(dcfg.prediction, z0, eps, diffusion.abar(t, z0)).float()
    txt = c_txt.expand(B, -1, -1)
    pred = controlled_unet(frozen.unet, z_t, t, txt, controlnet(z_t, t, c_img, txt))
    return F.mse_loss(pred.float(), target)


def diffbir_stage2_recipe(cfg: RunConfig) -> Recipe:
    """Stage 2: train the IRControlNet (from the UNet, or ``model.controlnet`` official weights) with Eq. 4."""
    from blindsr.models.ircontrolnet import (
        IRControlNet,
        IRControlNetConfig,
        controlnet_to_official,
        load_controlnet,
        load_official_controlnet,
    )
    from blindsr.models.sd import encode_text

    known = {"sd", "sd_config", "cleaner", "cleaner_kind", "controlnet", "backend", "prior", "prior_config",
             "condition_xt"}
    if set(cfg.model) - known:
        raise BlindSRError(f"config: unknown key(s) model.{', model.'.join(sorted(set(cfg.model) - known))} "
                           f"(known: {', '.join(sorted(known))})")
    if cfg.loss:
        raise BlindSRError("config: method diffbir-stage2 takes no loss section (the loss is Eq. 4's MSE)")
    backend = cfg.model.get("backend", "sd")
    if backend not in ("sd", "pixel"):
        raise BlindSRError(f"config: model.backend {backend!r}: choose sd or pixel")
    pixel = backend == "pixel"
    dcfg = from_dict(Stage2Diffusion, cfg.diffusion, "diffusion")
    if pixel and (dcfg.prediction, dcfg.zero_snr, dcfg.prompt) != ("eps", False, ""):
        raise BlindSRError("config: the pixel prior predicts eps on SD's schedule and has no text "
                           "(diffusion.prediction eps, zero_snr false, prompt '')")
    diffusion = dcfg.process()
    sd = load_sd(cfg.model)
    xt = bool(cfg.model.get("condition_xt", True))
    hint = 3 if pixel else 4
    ccfg = IRControlNetConfig.from_unet_config(dict(sd.unet.config), hint, xt)
    if cfg.model.get("controlnet") and pixel:
        controlnet = load_controlnet(cfg.model["controlnet"]).requires_grad_(True)
    elif cfg.model.get("controlnet"):
        controlnet = load_official_controlnet(cfg.model["controlnet"], ccfg).requires_grad_(True)
    else:
        controlnet = IRControlNet.from_unet(sd.unet, hint, xt)  # official load_controlnet_from_unet
    frozen = FrozenParts(sd, load_cleaner(cfg.model))
    with torch.no_grad():
        if pixel:
            from blindsr.methods.prior.model import null_context

            c_txt0 = null_context(frozen.unet, 1).float()
        else:
            c_txt0 = encode_text(frozen.text_encoder, prompt_tokens(dcfg.prompt)).float()
    degrade, d = degrade_fn(cfg), cfg.data
    multiple = sd.unet_config.multiple if pixel else 64
    if d.crop % multiple:
        raise BlindSRError(f"config: data.crop {d.crop} must be a multiple of {multiple} (whole UNet levels"
                           f"{'' if pixel else ', 8x VAE'})")
    train_files, val_files = split_data(cfg)
    dataset = hr_dataset(cfg, train_files)

    def on(device: torch.device) -> torch.Tensor:
        if next(frozen.unet.parameters()).device != device:
            frozen.to(device)
        return c_txt0.to(device)

    def loss_fn(model: nn.Module, hr: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c_txt = on(hr.device)
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
            deg = degrade(hr.float(), generator)
        return {"loss": stage2_loss(model, frozen, diffusion, dcfg, c_txt, deg.lr, deg.hr, generator)}

    state: dict[str, FixedLRSet] = {}

    def validate(model: nn.Module) -> dict[str, float]:
        """The Eq. 4 loss on fixed held-out pairs at fixed timesteps and noise (comparable across steps)."""
        if "set" not in state:
            state["set"] = FixedLRSet(val_files, degrade, 1, d.val_crop, cfg.train.seed, d.val_max_images)
        device = next(model.parameters()).device
        c_txt, losses = on(device), []
        with torch.no_grad():
            for i, (_, lq, hr) in enumerate(state["set"]):  # one batch: the image at every VAL_TIMESTEPS
                g = torch.Generator(device=device).manual_seed(mix_seed(cfg.train.seed, "val-eps", i))
                n, t = len(VAL_TIMESTEPS), torch.tensor(VAL_TIMESTEPS, device=device)
                lq, hr = lq[None].expand(n, -1, -1, -1).to(device), hr[None].expand(n, -1, -1, -1).to(device)
                losses.append(stage2_loss(model, frozen, diffusion, dcfg, c_txt, lq, hr, g, t).item())
        return {"val_loss": sum(losses) / len(losses)}

    use_val = val_files and cfg.train.val_every
    cfg = dataclasses.replace(cfg, diffusion=to_dict(dcfg))
    meta = {"method": "diffbir-stage2", "backend": backend, "config": json.dumps(dataclasses.asdict(ccfg)),
            "prediction": dcfg.prediction, "degradation": d.degradation, "train_config": json.dumps(to_dict(cfg))}
    export = None if pixel else (lambda sd_: controlnet_to_official(sd_, ccfg))  # pixel: our layout
    return Recipe.single(controlnet, loss_fn, dataset, validate_fn=validate if use_val else None,
                         export_metadata=meta, config=cfg, export_keys=export)


__all__ = ["diffbir_stage1_recipe", "diffbir_stage2_recipe", "stage2_loss", "restorer_config", "TINY_SD_LDM"]
