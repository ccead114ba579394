"""DM-SR's three trainable networks: the timestep estimator T, the time-aware encoder E_θ, the LR discriminator D.

Paper: "Bridging the distribution gap to harness pre-trained diffusion priors for SR" (ICLR 2026), no public code.

- ``TimestepEstimator`` (App. A.1, Eq. 10): the five conv blocks of VGG19 (torchvision's ``vgg19().features``,
  modules 0..36, the same indices, so an ImageNet VGG19 state dict's ``features.*`` keys load strictly) on the LR
  image, global average pool, ``Linear`` -> F in R^n_bins, t̂ = Σ softmax(F) · [0, 1, ..., n_bins − 1].
- ``TimeAwareEncoder`` (Sec. 3.2, A.1): diffusers' VAE ``Encoder`` (the SD VAE encoder, 34,163,592 parameters,
  + quant_conv 72) whose four down levels each get ``Linear(embed(t̂))`` added to their output feature map.
- ``LRDiscriminator`` (Eqs. 4-5): ControlNet-style and LR-conditioned; ``d_loss`` / ``g_loss`` are its losses.

Choices where the paper is silent (the config field where there is one, its default first):

==============================  ===============================================================================
t̂ embedding                     ``EncoderConfig.t_embed_dim`` = 128: diffusers' sinusoidal ``Timesteps``
                                (flip_sin_to_cos, shift 0: SD's) of the continuous t̂, straight into one Linear per
                                level (the paper's "linear layers"); ``t_mlp_dim`` > 0 inserts diffusers'
                                ``TimestepEmbedding`` MLP (Linear-SiLU-Linear, then SiLU) first. 0 = none.
where t̂ is added                after each down block, i.e. on the block's output (after its down-sampler: the
                                level's channels at the next level's resolution; the last level has no down-sampler).
projection init                 zeros: an untrained E_θ is exactly the SD VAE encoder (posterior mean × 0.18215).
encoder output                  the posterior MEAN (the first half of quant_conv's moments), never a sample.
pixel backend encoder           no down-samplers, no mid-block attention, no quant_conv, ``double_z`` off:
                                the output has the input's size (any H, W).
VGG19 max-pools                 ``EstimatorConfig.ceil_mode`` = True: any LR size >= 1 works (torchvision: False,
                                which needs sides >= 32); the same as torchvision on sides divisible by 32.
VGG19 init                      torchvision's (He normal, fan_out; zero biases): torch's default init shrinks
                                the signal ~1/√3 per conv, so 16 of them from scratch (the miniature) give a
                                nearly constant t̂. ImageNet weights replace it when loaded.
VGG19 input                     [0, 1] RGB, ImageNet mean/std inside forward (constants, not buffers: the state
                                dict is exactly torchvision's ``features.*``).
discriminator hint              LR bicubic-resized to Z's size (antialiased when shrinking), clamped to [0, 1],
                                mapped to [-1, 1], ``hint_channels`` = (16, 32) convs with SiLU (ControlNet's
                                condition embedding, 3x3, stride 1), last conv to channels[0] with ordinary init
                                (NOT zero: D must depend on the LR from the start), added to conv_in(Z).
discriminator body              ``blocks_per_level`` = 2 diffusers ``ResnetBlock2D`` per level (ControlNet / SD:
                                layers_per_block 2), a stride-2 3x3 conv between levels, GroupNorm-SiLU, global
                                average pool, Linear -> one logit per image.
GAN loss                        ``kind`` = "hinge" (InvSR's); "bce" is the paper's Eqs. 4-5 log-loss (D:
                                −log σ(r) − log(1 − σ(f)); G: the non-saturating −log σ(f)).
==============================  ===============================================================================

Dtypes: each network casts its input to its own parameter dtype (fp16/bf16 after
``blindsr.ops.precision.cast_keep_norms_fp32``); t̂'s softmax, the sinusoidal embedding and the GAN losses are fp32.
Nothing here draws random numbers after construction (init: torch's default init, the VGG convs' above).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blindsr.errors import BlindSRError, WeightsError
from blindsr.train.gan import GAN_LOSSES, d_loss, g_loss  # noqa: F401  (re-exported: DM-SR's names)

# ImageNet normalisation of torchvision's VGG weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg19 "E" config: conv widths and "M" max-pools; 37 modules (conv + ReLU pairs, 5 pools)
VGG19_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _strict_load(module: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Strict load with one-line errors (missing / unexpected keys and shape mismatches alike)."""
    from blindsr.models.sd import load_converted

    try:
        load_converted(module, sd, what)
    except RuntimeError as e:  # size mismatches
        raise WeightsError(f"{what}: {str(e).strip().splitlines()[-1].strip()}") from None


