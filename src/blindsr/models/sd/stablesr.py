"""StableSR (Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution", IJCV 2024;
official code IceClear/StableSR): SD 2.1 steered by a time-aware encoder through SFT layers.

Section numbers (§) refer to the conformance README in ``shared/reference/stablesr``.

- :class:`StableSREncoder` (official ``EncoderUNetModelWT``, §4.2): our own small module, official key layout.
  The LR latent and the ORIGINAL timestep in; one feature map per UNet level out, a dict keyed by
  ``str(width)`` from high to low resolution.
- :class:`SFTUNet` (official ``UNetModelDualcondV2``, §4.3): diffusers' ``UNet2DConditionModel`` (SD 2.1) with a
  :class:`SPADE` attached to every ``ResnetBlock2D`` as its child ``spade``. During a forward pass a hook on
  each resnet's ``conv2`` modulates conv2's output (the end of the residual branch, before the skip add) with
  the feature of the same width. Nothing of diffusers is forked. Since ``spade`` sits where the official
  ``ResBlockDual.spade`` sits, the official keys go through the plain SD key rows
  (``blindsr.models.sd.unet_block_rows``) unchanged.
- Loading (§2): :func:`load_stablesr` reads a stage-1 ``LatentDiffusionSRTextWT`` state dict
  (``model.diffusion_model.``, ``structcond_stage_model.``, ``first_stage_model.``, optionally
  ``cond_stage_model.model.``); :func:`load_sft_unet_state` also accepts a plain SD 2.1 UNet (the SPADE
  layers then keep their init). The CFW decoder is in ``blindsr.models.sd.cfw``.
  :func:`tiny_config`: the fixture's tiny sizes, in code (tests, UDDM's tiny DDM); :func:`latent_multiple`
  and :func:`vae_factor`: the size constraints.
- Sampling (§4.4, §4.6): :func:`base_process` (T = 1000, LDM linear), :func:`sampling_process` (respaced,
  ``timestep_map`` = the original steps the networks see: the official ``t_replace``), :func:`start_latent`
  (x_T = the noised LR latent), :func:`denoiser` / :func:`canvas_denoiser` (the aggregation sampling: official
  tile placement, x-major order and float64 weights through ``diffusion.tiling.tiled``), :func:`p_mean_variance`
  (one step's x0 and posterior), :func:`sample_latent` (the whole loop, the shared ``sample`` + DDPM).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.parameterization import split
from blindsr.diffusion.respace import respaced, space_timesteps
from blindsr.diffusion.samplers import DDPMStepper, Generators, ModelFn, ModelOutput, randn, sample
from blindsr.diffusion.schedules import scaled_linear_betas
from blindsr.diffusion.tiling import tiled
from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.sd import (
    SCALE_FACTOR,
    build_text_encoder,
    build_unet,
    build_vae,
    convert_ldm_unet,
    convert_ldm_vae,
    convert_openclip_text,
    freeze,
    load_config,
    load_text_encoder_state,
    unet_config_from_ldm,
    vae_config_from_ldm,
)
from blindsr.ops.progress import Progress

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

T_TRAIN = 1000  # the SD / StableSR training process: 1000 steps, LDM "linear" 0.00085 -> 0.012
SPADE_HIDDEN = 128  # hard-coded `nhidden` of the official SPADE


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------
# official encoder kwargs that must have these values / that do not change the network
_ENCODER_FIXED = {"conv_resample": True, "dims": 2, "use_scale_shift_norm": False, "resblock_updown": False,
                  "use_new_attention_order": False}
_ENCODER_IGNORED = ("image_size", "use_checkpoint", "use_fp16", "num_heads_upsample")


@dataclass(frozen=True)
class StableSREncoderConfig:
    """The time-aware encoder (official ``EncoderUNetModelWT`` kwargs); defaults = the released model's."""

    in_channels: int = 4                               # SD latent channels
    model_channels: int = 256
    out_channels: int = 256                            # = the UNet's ``semb_channels`` (SPADE input)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get an AttentionBlock
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)       # as many levels as the UNet (one feature per level)
    num_heads: int = 4
    num_head_channels: int = -1                        # > 0: heads = channels // num_head_channels
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_resolutions", tuple(int(a) for a in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult or min(self.channel_mult) < 1 or self.num_res_blocks < 1:
            raise BlindSRError(f"bad StableSR encoder config: {self}")
        for ch in [self.model_channels * m for m in self.channel_mult] + [self.out_channels]:
            if ch % 32:
                raise BlindSRError(f"StableSR encoder widths must be multiples of 32 (GroupNorm32), got {ch}")

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels

    @classmethod
    def from_official(cls, params: Mapping[str, Any]) -> StableSREncoderConfig:
        """From the official ``structcond_stage_config.params``; unsupported values are one-line errors."""
        names = {f.name for f in fields(cls)}
        for key, value in params.items():
            if key in _ENCODER_FIXED and value != _ENCODER_FIXED[key]:
                raise WeightsError(f"StableSR encoder: {key}={value!r} is not supported "
                                   f"(only {_ENCODER_FIXED[key]!r})")
            if key not in names and key not in _ENCODER_FIXED and key not in _ENCODER_IGNORED:
                raise WeightsError(f"StableSR encoder: unknown official config key {key!r}")
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass(frozen=True)
class StableSRConfig:
    """Every part's config. Defaults = the release: SD 2.1(-base)'s UNet and VAE (the shipped
    ``configs/sd21``), the encoder above, CFW with 2 RRDBs per fusion layer."""

    unet: Mapping[str, Any] = field(default_factory=lambda: load_config("unet"))  # diffusers kwargs
    encoder: StableSREncoderConfig = field(default_factory=StableSREncoderConfig)
    vae: Mapping[str, Any] = field(default_factory=lambda: load_config("vae"))    # diffusers kwargs
    text_encoder: Mapping[str, Any] = field(default_factory=lambda: load_config("text_encoder"))
    num_fuse_block: int = 2                                                      # CFW ``Decoder_Mix`` kwarg
    scale_factor: float = SCALE_FACTOR

    @property
    def semb_channels(self) -> int:
        return self.encoder.out_channels

    @classmethod
    def from_official(cls, ldm: Mapping[str, Any], cfw: Mapping[str, Any] | None = None) -> StableSRConfig:
        """From the official YAML dicts: ``LatentDiffusionSRTextWT`` (``{"model": {"params": ...}}`` or its
        ``params``) and optionally ``AutoencoderKLResi`` (for ``num_fuse_block``). The text encoder keeps
        the shipped OpenCLIP ViT-H penultimate-layer config (StableSR's ``FrozenOpenCLIPEmbedder``)."""
        p = _params(ldm)
        u = _params(p["unet_config"])
        if int(u.get("transformer_depth", 1)) != 1:
            raise WeightsError("StableSR UNet: transformer_depth must be 1 (SpatialTransformerV2, §4.3)")
        enc = StableSREncoderConfig.from_official(_params(p["structcond_stage_config"]))
        if int(u["semb_channels"]) != enc.out_channels:
            raise WeightsError(f"StableSR: UNet semb_channels {u['semb_channels']} != encoder out_channels "
                               f"{enc.out_channels}")
        if len(enc.channel_mult) != len(u["channel_mult"]):
            raise WeightsError("StableSR: the encoder needs as many levels as the UNet (one feature per level)")
        kw: dict[str, Any] = {"unet": unet_config_from_ldm(u), "encoder": enc,
                              "vae": vae_config_from_ldm(_params(p["first_stage_config"])),
                              "scale_factor": float(p.get("scale_factor", SCALE_FACTOR))}
        if cfw is not None:
            kw["num_fuse_block"] = int(_params(cfw)["ddconfig"].get("num_fuse_block", 2))
        return cls(**kw)


