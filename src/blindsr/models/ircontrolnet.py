"""DiffBIR's IRControlNet (paper v2 §3.2) built from diffusers blocks, and the controlled SD UNet.

IRControlNet is a trainable copy of the SD UNet encoder + middle block. Unlike lllyasviel's ControlNet it has no
condition-embedding network: the condition is already a latent, ``c_img = E(I_stage1) * 0.18215`` (VAE posterior
mode), concatenated to ``z_t`` at the first conv (so ``conv_in`` takes 4 + 4 channels). After ``conv_in`` and after
every encoder layer a zero-initialised 1x1 conv gives one control (12 for SD 2.1), and one more after the middle
block (13 in all). The controls, times the control scales, are added to the UNet's skip connections and to its
middle-block output; diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` add them at
exactly those points (the official ``ControlledUnetModel`` adds ``control[i]`` to ``hs[i]`` when it is popped into
the decoder, which is the same sum).

Official ControlNet state dicts (``v1_general.pth``, ``v1_face.pth``, ``v2.pth``, ``DiffBIR_v2.1.pt``; 324 keys,
LDM layout: ``input_blocks.*``, ``zero_convs.*``, ``middle_block(_out)``) are converted by
``convert_official_controlnet``; ``controlnet_to_official`` writes that layout back (training export).

The pixel backend (issue 14) builds the same module on the pixel prior's UNet (``hint_channels=3``: the condition
is the stage-1 image itself, ``2 I - 1``) and stores it in our layout with its config in the safetensors metadata
(``save_controlnet`` / ``load_controlnet``). ``condition_xt=False`` is the paper's Table 1 "Variant 2": the control
branch sees the condition alone, not ``cat(z_t, c)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blindsr.errors import WeightsError
from blindsr.models.sd import convert_by_rows, load_config, load_converted, unet_block_rows

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


@dataclass
class IRControlNetConfig:
    """Architecture of the ControlNet trunk (same field names as diffusers' UNet config)."""

    in_channels: int = 4  # z_t channels
    hint_channels: int = 4  # c_img channels, concatenated after z_t
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    layers_per_block: int = 2
    attention_head_dim: list[int] = field(default_factory=lambda: [5, 10, 20, 20])  # heads per level (diffusers name)
    cross_attention_dim: int = 1024
    use_linear_projection: bool = True
    transformer_layers_per_block: int = 1
    flip_sin_to_cos: bool = True  # [cos, sin] timestep embedding
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    condition_xt: bool = True  # conv_in sees cat(z_t, c) (paper Eq. 4); False: c alone (Table 1, Variant 2)

    @classmethod
    def from_unet_config(cls, cfg: Mapping[str, Any] | None = None, hint_channels: int = 4,
                         condition_xt: bool = True) -> IRControlNetConfig:
        """The ControlNet matching a UNet config (default: the shipped SD 2.1 UNet)."""
        cfg = dict(cfg or load_config("unet"))
        names = set(cls.__dataclass_fields__) - {"hint_channels", "condition_xt"}
        heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers: heads win if given
        if isinstance(heads, int):
            heads = [heads] * len(cfg["block_out_channels"])
        kw = {k: cfg[k] for k in names if k in cfg}
        return cls(**{**kw, "attention_head_dim": list(heads), "hint_channels": hint_channels,
                      "condition_xt": condition_xt})

    def num_controls(self) -> int:
        """1 (conv_in) + layers per level + downsamplers + 1 (middle block): 13 for SD 2.1."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1) + 1


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class IRControlNet(nn.Module):
    """UNet encoder + middle block on ``cat(z_t, c_img)`` with zero-conv outputs; see the module docstring."""

    def __init__(self, config: IRControlNetConfig | None = None):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block

        self.config = c = config or IRControlNetConfig()
        ch = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels * c.condition_xt + c.hint_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        temb = ch[0] * 4
        self.down_blocks = nn.ModuleList()
        zero = [_zero_conv(ch[0])]
        for i, kind in enumerate(c.down_block_types):
            last = i == len(ch) - 1
            self.down_blocks.append(get_down_block(
                kind, num_layers=c.layers_per_block, in_channels=ch[max(i - 1, 0)], out_channels=ch[i],
                temb_channels=temb, add_downsample=not last, resnet_eps=c.norm_eps, resnet_act_fn="silu",
                transformer_layers_per_block=c.transformer_layers_per_block,
                num_attention_heads=c.attention_head_dim[i], resnet_groups=c.norm_num_groups,
                cross_attention_dim=c.cross_attention_dim, downsample_padding=1,
                use_linear_projection=c.use_linear_projection, attention_head_dim=c.attention_head_dim[i]))
            zero += [_zero_conv(ch[i]) for _ in range(c.layers_per_block + (not last))]
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=ch[-1], temb_channels=temb, resnet_eps=c.norm_eps, resnet_act_fn="silu",
            resnet_groups=c.norm_num_groups, num_attention_heads=c.attention_head_dim[-1],
            cross_attention_dim=c.cross_attention_dim, use_linear_projection=c.use_linear_projection,
            transformer_layers_per_block=c.transformer_layers_per_block)
        self.controlnet_down_blocks = nn.ModuleList(zero)
        self.controlnet_mid_block = _zero_conv(ch[-1])

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, hint_channels: int = 4, condition_xt: bool = True) -> IRControlNet:
        """Initialise from a UNet (official ``load_controlnet_from_unet``): shared tensors copied, the extra
        ``hint_channels`` input channels of ``conv_in`` and all zero convs set to zero. Without ``z_t`` in the
        input (Variant 2) the condition lives in the UNet's input space, so ``conv_in`` is the UNet's own."""
        config = IRControlNetConfig.from_unet_config(unet.config, hint_channels, condition_xt)
        net = cls(config).to(unet.dtype)
        src, own = unet.state_dict(), net.state_dict()
        with torch.no_grad():
            for key, value in own.items():
                if key == "conv_in.weight" and condition_xt:
                    value.zero_()[:, : src[key].shape[1]].copy_(src[key])
                elif key == "conv_in.weight" and value.shape != src[key].shape:
                    continue  # Variant 2 with a condition of another width: the default init
                elif key in src and not key.startswith("controlnet_"):
                    value.copy_(src[key])
        return net.to(unet.device)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c_img: torch.Tensor, c_txt: torch.Tensor,
                ) -> list[torch.Tensor]:
        """The controls (``num_controls()`` tensors, last = middle block) for ``z_t`` at original timestep(s) ``t``."""
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(z_t.dtype))
        c_img = c_img.to(z_t.dtype)
        h = self.conv_in(torch.cat([z_t, c_img], dim=1) if self.config.condition_xt else c_img)
        feats = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb, encoder_hidden_states=c_txt)
            else:
                h, res = block(h, temb)
            feats.extend(res)
        h = self.mid_block(h, temb, encoder_hidden_states=c_txt)
        controls = [conv(f) for conv, f in zip(self.controlnet_down_blocks, feats, strict=True)]
        return controls + [self.controlnet_mid_block(h)]


def _scales(scale: float | Sequence[float], n: int) -> list[float]:
    """Control scales: one number for all (CLI ``--strength``) or one per control (official ``control_scales``)."""
    if isinstance(scale, int | float):
        return [float(scale)] * n
    if len(scale) < n:
        raise WeightsError(f"need {n} control scales, got {len(scale)}")
    return [float(s) for s in scale[:n]]


def controlled_unet(unet: UNet2DConditionModel, z_t: torch.Tensor, t: torch.Tensor, c_txt: torch.Tensor,
                    controls: Sequence[torch.Tensor], scale: float | Sequence[float] = 1.0) -> torch.Tensor:
    """The UNet output (eps or v) with ``controls[:-1]`` added to the skips and ``controls[-1]`` to the middle."""
    controls = [c * s for c, s in zip(controls, _scales(scale, len(controls)), strict=True)]
    t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])
    return unet(z_t, t, encoder_hidden_states=c_txt, down_block_additional_residuals=tuple(controls[:-1]),
                mid_block_additional_residual=controls[-1]).sample


class ControlledUNet(nn.Module):
    """Official ``ControlLDM.forward``: ``controlnet(z_t, c_img, t, c_txt)`` then the UNet with those controls."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: IRControlNet):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, c_txt: torch.Tensor, c_img: torch.Tensor,
                control_scale: float | Sequence[float] = 1.0) -> torch.Tensor:
        controls = self.controlnet(z_t, t, c_img, c_txt)
        return controlled_unet(self.unet, z_t, t, c_txt, controls, control_scale)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------
