"""The frozen pixel-space prior as a model: build it, call it (the null context), sample from it, save and load it.

``Prior(unet, unet_config, diffusion)`` holds a diffusers ``UNet2DConditionModel`` built from a
:class:`PriorUNetConfig` and its :class:`PriorDiffusion` process. :meth:`Prior.denoiser` is the package's denoiser
contract (``model_fn(x_t, t) -> ModelOutput``) on [-1, 1] samples; :func:`sample_prior` draws unconditional
samples with the one sampling loop (``diffusion.samplers.sample``, DDIM). A saved prior is one safetensors file
whose metadata ``config`` holds ``{"unet": ..., "diffusion": ...}``; a sidecar ``<stem>.json`` (the training
record of the shipped model) may hold the same sections, and the metadata wins.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blindsr.config import from_dict, to_dict
from blindsr.diffusion.samplers import Generators, ModelOutput, make_stepper, randn, sample
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.prior.config import PriorDiffusion, PriorUNetConfig

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


def build_unet(config: PriorUNetConfig) -> UNet2DConditionModel:
    """A randomly initialised prior UNet (diffusers' default init)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**to_dict(config))


def null_context(unet: UNet2DConditionModel, batch: int, like: Tensor | None = None) -> Tensor:
    """The fixed unconditional ``encoder_hidden_states``: zeros (batch, 1, cross_attention_dim), on ``like``'s
    device and dtype (else the UNet's)."""
    ref = like if like is not None else next(unet.parameters())
    return torch.zeros(batch, 1, unet.config.cross_attention_dim, device=ref.device, dtype=ref.dtype)


def unet_prediction(unet: UNet2DConditionModel, x_t: Tensor, t: Tensor) -> Tensor:
    """The raw UNet output at [-1, 1] samples ``x_t`` and ORIGINAL timesteps ``t`` (B,), with the null context."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    return unet(x_t, t, encoder_hidden_states=null_context(unet, x_t.shape[0], x_t)).sample


@dataclass
class Prior:
    """A prior UNet with its architecture and diffusion process (see the module docstring)."""

    unet: Any  # UNet2DConditionModel
    unet_config: PriorUNetConfig = field(default_factory=PriorUNetConfig)
    diffusion: PriorDiffusion = field(default_factory=PriorDiffusion)

    @classmethod
    def new(cls, unet_config: PriorUNetConfig | None = None, diffusion: PriorDiffusion | None = None) -> Prior:
        unet_config = unet_config or PriorUNetConfig()
        return cls(build_unet(unet_config), unet_config, diffusion or PriorDiffusion())

    def config_dict(self) -> dict[str, Any]:
        return {"unet": to_dict(self.unet_config), "diffusion": to_dict(self.diffusion)}

    def denoiser(self):
        """``model_fn(x_t, t) -> ModelOutput`` on [-1, 1] samples (the shared denoiser contract)."""
        kind = self.diffusion.prediction

        def model_fn(x_t: Tensor, t: Tensor) -> ModelOutput:
            return ModelOutput(unet_prediction(self.unet, x_t, t), kind)

        return model_fn


def sample_prior(prior: Prior, n: int, size: int | tuple[int, int] | None = None, *, steps: int | None = None,
                 generator: Generators = None, eta: float | None = None, progress: bool = False) -> Tensor:
    """``n`` unconditional samples (n, 3, H, W) in [0, 1] by DDIM (``steps``, ``eta``: the config's by default).

    ``generator``: one ``torch.Generator`` or ``n`` of them (sample i from generator i, independent of the batch).
    """
    cfg = prior.diffusion
    h, w = (size, size) if isinstance(size, int) else (size or (prior.unet_config.sample_size,) * 2)
    m = prior.unet_config.multiple
    if n < 1 or h < m or w < m or h % m or w % m:
        raise BlindSRError(f"prior samples need n >= 1 and sides that are multiples of {m}; got {n} x {h}x{w}")
    ref = next(prior.unet.parameters())
    stepper = make_stepper("ddim", cfg.process(), steps or cfg.sample_steps, spacing=cfg.spacing,
                           eta=cfg.eta if eta is None else eta)
    x_T = randn((n, prior.unet_config.in_channels, h, w), generator, ref.device, ref.dtype)
    with torch.no_grad():
        x0 = sample(prior.denoiser(), x_T, stepper, generator, clip_x0=(-1.0, 1.0), progress=progress)
    return ((x0.float() + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ files
def save_prior(prior: Prior, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the UNet weights (fp32) with ``{"unet", "diffusion"}`` as the ``config`` metadata."""
    from blindsr.io.weights import save_safetensors

    sd = {k: v.detach().float() for k, v in prior.unet.state_dict().items()}
    return save_safetensors(sd, path, metadata={**(metadata or {}), "method": "prior",
                                                "config": json.dumps(prior.config_dict())})


def read_prior_config(path: Path) -> dict[str, Any]:
    """``{"unet": ..., "diffusion": ...}`` from the safetensors metadata, else from the sidecar ``<stem>.json``."""
    from blindsr.io.weights import load_safetensors_metadata

    meta = load_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    sidecar = path.with_suffix(".json")
    try:
        if "config" in meta:
            cfg = json.loads(meta["config"])
        elif sidecar.is_file():
            cfg = json.loads(sidecar.read_text())
        else:
            raise WeightsError(f"{path}: no prior config (no 'config' metadata and no {sidecar.name})")
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: the prior config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("unet"), dict):
        raise WeightsError(f"{path}: the config has no 'unet' section (is it a prior?)")
    return cfg


def load_prior(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Prior:
    """A frozen prior (eval mode, no gradients) from a safetensors file, loaded strictly; None = the embedded
    Prior-S (``blindsr.weights.prior_path``)."""
    from blindsr.io.weights import check_finite, load_into, load_state_dict
    from blindsr.weights import prior_path

    path = prior_path() if path is None else Path(path)
    if not path.is_file():
        raise WeightsError(f"prior weights not found: {path}")
    cfg = read_prior_config(path)
    unet_cfg = from_dict(PriorUNetConfig, cfg["unet"], "unet")
    diffusion = from_dict(PriorDiffusion, cfg.get("diffusion", {}), "diffusion")
    sd = load_state_dict(path)
    check_finite(sd, path)
    unet = build_unet(unet_cfg)  # small: built on the CPU (no meta-device buffers to restore)
    load_into(unet, sd, strict=True)
    unet = unet.to(device).eval().requires_grad_(False)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
        unet = unet.to(dtype)
    return Prior(unet, unet_cfg, diffusion)


def generators(seed: int, n: int, device: str | torch.device = "cpu") -> Sequence[torch.Generator]:
    """``n`` generators seeded ``seed, seed + 1, ...``: sample i of a sheet does not depend on the sheet's size."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


__all__ = ["Prior", "build_unet", "null_context", "unet_prediction", "sample_prior", "save_prior", "load_prior",
           "read_prior_config", "generators"]