# The conformance fixture's sizes (``shared/reference/stablesr`` README §3.1) in the official config layout, so a
# tiny StableSR (tests, UDDM's ``size: tiny``) is built without reading the fixture: only sizes are shrunk.
TINY_OFFICIAL: dict[str, Any] = {
    "scale_factor": SCALE_FACTOR,
    "unet_config": {"params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 32, "legacy": False,
        "semb_channels": 32}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    "structcond_stage_config": {"params": {
        "image_size": 96, "in_channels": 4, "model_channels": 32, "out_channels": 32, "num_res_blocks": 1,
        "attention_resolutions": [2], "dropout": 0, "channel_mult": [1, 2], "conv_resample": True, "dims": 2,
        "use_checkpoint": False, "use_fp16": False, "num_heads": 2, "num_head_channels": -1,
        "num_heads_upsample": -1, "use_scale_shift_norm": False, "resblock_updown": False,
        "use_new_attention_order": False}},
}


def tiny_config() -> StableSRConfig:
    """The fixture's tiny StableSR (UNet 32/64 channels, 2 levels; encoder 32/64; VAE x8, 32 channels); the
    text encoder keeps the shipped config but is never built for it (its context is an input, 32 wide)."""
    return StableSRConfig.from_official(TINY_OFFICIAL)