def controlnet_block_rows(config: IRControlNetConfig) -> list[tuple[str, str, str]]:
    """Official (LDM) ControlNet prefixes -> ours: the UNet encoder rows plus the zero convs."""
    rows = unet_block_rows(asdict(config), decoder=False)
    rows += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", "plain") for i in range(config.num_controls() - 1)]
    return rows + [("middle_block_out.0.", "controlnet_mid_block.", "plain")]


def convert_official_controlnet(sd: Mapping[str, torch.Tensor], config: IRControlNetConfig) -> dict[str, torch.Tensor]:
    """Official ControlNet keys (bare, as in ``v2.pth``; a ``controlnet.`` prefix is stripped) -> ours (strict)."""
    if all(k.startswith("controlnet.") for k in sd):
        sd = {k[len("controlnet."):]: v for k, v in sd.items()}
    return convert_by_rows(sd, controlnet_block_rows(config), "IRControlNet")


def controlnet_to_official(sd: Mapping[str, torch.Tensor], config: IRControlNetConfig) -> dict[str, torch.Tensor]:
    """Ours -> official ControlNet keys (bare, as ``train_stage2.py`` saves them): the inverse of
    :func:`convert_official_controlnet` (strict: an unknown key is a ``WeightsError``)."""
    return convert_by_rows(sd, controlnet_block_rows(config), "IRControlNet (keys with no official name)",
                           reverse=True)


