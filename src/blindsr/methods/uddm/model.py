"""A trained UDDM (its DDM and P-DDM), the fusion of Eq. 1, and the ``uddm`` degradation preset.

``x = (1 − w) · DDM(HR) + w · P-DDM(HR)`` (Eq. 1; w = 0.5 by default, Table 2 sweeps 0, 0.5, 1). A run folder of
``blindsr train uddm`` (or its ``final.safetensors``) loads with :func:`load_uddm`; the preset

    blindsr degrade --preset uddm --ckpt RUN --w 0.5 --input HR_DIR --output PAIRS      (= --set ckpt=RUN --set w=0.5)

writes pairs with the same layout and manifest as every other preset (``register_preset`` is not needed: the
registry names it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blindsr.config import from_dict
from blindsr.degradations.pipelines import Degradation, DegradeResult, PresetSpec
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.uddm.ddm import DDMConfig, condition, synthesize
from blindsr.methods.uddm.pddm import PDDM, PDDMConfig


def fuse(ddm_lr: Tensor, pddm_lr: Tensor, w: float | Tensor) -> Tensor:
    """Eq. 1: ``(1 − w) · DDM(HR) + w · P-DDM(HR)``."""
    return (1 - w) * ddm_lr + w * pddm_lr


@dataclass
class UDDMModel:
    """The DDM (the pixel backend's UNet, or the stablesr backend's ``StableSRDDMNet``; ``ddm_config.backend``
    says which) with its config, and P-DDM (both frozen, eval mode)."""

    ddm: nn.Module
    ddm_config: DDMConfig
    pddm: PDDM
    scale: int = 4

    def __post_init__(self) -> None:
        for m in (self.ddm, self.pddm):
            m.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, hr: Tensor, w: float = 0.5, generator: torch.Generator | None = None,
                 steps: int | None = None, progress: Any = False) -> Tensor:
        """The fused LR (B, 3, H/r, W/r) of HR images (B, 3, H, W) in [0, 1]; w = 0 skips P-DDM, w = 1 the DDM."""
        r = self.scale
        size = (hr.shape[-2] // r, hr.shape[-1] // r)
        hr = hr[..., : size[0] * r, : size[1] * r]
        parts = []
        if w != 1:
            cond = condition(hr, r * self.ddm_config.s, size)
            parts.append(synthesize(self.ddm, self.ddm_config, cond, generator, steps, progress))
        if w != 0:
            parts.append(self.pddm(hr, generator))
        if len(parts) == 1:
            return parts[0]
        return fuse(parts[0], parts[1], w).clamp(0, 1)


def load_uddm(path: str | Path, device: str | torch.device = "cpu",
              base_weights: str | Path | None = None) -> UDDMModel:
    """A run folder of ``blindsr train uddm`` (``final.safetensors`` + ``final_pddm.safetensors``) or the
    path of its ``final.safetensors``; strict loading, frozen.

    The stablesr backend's ``final.safetensors`` holds only the trainable part (encoder + SPADE); the frozen
    SD part is rebuilt from the base weights its metadata names (``base_weights``: another path for them)."""
    from blindsr.io.weights import check_finite, load_into, load_safetensors_metadata, load_state_dict
    from blindsr.methods.prior.model import build_unet

    path = Path(path)
    final = path / "final.safetensors" if path.is_dir() else path
    pddm_file = final.with_name(final.stem + "_pddm.safetensors")  # the trainer's final_<module> beside it
    for f in (final, pddm_file):
        if not f.is_file():
            raise WeightsError(f"UDDM weights not found: {f} (train them with `blindsr train uddm`)")
    meta = load_safetensors_metadata(final)
    if meta.get("method") != "uddm" or "config" not in meta:
        raise WeightsError(f"{final}: not a UDDM checkpoint (metadata method {meta.get('method')!r})")
    cfg = json.loads(meta["config"])
    ddm_cfg = from_dict(DDMConfig, cfg["ddm"], "ddm")
    pddm = PDDM(from_dict(PDDMConfig, cfg["pddm"], "pddm"))
    if ddm_cfg.backend == "stablesr":
        from blindsr.methods.uddm.ddm_stablesr import build_ddm_net

        unet: nn.Module = build_ddm_net(ddm_cfg.stablesr, base_weights)
    else:
        unet = build_unet(ddm_cfg.unet)
    for module, f in ((unet, final), (pddm, pddm_file)):
        sd = load_state_dict(f)
        check_finite(sd, f)
        load_into(module, sd, strict=True)
    return UDDMModel(unet.to(device), ddm_cfg, pddm.to(device), int(cfg.get("scale", 4)))


@lru_cache(maxsize=2)
def _cached(path: str) -> UDDMModel:
    return load_uddm(path)


@dataclass
class UDDMPresetConfig:
    ckpt: str = ""            # the `blindsr train uddm` run folder (or its final.safetensors)
    w: float = 0.5            # Eq. 1's fusion weight: 0 = DDM only, 1 = P-DDM only
    steps: int | None = None  # DDM sampling steps (None: the model's, 200 as the paper)
    scale: int = field(default=4)  # must equal the model's


class UDDMDegradation(Degradation):
    """A learned camera degradation as a preset (``DegradeResult.kernel``: P-DDM's global kernel, or None)."""

    def validate(self) -> None:
        super().validate()
        if not self.config.ckpt:
            raise BlindSRError("preset uddm: give the trained model: --ckpt RUN_FOLDER (or --set ckpt=RUN_FOLDER)")
        if not 0 <= self.config.w <= 1:
            raise BlindSRError(f"preset uddm: w must be in [0, 1], got {self.config.w}")
        model = _cached(str(Path(self.config.ckpt).resolve()))  # a missing or wrong model fails here, once
        if model.scale != self.scale:
            raise BlindSRError(f"preset uddm: the model is x{model.scale}, not x{self.scale} (--scale)")

    def __call__(self, hr: Tensor, generator: torch.Generator | None = None) -> DegradeResult:
        hr = self.check_input(hr)
        model = _cached(str(Path(self.config.ckpt).resolve()))
        lr = model(hr.float(), self.config.w, generator, self.config.steps, self.progress)
        kernel = None
        if self.config.w != 0 and model.pddm.config.kernel == "global" and "blur" in model.pddm.config.ops:
            with torch.no_grad():
                kernel = model.pddm.params(hr.float()).kernel
        params = [{"w": self.config.w, "s": model.ddm_config.s} for _ in range(hr.shape[0])]
        return DegradeResult(lr, hr, kernel, params)


UDDM = PresetSpec(UDDMDegradation, UDDMPresetConfig, "UDDM: a camera's degradation learnt from its LR photos (Eq. 1)")

__all__ = ["fuse", "UDDMModel", "load_uddm", "UDDMPresetConfig", "UDDMDegradation", "UDDM"]
