"""Stage-1 restoration modules ("cleaners") of DiffBIR: SwinIR, RRDBNet (BSRNet / Real-ESRGAN), SCUNet.

Public API:
- ``build_restorer(kind, config=None)``: a randomly initialised model (full DiffBIR config by default);
- ``load_restorer(kind, path, device="cpu", dtype=None)``: a pretrained model in eval mode, sizes read back
  from the checkpoint, keys checked strictly;
- ``restore_tiled(model, img, tile, overlap, window="gaussian")``: run any of them tile by tile.

Kinds: ``swinir`` (x1), ``rrdbnet`` (aliases ``bsrnet``, ``realesrgan``; x4), ``scunet`` (x1).
"""

from __future__ import annotations

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
from blindsr.ops.progress import Progress

__all__ = ["SwinIR", "SwinIRConfig", "RRDBNet", "RRDBNetConfig", "SCUNet", "SCUNetConfig", "KINDS",
           "build_restorer", "load_restorer", "restore_tiled", "restorer_spec"]


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


def restorer_spec(kind: str) -> RestorerSpec:
    name = ALIASES.get(kind.lower(), kind.lower())
    if name not in KINDS:
        raise BlindSRError(f"unknown restorer {kind!r} (choose {', '.join([*KINDS, *ALIASES])})")
    return KINDS[name]


def build_restorer(kind: str, config=None) -> nn.Module:
    """A freshly initialised restorer; ``config`` defaults to the full DiffBIR configuration."""
    spec = restorer_spec(kind)
    return spec.cls(config or spec.default_config())


def load_restorer(kind: str, path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Load a pretrained restorer (.safetensors/.pth/.pt/.ckpt; Lightning ``state_dict``, ``params_ema``
    and ``module.`` wrappers are unwrapped; pickles only with ``weights_only=True``).

    The model's sizes are read from the tensors; any missing or unexpected key is a one-line
    ``WeightsError``. ``kind="auto"``: the first architecture whose layout the tensors have. The model is
    returned in eval mode with gradients off.
    """
    from blindsr.io.weights import check_finite, load_into, load_state_dict

    raw = load_state_dict(path)
    check_finite(raw, path)
    names = list(KINDS) if kind == "auto" else [kind]
    errors = []
    for name in names:
        spec = restorer_spec(name)
        sd = spec.prepare(raw)
        try:
            config = spec.config_from_state_dict(sd)
            break
        except ValueError as e:
            errors.append(str(e))
    else:
        why = errors[0] if kind != "auto" else "not a SwinIR, RRDBNet or SCUNet state dict"
        raise WeightsError(f"{path}: {why}")
    model = spec.cls(config)
    # Shift masks and position indices are functions of the config: fill them in when a file omits them.
    for k, v in model.state_dict().items():
        if k not in sd and k.rsplit(".", 1)[-1] in spec.derived_buffers:
            sd[k] = v
    load_into(model, sd, strict=True)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


@torch.no_grad()
def restore_tiled(model: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor, tile: int = 512,
                  overlap: int = 64, window: str = "gaussian", progress: Progress = False) -> torch.Tensor:
    """Apply ``model`` to overlapping ``tile`` x ``tile`` windows of ``img`` ((C,H,W) or (B,C,H,W)) and
    blend the outputs (``blindsr.ops.tiling.tiled_map``: DiffBIR's Gaussian weights, sigma 0.1 of the tile, or
    ``ramp``). The output scale is read from the first tile (x1 cleaners, x4 RRDBNet). An image no larger than
    one tile is processed in one call.
    """
    from blindsr.ops.tiling import tiled_map

    x = img[None] if img.ndim == 3 else img
    out = tiled_map(model, x, tile=tile, overlap=overlap, window=window, sigma=0.1, progress=progress)
    return out[0] if img.ndim == 3 else out
