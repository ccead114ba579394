"""``blindsr train dmsr``: E_θ and T (one module ``nets``, exported as a DM-SR checkpoint) and the LR-conditioned
discriminator D train; the prior μψ (and SD-Turbo's VAE) stay frozen (Sec. 4.1).

Run config sections: ``model`` -- ``backend`` (pixel | sd-turbo), ``prior`` (pixel: an embedded prior name or a
prior .safetensors; sd-turbo: the local SD-Turbo folder / file; E_θ then has its VAE encoder's architecture and
starts as it), ``prompt``, ``vgg19_weights`` (optional: torchvision's ImageNet VGG19 for T's trunk), ``use_prior`` (false:
the "no prior" L1 baseline, Z_SR = X_SR), and ``estimator`` /
``encoder`` / ``discriminator`` (a ``preset`` plus config fields); ``diffusion``: :class:`DMSRProcess`;
``loss``: :class:`LossConfig`. Every iteration: sub-step ``g`` (Eqs. 3-9 + the estimator's loss; updates
``nets``), then ``d`` (the discriminator's loss; updates ``discriminator``). The LR of an iteration is drawn
from a generator seeded by (seed, step), so both sub-steps see the same pairs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.datasets import mix_seed
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.methods.dmsr.config import DMSRProcess, InferenceConfig, LossConfig
from blindsr.methods.dmsr.core import FrozenPrior, decompose
from blindsr.methods.dmsr.losses import generator_losses
from blindsr.methods.dmsr.nets import (
    DiscriminatorConfig,
    EncoderConfig,
    EstimatorConfig,
    LRDiscriminator,
    TimeAwareEncoder,
    TimestepEstimator,
    d_loss,
)
from blindsr.train.common import degrade_fn, hr_dataset, split_data, sr_validation
from blindsr.train.config import RunConfig
from blindsr.train.trainer import SubStep

PRESETS = {"estimator": {"vgg19": EstimatorConfig.vgg19, "pixel_s": EstimatorConfig.pixel_s},
           "encoder": {"pixel_s": EncoderConfig.pixel_s},  # sd-turbo: from its VAE's config
           "discriminator": {"default": DiscriminatorConfig, "tiny": DiscriminatorConfig.tiny}}
MODEL_KEYS = {"backend", "prior", "prompt", "estimator", "encoder", "discriminator", "vgg19_weights", "use_prior"}


class DMSRNets(nn.Module):
    """E_θ and T as one module: what the generator step updates and what ``final.safetensors`` holds (keys
    ``encoder.*``, ``estimator.*``: the layout ``dmsr.pipeline.load_pipeline`` reads)."""

    def __init__(self, estimator: TimestepEstimator, encoder: TimeAwareEncoder):
        super().__init__()
        self.estimator, self.encoder = estimator, encoder


def _config(kind: str, spec: dict[str, Any] | None, default: str):
    """A network config: ``spec["preset"]`` (or ``default``) with the other fields of ``spec`` replaced."""
    spec = dict(spec or {})
    name = spec.pop("preset", default)
    if name not in PRESETS[kind]:
        raise BlindSRError(f"config: model.{kind}.preset {name!r}: choose {', '.join(PRESETS[kind])}")
    made = PRESETS[kind][name]()
    try:
        return dataclasses.replace(made, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    except TypeError as e:
        raise BlindSRError(f"config: model.{kind}: {e}") from None


def frozen_prior(model: dict[str, Any], process: DMSRProcess, device: torch.device | str = "cpu") -> FrozenPrior:
    from blindsr.methods.dmsr.pipeline import pixel_prior, sd_turbo_prior

    if model.get("backend", "pixel") == "pixel":
        return pixel_prior(model.get("prior"), device, process)
    if not model.get("prior"):
        raise BlindSRError("config: model.prior must name the local SD-Turbo weights for backend sd-turbo")
    return sd_turbo_prior(model["prior"], model.get("prompt", InferenceConfig().prompt), device, process)


def dmsr_recipe(cfg: RunConfig) -> Recipe:
    """DM-SR training (see the module docstring)."""
    model = dict(cfg.model)
    unknown = set(model) - MODEL_KEYS
    if unknown:
        raise BlindSRError(f"config: unknown model key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(MODEL_KEYS))}")
    backend = model.setdefault("backend", "pixel")
    if backend not in ("pixel", "sd-turbo"):
        raise BlindSRError(f"config: model.backend {backend!r}: choose pixel or sd-turbo")
    pixel = backend == "pixel"
    use_prior = bool(model.get("use_prior", True))  # false: the L1 "no prior" baseline of issue 11's table
    process = from_dict(DMSRProcess, cfg.diffusion, "diffusion")
    loss_cfg = from_dict(LossConfig, cfg.loss, "loss")
    if not use_prior and (loss_cfg.w_dm > 0 or loss_cfg.w_eps > 0):
        raise BlindSRError("config: without the prior (model.use_prior false) set loss.w_dm and loss.w_eps to 0")
    prior = frozen_prior(model, process)
    est_cfg = _config("estimator", model.get("estimator"), "pixel_s" if pixel else "vgg19")
    if pixel:
        enc_cfg = _config("encoder", model.get("encoder"), "pixel_s")
    else:  # the architecture of SD-Turbo's own VAE encoder (t̂ settings may change)
        extra = {k: v for k, v in (model.get("encoder") or {}).items() if k != "preset"}
        enc_cfg = EncoderConfig.from_vae_config(dict(prior.vae.config), **extra)
    latent = 3 if pixel else prior.unet.config.in_channels
    disc_cfg = _config("discriminator", {"in_channels": latent, **(model.get("discriminator") or {})},
                       "default")
    nets = DMSRNets(TimestepEstimator(est_cfg), TimeAwareEncoder(enc_cfg))
    if not pixel:  # E_θ starts as SD-Turbo's own VAE encoder (Sec. 3.2); its t̂ projections start at zero
        nets.encoder.load_sd_vae_encoder(prior.vae.state_dict())
    if model.get("vgg19_weights"):  # T's trunk from torchvision's ImageNet VGG19 (a local .pth / .safetensors)
        from blindsr.io.weights import load_state_dict

        nets.estimator.load_vgg19_features(load_state_dict(model["vgg19_weights"]))
    disc = LRDiscriminator(disc_cfg)
    degrade = degrade_fn(cfg)
    scale, d = cfg.data.scale, cfg.data  # the LR -> HR factor of the degradation (data.scale)
    multiple = prior.multiple * prior.factor
    if d.crop % multiple:
        raise BlindSRError(f"config: data.crop {d.crop} must be a multiple of {multiple} (the prior's levels)")
    train_files, val_files = split_data(cfg)
    dataset = hr_dataset(cfg, train_files)

    def pairs(hr: torch.Tensor, step: int):
        """(LR, bicubic-upsampled LR, HR) of this iteration, the same in both sub-steps."""
        from blindsr.degradations.operators import imresize

        if next(prior.unet.parameters()).device != hr.device:  # the frozen parts follow the run's device
            for m in (prior.unet, prior.vae):
                if m is not None:
                    m.to(hr.device)
        g = torch.Generator(device=hr.device).manual_seed(mix_seed(cfg.train.seed, "dmsr-degrade", step))
        with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
            deg = degrade(hr.float(), g)
            up = imresize(deg.lr, scale=scale).clamp(0, 1)
        return deg.lr, up, deg.hr

    def g_step(models: dict[str, nn.Module], hr: torch.Tensor, generator: torch.Generator,
               step: int) -> dict[str, torch.Tensor]:
        lr, up, hr = pairs(hr, step)
        n = models["nets"]
        terms = generator_losses(prior, n.encoder, n.estimator, models["discriminator"], lr, up, hr, loss_cfg,
                                 generator, step, use_prior=use_prior)
        return {k: v for k, v in terms.items() if k not in ("z_sr", "x_hr")}

    def d_step(models: dict[str, nn.Module], hr: torch.Tensor, generator: torch.Generator,
               step: int) -> dict[str, torch.Tensor]:
        lr, up, hr = pairs(hr, step)
        n = models["nets"]
        with torch.no_grad():  # the generator side as it is after this iteration's g step
            t_hat = n.estimator(lr)[0]
            x_sr = n.encoder(up, t_hat)
            z_sr = decompose(prior, x_sr, t_hat)[1] if use_prior else x_sr
            x_hr = prior.to_space(hr)
        loss = d_loss(models["discriminator"](x_hr, lr), models["discriminator"](z_sr, lr), loss_cfg.adv_loss)
        return {"loss": loss}

    steps = [SubStep("g", g_step, ("nets",))]
    if loss_cfg.w_adv > 0:
        steps.append(SubStep("d", d_step, ("discriminator",)))

    # the pixel prior's self-attention at 1/4 of the tile dominates above 128² (one call: 2.2 s at 256², 13.3 s
    # at 512² on one thread), so its checkpoints default to 256-pixel tiles; SD-Turbo's latent tiles stay 512
    infer = InferenceConfig(tile=256, tile_overlap=32, tile_margin=16) if pixel else InferenceConfig()

    def sample(nets_ema: nn.Module, lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from blindsr.methods.dmsr.pipeline import DMSRPipeline

        return DMSRPipeline(nets_ema.estimator, nets_ema.encoder, prior, infer, scale, use_prior)(lr).sr

    validate = sr_validation(sample, val_files, degrade, cfg) if val_files and cfg.train.val_every else None
    resolved = {"backend": backend, "prior": model.get("prior"), "scale": scale, "estimator": to_dict(est_cfg),
                "encoder": to_dict(enc_cfg), "discriminator": to_dict(disc_cfg), "process": to_dict(process),
                "inference": to_dict(infer), "use_prior": use_prior}
    cfg = dataclasses.replace(cfg, model={**model, "estimator": to_dict(est_cfg), "encoder": to_dict(enc_cfg),
                                          "discriminator": to_dict(disc_cfg)},
                              diffusion=to_dict(process), loss=to_dict(loss_cfg))
    meta = {"method": "dmsr", "config": json.dumps(resolved), "train_config": json.dumps(to_dict(cfg))}

    return Recipe({"nets": nets, "discriminator": disc}, steps, dataset, validate_fn=validate,
                  export_metadata=meta, config=cfg, export="nets")
