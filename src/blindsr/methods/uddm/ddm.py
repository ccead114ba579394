"""UDDM's DDM (paper Eqs. 2-4), pixel backend: a conditional diffusion model from an extremely downsampled image
to a real-looking LR image, trained on real LR photos only.

- **Condition** (Eq. 2): ``ULR = (LR ↓s) ↑s`` -- the real LR bicubic-downscaled by ``s`` (MATLAB bicubic, the
  library's ``imresize``), then brought back to the LR size so it can be concatenated to ``x_t``.
- **Training** (Eq. 3): ε-MSE of ``UNet(cat(x_t, 2 ULR - 1), t)`` with ``x_0 = 2 LR - 1``; SD-Turbo's process
  (T = 1000, scaled linear, ε), the same as the pixel prior's, so the UNet is the prior's miniature SD UNet with 6
  input channels (``methods.prior.config.PriorUNetConfig``), called with the prior's null context.
- **Synthesis** (Eq. 4): for an HR image and scale r the condition is ``(HR ↓ r s) ↑s`` at size HR / r, and reverse
  diffusion (DDPM, ``sample_steps`` = 200 as the paper, respaced) gives a "real-looking" LR of that size, in
  Gaussian-blended tiles for any size (``diffusion.tiling.tiled``; each tile sees its crop of the condition).

``s`` is not given in the paper (its Fig. 4b sweeps it). Our sweep (docs/uddm.md, unpaired data only: the SWD
between the DDM's LR and the camera's real LR photos) chose ``DDMConfig.s`` = 2 over 4.

Two backends, one method (``DDMConfig.backend``): ``pixel`` (this module, the default) and ``stablesr`` -- the
paper's DDM on StableSR (SD 2.1 frozen + the trainable time-aware encoder and SFT layers, on VAE latents),
configured by :class:`StableSRDDM` and implemented in ``ddm_stablesr.py``; :func:`synthesize` serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindsr.degradations.operators import imresize
from blindsr.diffusion import parameterization
from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.samplers import Generators, ModelOutput, make_stepper, randn, sample
from blindsr.diffusion.tiling import tiled
from blindsr.errors import BlindSRError
from blindsr.methods.prior.config import PriorDiffusion, PriorUNetConfig
from blindsr.methods.prior.model import null_context
from blindsr.ops.progress import Progress
from blindsr.ops.resize import pad_to_multiple


def ddm_unet_config(base: PriorUNetConfig | None = None) -> PriorUNetConfig:
    """The prior's UNet architecture with 3 + 3 input channels (x_t and the condition)."""
    from dataclasses import replace

    return replace(base or PriorUNetConfig(), in_channels=6, out_channels=3)


BACKENDS = ("pixel", "stablesr")


