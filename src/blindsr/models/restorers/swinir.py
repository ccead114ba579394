"""SwinIR (Liang et al., ICCV-W 2021) in DiffBIR's stage-1 form.

DiffBIR's general cleaner is a SwinIR that works at input resolution: ``conv_first`` pixel-unshuffles the
image by 8 before its first conv, the residual Swin transformer groups (RSTB) run on that 1/8 grid, and a
"nearest+conv" upsampler (three nearest x2 + conv steps) brings it back. State-dict keys, their order and
the registered buffers (``relative_position_index`` in every attention, ``attn_mask`` in every shifted
block, both persistent) are identical to the official checkpoints (see tests/test_restorers.py).

The window helpers (partition, relative position index, shifted-window mask) are shared with SCUNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean that SwinIR subtracts (for 3-channel inputs)


@dataclass
class SwinIRConfig:
    img_size: int = 64                       # grid size (after unshuffle) the stored shift masks are built for
    in_chans: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6,) * 8       # blocks per RSTB
    num_heads: tuple[int, ...] = (6,) * 8    # heads per RSTB (head dim 30)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upscale: int = 8                         # "sf": product of the nearest x2 steps of the upsampler
    unshuffle: int = 8                       # pixel-unshuffle factor in conv_first (1: none)
    num_feat: int = 64                       # channels of the upsampler
    resi_connection: str = "1conv"           # "1conv" | "3conv" (conv at the end of each RSTB)
    img_range: float = 1.0
    pad_mode: str = "constant"               # DiffBIR's pipeline zero-pads to a multiple of 64; or "reflect"

    @classmethod
    def diffbir(cls) -> SwinIRConfig:
        """configs/inference/swinir.yaml (general_swinir_v1, face_swinir_v1, realesrgan_s4_swinir_100k)."""
        return cls()

    @classmethod
    def tiny(cls) -> SwinIRConfig:
        """A few-thousand-parameter model with the same structure, for tests."""
        return cls(img_size=8, embed_dim=12, depths=(2, 2), num_heads=(2, 3), window_size=4, upscale=2,
                   unshuffle=2, num_feat=8)

    @property
    def scale(self) -> float:
        """Output size / input size (1 for DiffBIR's cleaner)."""
        return self.upscale / self.unshuffle

    @property
    def pad_multiple(self) -> int:
        """Inputs are padded to this multiple so the 1/unshuffle grid tiles into whole windows."""
        return self.window_size * self.unshuffle


# ----------------------------------------------------------------------------------------------------------
# Window helpers (also used by SCUNet)

def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws*ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, ws*ws, C) -> (B, H, W, C); inverse of ``window_partition``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws², ws²) int64 index into a ((2ws-1)², heads) bias table: (dy + ws-1) * (2ws-1) + (dx + ws-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), query - key
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, N, N) bool, True where a query and a key of a cyclically shifted window come from different
    image regions (Swin, Liu et al. 2021, Fig. 4): such pairs must not attend to each other."""
    region = torch.zeros(h, w, device=device)
    bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(bounds):
        for j, wsl in enumerate(bounds):
            region[hs, wsl] = 3 * i + j
    ids = window_partition(region.view(1, h, w, 1), ws).squeeze(-1)  # (nW, N)
    return ids[:, None, :] != ids[:, :, None]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def attention(q, k, v, bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + B [+ mask]) v over windows; q, k, v: (B*nW, heads, N, d).

    ``bias`` is (heads, N, N); ``mask`` is additive (nW, N, N). Softmax in fp32.
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias.to(q.dtype)
    if mask is not None:
        nw, n = mask.shape[0], attn.shape[-1]
        attn = attn.view(-1, nw, attn.shape[1], n, n) + mask.to(attn.dtype)[None, :, None]
        attn = attn.view(-1, attn.shape[2], n, n)
    return attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v


# ----------------------------------------------------------------------------------------------------------
# Swin blocks

class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias (Swin eq. 4)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias(self) -> torch.Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window_size ** 2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.bias(), mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """x + W-MSA(LN x), then x + MLP(LN x); odd blocks shift the windows by ws/2 (SW-MSA)."""

    def __init__(self, dim: int, input_resolution: int, num_heads: int, window_size: int, shift: bool,
                 mlp_ratio: float):
        super().__init__()
        self.input_resolution = (input_resolution, input_resolution)
        if input_resolution <= window_size:  # one window covers the grid: no shift (as the official code)
            window_size, shift = input_resolution, False
        self.window_size, self.shift_size = window_size, (window_size // 2 if shift else 0)
        self.norm1 = LayerNorm32(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = LayerNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # The official code stores the mask for img_size in the state dict (persistent buffer).
        mask = self.additive_mask(self.input_resolution) if self.shift_size else None
        self.register_buffer("attn_mask", mask)

    def additive_mask(self, size: tuple[int, int], device=None) -> torch.Tensor:
        """SwinIR's (nW, N, N) mask: -100 between regions, 0 inside one."""
        m = shifted_window_mask(*size, self.window_size, self.shift_size, device=device)
        return torch.zeros(m.shape, device=device).masked_fill(m, -100.0)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        mask = None
        if s:
            mask = self.attn_mask if size == self.input_resolution else self.additive_mask(size, x.device)
        y = window_reverse(self.attn(window_partition(y, ws), mask=mask), ws, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, input_resolution: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size, i % 2 == 1, mlp_ratio)
            for i in range(depth))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, size)
        return x


