"""StableSR's controllable feature wrapping (CFW, official ``AutoencoderKLResi`` / ``Decoder_Mix``, README §4.7).

The SD VAE (diffusers ``AutoencoderKL``, unchanged) plus one fusion layer per inner decoder level: after the
blocks of up-level i and before its upsample (i = L-2 down to 1; L = 4 levels in SD),

    h = h + w * F_i(cat[enc_fea_i, h]),   F_i = ResBlock(2C -> C) -> n x RRDB(C, growth 32) -> ResBlock(C -> C),

where enc_fea_i is the encoder's feature after the blocks of its level i (before the downsample) for the
same input image (the bicubically upsampled LR), and w = ``fusion_w`` (the script's ``--dec_w``, 0.5 by
default; 0 = the plain SD decoder, though F is still evaluated). The RRDB is ESRGAN's, shared with
``blindsr.models.restorers.rrdbnet``.

The taps and the fusion are hooks registered for one :meth:`CFWAutoencoder.encode` / ``decode`` call (on the
last resnet of an encoder level, before an up-level's upsampler), so diffusers' own forward passes run.
Official keys: ``encoder.*``, ``decoder.*`` (SD layout, through ``blindsr.models.sd.vae_block_rows``),
``decoder.fusion_layer_{i}.*`` -> ``fusion.{i}.*`` (``rdbK`` -> ``RDBK``), ``quant_conv``, ``post_quant_conv``;
``loss.*`` of a training checkpoint is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.restorers.rrdbnet import RRDB
from blindsr.models.sd import build_vae, convert_ldm_vae, freeze, load_config
from blindsr.models.sd.stablesr import GroupNorm32, load_checked

if TYPE_CHECKING:
    from collections.abc import Iterator

    from diffusers import AutoencoderKL

RRDB_GROWTH = 32
DEC_W = 0.5  # the inference default (``--dec_w``); the training YAML has fusion_w 1.0


class FuseResBlock(nn.Module):
    """GN(32, eps 1e-6) -> swish -> conv3x3, twice; plus a 1x1 ``conv_out`` skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm32(in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x))))))
        return (x if self.conv_out is None else self.conv_out(x)) + h


class FusionLayer(nn.Module):
    """One CFW layer (official ``Fuse_sft_block_RRDB``): dec + w * enc_3(enc_2(enc_1(cat[enc, dec])))."""

    def __init__(self, channels: int, num_blocks: int = 2, growth: int = RRDB_GROWTH):
        super().__init__()
        self.encode_enc_1 = FuseResBlock(2 * channels, channels)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, growth) for _ in range(num_blocks)))
        self.encode_enc_3 = FuseResBlock(channels, channels)

    def forward(self, enc: Tensor, dec: Tensor, w: float) -> Tensor:
        return dec + w * self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], 1))))