def _split_prefixes(sd: Mapping[str, Tensor], keep: Iterable[str], ignore: Iterable[str],
                    what: str) -> dict[str, dict[str, Tensor]]:
    """``{prefix: sub state dict}`` for the ``keep`` prefixes; keys under ``ignore`` are dropped, others refused."""
    keep, ignore = tuple(keep), tuple(ignore)
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in keep}
    other = []
    for key, value in sd.items():
        prefix = next((p for p in keep if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix):]] = value
        elif not key.startswith(ignore):
            other.append(key)
    if other:
        raise WeightsError(f"{what}: {len(other)} unexpected key(s) {other[:3]} (expected prefixes "
                           f"{', '.join(keep)}; ignored: {', '.join(ignore)})")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# T: the timestep estimator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EstimatorConfig:
    """The timestep estimator T (App. A.1)."""

    width_mult: float = 1.0  # VGG19 widths x this (1.0: 64/128/256/512/512, ImageNet weights load; less: miniature)
    n_bins: int = 500  # F in R^n_bins; t̂ in [0, n_bins - 1]
    ceil_mode: bool = True  # max-pools round up: any LR size works (torchvision: False, needs sides >= 32)

    def __post_init__(self) -> None:
        if not self.width_mult > 0 or self.n_bins < 2:
            raise BlindSRError("dmsr estimator: width_mult must be > 0 and n_bins >= 2")

    @property
    def widths(self) -> tuple[int, ...]:
        """The 16 conv widths."""
        return tuple(max(1, round(c * self.width_mult)) for c in VGG19_LAYOUT if c != "M")

    @classmethod
    def vgg19(cls) -> EstimatorConfig:
        """The paper's T: real VGG19 widths, 500 bins (20.02 M VGG + 256.5 k head parameters)."""
        return cls()

    @classmethod
    def pixel_s(cls) -> EstimatorConfig:
        """The miniature for the pixel backend: VGG19 at 1/8 width (8/16/32/64/64)."""
        return cls(width_mult=0.125)


def vgg19_conv_indices() -> list[int]:
    """Indices of the 16 convs in torchvision's ``vgg19().features`` (0, 2, 5, 7, 10, ..., 34)."""
    out, i = [], 0
    for c in VGG19_LAYOUT:
        if c != "M":
            out.append(i)
        i += 1 if c == "M" else 2
    return out


def expected_timestep(logits: Tensor) -> Tensor:
    """Eq. 10: t̂ = Σ_i softmax(F)_i · i, in fp32, continuous in [0, n_bins - 1]; ``logits`` (B, n_bins) -> (B,)."""
    p = torch.softmax(logits.float(), dim=-1)
    return p @ torch.arange(logits.shape[-1], device=logits.device, dtype=p.dtype)