def tokens_to_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PatchUnEmbed (patch size 1): (B, HW, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """PatchEmbed (patch size 1) without norm: (B, C, H, W) -> (B, HW, C)."""
    return x.flatten(2).transpose(1, 2)


class RSTB(nn.Module):
    """Residual Swin Transformer Block: x + conv(Swin blocks(x)) (SwinIR eq. 5)."""

    def __init__(self, dim: int, input_resolution: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, resi_connection: str):
        super().__init__()
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size, mlp_ratio)
        if resi_connection == "1conv":
            self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        elif resi_connection == "3conv":  # fewer parameters; keys conv.0, conv.2, conv.4
            lrelu = nn.LeakyReLU(0.2, inplace=True)
            self.conv = nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), lrelu, nn.Conv2d(dim // 4, dim // 4, 1),
                                      lrelu, nn.Conv2d(dim // 4, dim, 3, 1, 1))
        else:
            raise ValueError(f"resi_connection must be '1conv' or '3conv', not {resi_connection!r}")

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return image_to_tokens(self.conv(tokens_to_image(self.residual_group(x, size), size))) + x


class PatchEmbed(nn.Module):
    """Image -> tokens, then LayerNorm (patch_norm=True in SwinIR); key ``patch_embed.norm``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm32(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(image_to_tokens(x))


# ----------------------------------------------------------------------------------------------------------

class SwinIR(nn.Module):
    """SwinIR with the "nearest+conv" upsampler and optional pixel-unshuffle input (DiffBIR's cleaner).

    ``forward`` takes (B, C, H, W) in [0, 1] of any size: it pads to ``config.pad_multiple`` (zeros by
    default, as DiffBIR's pipeline does), runs, and crops back to ``H * scale, W * scale``.
    """

    def __init__(self, config: SwinIRConfig | None = None):
        super().__init__()
        cfg = self.config = config or SwinIRConfig()
        n_up = int(math.log2(cfg.upscale))
        if 2 ** n_up != cfg.upscale or n_up < 1:
            raise ValueError(f"SwinIR upscale must be a power of two >= 2, not {cfg.upscale}")
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError("SwinIR depths and num_heads must have the same length")
        mean = RGB_MEAN if cfg.in_chans == 3 else (0.0,) * cfg.in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        d, grid = cfg.embed_dim, cfg.img_size
        conv_in = nn.Conv2d(cfg.in_chans * cfg.unshuffle ** 2, d, 3, 1, 1)
        # keys conv_first.1.* with unshuffle (index 0 is the parameter-free PixelUnshuffle), else conv_first.*
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(cfg.unshuffle), conv_in) if cfg.unshuffle > 1 else conv_in
        self.patch_embed = PatchEmbed(d)
        self.layers = nn.ModuleList(
            RSTB(d, grid, depth, heads, cfg.window_size, cfg.mlp_ratio, cfg.resi_connection)
            for depth, heads in zip(cfg.depths, cfg.num_heads, strict=True))
        self.norm = LayerNorm32(d)
        self.conv_after_body = nn.Conv2d(d, d, 3, 1, 1)
        # SwinIR's default LeakyReLU slope (0.01) here, 0.2 in the upsampler: as the official code.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(d, cfg.num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        for i in range(n_up):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1))
        self.n_up = n_up
        self.conv_hr = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(cfg.num_feat, cfg.in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.apply(init_swin_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t, size)
        return tokens_to_image(self.norm(t), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h, w = x.shape[-2:]
        m = cfg.pad_multiple
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode=cfg.pad_mode)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * cfg.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for i in range(self.n_up):
            up = getattr(self, f"conv_up{i + 1}")
            x = self.lrelu(up(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / cfg.img_range + mean
        return x[..., : round(h * cfg.scale), : round(w * cfg.scale)]


def init_swin_weights(m: nn.Module) -> None:
    """SwinIR's init: trunc-normal(0.02) linears with zero bias, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def config_from_state_dict(sd: dict[str, torch.Tensor], in_chans: int = 3) -> SwinIRConfig:
    """Read the sizes of a "nearest+conv" SwinIR back from its state dict (DiffBIR's and Real-world x4 ones)."""
    try:
        first = sd["conv_first.1.weight"] if "conv_first.1.weight" in sd else sd["conv_first.weight"]
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        depths = tuple(1 + max(int(k.split(".")[4]) for k in sd if k.startswith(f"layers.{i}.residual_group."))
                       for i in range(n_layers))
        tables = [sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"] for i in range(n_layers)]
        n_up = sum(1 for k in sd if k.startswith("conv_up") and k.endswith(".weight"))
        hidden = sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0]
        num_feat = sd["conv_hr.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a SwinIR (nearest+conv) state dict (missing {e})") from None
    embed_dim = first.shape[0]
    window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
    unshuffle = round((first.shape[1] / in_chans) ** 0.5)
    masks = [v for k, v in sd.items() if k.endswith("attn_mask")]
    img_size = round(masks[0].shape[0] ** 0.5) * window if masks else 64
    resi = "3conv" if "layers.0.conv.0.weight" in sd else "1conv"
    return SwinIRConfig(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
                        num_heads=tuple(t.shape[1] for t in tables), window_size=window,
                        mlp_ratio=hidden / embed_dim, upscale=2 ** n_up, unshuffle=unshuffle, num_feat=num_feat,
                        resi_connection=resi)