def load_official_controlnet(source: str | Path | Mapping[str, torch.Tensor], config: IRControlNetConfig | None = None,
                             dtype: torch.dtype | None = torch.float32) -> IRControlNet:
    """Build an IRControlNet (default: SD 2.1 size) and strictly load an official ControlNet checkpoint
    (``v1_general.pth``, ``v1_face.pth``, ``v2.pth``, ``DiffBIR_v2.1.pt``), cast to ``dtype``."""
    if not isinstance(source, Mapping):
        from blindsr.io.weights import load_state_dict

        source = load_state_dict(source)
    config = config or IRControlNetConfig.from_unet_config()
    with torch.device("meta"):
        net = IRControlNet(config)
    return load_converted(net, convert_official_controlnet(source, config), "IRControlNet", dtype).eval()


def save_controlnet(net: IRControlNet, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Our layout (fp32) with the config as ``config`` metadata: the pixel backend's file format."""
    import json

    from blindsr.io.weights import save_safetensors

    sd = {k: v.detach().float() for k, v in net.state_dict().items()}
    return save_safetensors(sd, path, metadata={**(metadata or {}), "config": json.dumps(asdict(net.config))})


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32) -> IRControlNet:
    """An IRControlNet saved by :func:`save_controlnet` (or the pixel stage-2 training), loaded strictly."""
    import json

    from blindsr.config import from_dict
    from blindsr.io.weights import check_finite, load_into, load_safetensors_metadata, load_state_dict

    path = Path(path)
    meta = load_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if "config" not in meta:
        raise WeightsError(f"{path}: no IRControlNet config in its metadata (an official ControlNet needs --backend sd)")
    config = from_dict(IRControlNetConfig, json.loads(meta["config"]), "IRControlNet")
    sd = load_state_dict(path)
    check_finite(sd, path)
    net = IRControlNet(config)
    load_into(net, sd, strict=True)
    return net.to(dtype).eval().requires_grad_(False)
