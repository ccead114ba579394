"""Learned image-quality metrics through pyiqa (the optional ``blindsr[metrics]`` extra), strictly offline.

pyiqa downloads weights on first use; this wrapper never lets it. Before a metric is built, every file it
needs must already be on disk, else a one-line :class:`~blindsr.errors.WeightsError` names the first missing
file and where to put it. Layout (``weights_dir`` plays the role of ``$TORCH_HOME``; default: torch's hub
directory, ``$TORCH_HOME`` or ``~/.cache/torch``)::

    <weights_dir>/hub/pyiqa/<file>          pyiqa's own weights (exact basenames below)
    <weights_dir>/hub/checkpoints/<file>    torchvision ImageNet backbones (LPIPS, DISTS)
    <weights_dir>/hub/clip/<file>           OpenAI CLIP JIT archives (CLIP-IQA, LIQE)
    $HF_HOME/hub/models--timm--<name>/      timm backbones (MANIQA, TOPIQ), read with HF_HUB_OFFLINE=1

pyiqa fixes its cache folder when it is imported, so ``weights_dir`` must be given before the first
import of pyiqa in the process. PSNR and SSIM are deliberately not offered here: pyiqa's defaults use
YIQ/full-range gray, about 1.32 dB off the BT.601 numbers papers report; use :mod:`blindsr.metrics.psnr_ssim`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindsr.errors import BlindSRError, WeightsError

INSTALL_HINT = "pip install 'blindsr[metrics]'"


@dataclass(frozen=True)
class LearnedMetricSpec:
    pyiqa_name: str  # name passed to pyiqa.create_metric
    mode: str  # "FR" (pred vs gt), "NR" (pred only) or "FID" (folder vs folder)
    files: tuple[str, ...]  # paths relative to <torch hub dir>; all must exist
    timm: tuple[str, ...] = ()  # timm pretrained tags fetched from the HF cache
    verified: bool = True  # file list read from pyiqa's source (False: best knowledge, unconfirmed)
    note: str = ""


# File names from pyiqa 0.1.16 / HEAD (archs/*_arch.py `default_model_urls`, torchvision and CLIP loaders).
LEARNED_METRICS: dict[str, LearnedMetricSpec] = {
    "lpips": LearnedMetricSpec("lpips", "FR", ("pyiqa/LPIPS_v0.1_alex-df73285e.pth",
                                               "checkpoints/alexnet-owt-7be5be79.pth"), note="LPIPS v0.1, AlexNet"),
    "lpips-vgg": LearnedMetricSpec("lpips-vgg", "FR", ("pyiqa/LPIPS_v0.1_vgg-a78928a0.pth",
                                                       "checkpoints/vgg16-397923af.pth"),
                                   note="LPIPS v0.1, VGG16 (BlindDiff's choice)"),
    "dists": LearnedMetricSpec("dists", "FR", ("pyiqa/DISTS_weights-f5e65c96.pth",
                                               "checkpoints/vgg16-397923af.pth")),
    "topiq_fr": LearnedMetricSpec("topiq_fr", "FR", ("pyiqa/cfanet_fr_kadid_res50-2c4cc61d.pth",),
                                  timm=("resnet50.a1_in1k",), verified=False, note="timm tag unconfirmed"),
    "niqe": LearnedMetricSpec("niqe", "NR", ("pyiqa/niqe_modelparameters.mat",), note="lower is better"),
    "musiq": LearnedMetricSpec("musiq", "NR", ("pyiqa/musiq_koniq_ckpt-e95806b9.pth",), note="KonIQ-10k"),
    "maniqa": LearnedMetricSpec("maniqa", "NR", ("pyiqa/ckpt_koniq10k.pt",), timm=("vit_base_patch8_224.augreg2_in21k_ft_in1k",),
                                verified=False, note="KonIQ-10k checkpoint; timm tag unconfirmed"),
    "maniqa-pipal": LearnedMetricSpec("maniqa-pipal", "NR", ("pyiqa/MANIQA_PIPAL-ae6d356b.pth",),
                                      timm=("vit_base_patch8_224.augreg2_in21k_ft_in1k",), verified=False,
                                      note="PIPAL checkpoint; timm tag unconfirmed"),
    "clipiqa": LearnedMetricSpec("clipiqa", "NR", ("clip/RN50.pt",), verified=False,
                                 note="CLIP RN50; pyiqa 0.1.16 + setuptools>=81 may fail importing pkg_resources"),
    "topiq_nr": LearnedMetricSpec("topiq_nr", "NR", ("pyiqa/cfanet_nr_koniq_res50-9a73138b.pth",),
                                  timm=("resnet50.a1_in1k",), verified=False, note="timm tag unconfirmed"),
    "liqe": LearnedMetricSpec("liqe", "NR", ("pyiqa/liqe_koniq.pt", "clip/ViT-B-32.pt"), verified=False,
                              note="text features are computed and cached on first use"),
    "fid": LearnedMetricSpec("fid", "FID", ("pyiqa/pt_inception-2015-12-05-6726825d.pth",),
                             note="folder vs folder (clean-fid 'clean' mode); no dataset statistics"),
}

REFUSED = {"psnr", "psnry", "ssim", "ssimc", "ms_ssim"}


def hub_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The torch hub folder pyiqa and torchvision read: ``<weights_dir>/hub``, else ``torch.hub.get_dir()``."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser() / "hub"
    import torch

    return Path(torch.hub.get_dir())


def _hf_cache_dir() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        return Path(home) / "hub"


def missing_files(name: str, weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Files that ``name`` needs and that are absent (empty list: ready to run offline)."""
    spec = get_spec(name)
    hub = hub_dir(weights_dir)
    missing = [hub / f for f in spec.files if not (hub / f).is_file()]
    hf = _hf_cache_dir()
    for tag in spec.timm:
        repo = hf / f"models--timm--{tag}"
        if not any(repo.glob("snapshots/*/*.safetensors")) and not any(repo.glob("snapshots/*/*.bin")):
            missing.append(repo / "snapshots" / "<rev>" / "model.safetensors")
    return missing