def latent_multiple(config: StableSRConfig) -> int:
    """Latent sides must be multiples of 2^(levels - 1) (the UNet's downsamplings; SFT features by width)."""
    return 2 ** (len(config.unet["block_out_channels"]) - 1)


def vae_factor(config: StableSRConfig) -> int:
    """The VAE's downsampling: 2^(levels - 1) image pixels per latent pixel (8 for SD)."""
    return 2 ** (len(config.vae["block_out_channels"]) - 1)


def _params(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``params`` of an official ``{target, params}`` node (also under ``model``), or the dict itself."""
    cfg = cfg.get("model", cfg)
    return cfg.get("params", cfg)


# ----------------------------------------------------------------------------------------------------------
# Time-aware encoder (official EncoderUNetModelWT, §4.2)
# ----------------------------------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input / parameter dtype (official ``GroupNorm32``)."""

    def __init__(self, channels: int, eps: float = 1e-5, **kw: Any):
        super().__init__(32, channels, eps=eps, **kw)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv0(Dropout(SiLU(GN(h)))); skip(x) + h (§4.2).
    ``out_layers.3`` is zero-initialised (the official ``zero_module``)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels with the *legacy* head split (§4.2): the qkv channels are laid out
    ``[head0: q, k, v | head1: q, k, v | ...]``; q and k are each scaled by d^-1/4; softmax in fp32."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise BlindSRError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        scale = d ** -0.25
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = weight.float().softmax(dim=-1).to(v.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """3x3 conv, stride 2, symmetric padding 1 (unlike the VAE's (0, 1, 0, 1) pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class _EmbSequential(nn.Sequential):
    """Blocks that may take the time embedding (official ``TimestepEmbedSequential``)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock | AttentionBlock | Downsample) else layer(x)
        return x


class StableSREncoder(nn.Module):
    """The time-aware encoder: ``forward(z_lr, t) -> {str(width): (B, out_channels, h, w)}`` (§4.2).

    Keys are the official ones (``time_embed``, ``input_blocks.i.j``, ``middle_block``, ``fea_tran``). The
    features are the output of each level's last block (just before its Downsample) and of the middle block,
    each through its ``fea_tran`` ResBlock (-> out_channels, conditioned on the same embedding).
    """

    def __init__(self, config: StableSREncoderConfig | None = None):
        super().__init__()
        cfg = self.config = config or StableSREncoderConfig()
        mc, emb_ch = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_blocks = nn.ModuleList([_EmbSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        ch, ds, feature_channels = mc, 1, []
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.heads(ch)))
                self.input_blocks.append(_EmbSequential(*layers))
            if level < len(cfg.channel_mult) - 1:
                feature_channels.append(ch)  # the feature taken just before this Downsample
                self.input_blocks.append(_EmbSequential(Downsample(ch)))
                ds *= 2
        self.middle_block = _EmbSequential(ResBlock(ch, emb_ch, ch, cfg.dropout), AttentionBlock(ch, cfg.heads(ch)),
                                           ResBlock(ch, emb_ch, ch, cfg.dropout))
        feature_channels.append(ch)
        self.fea_tran = nn.ModuleList(ResBlock(c, emb_ch, cfg.out_channels, cfg.dropout) for c in feature_channels)

    def embed(self, t: Tensor) -> Tensor:
        """emb = time_embed([cos, sin] embedding of t): the encoder's own, not the UNet's."""
        w = self.time_embed[0].weight
        # diffusers' sinusoid with flip_sin_to_cos and shift 0 is exactly §4.2's: f_j = exp(-ln(1e4) j / half)
        sinusoid = get_timestep_embedding(t, self.config.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.time_embed(sinusoid.to(w.dtype))

    def trunk(self, x: Tensor, emb: Tensor) -> list[Tensor]:
        """The features before ``fea_tran``: each level's output before its Downsample, then the middle."""
        feats, h = [], x
        for block in self.input_blocks:
            if isinstance(block[0], Downsample):
                feats.append(h)
            h = block(h, emb)
        return feats + [self.middle_block(h, emb)]

    def forward(self, x: Tensor, t: Tensor | int) -> dict[str, Tensor]:
        emb = self.embed(_batch_t(t, x))
        feats = self.trunk(x, emb)
        return {str(f.shape[-1]): tran(f, emb) for f, tran in zip(feats, self.fea_tran, strict=True)}


def _batch_t(t: Tensor | int, x: Tensor) -> Tensor:
    """Timesteps as a (B,) long tensor on x's device."""
    t = torch.as_tensor(t, device=x.device).long()
    return t.expand(x.shape[0]) if t.ndim == 0 else t


# ----------------------------------------------------------------------------------------------------------
# SFT UNet (official UNetModelDualcondV2 / ResBlockDual, §4.3)
# ----------------------------------------------------------------------------------------------------------
class SPADE(nn.Module):
    """h -> GN(h) * (1 + gamma(s)) + beta(s), gamma / beta = conv3x3(ReLU(conv3x3_shared(s))) (§4.3).
    ``param_free_norm`` is, despite its name, an affine GroupNorm32."""

    def __init__(self, channels: int, cond_channels: int, hidden: int = SPADE_HIDDEN, **kw: Any):
        super().__init__()
        self.param_free_norm = GroupNorm32(channels, **kw)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1, **kw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1, **kw)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1, **kw)

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        if s.shape[-2:] != h.shape[-2:]:
            raise BlindSRError(f"SFT: a structure feature of size {tuple(s.shape[-2:])} "
                               f"for a {tuple(h.shape[-2:])} map")
        actv = self.mlp_shared(s.to(h.dtype))
        return self.param_free_norm(h) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def _modulate(spade: SPADE, struct_cond: Mapping[str, Tensor], module: nn.Module, inputs: Any, h: Tensor) -> Tensor:
    """Forward hook on a resnet's conv2: SFT of its output with the feature picked by the WIDTH of h."""
    s = struct_cond.get(str(h.shape[-1]))
    if s is None:
        raise BlindSRError(f"SFT: no structure feature of width {h.shape[-1]} (have {', '.join(struct_cond)}); "
                           "latent sides must be multiples of 2^(levels - 1)")
    return spade(h, s)