@dataclass
class StableSRDDM:
    """The ``stablesr`` backend's parts and synthesis tiles (``model.ddm.stablesr``; ``ddm_stablesr.py``)."""

    weights: str = ""          # a StableSR stage-1 .ckpt, or an SD 2.1-base checkpoint / diffusers folder to start
    #                            from (fresh encoder + SPADE); "" = random init (tests only)
    size: str = "full"         # full (SD 2.1 + the released encoder) | tiny (the conformance fixture's sizes; tests)
    tile: int = 64             # synthesis tile in latent pixels (official 64 = 512 image px; 0: never tile)
    overlap: int = 32          # latent overlap of the aggregation tiles (official 32)
    context: str = "text"      # the null text context: text = the weights' text encoder on "" (official);
    #                            zeros = a fixed (1, 77, C) zero context (always so for random init)
    posterior: str = "sample"  # VAE latents: a posterior sample (official get_first_stage_encoding) | mode

    def __post_init__(self) -> None:
        choices = {"size": ("full", "tiny"), "context": ("text", "zeros"), "posterior": ("sample", "mode")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BlindSRError(f"DDM stablesr: {name} {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if self.tile < 0 or (self.tile and not 0 <= self.overlap < self.tile):
            raise BlindSRError("DDM stablesr: tile must be >= 0 (0: never) and 0 <= overlap < tile")


@dataclass
class DDMConfig:
    """The DDM's architecture, process and sampler (paper-silent choices named)."""

    s: int = 2                # extreme downsampling factor (paper: swept, not given; ours: 2 beat 4, docs/uddm.md)
    unet: PriorUNetConfig = field(default_factory=ddm_unet_config)
    diffusion: PriorDiffusion = field(default_factory=PriorDiffusion)  # SD-Turbo's T = 1000, eps
    sample_steps: int = 200   # DDPM steps at synthesis (paper: 200)
    tile: int = 256           # synthesis tile in LR pixels (0: never); a multiple of the UNet's levels
    overlap: int = 64
    backend: str = "pixel"    # pixel (the fields above) | stablesr (the paper's: ``stablesr`` below, its own
    #                           process: stablesr.base_process, the LDM linear 1000 steps)
    stablesr: StableSRDDM = field(default_factory=StableSRDDM)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BlindSRError(f"DDM: backend {self.backend!r}: choose {' or '.join(BACKENDS)}")
        if self.s < 1 or self.sample_steps < 1:
            raise BlindSRError("DDM: s >= 1 and sample_steps >= 1 are required")
        if self.unet.in_channels != 6 or self.unet.out_channels != 3:
            raise BlindSRError("DDM: the UNet takes x_t and the condition (6 channels) and predicts 3")
        if self.tile and (self.tile % self.unet.multiple or not 0 <= self.overlap < self.tile):
            raise BlindSRError(f"DDM: tile must be a multiple of {self.unet.multiple} above the overlap")


def condition(img: Tensor, factor: float, size: tuple[int, int] | None = None) -> Tensor:
    """``(img ↓factor)`` brought to ``size`` (default: ``img``'s), MATLAB bicubic both ways, in [0, 1]. Training:
    ``condition(real_lr, s)``; synthesis: ``condition(hr, r * s, hr_size / r)``."""
    size = tuple(img.shape[-2:]) if size is None else size
    small = imresize(img, scale=1 / factor)
    return imresize(small, size=size).clamp(0, 1)


def predict(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    """The UNet's ε at [-1, 1] samples ``x_t``, original timesteps ``t`` and a condition in [0, 1]."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    x = torch.cat([x_t, cond.to(x_t.dtype) * 2 - 1], dim=1)
    return unet(x, t, encoder_hidden_states=null_context(unet, x.shape[0], x)).sample


def ddm_loss(unet: nn.Module, diffusion: GaussianDiffusion, lr: Tensor, cond: Tensor, generator: torch.Generator,
             t: Tensor | None = None) -> Tensor:
    """Eq. 3 on real LR crops ``lr`` with their conditions ``cond`` (both [0, 1]); t ~ U{0..T-1} unless given."""
    dev, B = lr.device, lr.shape[0]
    with torch.no_grad():
        x0 = lr.float() * 2 - 1
        if t is None:
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=generator, device=dev)
        eps = torch.randn(x0.shape, generator=generator, device=dev)
        x_t = diffusion.q_sample(x0, t, eps)
    return F.mse_loss(predict(unet, x_t, t, cond).float(), parameterization.target("eps", x0, eps,
                                                                                   diffusion.abar(t, x0)))


def synthesize(unet: nn.Module, config: DDMConfig, cond: Tensor, generator: Generators = None,
               steps: int | None = None, progress: Progress = False) -> Tensor:
    """Reverse diffusion from noise to an LR image (B, 3, h, w) in [0, 1] given its condition (B, 3, h, w).

    ``generator``: one, or one per image (image i then does not depend on the batch it is in). With
    ``config.backend == "stablesr"`` ``unet`` is the backend's module (``ddm_stablesr.StableSRDDMNet``) and the
    work is :func:`ddm_stablesr.synthesize_stablesr`'s."""
    if config.backend == "stablesr":
        from blindsr.methods.uddm.ddm_stablesr import synthesize_stablesr

        return synthesize_stablesr(unet, config, cond, generator, steps, progress)
    m = config.unet.multiple
    h, w = cond.shape[-2:]
    c = pad_to_multiple(cond, m, mode="reflect")
    ref = next(unet.parameters())
    stepper = make_stepper("ddpm", config.diffusion.process(), steps or config.sample_steps, var_type="fixed_small",
                           device=ref.device)

    def model_fn(x: Tensor, t: Tensor, box=None) -> ModelOutput:
        cc = c if box is None else c[..., box.slices[0], box.slices[1]]
        return ModelOutput(predict(unet, x, t, cc), "eps")

    H, W = c.shape[-2:]
    fn = model_fn
    if config.tile and max(H, W) > config.tile:
        fn = tiled(model_fn, config.tile, config.overlap, align=m, pass_box=True)
    x_T = randn((c.shape[0], 3, H, W), generator, ref.device)
    with torch.no_grad():
        x0 = sample(fn, x_T, stepper, generator, clip_x0=(-1.0, 1.0), progress=progress)
    return ((x0[..., :h, :w].float() + 1) / 2).clamp(0, 1)


__all__ = ["BACKENDS", "DDMConfig", "StableSRDDM", "ddm_unet_config", "condition", "predict", "ddm_loss", "synthesize"]
