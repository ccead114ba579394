"""RRDBNet (ESRGAN, Wang et al. 2018): BSRNet (Zhang et al., BSRGAN 2021) and Real-ESRGAN x4plus.

One architecture, two key layouts:

- ``kair`` (native; BSRNet.pth as DiffBIR v2 loads it): ``conv_first``, ``RRDB_trunk.N.RDB1.conv1``,
  ``trunk_conv``, ``upconv1``, ``upconv2``, ``HRconv``, ``conv_last``;
- ``basicsr`` (Real-ESRGAN, BasicSR): ``conv_first``, ``body.N.rdb1.conv1``, ``conv_body``, ``conv_up1``,
  ``conv_up2``, ``conv_hr``, ``conv_last``.

``to_kair_keys`` / ``to_basicsr_keys`` translate a state dict; ``config_from_state_dict`` reads the sizes
(blocks, widths, unshuffle) back from the tensors, so any RRDBNet checkpoint loads without a config file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RRDBNetConfig:
    in_ch: int = 3
    out_ch: int = 3
    nf: int = 64           # trunk channels
    nb: int = 23           # RRDB blocks
    gc: int = 32           # growth channels inside a dense block
    up_steps: int = 2      # nearest x2 + conv steps (KAIR sf=4: 2, sf=2: 1)
    unshuffle: int = 1     # Real-ESRGAN x2plus pixel-unshuffles by 2 before conv_first (x1: 4)

    @property
    def scale(self) -> float:
        return 2 ** self.up_steps / self.unshuffle

    @classmethod
    def bsrnet(cls) -> RRDBNetConfig:
        """BSRNet / Real-ESRGAN x4plus: x4, 23 blocks."""
        return cls()

    @classmethod
    def tiny(cls) -> RRDBNetConfig:
        return cls(nf=8, nb=2, gc=4)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; x + 0.2 * conv5(...) (ESRGAN Fig. 4, residual scaling beta=0.2)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(5):
            self.add_module(f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1))
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(self.lrelu(getattr(self, f"conv{i}")(torch.cat(feats, 1))))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: x + 0.2 * RDB3(RDB2(RDB1(x)))."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = (ResidualDenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.RDB3(self.RDB2(self.RDB1(x)))


class RRDBNet(nn.Module):
    """conv_first -> 23 RRDB -> trunk_conv (+ skip) -> (nearest x2, conv, LReLU) x2 -> HRconv -> conv_last.

    Input/output in [0, 1]; output size = input size * ``config.scale``.
    """

    def __init__(self, config: RRDBNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or RRDBNetConfig()
        nf = cfg.nf
        self.conv_first = nn.Conv2d(cfg.in_ch * cfg.unshuffle ** 2, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, cfg.gc) for _ in range(cfg.nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(cfg.up_steps):
            self.add_module(f"upconv{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, cfg.out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h, w = x.shape[-2:]
        if cfg.unshuffle > 1:
            r = cfg.unshuffle
            x = F.pixel_unshuffle(F.pad(x, (0, -w % r, 0, -h % r), mode="reflect"), r)
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.RRDB_trunk(fea))
        for i in range(cfg.up_steps):
            up = getattr(self, f"upconv{i + 1}")
            fea = self.lrelu(up(F.interpolate(fea, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.HRconv(fea)))
        return out[..., : round(h * cfg.scale), : round(w * cfg.scale)]


# ----------------------------------------------------------------------------------------------------------
# Key layouts

_KAIR_TO_BASICSR = [  # (kair regex, basicsr replacement) applied to the start of each key
    (r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
]
_BASICSR_TO_KAIR = [
    (r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2."),
    (r"^conv_body\.", "trunk_conv."),
    (r"^conv_up(\d)\.", r"upconv\1."),
    (r"^conv_hr\.", "HRconv."),
]


def _rename(sd: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """'basicsr' if the keys use Real-ESRGAN names (body.N.rdbK, conv_body), else 'kair'."""
    return "basicsr" if any(k.startswith(("body.", "conv_body.")) for k in sd) else "kair"


def to_kair_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real-ESRGAN/BasicSR names -> KAIR/BSRNet names (identity for a KAIR state dict)."""
    return _rename(sd, _BASICSR_TO_KAIR) if detect_layout(sd) == "basicsr" else dict(sd)


def to_basicsr_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """KAIR/BSRNet names -> Real-ESRGAN/BasicSR names (identity for a BasicSR state dict)."""
    return _rename(sd, _KAIR_TO_BASICSR) if detect_layout(sd) == "kair" else dict(sd)


def config_from_state_dict(sd: dict[str, torch.Tensor], in_ch: int = 3) -> RRDBNetConfig:
    """Read nf, nb, gc, up_steps and unshuffle back from a (either layout) RRDBNet state dict."""
    sd = to_kair_keys(sd)
    try:
        first = sd["conv_first.weight"]
        nb = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("RRDB_trunk."))
        gc = sd["RRDB_trunk.0.RDB1.conv1.weight"].shape[0]
        up_steps = sum(1 for k in sd if re.fullmatch(r"upconv\d\.weight", k))
        out_ch = sd["conv_last.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not an RRDBNet state dict (missing {e})") from None
    unshuffle = round((first.shape[1] / in_ch) ** 0.5)
    return RRDBNetConfig(in_ch=in_ch, out_ch=out_ch, nf=first.shape[0], nb=nb, gc=gc, up_steps=up_steps,
                         unshuffle=unshuffle)