class TimestepEstimator(nn.Module):
    """T: ``forward(lr (B, 3, h, w) in [0, 1]) -> (t_hat (B,) fp32, logits (B, n_bins))``."""

    def __init__(self, config: EstimatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or EstimatorConfig()
        layers: list[nn.Module] = []
        widths, c_in = iter(cfg.widths), 3
        for c in VGG19_LAYOUT:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=cfg.ceil_mode))
            else:
                c_out = next(widths)
                conv = nn.Conv2d(c_in, c_out, 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's VGG init
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)  # the same module indices as torchvision's vgg19().features
        self.head = nn.Linear(c_in, cfg.n_bins)

    def forward(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        dtype = _module_dtype(self)
        mean = torch.tensor(IMAGENET_MEAN, device=lr.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=lr.device, dtype=dtype).view(1, 3, 1, 1)
        h = self.features((lr.to(dtype) - mean) / std)
        logits = self.head(h.mean(dim=(2, 3)))
        return expected_timestep(logits), logits

    def load_vgg19_features(self, state_dict: Mapping[str, Tensor]) -> TimestepEstimator:
        """Load a torchvision VGG19 state dict's ``features.*`` strictly (``classifier.*`` is ignored)."""
        if self.config.width_mult != 1:
            raise WeightsError(f"dmsr estimator: VGG19 weights need width_mult 1, not {self.config.width_mult}")
        parts = _split_prefixes(state_dict, ["features."], ["classifier."], "VGG19 features")
        _strict_load(self.features, parts["features."], "VGG19 features")
        return self


# ---------------------------------------------------------------------------------------------------------------
# E_θ: the time-aware encoder
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    """The time-aware encoder E_θ (Sec. 3.2, A.1). Defaults: the SD 2.x VAE encoder (``EncoderConfig.sd()``)."""

    in_channels: int = 3  # RGB (bicubic-upsampled LR in [0, 1]; 2x - 1 inside)
    out_channels: int = 4  # latent channels: 4 for SD, 3 for the pixel backend
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per level (one t̂ projection each)
    layers_per_block: int = 2  # ResNet blocks per level
    norm_num_groups: int = 32
    double_z: bool = True  # conv_out gives mean + logvar (SD); the output is the mean half
    use_quant_conv: bool = True  # SD's 1x1 quant_conv after conv_out
    downsample: bool = True  # SD: 2x down-samplers after all levels but the last; False: full resolution
    mid_attention: bool = True  # the mid block's self-attention (SD: on; pixel: off, too costly at full size)
    scaling_factor: float = 0.18215  # output scale (SD's latent scale; pixel: 1.0)
    t_embed_dim: int = 128  # sinusoidal embedding width of t̂
    t_mlp_dim: int = 0  # 0: sinusoid straight into the per-level Linears; > 0: a TimestepEmbedding MLP to this width

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or not self.block_out_channels or self.layers_per_block < 1:
            raise BlindSRError("dmsr encoder: needs >= 1 in/out channels, >= 1 level and layers_per_block >= 1")
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise BlindSRError(f"dmsr encoder: channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")
        if self.t_embed_dim < 2 or self.t_embed_dim % 2 or self.t_mlp_dim < 0:
            raise BlindSRError("dmsr encoder: t_embed_dim must be even and >= 2, t_mlp_dim >= 0")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this for an exact size ratio (8 for SD, 1 without down-sampling)."""
        return 2 ** (len(self.block_out_channels) - 1) if self.downsample else 1

    @classmethod
    def from_vae_config(cls, vae_config: Mapping[str, Any] | None = None, **changes: Any) -> EncoderConfig:
        """The encoder of a diffusers ``AutoencoderKL`` config (None: the shipped SD 2.x VAE)."""
        from blindsr.models.sd import load_config

        v = dict(vae_config or load_config("vae"))
        if any(b != "DownEncoderBlock2D" for b in v.get("down_block_types", ["DownEncoderBlock2D"])):
            raise BlindSRError("dmsr encoder: only DownEncoderBlock2D VAE encoders are supported")
        kw = dict(in_channels=v.get("in_channels", 3), out_channels=v.get("latent_channels", 4),
                  block_out_channels=tuple(v.get("block_out_channels", (64,))),
                  layers_per_block=v.get("layers_per_block", 1), norm_num_groups=v.get("norm_num_groups", 32),
                  double_z=True, use_quant_conv=v.get("use_quant_conv", True), downsample=True,
                  mid_attention=v.get("mid_block_add_attention", True),
                  scaling_factor=v.get("scaling_factor", 0.18215))
        return cls(**{**kw, **changes})

    @classmethod
    def sd(cls) -> EncoderConfig:
        """SD 2.x (SD-Turbo's VAE): 128/256/512/512, 2 layers, 32 groups, double_z, quant_conv, x 0.18215."""
        return cls()

    @classmethod
    def pixel_s(cls) -> EncoderConfig:
        """The pixel backend's miniature: 32/64/64/64, 1 layer, 8 groups, full resolution, RGB out, x 1."""
        return cls(out_channels=3, block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8,
                   double_z=False, use_quant_conv=False, downsample=False, mid_attention=False,
                   scaling_factor=1.0, t_embed_dim=64)


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class TimeAwareEncoder(nn.Module):
    """E_θ: ``forward(x (B, 3, H, W) in [0, 1], t_hat (B,) | float) -> (B, out_channels, H/8, W/8)`` (SD) or
    ``(B, 3, H, W)`` (pixel): ``scaling_factor`` x the encoder's output (the posterior mean with ``double_z``).

    Submodules ``encoder`` and ``quant_conv`` have the key names of diffusers' ``AutoencoderKL``;
    ``t_levels[i]`` (zero-initialised Linear) adds the embedded t̂ to down level i's output.
    Set ``gradient_checkpointing = True`` to recompute each level in backward (training only).
    """

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.config = cfg = config or EncoderConfig()
        self.encoder = Encoder(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                               down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
                               block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                               norm_num_groups=cfg.norm_num_groups, act_fn="silu", double_z=cfg.double_z,
                               mid_block_add_attention=cfg.mid_attention)
        if not cfg.downsample:
            for block in self.encoder.down_blocks:
                block.downsamplers = None
        z = 2 * cfg.out_channels if cfg.double_z else cfg.out_channels
        self.quant_conv = nn.Conv2d(z, z, 1) if cfg.use_quant_conv else None
        self.time_proj = Timesteps(cfg.t_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = TimestepEmbedding(cfg.t_embed_dim, cfg.t_mlp_dim) if cfg.t_mlp_dim else None
        d = cfg.t_mlp_dim or cfg.t_embed_dim
        self.t_levels = nn.ModuleList(_zero_linear(d, c) for c in cfg.block_out_channels)
        self.gradient_checkpointing = False

    def embed_t(self, t_hat: Tensor | float, batch: int, device: torch.device) -> Tensor:
        """(B, d) embedding of the continuous t̂ (a float or shape () / (B,)), fp32 sinusoid, module dtype out."""
        t = torch.as_tensor(t_hat, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        emb = self.time_proj(t).to(_module_dtype(self))
        if self.time_mlp is not None:
            emb = F.silu(self.time_mlp(emb))
        return emb

    def _run(self, module: nn.Module, h: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, use_reentrant=False)
        return module(h)

    def forward(self, x: Tensor, t_hat: Tensor | float) -> Tensor:
        enc, cfg = self.encoder, self.config
        emb = self.embed_t(t_hat, x.shape[0], x.device)
        h = enc.conv_in((x * 2 - 1).to(emb.dtype))
        for block, proj in zip(enc.down_blocks, self.t_levels, strict=True):
            h = self._run(block, h) + proj(emb)[:, :, None, None]
        h = self._run(enc.mid_block, h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        if cfg.double_z:
            h = h[:, : cfg.out_channels]  # the posterior mean (DiagonalGaussianDistribution's first chunk)
        return h * cfg.scaling_factor

    def load_sd_vae_encoder(self, state_dict: Mapping[str, Tensor]) -> TimeAwareEncoder:
        """Load the encoder half of a diffusers ``AutoencoderKL`` state dict strictly (``encoder.*``,
        ``quant_conv.*``; ``decoder.*`` / ``post_quant_conv.*`` ignored). The t̂ projections are left as they are."""
        parts = _split_prefixes(state_dict, ["encoder.", "quant_conv."], ["decoder.", "post_quant_conv."],
                                "SD VAE encoder")
        _strict_load(self.encoder, parts["encoder."], "SD VAE encoder")
        if self.quant_conv is not None:
            _strict_load(self.quant_conv, parts["quant_conv."], "SD VAE quant_conv")
        elif parts["quant_conv."]:
            raise WeightsError("SD VAE encoder: the weights have a quant_conv but the config has use_quant_conv off")
        return self


# ---------------------------------------------------------------------------------------------------------------
# D: the LR-conditioned discriminator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DiscriminatorConfig:
    """The LR-conditioned ControlNet-style discriminator (Eqs. 4-5)."""

    in_channels: int = 4  # Z's channels (4: an SD latent; 3: an image for the pixel backend)
    lr_channels: int = 3  # the LR image's channels
    channels: tuple[int, ...] = (64, 128, 256, 256)  # one entry per level; stride-2 down-sampling between levels
    blocks_per_level: int = 2  # ResnetBlock2D per level
    norm_num_groups: int = 32
    hint_channels: tuple[int, ...] = (16, 32)  # the LR's condition-embedding convs (then one conv to channels[0])

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.lr_channels < 1 or not self.channels or self.blocks_per_level < 1:
            raise BlindSRError("dmsr discriminator: needs >= 1 in/LR channels, >= 1 level and blocks_per_level >= 1")
        bad = [c for c in self.channels if c < 1 or c % self.norm_num_groups]
        if bad or any(c < 1 for c in self.hint_channels):
            raise BlindSRError(f"dmsr discriminator: channels {bad or list(self.hint_channels)} must be >= 1 and "
                               f"divisible by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def tiny(cls, in_channels: int = 4) -> DiscriminatorConfig:
        """For tests: 8/16/32/32, one block per level, 4 groups."""
        return cls(in_channels=in_channels, channels=(8, 16, 32, 32), blocks_per_level=1, norm_num_groups=4,
                   hint_channels=(8,))


class LRDiscriminator(nn.Module):
    """D: ``forward(z (B, C, H, W), lr (B, 3, h, w) in [0, 1]) -> logits (B,)``, one per image.

    The LR is resized to H x W (bicubic), embedded by ``hint`` and added to ``conv_in(z)``; then ``levels``
    (ResnetBlock2D x blocks_per_level, stride-2 conv between levels), GroupNorm-SiLU, global mean, Linear.
    """

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.config = cfg = config or DiscriminatorConfig()
        ch, g = cfg.channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        hint: list[nn.Module] = []
        for c_in, c_out in zip((cfg.lr_channels, *cfg.hint_channels), cfg.hint_channels, strict=False):
            hint += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU()]
        hint.append(nn.Conv2d((cfg.lr_channels, *cfg.hint_channels)[-1], ch[0], 3, padding=1))
        self.hint = nn.Sequential(*hint)
        self.levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        c_prev = ch[0]
        for i, c in enumerate(ch):
            self.levels.append(nn.ModuleList(
                ResnetBlock2D(in_channels=c_prev if j == 0 else c, out_channels=c, temb_channels=None, groups=g)
                for j in range(cfg.blocks_per_level)))
            if i < len(ch) - 1:
                self.downsamplers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            c_prev = c
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.head = nn.Linear(ch[-1], 1)

    def condition(self, lr: Tensor, size: tuple[int, int]) -> Tensor:
        """The LR resized to ``size`` (bicubic, antialiased when shrinking), clamped, in [-1, 1], fp32."""
        x = lr.float()
        if tuple(x.shape[-2:]) != tuple(size):
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink)
        return x.clamp(0, 1) * 2 - 1

    def forward(self, z: Tensor, lr: Tensor) -> Tensor:
        dtype = _module_dtype(self)
        cond = self.condition(lr, (z.shape[-2], z.shape[-1])).to(dtype)
        h = self.conv_in(z.to(dtype)) + self.hint(cond)
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h, None)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h).squeeze(1)


__all__ = ["EstimatorConfig", "TimestepEstimator", "expected_timestep", "vgg19_conv_indices",
           "EncoderConfig", "TimeAwareEncoder", "DiscriminatorConfig", "LRDiscriminator", "d_loss", "g_loss",
           "GAN_LOSSES", "IMAGENET_MEAN", "IMAGENET_STD", "VGG19_LAYOUT"]
