"""Stage-1 restoration modules ("cleaners") of DiffBIR: SwinIR, RRDBNet (BSRNet / Real-ESRGAN), SCUNet.

Public API:
- ``build_restorer(kind, config=None)``: a randomly initialised model (full DiffBIR config by default);
- ``load_restorer(kind, path, device="cpu", dtype=None)``: a pretrained model in eval mode, sizes read back
  from the checkpoint, keys checked strictly;
- ``restore_tiled(model, img, tile, overlap, blend="gaussian")``: run any of them tile by tile.

Kinds: ``swinir`` (x1), ``rrdbnet`` (aliases ``bsrnet``, ``realesrgan``; x4), ``scunet`` (x1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.restorers import rrdbnet, scunet, swinir
from blindsr.models.restorers.rrdbnet import RRDBNet, RRDBNetConfig
from blindsr.models.restorers.scunet import SCUNet, SCUNetConfig
from blindsr.models.restorers.swinir import SwinIR, SwinIRConfig

__all__ = ["SwinIR", "SwinIRConfig", "RRDBNet", "RRDBNetConfig", "SCUNet", "SCUNetConfig", "KINDS",
           "build_restorer", "load_restorer", "restore_tiled", "tile_starts", "blend_weights"]


@dataclass(frozen=True)
class RestorerSpec:
    cls: type[nn.Module]
    default_config: Callable[[], object]
    config_from_state_dict: Callable[[dict], object]
    prepare: Callable[[dict], dict] = dict          # key mapping applied to a loaded state dict
    derived_buffers: tuple[str, ...] = ()           # deterministic buffers a checkpoint may leave out


KINDS: dict[str, RestorerSpec] = {
    "swinir": RestorerSpec(SwinIR, SwinIRConfig.diffbir, swinir.config_from_state_dict,
                           derived_buffers=("attn_mask", "relative_position_index")),
    "rrdbnet": RestorerSpec(RRDBNet, RRDBNetConfig.bsrnet, rrdbnet.config_from_state_dict, rrdbnet.to_kair_keys),
    "scunet": RestorerSpec(SCUNet, SCUNetConfig.diffbir, scunet.config_from_state_dict),
}
ALIASES = {"bsrnet": "rrdbnet", "realesrgan": "rrdbnet", "esrgan": "rrdbnet"}


def _spec(kind: str) -> RestorerSpec:
    name = ALIASES.get(kind.lower(), kind.lower())
    if name not in KINDS:
        raise BlindSRError(f"unknown restorer {kind!r} (choose {', '.join([*KINDS, *ALIASES])})")
    return KINDS[name]


def build_restorer(kind: str, config=None) -> nn.Module:
    """A freshly initialised restorer; ``config`` defaults to the full DiffBIR configuration."""
    spec = _spec(kind)
    return spec.cls(config or spec.default_config())


def load_restorer(kind: str, path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Load a pretrained restorer (.safetensors/.pth/.pt/.ckpt; Lightning ``state_dict``, ``params_ema``
    and ``module.`` wrappers are unwrapped; pickles only with ``weights_only=True``).

    The model's sizes are read from the tensors; any missing or unexpected key is a one-line
    ``WeightsError``. The model is returned in eval mode with gradients off.
    """
    from blindsr.io.weights import load_into, load_state_dict

    spec = _spec(kind)
    sd = spec.prepare(load_state_dict(path))
    try:
        config = spec.config_from_state_dict(sd)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    model = spec.cls(config)
    # Shift masks and position indices are functions of the config: fill them in when a file omits them.
    for k, v in model.state_dict().items():
        if k not in sd and k.rsplit(".", 1)[-1] in spec.derived_buffers:
            sd[k] = v
    load_into(model, sd, strict=True)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Tiling

def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts 0, stride, 2*stride, ... plus one window flush with the far border."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def blend_weights(h: int, w: int, blend: str = "gaussian", overlap: int = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(h, w) positive weights of one output tile.

    ``gaussian``: DiffBIR's separable Gaussian, variance 0.01 of the tile size, centred on the tile.
    ``linear``: 1 inside, ramping linearly to 1/(overlap+1) over the last ``overlap`` pixels of each side.
    """
    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64, device=device)
        if blend == "gaussian":
            var = 0.01
            return torch.exp(-((i - (n - 1) / 2) ** 2) / n**2 / (2 * var)) / math.sqrt(2 * math.pi * var)
        if blend == "linear":
            ramp = torch.minimum(i + 1, n - i) / (overlap + 1)
            return ramp.clamp(max=1.0)
        raise BlindSRError(f"tile blending must be 'gaussian' or 'linear', not {blend!r}")

    return (axis(h)[:, None] * axis(w)[None, :]).float()


@torch.no_grad()
def restore_tiled(model: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, tile: int = 512,
                  overlap: int = 64, blend: str = "gaussian", progress: bool = False) -> torch.Tensor:
    """Apply ``model`` to overlapping ``tile`` x ``tile`` windows of ``img`` ((C,H,W) or (B,C,H,W)) and
    blend the outputs with weights from ``blend_weights``. The output scale is read from the first tile
    (x1 cleaners, x4 RRDBNet). An image no larger than one tile is processed in one call.
    """
    if overlap < 0 or overlap >= tile:
        raise BlindSRError(f"tile overlap must be in [0, tile), got tile={tile} overlap={overlap}")
    x = img[None] if img.ndim == 3 else img
    b, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    if (th, tw) == (h, w):
        out = model(x)
        return out[0] if img.ndim == 3 else out
    stride = tile - overlap
    coords = list(itertools.product(tile_starts(h, th, stride), tile_starts(w, tw, stride)))
    if progress:
        from tqdm.auto import tqdm
        coords = tqdm(coords, desc="tiles", leave=False)
    out = weight = tile_w = None
    scale = 1
    for y0, x0 in coords:
        y = model(x[..., y0:y0 + th, x0:x0 + tw])
        if out is None:
            scale = y.shape[-2] // th
            if y.shape[-2] != scale * th or y.shape[-1] != scale * tw or scale < 1:
                raise BlindSRError(f"tiling needs an integer output scale; got {tuple(y.shape[-2:])} "
                                   f"from a {th}x{tw} tile")
            out = torch.zeros(b, y.shape[1], h * scale, w * scale, device=y.device, dtype=torch.float32)
            weight = torch.zeros(h * scale, w * scale, device=y.device, dtype=torch.float32)
            tile_w = blend_weights(th * scale, tw * scale, blend, overlap * scale, device=y.device)
        ys, xs = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
        out[..., ys, xs] += y.float() * tile_w
        weight[ys, xs] += tile_w
    out = (out / weight).to(y.dtype)
    return out[0] if img.ndim == 3 else out
