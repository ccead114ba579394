"""``blindsr train srnet``: a regression SR network (RRDBNet or SwinIR, x``data.scale``) on a folder of pairs.

The pairs are any LR/HR folders -- ``blindsr degrade`` writes them (``PAIRS/lr``, ``PAIRS/hr``) for every preset,
UDDM's learnt one included -- so the same network trained on bicubic, ``realesrgan`` or UDDM pairs compares the
degradations (issue 12's protocol). ``data.root`` = the HR folder, ``data.lr_root`` = its LR partners (paired by
name). Loss: L1 (Real-ESRNet's). ``model``: ``arch`` (rrdbnet | swinir), ``preset`` (small | tiny | full: the
published size), field overrides, and ``init``: weights to start from (e.g. the converted RealESRGAN-x4plus: the
paper's "Real-ESRGAN (Ours)" row), loaded strictly in either RRDBNet key layout. ``final.safetensors`` is in the
restorer layout: ``blindsr restore --stage1-only --cleaner final.safetensors`` runs it.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from blindsr.config import from_dict, to_dict
from blindsr.data.paired import PairedFolderDataset
from blindsr.errors import BlindSRError
from blindsr.methods.base import Recipe
from blindsr.models.restorers import RRDBNetConfig, SwinIRConfig, build_restorer, restorer_spec
from blindsr.train.config import RunConfig


def _presets(arch: str, scale: int) -> dict:
    up = {2: 1, 4: 2}.get(scale)
    if up is None:
        raise BlindSRError(f"config: srnet supports x2 and x4, not x{scale}")
    if arch == "rrdbnet":
        return {"full": RRDBNetConfig(up_steps=up), "small": RRDBNetConfig(nf=32, nb=6, gc=16, up_steps=up),
                "tiny": RRDBNetConfig(nf=8, nb=1, gc=4, up_steps=up)}
    if arch == "swinir":  # classical SR SwinIR: no unshuffle, x`scale` upsampler
        return {"full": SwinIRConfig(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, upscale=scale, unshuffle=1),
                "small": SwinIRConfig(img_size=32, embed_dim=48, depths=(4, 4, 4), num_heads=(4, 4, 4),
                                      upscale=scale, unshuffle=1, num_feat=32),
                "tiny": SwinIRConfig(img_size=8, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4,
                                     upscale=scale, unshuffle=1, num_feat=8)}
    raise BlindSRError(f"config: model.arch {arch!r}: choose rrdbnet or swinir")


def srnet_recipe(cfg: RunConfig) -> Recipe:
    d, model = cfg.data, dict(cfg.model)
    if cfg.diffusion or cfg.loss:
        raise BlindSRError("config: method srnet takes no diffusion/loss sections (its loss is L1)")
    if not d.lr_root:
        raise BlindSRError("config: data.lr_root (the LR partners of data.root) is required")
    arch, preset, init = model.pop("arch", "rrdbnet"), model.pop("preset", "small"), model.pop("init", None)
    presets = _presets(arch, d.scale)
    if preset not in presets:
        raise BlindSRError(f"config: model.preset {preset!r}: choose {', '.join(presets)}")
    base = presets[preset]
    net_cfg = from_dict(type(base), {**to_dict(base), **model}, "model")
    net = build_restorer(arch, net_cfg)
    if round(net_cfg.scale) != d.scale:
        raise BlindSRError(f"config: the network is x{net_cfg.scale:g}, data.scale is {d.scale}")
    if init:
        from blindsr.io.weights import load_into, load_state_dict

        load_into(net, restorer_spec(arch).prepare(load_state_dict(init)), strict=True)
    dataset = PairedFolderDataset(d.lr_root, d.root, d.scale, d.crop, d.flip, d.rot, d.cache, cfg.train.seed)

    def loss_fn(model: nn.Module, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"loss": F.l1_loss(model(batch["lr"]).float(), batch["hr"].float())}

    resolved = {"arch": arch, "preset": preset, "init": init, **to_dict(net_cfg)}
    cfg = dataclasses.replace(cfg, model=resolved)
    meta = {"method": "srnet", "kind": arch, "config": json.dumps(to_dict(net_cfg)),
            "train_config": json.dumps(to_dict(cfg))}
    return Recipe.single(net, loss_fn, dataset, export_metadata=meta, config=cfg)


__all__ = ["srnet_recipe"]