class SFTUNet(nn.Module):
    """SD's UNet whose every ResnetBlock2D (down, mid and up blocks: 22 in SD 2.1) has a child ``spade``.

    ``forward(x, t, context, struct_cond) -> eps``: ``t`` are ORIGINAL timesteps, ``context`` (B, 77, C) the
    cross-attention context, ``struct_cond`` the encoder's ``{str(width): feature}``. ``unet`` is a plain
    ``UNet2DConditionModel`` (SD 2.1 weights load into it unchanged); the modulation exists only inside
    :meth:`forward`, as hooks on each resnet's ``conv2``.
    """

    def __init__(self, unet: UNet2DConditionModel, cond_channels: int, hidden: int = SPADE_HIDDEN):
        """Wraps ``unet`` (SD weights loaded or not), adding a fresh SPADE to each of its resnets in place."""
        super().__init__()
        self.unet = unet
        ref = unet.conv_in.weight
        for resnet in self.resnets():
            resnet.spade = SPADE(resnet.conv2.out_channels, cond_channels, hidden, device=ref.device, dtype=ref.dtype)

    @classmethod
    def build(cls, unet_config: Mapping[str, Any] | None = None, cond_channels: int = 256) -> SFTUNet:
        """Random init on the current default device (``with torch.device("meta")`` for a shell)."""
        return cls(build_unet(unet_config), cond_channels)

    def resnets(self) -> list[nn.Module]:
        from diffusers.models.resnet import ResnetBlock2D

        return [m for m in self.unet.modules() if isinstance(m, ResnetBlock2D)]

    def spade_parameters(self) -> list[nn.Parameter]:
        """The SFT layers' parameters (trained with the encoder in stage 1; the SD UNet stays frozen)."""
        return [p for r in self.resnets() for p in r.spade.parameters()]

    def forward(self, x: Tensor, t: Tensor | int, context: Tensor, struct_cond: Mapping[str, Tensor],
                spades: Sequence[nn.Module] | None = None) -> Tensor:
        """``spades``: the SFT layers to use, one per resnet in :meth:`resnets` order (default: each resnet's
        own ``spade``); a copy of the trainable part (an EMA) runs with the same frozen UNet this way."""
        resnets = self.resnets()
        layers = [r.spade for r in resnets] if spades is None else list(spades)
        if len(layers) != len(resnets):
            raise BlindSRError(f"SFT: {len(layers)} SPADE layers for {len(resnets)} resnets")
        handles = [r.conv2.register_forward_hook(partial(_modulate, s, struct_cond))
                   for r, s in zip(resnets, layers, strict=True)]
        try:
            return self.unet(x, _batch_t(t, x), encoder_hidden_states=context).sample
        finally:
            for handle in handles:
                handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------------
