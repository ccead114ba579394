"""StableSR inference (README §4.4-4.7 of ``shared/reference/stablesr``): ``StableSRPipeline(lr) -> SRResult``.

1. Bicubic upsampling of the LR to the output size (``upscale``; with ``input_size``, the official: short side
   at least 512, resized back at the end), clamped.
2. Reflect-pad bottom / right the official way (:func:`official_pad`: when a side is not a multiple of 32,
   BOTH sides get ``(n // 32 + 1) * 32 - n``, so an aligned side gains a whole 32 px).
3. Above ``pixel_tile`` (official ``--vqgantile_size`` 1280, stride 1000) the padded image is cut into pixel tiles
   (``ops.tiling.tiled_map``, Gaussian windows of variance 0.01 as ``ImageSpliterTh``), each running the whole
   chain below, so memory is bounded by one tile whatever the input size.
4. The chain (:meth:`StableSRPipeline.restore`), per tile: reflect-pad to whole latent levels, z_lr = the VAE
   latent of the upsampled LR (a posterior sample, official), ``stablesr.sample_latent`` from the noised LR
   latent (``steps`` respaced DDPM steps, latent aggregation tiles 64 / 32), decode with CFW at ``dec_w`` when a
   CFW checkpoint is given (else the plain SD decoder), colour fix against the upsampled LR in [-1, 1].
5. Crop the padding, resize back when ``input_size`` upsampled further than ``upscale``, [0, 1].

Checkpoints (:func:`load_pipeline`): an official StableSR stage-1 ``.ckpt`` (every part; ``cfw=`` an official
CFW ``.ckpt``), or a ``blindsr train stablesr`` ``final.safetensors``: only the trainable encoder + SPADE layers,
its metadata (``method: stablesr``) naming the model config and the base weights the frozen part is rebuilt from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.config import from_dict
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.base import SRResult
from blindsr.methods.stablesr.config import StableSRInference, StableSRModel
from blindsr.methods.uddm.ddm_stablesr import StableSRDDMNet
from blindsr.ops.progress import Progress

OFFICIAL_PAD = 32


def official_pad(x: Tensor, multiple: int = OFFICIAL_PAD) -> Tensor:
    """The official reflect padding (bottom, right): if either side is not a multiple of ``multiple``, both get
    ``(n // multiple + 1) * multiple - n`` (an aligned side gains ``multiple``); else none."""
    h, w = x.shape[-2:]
    if not (h % multiple or w % multiple):
        return x
    ph, pw = (h // multiple + 1) * multiple - h, (w // multiple + 1) * multiple - w
    mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < size
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class StableSRPipeline:
    """``pipe(lr (B, 3, h, w) in [0, 1], generator=, progress=, **overrides) -> SRResult`` (x ``upscale``).

    ``net``: the StableSR model (``uddm.ddm_stablesr.StableSRDDMNet``: the trainable encoder + SPADE layers, the
    frozen SD UNet / VAE and the null text context); ``cfw``: an optional ``models.sd.cfw.CFWAutoencoder``.
    Overrides are fields of :class:`StableSRInference` (None: the config's)."""

    def __init__(self, net: StableSRDDMNet, cfw: Any = None, config: StableSRInference | None = None):
        self.net = net.eval().requires_grad_(False)
        self.cfw = None if cfw is None else cfw.eval().requires_grad_(False)
        self.config = config or StableSRInference()

    @property
    def scale(self) -> int:
        return self.config.upscale

    @property
    def device(self) -> torch.device:
        return self.net.context.device

    def restore(self, x: Tensor, cfg: StableSRInference, generator: Any, progress: Progress = False) -> Tensor:
        """The whole chain on (a pixel tile of) the upsampled LR ``x`` (B, 3, H, W) in [0, 1]: SR in [0, 1]."""
        from blindsr.models.sd import stablesr as ss
        from blindsr.ops.colorfix import color_fix
        from blindsr.ops.resize import pad_to_multiple

        net = self.net
        H, W = x.shape[-2:]
        xp = pad_to_multiple(x, net.multiple, mode="reflect")  # whole latent levels (64 px for SD)
        z_lr = net.encode(xp, generator, cfg.posterior == "sample")
        context = net.context.expand(x.shape[0], -1, -1)
        z = ss.sample_latent(net, z_lr, context, steps=cfg.steps, tile=cfg.tile or None, overlap=cfg.tile_overlap,
                             generator=generator, progress=progress)
        if self.cfw is not None:
            dt = self.cfw.vae.dtype
            _, enc_fea = self.cfw.encode((xp.float() * 2 - 1).to(dt))  # features of the same upsampled LR
            y = self.cfw.decode((z.float() / net.scale_factor).to(dt), enc_fea, cfg.dec_w)
        else:
            y = net.decode(z)
        y = y[..., :H, :W].float()
        if cfg.color_fix != "none":  # against the upsampled LR, both in [-1, 1] (official)
            y = color_fix(y, x.float() * 2 - 1, cfg.color_fix)
        return ((y + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, lr: Tensor, *, generator: Any = None, progress: Progress = False,
                 **overrides: Any) -> SRResult:
        """Super-resolve ``lr``; ``generator``: one, or one per image (then image i depends only on its own)."""
        from blindsr.ops.tiling import tiled_map

        cfg = dataclasses.replace(self.config, **{k: v for k, v in overrides.items() if v is not None})
        if cfg.tile and cfg.tile % self.net.latent_multiple:
            raise BlindSRError(f"StableSR: the latent tile {cfg.tile} must be a multiple of "
                               f"{self.net.latent_multiple} (the UNet's levels)")
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise BlindSRError(f"StableSR expects LR images (B, 3, h, w), got {tuple(lr.shape)}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)  # seeded, never the global RNG
        lr = lr.to(self.device, torch.float32)
        h, w = lr.shape[-2:]
        s = max(cfg.input_size / min(h, w), cfg.upscale) if cfg.input_size else cfg.upscale
        size = (int(h * s), int(w * s))
        up = F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = official_pad(up, cfg.pad)
        if cfg.pixel_tile and max(x.shape[-2:]) > cfg.pixel_tile:
            out = tiled_map(lambda t: self.restore(t, cfg, generator), x, tile=cfg.pixel_tile // 8,
                            overlap=cfg.pixel_overlap // 8, window="gaussian", sigma=0.1, in_factor=8,
                            out_factor=8, progress=progress)
        else:
            out = self.restore(x, cfg, generator, progress)
        out = out[..., :size[0], :size[1]]
        target = (h * cfg.upscale, w * cfg.upscale)
        if size != target:  # input_size made it larger: back to x upscale (official: bicubic, clamped)
            out = F.interpolate(out, size=target, mode="bicubic", align_corners=False)
        return SRResult(sr=out.float().clamp(0, 1))


# ---------------------------------------------------------------------------------------------- loading
def _inference(meta: dict[str, str], upscale: int | None) -> StableSRInference:
    cfg = from_dict(StableSRInference, json.loads(meta.get("inference", "{}")), "inference")
    return cfg if upscale is None else dataclasses.replace(cfg, upscale=upscale)


def _official_net(path: Path, state: dict[str, Tensor], model: StableSRModel) -> StableSRDDMNet:
    """An official stage-1 state dict: every part loaded strictly (the trained encoder + SPADE included)."""
    from blindsr.methods.uddm.ddm_stablesr import null_text_context, stablesr_config
    from blindsr.models.sd import stablesr as ss
    from blindsr.models.sd.tokenizer import CONTEXT_LENGTH

    cfg = stablesr_config(model.size)
    parts = ss.load_stablesr(state, cfg, text_encoder=None if model.context == "text" else False)
    width = int(parts.unet.unet.config.cross_attention_dim)
    if model.context == "text":
        if parts.text_encoder is None:
            raise WeightsError(f"{path} has no text encoder (cond_stage_model.model.*) for the null context: "
                               "load it with context='zeros'")
        context = null_text_context(parts.text_encoder)
        parts.text_encoder = None
    else:
        context = torch.zeros(1, CONTEXT_LENGTH, width)
    return StableSRDDMNet(parts, context, model, cfg)


def load_net(ckpt: str | Path, *, base_weights: str | Path | None = None, size: str = "full",
             context: str = "text") -> tuple[StableSRDDMNet, dict[str, str]]:
    """The StableSR model of ``ckpt`` (CPU, fp32) and its metadata: a ``blindsr train stablesr`` safetensors
    (trainable part; the frozen part rebuilt from the base its metadata names, or ``base_weights``) or an
    official stage-1 checkpoint (``size`` / ``context``: how to build it; the release is ``full`` / ``text``)."""
    from blindsr.io.weights import check_finite, load_into, load_safetensors_metadata, load_state_dict
    from blindsr.methods.uddm.ddm_stablesr import build_ddm_net

    path = Path(ckpt)
    if not path.is_file():
        raise WeightsError(f"StableSR checkpoint not found: {path}")
    meta = load_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("method") == "stablesr":
        if "model" not in meta:
            raise WeightsError(f"{path}: a stablesr checkpoint without its model config in the metadata")
        model = from_dict(StableSRModel, json.loads(meta["model"]), "model")
        net = build_ddm_net(model, base_weights, what="StableSR base", section="model")
        sd = load_state_dict(path)
        check_finite(sd, path)
        load_into(net, sd, strict=True)
        return net, meta
    state = load_state_dict(path)
    if not any(k.startswith("structcond_stage_model.") for k in state):
        what = f"metadata method {meta['method']!r}" if meta.get("method") else "no structcond_stage_model.* keys"
        raise WeightsError(f"{path}: not a StableSR checkpoint ({what}); give an official stage-1 .ckpt or a "
                           "`blindsr train stablesr` final.safetensors")
    return _official_net(path, state, StableSRModel(size=size, context=context)), {}


def load_pipeline(ckpt: str | Path | None = None, device: str | torch.device = "cpu", *,
                  cfw: str | Path | None = None, base_weights: str | Path | None = None,
                  dtype: torch.dtype | None = None, size: str = "full", context: str = "text",
                  upscale: int | None = None, **_: Any) -> StableSRPipeline:
    """A StableSR pipeline (``blindsr sr --method stablesr --ckpt FILE [--cfw FILE]``), frozen, on ``device``.

    ``ckpt``: see :func:`load_net`; ``cfw``: an official CFW checkpoint (``vqgan_cfw_00011.ckpt``; None: the plain
    SD decoder); ``dtype``: the networks' dtype (default fp32; norms and softmaxes stay fp32)."""
    from blindsr.models.sd.cfw import load_cfw

    if ckpt is None:
        raise WeightsError("--method stablesr needs --ckpt FILE: an official StableSR stage-1 .ckpt or a "
                           "`blindsr train stablesr` final.safetensors")
    if cfw is not None and not Path(cfw).is_file():  # before the (large) stage-1 checkpoint is read
        raise WeightsError(f"StableSR CFW checkpoint not found: {cfw}")
    net, meta = load_net(ckpt, base_weights=base_weights, size=size, context=context)
    decoder = None if cfw is None else load_cfw(cfw, dict(net.sr_config.vae), dtype=torch.float32)
    dtype = dtype or torch.float32
    net.to(device, dtype)
    net.frozen.unet.to(device, dtype)
    net.frozen.vae.to(device, dtype)
    if decoder is not None:
        decoder.to(device, dtype)
    return StableSRPipeline(net, decoder, _inference(meta, upscale))


__all__ = ["StableSRPipeline", "official_pad", "load_net", "load_pipeline"]
