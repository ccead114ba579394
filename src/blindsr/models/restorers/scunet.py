"""SCUNet (Zhang et al., "Practical Blind Denoising via Swin-Conv-UNet", 2022): DiffBIR v2's BID cleaner.

A 4-level UNet whose blocks are Swin-Conv blocks: a 1x1 conv splits the channels into a residual conv
half and a (shifted-)window transformer half, and a second 1x1 conv fuses them back (paper Fig. 2).
State-dict keys are identical to KAIR's ``scunet_color_real_psnr.pth`` (540 keys for the full config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.models.restorers.swinir import (
    LayerNorm32,
    init_swin_weights,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


@dataclass
class SCUNetConfig:
    in_nc: int = 3
    config: tuple[int, ...] = (4,) * 7   # blocks in down1, down2, down3, body, up3, up2, up1
    dim: int = 64                         # channels at full resolution (doubling per level)
    head_dim: int = 32
    window_size: int = 8
    input_resolution: int = 256           # blocks whose level is <= one window use plain (unshifted) W-MSA

    @classmethod
    def diffbir(cls) -> SCUNetConfig:
        """configs/inference/scunet.yaml (SCUNet-PSNR, scunet_color_real_psnr.pth)."""
        return cls()

    @classmethod
    def tiny(cls) -> SCUNetConfig:
        return cls(config=(2,) * 7, dim=16, head_dim=4, window_size=4, input_resolution=64)

    @property
    def pad_multiple(self) -> int:
        """Three 2x downsamplings, then whole windows: 64 for the official model."""
        return 8 * self.window_size


class WMSA(nn.Module):
    """(Shifted) window multi-head self-attention; keys ``embedding_layer`` (qkv), ``linear``,
    ``relative_position_params`` (heads, 2ws-1, 2ws-1). Masked pairs get -inf, as the official code."""

    def __init__(self, dim: int, head_dim: int, window_size: int, shifted: bool):
        super().__init__()
        self.head_dim, self.window_size, self.shifted = head_dim, window_size, shifted
        self.n_heads = dim // head_dim
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        self.relative_position_params = nn.Parameter(torch.zeros(self.n_heads, 2 * window_size - 1, 2 * window_size - 1))
        self.linear = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)

    def bias(self) -> torch.Tensor:
        idx = relative_position_index(self.window_size).to(self.relative_position_params.device)
        return self.relative_position_params.flatten(1)[:, idx]  # (heads, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        ws, s = self.window_size, self.window_size // 2
        if self.shifted:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        win = window_partition(x, ws)  # (B*nW, N, C)
        n = win.shape[1]
        q, k, v = self.embedding_layer(win).view(-1, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + self.bias().to(q.dtype)
        if self.shifted:
            mask = shifted_window_mask(h, w, ws, s, device=x.device)  # (nW, N, N)
            attn = attn.view(b, -1, self.n_heads, n, n).masked_fill(mask[None, :, None], float("-inf"))
            attn = attn.view(-1, self.n_heads, n, n)
        out = attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        out = self.linear(out.transpose(1, 2).reshape(-1, n, c))
        out = window_reverse(out, ws, h, w)
        if self.shifted:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out


class Block(nn.Module):
    """Swin transformer block on (B, H, W, C): x + WMSA(LN x), x + MLP(LN x), MLP ratio 4."""

    def __init__(self, dim: int, head_dim: int, window_size: int, shifted: bool):
        super().__init__()
        self.ln1 = LayerNorm32(dim)
        self.msa = WMSA(dim, head_dim, window_size, shifted)
        self.ln2 = LayerNorm32(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.msa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvTransBlock(nn.Module):
    """Swin-Conv block: split(conv1x1 x) -> [conv half: x + conv3(relu(conv3 x)), trans half: Swin block]
    -> x + conv1x1(cat)."""

    def __init__(self, conv_dim: int, trans_dim: int, head_dim: int, window_size: int, shifted: bool,
                 input_resolution: int):
        super().__init__()
        self.conv_dim, self.trans_dim = conv_dim, trans_dim
        shifted = shifted and input_resolution > window_size
        self.trans_block = Block(trans_dim, head_dim, window_size, shifted)
        d = conv_dim + trans_dim
        self.conv1_1 = nn.Conv2d(d, d, 1)
        self.conv1_2 = nn.Conv2d(d, d, 1)
        self.conv_block = nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False), nn.ReLU(True),
                                        nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_x, trans_x = torch.split(self.conv1_1(x), (self.conv_dim, self.trans_dim), dim=1)
        conv_x = self.conv_block(conv_x) + conv_x
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SCUNet(nn.Module):
    """SCUNet x1. ``forward`` replicate-pads to a multiple of 64 (as the official model) and crops back."""

    def __init__(self, config: SCUNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or SCUNetConfig()
        d, n, hd, ws, res = cfg.dim, cfg.config, cfg.head_dim, cfg.window_size, cfg.input_resolution

        def stage(width: int, count: int, level: int) -> list[nn.Module]:
            # blocks alternate W / SW; width = channels of the whole block (half conv, half transformer)
            return [ConvTransBlock(width // 2, width // 2, hd, ws, i % 2 == 1, res // 2 ** level)
                    for i in range(count)]

        def down(c: int) -> nn.Module:
            return nn.Conv2d(c, 2 * c, 2, 2, 0, bias=False)

        def up(c: int) -> nn.Module:
            return nn.ConvTranspose2d(c, c // 2, 2, 2, 0, bias=False)

        self.m_head = nn.Sequential(nn.Conv2d(cfg.in_nc, d, 3, 1, 1, bias=False))
        self.m_down1 = nn.Sequential(*stage(d, n[0], 0), down(d))
        self.m_down2 = nn.Sequential(*stage(2 * d, n[1], 1), down(2 * d))
        self.m_down3 = nn.Sequential(*stage(4 * d, n[2], 2), down(4 * d))
        self.m_body = nn.Sequential(*stage(8 * d, n[3], 3))
        self.m_up3 = nn.Sequential(up(8 * d), *stage(4 * d, n[4], 2))
        self.m_up2 = nn.Sequential(up(4 * d), *stage(2 * d, n[5], 1))
        self.m_up1 = nn.Sequential(up(2 * d), *stage(d, n[6], 0))
        self.m_tail = nn.Sequential(nn.Conv2d(d, cfg.in_nc, 3, 1, 1, bias=False))
        self.apply(init_swin_weights)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        h, w = x0.shape[-2:]
        m = self.config.pad_multiple
        x0 = F.pad(x0, (0, -w % m, 0, -h % m), mode="replicate")
        x1 = self.m_head(x0)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        x = self.m_body(x4)
        x = self.m_up3(x + x4)
        x = self.m_up2(x + x3)
        x = self.m_up1(x + x2)
        x = self.m_tail(x + x1)
        return x[..., :h, :w]



def config_from_state_dict(sd: dict[str, torch.Tensor]) -> SCUNetConfig:
    """Read dim, block counts and head/window sizes back from an SCUNet state dict."""
    try:
        head = sd["m_head.0.weight"]
        counts = []
        for name in ("m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1"):
            idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"{name}.") and ".trans_block." in k}
            counts.append(len(idx))
        rel = sd["m_down1.0.trans_block.msa.relative_position_params"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not an SCUNet state dict (missing {e})") from None
    dim = head.shape[0]
    return SCUNetConfig(in_nc=head.shape[1], config=tuple(counts), dim=dim, head_dim=(dim // 2) // rel.shape[0],
                        window_size=(rel.shape[1] + 1) // 2)