class EpsModel(Protocol):
    """What the sampling helpers call: one network evaluation ``eps(z_t, t, context, z_lr)`` (§4.3)."""

    def eps(self, z_t: Tensor, t: Tensor | int, context: Tensor, z_lr: Tensor) -> Tensor: ...


@dataclass
class StableSR:
    """StableSR's stage-1 parts: the SFT UNet, the time-aware encoder, the SD VAE and (optional) the text
    encoder; ``eps(z_t, t, context, z_lr)`` is one network evaluation (§4.3)."""

    unet: SFTUNet
    encoder: StableSREncoder
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None = None
    scale_factor: float = SCALE_FACTOR

    def to(self, *args: Any, **kwargs: Any) -> StableSR:
        for m in (self.unet, self.encoder, self.vae, self.text_encoder):
            if m is not None:
                m.to(*args, **kwargs)
        return self

    def eps(self, z_t: Tensor, t: Tensor | int, context: Tensor, z_lr: Tensor) -> Tensor:
        return self.unet(z_t, t, context, self.encoder(z_lr, t))


def build_stablesr(config: StableSRConfig | None = None, text_encoder: bool = False) -> StableSR:
    """Random init of every part on the current default device (``with torch.device("meta")``: a shell)."""
    cfg = config or StableSRConfig()
    return StableSR(SFTUNet.build(cfg.unet, cfg.semb_channels), StableSREncoder(cfg.encoder), build_vae(cfg.vae),
                    build_text_encoder(cfg.text_encoder) if text_encoder else None, cfg.scale_factor)


STAGE1_PREFIXES = {"unet": "model.diffusion_model.", "encoder": "structcond_stage_model.",
                   "vae": "first_stage_model.", "clip": "cond_stage_model.model."}
# what a LatentDiffusionSRTextWT state dict also holds and StableSR's inference never reads
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")
_IGNORED_PREFIXES = ("model_ema.",)


