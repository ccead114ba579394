"""DiffBIR configuration: one run's settings (``DiffBIRConfig``, filled from the official presets in
``configs/diffbir_presets.json``), the tiling of each stage and the SD training schedule.

Samplers (``blindsr.diffusion.samplers``): ``ddpm`` (IDDPM respacing + ancestral DDPM with fixed-small variance;
the paper setting, official "spaced"), ``ddim`` (eta 0, LDM "uniform" = leading timesteps 1, 1+T/S, ...),
``dpm++_2m`` (DPM-Solver++(2M)) and ``dpm++_3m_sde`` (SDE-DPM-Solver++, order 3; our stand-in for v2.1's official
k-diffusion ``edm_dpm++_3m_sde``), the last two on diffusers' scheduler. The old names ``spaced`` and
``dpm++_m2`` are accepted (``SAMPLER_ALIASES``).

Backends (issue 14): ``sd`` (versions v1 / v2 / v2.1: SD 2.1 + the official ControlNets, weights from local
paths) and ``pixel`` (the preset named ``pixel``: the same two stages on the embedded pixel-space prior Prior-S
with an IRControlNet trained here and the SwinIR-S cleaner; the "VAE" is the identity, ``x -> 2x - 1``, and there
is no text: the prior's null context, CFG off). ``blindsr restore`` uses ``pixel`` unless told ``--backend sd``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blindsr.config import from_dict
from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.schedules import get_betas
from blindsr.errors import BlindSRError
from blindsr.methods.diffbir.guidance import GuidanceConfig
from blindsr.models.sd.vae_tiling import VAETiling
from blindsr.registry import DIFFBIR_BACKENDS, DIFFBIR_COLOR_FIXES, DIFFBIR_START_POINTS
from blindsr.registry import DIFFBIR_SAMPLERS as SAMPLERS
from blindsr.registry import DIFFBIR_TASKS as TASKS
from blindsr.registry import DIFFBIR_VERSIONS as VERSIONS

PRESETS_PATH = Path(__file__).resolve().parents[2] / "configs" / "diffbir_presets.json"
SAMPLER_ALIASES = {"spaced": "ddpm", "dpm++_m2": "dpm++_2m"}  # the names of earlier blindsr versions


@lru_cache(maxsize=1)
def presets() -> dict[str, Any]:
    return json.loads(PRESETS_PATH.read_text())


@dataclass
class SDProcess:
    """The SD training process (DiffBIR ``Diffusion``: scaled linear betas 0.00085 -> 0.012, T = 1000) and what
    the UNet predicts; shared by the sampling config and the stage-2 training config."""

    prediction: str = "eps"  # eps (v1, v2) | v (v2.1)
    zero_snr: bool = False  # zero-terminal-SNR schedule (Lin et al. 2024; v2.1)

    def betas(self, zero_snr: bool | None = None) -> Tensor:
        return get_betas("scaled_linear", 1000, self.zero_snr if zero_snr is None else zero_snr)

    def process(self) -> GaussianDiffusion:
        if self.prediction not in ("eps", "v"):
            raise BlindSRError(f"prediction must be eps or v, not {self.prediction!r}")
        if self.zero_snr and self.prediction == "eps":
            raise BlindSRError("zero-terminal-SNR needs v-prediction (eps is undefined at alpha_bar = 0)")
        return GaussianDiffusion(self.betas())


@dataclass
class Tiling:
    """Tile sizes in output pixels; 0 = never tile that stage. A stage is tiled only when the image exceeds it."""

    cleaner_tile: int = 512  # stage-1 input pixels [--cleaner_tile_size 512]
    cleaner_overlap: int = 256  # [--cleaner_tile_stride 256]
    diffusion_tile: int = 1024  # [--cldm_tile_size 512], multiple of 64
    diffusion_overlap: int = 512  # [--cldm_tile_stride 256 at 512]
    vae: VAETiling = field(default_factory=VAETiling)

    @classmethod
    def off(cls) -> Tiling:
        return cls(0, 0, 0, 0, VAETiling(encoder_tile=0, decoder_tile=0))

    @classmethod
    def from_options(cls, tile: int | None = None, tile_overlap: int | None = None, cleaner_tile: int | None = None,
                     vae_tile: int | None = None, no_tile: bool = False, base: Tiling | None = None) -> Tiling:
        """The defaults (``base``: a preset's; else the class's) with the user's choices (``blindsr restore``'s
        flags, the web page's fields): a diffusion tile overlaps by half unless told; a cleaner tile keeps at
        most half of itself as overlap."""
        if no_tile:
            return cls.off()
        t = replace(base) if base is not None else cls()
        if tile is not None:
            t.diffusion_tile = tile
            t.diffusion_overlap = tile // 2 if tile_overlap is None else tile_overlap
        elif tile_overlap is not None:
            t.diffusion_overlap = tile_overlap
        if cleaner_tile is not None:
            t.cleaner_tile = cleaner_tile
            t.cleaner_overlap = min(t.cleaner_overlap, cleaner_tile // 2)
        if vae_tile is not None:
            t.vae = VAETiling(encoder_tile=vae_tile, decoder_tile=vae_tile)
        return t


@dataclass
class DiffBIRConfig(SDProcess):
    """One run's settings; ``from_preset`` fills them from ``diffbir_presets.json`` (official defaults)."""

    version: str = "v2"  # v1 | v2 | v2.1 (backend sd) | pixel
    backend: str = "sd"  # sd (SD 2.1 latents) | pixel (the prior trained here; set by the pixel preset)
    task: str = "sr"
    upscale: float = 4.0
    sampler: str = "ddpm"  # ddpm | ddim | dpm++_2m | dpm++_3m_sde
    steps: int = 50
    cfg: float = 4.0  # classifier-free guidance scale; 1 = conditional only
    rescale_cfg: bool = False  # official --rescale_cfg
    pos_prompt: str = ""
    neg_prompt: str = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
    strength: float = 1.0  # control scale of all controls [--strength]
    noise_aug: int = 0  # add noise of this timestep to the condition latent (v2.1) [--noise_aug]
    start_point: str = "noise"  # noise | cond (SeeSR's LR embedding: x_T = q_sample(c_img, T-1))
    color_fix: str = "wavelet"  # wavelet | adain | none (official v2/v2.1: always wavelet)
    min_size: int = 512  # short side of the stage-2 input (official: 512)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    tiling: Tiling = field(default_factory=Tiling)
    dtype: torch.dtype = torch.float32  # UNet + ControlNet compute dtype (norms stay fp32)
    offload: bool = False  # keep modules on the CPU except while used
    batch_cfg: bool = True  # run cond and uncond as one batch (faster; False halves activation memory)

    @classmethod
    def from_preset(cls, version: str = "v2", task: str = "sr", **overrides: Any) -> DiffBIRConfig:
        """Official defaults of ``version`` for ``task``, then ``overrides`` (None values are ignored)."""
        if version not in (*VERSIONS, "pixel"):
            raise BlindSRError(f"unknown DiffBIR version {version!r}; choose {', '.join(VERSIONS)} or pixel")
        if task not in TASKS:
            raise BlindSRError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
        p = presets()["versions"][version]
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in p.items() if k in names}
        base.update(presets()["tasks"][task])
        unknown = set(overrides) - names
        if unknown:
            raise BlindSRError(f"unknown DiffBIR setting(s): {', '.join(sorted(unknown))}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return from_dict(cls, {**base, "version": version, "task": task}, "diffbir")

    def __post_init__(self) -> None:
        self.sampler = SAMPLER_ALIASES.get(self.sampler, self.sampler)
        self.validate()

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BlindSRError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        if self.steps < 1 or self.upscale <= 0 or self.min_size < 0:
            raise BlindSRError("--steps must be >= 1 and --upscale > 0")
        if self.start_point not in DIFFBIR_START_POINTS:
            raise BlindSRError(f"start point must be noise or cond, not {self.start_point!r}")
        if self.color_fix not in DIFFBIR_COLOR_FIXES:
            raise BlindSRError(f"colour fix must be one of {', '.join(DIFFBIR_COLOR_FIXES)}, not {self.color_fix!r}")
        if self.backend not in DIFFBIR_BACKENDS:
            raise BlindSRError(f"backend must be one of {', '.join(DIFFBIR_BACKENDS)}, not {self.backend!r}")
        if self.backend == "pixel" and (self.cfg != 1 or self.rescale_cfg):
            raise BlindSRError("the pixel backend has no text: classifier-free guidance needs --backend sd")
        m = self.tile_multiple
        if self.tiling.diffusion_tile % m:
            raise BlindSRError(f"diffusion tile {self.tiling.diffusion_tile} must be a multiple of {m} pixels")
        self.process()

    @property
    def tile_multiple(self) -> int:
        """Diffusion tiles are whole UNet levels: 64 pixels for SD (8x VAE, 8x UNet), 8 for Prior-S."""
        return 8 if self.backend == "pixel" else 64
