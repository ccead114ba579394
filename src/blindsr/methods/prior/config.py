"""Configs of the frozen pixel-space prior: the UNet's architecture and its diffusion process.

Choices (issue 11, pixel backend of DM-SR; reused by DiffBIR's pixel backend, issue 14):

- **SD's UNet, miniature.** A diffusers ``UNet2DConditionModel`` (down blocks, a cross-attention middle block, up
  blocks with skips) with 3 input / 3 output channels. Plain ``DownBlock2D`` / ``UpBlock2D`` at the high
  resolutions and ``CrossAttn*Block2D`` only at the lowest ones (attention at 64² pixels would cost more than
  the whole rest of the network on a CPU). Same class and call signature as the SD-Turbo UNet, so DM-SR's two
  backends call it with the same code and ``IRControlNetConfig.from_unet_config`` mirrors it.
- **Unconditional.** The cross-attention always sees one fixed null token: ``encoder_hidden_states`` = zeros
  of shape (B, 1, ``cross_attention_dim``) (``model.null_context``), where SD-Turbo gets a text embedding.
- **SD-Turbo's process.** T = 1000, ``scaled_linear`` betas 0.00085 -> 0.012, epsilon prediction: alpha_bar(t),
  and so DM-SR's t̂ in [0, 500], mean the same in both backends (alpha_bar(100) = 0.8942, alpha_bar(500) = 0.2763).
- Images are in [-1, 1] inside the model (the [0, 1] convention of the package holds outside it).

Configs are read with ``blindsr.config.from_dict`` and written with ``to_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.parameterization import check_kind
from blindsr.diffusion.respace import make_diffusion
from blindsr.diffusion.samplers import SPACINGS
from blindsr.errors import BlindSRError

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class PriorUNetConfig:
    """The prior's UNet (field names = diffusers ``UNet2DConditionModel`` arguments). Defaults: Prior-S."""

    sample_size: int = 64  # training crop (diffusers metadata only: any multiple of 2^(levels-1) works)
    in_channels: int = 3  # RGB in [-1, 1]
    out_channels: int = 3  # epsilon
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # 64², 32², 16², 8² at 64²
    layers_per_block: int = 1  # resnets per down level (the up levels get one more, as in SD)
    down_block_types: list[str] = field(default_factory=lambda: [
        "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: [
        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
    attention_head_dim: list[int] = field(default_factory=lambda: [1, 1, 2, 4])  # heads per level (diffusers'
    #                                  legacy name, as in SD 2.x's config): head width 32 at the attention levels
    cross_attention_dim: int = 64  # width of the null context token
    use_linear_projection: bool = True  # SD 2.x
    norm_num_groups: int = 8  # GroupNorm groups (SD: 32 on 320+ channels; 8 keeps >= 2 channels per group)
    flip_sin_to_cos: bool = True  # SD's [cos, sin] timestep embedding
    freq_shift: int = 0

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if self.in_channels < 1 or self.out_channels < 1 or n < 2 or self.layers_per_block < 1:
            raise BlindSRError("prior: needs >= 1 in/out channels, >= 2 levels and layers_per_block >= 1")
        if len(self.down_block_types) != n or len(self.up_block_types) != n or len(self.attention_head_dim) != n:
            raise BlindSRError(f"prior: block_out_channels has {n} levels; down_block_types, up_block_types and "
                               "attention_head_dim need one entry per level")
        bad = [b for b in self.down_block_types if b not in DOWN_TYPES] + [
            b for b in self.up_block_types if b not in UP_TYPES]
        if bad:
            raise BlindSRError(f"prior: block type(s) {bad}: choose {', '.join(DOWN_TYPES + UP_TYPES)}")
        if [("CrossAttn" in b) for b in self.down_block_types] != [("CrossAttn" in b) for b in self.up_block_types[::-1]]:
            raise BlindSRError("prior: up_block_types must mirror down_block_types (attention at the same levels)")
        for c, h in zip(self.block_out_channels, self.attention_head_dim, strict=True):
            if c % self.norm_num_groups or h < 1 or c % h:
                raise BlindSRError(f"prior: {c} channels must be divisible by norm_num_groups "
                                   f"{self.norm_num_groups} and by the {h} attention heads")

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (one 2x downsampling per level but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def small(cls) -> PriorUNetConfig:
        """Prior-S, the shipped model (4.08 M parameters, 16.3 MB in fp32)."""
        return cls()

    @classmethod
    def tiny(cls) -> PriorUNetConfig:
        """Two levels, for tests."""
        return cls(sample_size=16, block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 2],
                   cross_attention_dim=8, norm_num_groups=4)


PRESETS = {"small": PriorUNetConfig.small, "tiny": PriorUNetConfig.tiny}


@dataclass
class PriorDiffusion:
    """The prior's diffusion process (SD-Turbo's) and its default unconditional sampler (DDIM)."""

    diffusion_steps: int = 1000  # T (SD, SD-Turbo)
    schedule: str = "scaled_linear"  # SD's betas: linspace(sqrt 0.00085, sqrt 0.012)^2
    prediction: str = "eps"  # what the UNet predicts (SD 2.1-base / SD-Turbo: eps)
    sample_steps: int = 50  # DDIM steps of `sample_prior`
    eta: float = 0.0  # DDIM eta: 0 = deterministic given x_T; 1 = the DDPM posterior's noise (on Prior-S's early
    #                   checkpoints eta 0 kept grain that eta 1 did not; the final one is sharper with 0)
    spacing: str = "linspace"  # sampler timesteps: linspace (both ends, starts at t = 999) | leading (SD's)

    def __post_init__(self) -> None:
        check_kind(self.prediction)
        if self.spacing not in SPACINGS:
            raise BlindSRError(f"prior: spacing {self.spacing!r}: choose one of {', '.join(SPACINGS)}")
        if self.sample_steps < 1 or self.eta < 0:
            raise BlindSRError("prior: sample_steps must be >= 1 and eta >= 0")

    def process(self) -> GaussianDiffusion:
        """The full T-step training process (no respacing: t ~ U{0, ..., T-1})."""
        return make_diffusion(self.diffusion_steps, self.schedule)


__all__ = ["PriorUNetConfig", "PriorDiffusion", "PRESETS", "DOWN_TYPES", "UP_TYPES"]