def split_stage1(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"unet", "encoder", "vae", "clip"}`` parts of a stage-1 state dict, prefixes removed (§2). The
    schedule buffers and ``model_ema.*`` are dropped; any other key is an error (strict)."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in STAGE1_PREFIXES}
    unknown = []
    for key, value in sd.items():
        name = next((n for n, p in STAGE1_PREFIXES.items() if key.startswith(p)), None)
        if name is not None:
            parts[name][key[len(STAGE1_PREFIXES[name]):]] = value
        elif key not in SCHEDULE_BUFFERS and not key.startswith(_IGNORED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise WeightsError(f"StableSR checkpoint: {len(unknown)} unexpected key(s), e.g. {unknown[:3]}")
    empty = [STAGE1_PREFIXES[n] for n in ("unet", "encoder", "vae") if not parts[n]]
    if empty:
        raise WeightsError(f"not a StableSR stage-1 checkpoint: no keys under {', '.join(empty)}")
    return parts


def load_checked(module: nn.Module, sd: Mapping[str, Tensor], what: str, *, dtype: torch.dtype | None = None,
                 optional: Callable[[str], bool] | None = None) -> list[str]:
    """Strict load with one-line ``WeightsError``s (wrong shapes, missing, unexpected keys); keys for which
    ``optional(key)`` holds may be missing (they keep their init). Floating tensors are cast to ``dtype``;
    a meta-device module gets the tensors assigned. Returns the keys left missing."""
    own = module.state_dict()
    wrong = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsError(f"{what}: {len(wrong)} tensor(s) of the wrong shape, e.g. {k} "
                           f"{tuple(sd[k].shape)} (expected {tuple(own[k].shape)})")
    missing = [k for k in own if k not in sd]
    bad, unexpected = [k for k in missing if optional is None or not optional(k)], [k for k in sd if k not in own]
    if bad or unexpected:
        raise WeightsError(f"{what}: {len(bad)} missing key(s) {bad[:3]}, {len(unexpected)} unexpected key(s) "
                           f"{unexpected[:3]}")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(dict(sd), strict=False, assign=any(p.is_meta for p in module.parameters()))
    return missing


def load_sft_unet_state(model: SFTUNet, sd: Mapping[str, Tensor], spade: bool = True,
                        dtype: torch.dtype | None = None) -> list[str]:
    """Load an LDM-layout UNet state dict (no prefix) into ``model.unet``; returns the keys left missing.

    ``spade=True``: strict (a StableSR UNet). ``spade=False``: the SPADE keys may be missing, nothing else
    (an SD 2.1 UNet: exactly the 176 SPADE keys of the full model keep their init)."""
    return load_checked(model.unet, convert_ldm_unet(sd, model.unet.config), "StableSR UNet", dtype=dtype,
                        optional=None if spade else (lambda k: ".spade." in k))


def load_stablesr(source: str | Path | Mapping[str, Tensor], config: StableSRConfig | None = None, *,
                  text_encoder: bool | None = None, dtype: torch.dtype | None = torch.float32) -> StableSR:
    """Build from ``config`` (default: the release's) and load a stage-1 checkpoint strictly, frozen.

    ``source``: a path (read through ``blindsr.io.weights``) or a state dict in the official layout.
    ``text_encoder``: load the OpenCLIP tower from ``cond_stage_model.model.*`` (None: when present)."""
    if isinstance(source, str | Path):
        from blindsr.io.weights import load_state_dict

        source = load_state_dict(source)
    cfg = config or StableSRConfig()
    parts = split_stage1(source)
    want_text = bool(parts["clip"]) if text_encoder is None else text_encoder
    if want_text and not parts["clip"]:
        raise WeightsError(f"StableSR checkpoint: no text encoder keys under {STAGE1_PREFIXES['clip']}")
    with torch.device("meta"):
        model = build_stablesr(cfg, text_encoder=want_text)
    load_sft_unet_state(model.unet, parts["unet"], spade=True, dtype=dtype)
    load_checked(model.encoder, parts["encoder"], "StableSR time-aware encoder", dtype=dtype)
    load_checked(model.vae, convert_ldm_vae(parts["vae"], cfg.vae), "StableSR first-stage VAE", dtype=dtype)
    if model.text_encoder is not None:
        load_text_encoder_state(model.text_encoder, convert_openclip_text(parts["clip"], cfg.text_encoder), dtype)
    freeze(*(m for m in (model.unet, model.encoder, model.vae, model.text_encoder) if m is not None))
    return model


# ----------------------------------------------------------------------------------------------------------
# Sampling (§4.4, §4.6)
# ----------------------------------------------------------------------------------------------------------
def base_process() -> GaussianDiffusion:
    """The 1000-step training process (LDM linear: beta = linspace(sqrt 8.5e-4, sqrt 1.2e-2)^2, float64)."""
    return GaussianDiffusion(scaled_linear_betas(T_TRAIN))


def sampling_process(steps: int = 200) -> GaussianDiffusion:
    """The respaced DDPM of ``--ddpm_steps`` (§4.4): s = space_timesteps(1000, [steps]), beta'_i =
    1 - abar[s_i] / abar[s_{i-1}] from the float32 abar table as the official script; its ``timestep_map``
    holds s, the ORIGINAL timesteps (the official ``t_replace``) that the encoder and the UNet receive, while
    x0 and the posterior use the respaced tables at the respaced index."""
    if not 1 <= steps <= T_TRAIN:
        raise BlindSRError(f"StableSR: --steps must be in [1, {T_TRAIN}], got {steps}")
    return respaced(base_process(), space_timesteps(T_TRAIN, steps), table_dtype=torch.float32)


def start_latent(z_lr: Tensor, noise: Tensor, base: GaussianDiffusion | None = None) -> Tensor:
    """x_T = sqrt(abar_999) z_lr + sqrt(1 - abar_999) noise with the ORIGINAL tables (§4.4): sampling starts
    from the noised LR latent, not from pure noise."""
    base = base or base_process()
    t = torch.full((z_lr.shape[0],), base.num_timesteps - 1, dtype=torch.long, device=z_lr.device)
    return base.q_sample(z_lr, t, noise)


def denoiser(model: EpsModel, z_lr: Tensor, context: Tensor) -> ModelFn:
    """The shared denoiser contract for the whole latent: features of ``z_lr`` at t, then the SFT UNet's eps."""
    def fn(x: Tensor, t: Tensor) -> ModelOutput:
        return ModelOutput(model.eps(x, t, context, z_lr))
    return fn


def canvas_denoiser(model: EpsModel, z_lr: Tensor, context: Tensor, tile: int = 64, overlap: int = 32) -> ModelFn:
    """Aggregation sampling (``p_mean_variance_canvas``, §4.6): ``tile`` x ``tile`` latent windows every
    ``tile - overlap`` (the last one flush with the border), x-major; each tile gets its own encoder
    features (of the matching ``z_lr`` crop) and eps; the eps are blended with the official float64 Gaussian
    weights. Official defaults: tile = input_size / 8 = 64, overlap 32. A latent that fits one tile is one call."""
    def fn(x: Tensor, t: Tensor, box) -> ModelOutput:
        return ModelOutput(model.eps(x, t, context, z_lr[..., box.slices[0], box.slices[1]]))
    return tiled(fn, tile, overlap, align=1, pass_box=True, window="stablesr", order="xy")


@dataclass
class MeanVariance:
    """One step's prediction (official ``p_mean_variance``): eps, x0, posterior mean / variance / log var."""

    eps: Tensor
    x0: Tensor
    mean: Tensor
    variance: Tensor
    log_variance: Tensor


def p_mean_variance(process: GaussianDiffusion, model_fn: ModelFn, x_t: Tensor, index: int | Tensor) -> MeanVariance:
    """The network at ``process.timestep_map[index]`` (original t), x0 and q(x_{t-1} | x_t, x0) at ``index``
    (respaced), ``clip_denoised=False`` (§4.4)."""
    idx = _batch_t(index, x_t)
    out = model_fn(x_t, process.original_t(idx))
    eps, x0 = split(out.pred, out.kind, x_t, process.abar(idx, x_t))
    mean, var, logvar = process.q_posterior(x0, x_t, idx)
    return MeanVariance(eps, x0, mean, var, logvar)


def sample_latent(model: EpsModel, z_lr: Tensor, context: Tensor, *, steps: int = 200, tile: int | None = 64,
                  overlap: int = 32, generator: Generators = None, progress: Progress = False) -> Tensor:
    """StableSR's sampler on a scaled LR latent: x_T from ``z_lr`` (:func:`start_latent`), then ``steps``
    respaced DDPM steps (fixed small variance, no clipping, no noise at the last step) in the shared loop,
    with canvas tiles of ``tile`` latent units (None: the whole latent at once)."""
    x_T = start_latent(z_lr, randn(z_lr.shape, generator, z_lr.device, z_lr.dtype))
    fn = denoiser(model, z_lr, context) if tile is None else canvas_denoiser(model, z_lr, context, tile, overlap)
    return sample(fn, x_T, DDPMStepper(sampling_process(steps), "fixed_small"), generator, progress=progress)
