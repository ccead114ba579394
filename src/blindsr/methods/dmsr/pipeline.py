"""DM-SR inference: bicubic-upsample the LR, estimate t̂ (one per image), encode to X_SR^t̂ with E_θ, decompose
with one call of the frozen μψ (Eq. 2; or Table 4's multi-step), decode. Any size: the encoder, μψ and the
decoder run tile by tile on the upsampled image with Gaussian-blended outputs (``ops.tiling.tiled_map``), t̂ is
estimated once on the whole LR image.

Checkpoints (``save_pipeline`` / ``load_pipeline``): one safetensors file with ``estimator.*`` and ``encoder.*``
and a JSON ``config`` in its metadata (backend, scale, the two network configs, the process, the prior). The
frozen prior is not in it: the pixel backend names an embedded prior (``blindsr.weights.PRIORS``), the
``sd-turbo`` backend needs the user's SD-Turbo weights (a diffusers folder or a single file, local only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blindsr.config import from_dict, to_dict
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.base import SRResult
from blindsr.methods.dmsr.config import DMSRProcess, InferenceConfig
from blindsr.methods.dmsr.core import FrozenPrior, restore_latent
from blindsr.methods.dmsr.nets import EncoderConfig, EstimatorConfig, TimeAwareEncoder, TimestepEstimator
from blindsr.ops.progress import Progress, progress_bar

BACKENDS = ("pixel", "sd-turbo")


class DMSRPipeline:
    """``pipe(lr, t_hat=..., steps=...) -> SRResult`` (``sr``, and ``t_hat`` (B,) per image)."""

    def __init__(self, estimator: TimestepEstimator, encoder: TimeAwareEncoder, prior: FrozenPrior,
                 config: InferenceConfig | None = None, scale: int = 4, use_prior: bool = True):
        self.estimator, self.encoder, self.prior = estimator, encoder, prior
        self.config, self.scale = config or InferenceConfig(), scale
        self.use_prior = use_prior  # False: the "no prior" baseline (the encoder's output is Z_SR itself)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def multiple(self) -> int:
        """HR pixels the chain needs sides to be multiples of (the UNet's levels x the VAE's factor)."""
        return self.prior.multiple * self.prior.factor

    def restore(self, x_up: Tensor, t_hat: Tensor, cfg: InferenceConfig) -> Tensor:
        """The whole chain on (a tile of) the upsampled image: E_θ, Eq. 2 / Table 4, decode."""
        x = self.encoder(x_up, t_hat)
        z = restore_latent(self.prior, x, t_hat, cfg.steps, cfg.reuse_eps)[0] if self.use_prior else x
        return self.prior.to_image(z).float()

    @torch.no_grad()
    def __call__(self, lr: Tensor, *, generator: Any = None, progress: Progress = False,
                 **overrides: Any) -> SRResult:
        """Super-resolve ``lr`` (B, 3, h, w) in [0, 1]. ``overrides``: fields of :class:`InferenceConfig`
        (None = the config's). ``generator`` is accepted for the Pipeline protocol: one-step DM-SR draws
        nothing."""
        from blindsr.degradations.operators import imresize
        from blindsr.ops.colorfix import color_fix
        from blindsr.ops.resize import pad_to_multiple
        from blindsr.ops.tiling import tiled_map

        cfg = dataclasses.replace(self.config, **{k: v for k, v in overrides.items() if v is not None})
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise BlindSRError(f"DM-SR expects LR images (B, 3, h, w), got {tuple(lr.shape)}")
        lr = lr.to(self.device, torch.float32)
        b, _, h, w = lr.shape
        if cfg.t_hat is not None:
            t_hat = torch.full((b,), float(cfg.t_hat), device=self.device)
        else:
            t_hat = self.estimator(lr)[0].float()
        up = imresize(lr, scale=self.scale).clamp(0, 1)
        m = self.multiple
        x = pad_to_multiple(up, m)
        if cfg.tile is not None and (x.shape[-2] > cfg.tile or x.shape[-1] > cfg.tile):
            out = tiled_map(lambda t: self.restore(t, t_hat, cfg), x, tile=max(cfg.tile // m, 1),
                            overlap=cfg.tile_overlap // m, margin=-(-cfg.tile_margin // m), in_factor=m,
                            out_factor=m, progress=progress)
        else:
            bar = progress_bar(1, progress, "dm-sr")
            out = self.restore(x, t_hat, cfg)
            if bar is not None:
                bar.update(1)
                bar.close()
        out = out[..., : h * self.scale, : w * self.scale]
        out = color_fix(out, up, cfg.color_fix) if cfg.color_fix != "none" else out
        return SRResult(sr=out.clamp(0, 1), t_hat=t_hat.cpu())


# ---------------------------------------------------------------------------------------------- files
def save_pipeline(pipe: DMSRPipeline, path: str | Path, backend: str, prior: str | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """E_θ and T (no discriminator, no prior) with their configs in the metadata."""
    from blindsr.io.weights import save_safetensors

    meta = {"method": "dmsr", "config": json.dumps({
        "backend": backend, "scale": pipe.scale, "prior": prior, "estimator": to_dict(pipe.estimator.config),
        "encoder": to_dict(pipe.encoder.config), "process": to_dict(pipe.prior.process),
        "inference": to_dict(pipe.config), "use_prior": pipe.use_prior, **(extra or {})})}
    sd = {f"estimator.{k}": v for k, v in pipe.estimator.state_dict().items()}
    sd.update({f"encoder.{k}": v for k, v in pipe.encoder.state_dict().items()})
    return save_safetensors(sd, path, metadata=meta)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import safe_open

    from blindsr.io.weights import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"DM-SR checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a DM-SR checkpoint is a .safetensors file written by blindsr")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("method") != "dmsr" or "config" not in meta:
        raise WeightsError(f"{path}: not a DM-SR checkpoint (no dmsr config in its metadata)")
    return json.loads(meta["config"]), load_state_dict(path)


def pixel_prior(name: str | None = None, device: str | torch.device = "cpu",
                process: DMSRProcess | None = None) -> FrozenPrior:
    """The pixel backend's μψ: an embedded prior (``blindsr.weights.PRIORS``; default ``prior-s``) or a file."""
    from blindsr.methods.prior.model import load_prior, null_context
    from blindsr.weights import PRIORS, prior_path

    p = load_prior(prior_path(name) if name in PRIORS else name, device=device)
    return FrozenPrior(p.unet, null_context(p.unet, 1), process or DMSRProcess(), multiple=p.unet_config.multiple)


def sd_turbo_prior(path: str | Path, prompt: str, device: str | torch.device = "cpu",
                   process: DMSRProcess | None = None, tokenizer: Any | None = None) -> FrozenPrior:
    """The sd-turbo backend's μψ: SD-Turbo's UNet and VAE from a local diffusers folder or checkpoint file;
    the fixed prompt's text embedding is computed once and the text encoder dropped."""
    from blindsr.models.sd import encode_text, load_sd
    from blindsr.models.sd.tokenizer import load_tokenizer

    sd = load_sd(path).to(device)
    tokens = (tokenizer or load_tokenizer())([prompt])
    with torch.no_grad():
        context = encode_text(sd.text_encoder, tokens)
    return FrozenPrior(sd.unet, context, process or DMSRProcess(), vae=sd.vae, scaling=sd.scale_factor,
                       multiple=2 ** (len(sd.unet.config.block_out_channels) - 1))


def load_pipeline(ckpt: str | Path | None = None, device: str | torch.device = "cpu", *,
                  sd_turbo: str | Path | None = None, prior: FrozenPrior | None = None,
                  prompt: str | None = None) -> DMSRPipeline:
    """A DM-SR pipeline from a checkpoint (``ckpt``; None: the embedded DM-SR-S). The frozen μψ: ``prior`` if
    given, else the checkpoint's backend: its embedded pixel prior, or SD-Turbo from ``sd_turbo`` with the
    checkpoint's fixed prompt (or ``prompt``: a per-run one; the pixel prior has none)."""
    from blindsr.io.weights import load_into

    if ckpt is None:
        from blindsr.weights import part_path

        ckpt = part_path("dmsr-s")
        if not ckpt.is_file():
            raise WeightsError("no embedded DM-SR-S model in this copy of blindsr: pass a DM-SR checkpoint "
                               "(--encoder FILE), trained with `blindsr train dmsr --config configs/dmsr_s.yaml`")
    meta, sd = read_checkpoint(ckpt)
    backend = meta.get("backend")
    if backend not in BACKENDS:
        raise WeightsError(f"{ckpt}: unknown DM-SR backend {backend!r}")
    process = from_dict(DMSRProcess, meta.get("process", {}), "process")
    estimator = TimestepEstimator(from_dict(EstimatorConfig, meta["estimator"], "estimator"))
    encoder = TimeAwareEncoder(from_dict(EncoderConfig, meta["encoder"], "encoder"))
    load_into(estimator, {k[10:]: v for k, v in sd.items() if k.startswith("estimator.")}, strict=True)
    load_into(encoder, {k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, strict=True)
    config = from_dict(InferenceConfig, meta.get("inference", {}), "inference")
    if prompt is not None:
        if backend == "pixel":
            raise BlindSRError("--prompt: the pixel backend's prior is unconditional")
        config = dataclasses.replace(config, prompt=prompt)
    if prior is None:
        if backend == "pixel":
            prior = pixel_prior(meta.get("prior"), device, process)
        else:
            if sd_turbo is None:
                raise WeightsError(f"{ckpt} is a DM-SR encoder for SD-Turbo: pass --sd-turbo PATH (a local "
                                   "diffusers folder with unet/, vae/, text_encoder/ or a single .safetensors)")
            prior = sd_turbo_prior(sd_turbo, config.prompt, device, process)
    for m in (estimator, encoder):
        m.requires_grad_(False).eval().to(device)
    return DMSRPipeline(estimator, encoder, prior, config, int(meta.get("scale", 4)), bool(meta.get("use_prior", True)))