class CFWAutoencoder(nn.Module):
    """The SD VAE with CFW fusion layers: ``encode(x) -> (moments, enc_fea)``, ``decode(z, enc_fea, w)``.

    ``x`` is in [-1, 1]; ``moments`` = quant_conv(Encoder(x)) (mean = first half of the channels, log var =
    second half); ``z`` is the *unscaled* latent (``z_scaled / scale_factor``)."""

    def __init__(self, vae: AutoencoderKL, num_fuse_block: int = 2, fusion_w: float = DEC_W):
        super().__init__()
        self.vae = vae
        chans = list(vae.config.block_out_channels)
        if len(chans) < 3:
            raise BlindSRError("CFW needs a VAE with at least 3 levels (fusion at the inner decoder levels)")
        self.levels = list(range(1, len(chans) - 1))  # the official 4-level VAE: levels 1 and 2
        self.fusion = nn.ModuleDict({str(i): FusionLayer(chans[i], num_fuse_block) for i in self.levels})
        self.fusion_w = float(fusion_w)

    @classmethod
    def build(cls, vae_config: Mapping[str, Any] | None = None, num_fuse_block: int = 2,
              fusion_w: float = DEC_W) -> CFWAutoencoder:
        """Random init on the current default device (``with torch.device("meta")`` for a shell)."""
        return cls(build_vae(vae_config), num_fuse_block, fusion_w)

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(posterior moments, enc_fea): enc_fea[k] = the encoder after the blocks of level ``levels[k]``."""
        enc, taps = self.vae.encoder, {}

        def tap(level: int, module: nn.Module, args: Any, out: Tensor) -> None:
            taps[level] = out

        with _hooks([(enc.down_blocks[i].resnets[-1], "forward", _bind(tap, i)) for i in self.levels]):
            moments = self.vae.quant_conv(enc(x))
        return moments, [taps[i] for i in self.levels]

    def decode(self, z: Tensor, enc_fea: Sequence[Tensor], fusion_w: float | None = None) -> Tensor:
        """The image (about [-1, 1]) of an unscaled latent, fused with ``enc_fea`` at weight ``fusion_w``
        (None: ``self.fusion_w``)."""
        if len(enc_fea) != len(self.levels):
            raise BlindSRError(f"CFW decode needs {len(self.levels)} encoder features, got {len(enc_fea)}")
        w = self.fusion_w if fusion_w is None else float(fusion_w)
        dec, n = self.vae.decoder, len(self.vae.config.block_out_channels)

        def fuse(level: int, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return (self.fusion[str(level)](enc_fea[level - 1], args[0], w), *args[1:])

        # up-level i is diffusers' up_blocks[n - 1 - i]; its upsampler runs after all its blocks
        hooks = [(dec.up_blocks[n - 1 - i].upsamplers[0], "pre", _bind(fuse, i)) for i in self.levels]
        with _hooks(hooks):
            return dec(self.vae.post_quant_conv(z))


def _bind(fn: Any, level: int) -> Any:
    return lambda *args: fn(level, *args)


@contextmanager
def _hooks(specs: list[tuple[nn.Module, str, Any]]) -> Iterator[None]:
    """Register forward (``forward``) / forward-pre (``pre``) hooks for the duration of one call."""
    handles = [m.register_forward_pre_hook(h) if kind == "pre" else m.register_forward_hook(h)
               for m, kind, h in specs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
_FUSION = re.compile(r"decoder\.fusion_layer_(\d+)\.(.+)")


def convert_official_cfw(sd: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official ``AutoencoderKLResi`` keys -> ours (``vae.*`` in diffusers' layout, ``fusion.{i}.*``)."""
    fusion, rest = {}, {}
    for key, value in sd.items():
        if key.startswith("loss."):
            continue  # the training loss (LPIPS, discriminator)
        m = _FUSION.fullmatch(key)
        if m:
            fusion[f"fusion.{m[1]}." + re.sub(r"\.rdb(\d)\.", r".RDB\1.", m[2])] = value
        else:
            rest[key] = value
    out = {"vae." + k: v for k, v in convert_ldm_vae(rest, vae_config).items()}
    return out | fusion


def count_fuse_blocks(sd: Mapping[str, Tensor]) -> int:
    """``num_fuse_block`` read from the RRDB indices of an official CFW state dict."""
    idx = {int(m[1]) for k in sd if (m := re.search(r"fusion_layer_\d+\.encode_enc_2\.(\d+)\.", k))}
    if not idx:
        raise WeightsError("not a StableSR CFW checkpoint: no decoder.fusion_layer_* keys")
    return max(idx) + 1


def load_cfw_state(model: CFWAutoencoder, sd: Mapping[str, Tensor], fusion: bool = True,
                   dtype: torch.dtype | None = None) -> list[str]:
    """Load an official CFW state dict (``fusion=True``, strict) or a plain LDM SD VAE (``fusion=False``:
    only the fusion keys may be missing) into ``model``; returns the keys left missing."""
    return load_checked(model, convert_official_cfw(sd, model.vae.config), "StableSR CFW", dtype=dtype,
                        optional=None if fusion else (lambda k: k.startswith("fusion.")))


def load_cfw(source: str | Path | Mapping[str, Tensor], vae_config: Mapping[str, Any] | None = None, *,
             num_fuse_block: int | None = None, fusion_w: float = DEC_W,
             dtype: torch.dtype | None = torch.float32) -> CFWAutoencoder:
    """Build and load (strict, frozen) an official CFW checkpoint (``vqgan_cfw_00011.ckpt`` style).
    ``num_fuse_block`` None: read from the keys; ``vae_config`` None: SD 2.1's."""
    if isinstance(source, str | Path):
        from blindsr.io.weights import load_state_dict

        source = load_state_dict(source)
    n = count_fuse_blocks(source) if num_fuse_block is None else num_fuse_block
    with torch.device("meta"):
        model = CFWAutoencoder.build(dict(vae_config or load_config("vae")), n, fusion_w)
    load_cfw_state(model, source, fusion=True, dtype=dtype)
    freeze(model)
    return model