def get_spec(name: str) -> LearnedMetricSpec:
    key = name.lower()
    if key in REFUSED:
        raise BlindSRError(f"metric {name!r}: use blindsr's own psnr/ssim (BasicSR convention); pyiqa's "
                           "default YIQ gray reads ~1.32 dB lower than the BT.601 Y that papers report")
    if key not in LEARNED_METRICS:
        raise BlindSRError(f"unknown learned metric {name!r}; choose from {', '.join(LEARNED_METRICS)}")
    return LEARNED_METRICS[key]


def _import_pyiqa(hub: Path) -> Any:
    """Import pyiqa with its cache at ``hub/pyiqa``; refuse a pyiqa already bound to another folder."""
    import torch

    os.environ["TORCH_HOME"] = str(hub.parent)  # read by pyiqa at import time and by torchvision later
    torch.hub.set_dir(str(hub))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm backbones: cache only, never the network
    try:
        import pyiqa
    except ImportError as e:
        raise BlindSRError(f"learned metrics need pyiqa ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    try:
        from pyiqa.utils.download_util import DEFAULT_CACHE_DIR
    except ImportError:  # layout changed; nothing to compare
        return pyiqa
    if Path(DEFAULT_CACHE_DIR).resolve() != (hub / "pyiqa").resolve():
        raise BlindSRError(f"pyiqa was imported earlier with cache {DEFAULT_CACHE_DIR}; set weights_dir before "
                           f"the first pyiqa import (wanted {hub / 'pyiqa'})")
    return pyiqa


class LearnedMetric:
    """A pyiqa metric behind the blindsr conventions: (C,H,W)/(B,C,H,W) tensors in [0, 1], per-image floats."""

    def __init__(self, name: str, spec: LearnedMetricSpec, net: Any, device: Any):
        self.name, self.spec, self.net, self.device = name, spec, net, device
        self.lower_better = bool(getattr(net, "lower_better", name in ("lpips", "lpips-vgg", "dists", "niqe", "fid")))

    @property
    def mode(self) -> str:
        return self.spec.mode

    def __call__(self, pred: Any, gt: Any = None) -> list[float]:
        """Scores per image. FR metrics need ``gt`` (same shape); NR metrics ignore it."""
        import torch

        if self.mode == "FID":
            raise BlindSRError("fid compares folders: call .folders(pred_dir, gt_dir)")
        pred = _as_batch(pred, "prediction").to(self.device)
        args = [pred]
        if self.mode == "FR":
            if gt is None:
                raise BlindSRError(f"{self.name} is a full-reference metric: give the ground truth too")
            gt = _as_batch(gt, "ground truth").to(self.device)
            if gt.shape != pred.shape:
                raise BlindSRError(f"{self.name}: shapes differ, {tuple(pred.shape)} vs {tuple(gt.shape)}")
            args.append(gt)
        with torch.no_grad():
            out = self.net(*args)
        return [float(v) for v in torch.as_tensor(out).detach().float().cpu().reshape(pred.shape[0], -1).mean(1)]

    def folders(self, pred_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> float:
        """Dataset-level score of two folders (FID: prediction folder vs ground-truth folder)."""
        if self.mode != "FID":
            raise BlindSRError(f"{self.name} is a per-image metric; call it on images")
        return float(self.net(str(pred_dir), str(gt_dir)))


def _as_batch(x: Any, what: str) -> Any:
    import torch

    if not torch.is_tensor(x) or x.dim() not in (3, 4):
        raise BlindSRError(f"{what}: expected a (C,H,W) or (B,C,H,W) tensor in [0, 1]")
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.float().clamp(0, 1)


def create_learned_metric(name: str, device: Any = "cpu", weights_dir: str | os.PathLike | None = None,
                          **opts: Any) -> LearnedMetric:
    """Build a pyiqa metric offline: check pyiqa, then every required file, then ``pyiqa.create_metric``.

    ``opts`` are passed to pyiqa (e.g. ``pretrained_model_path=``). Raises :class:`BlindSRError` when pyiqa
    is missing and :class:`WeightsError` naming the first missing file.
    """
    from blindsr.device import resolve_device

    spec = get_spec(name)
    hub = hub_dir(weights_dir)
    pyiqa = _import_pyiqa(hub)
    missing = missing_files(name, weights_dir)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{name}: missing weight file {missing[0]}{more}; place it there (no downloads here)")
    device = resolve_device(device)
    return LearnedMetric(name, spec, pyiqa.create_metric(spec.pyiqa_name, device=device, **opts), device)
