"""DiffBIR (Lin et al., ECCV 2024): two-stage blind image restoration.

Stage 1 removes the degradation with a regression "cleaner" (BSRNet x4 / SwinIR / SCUNet). Stage 2 regenerates
detail with SD 2.1 steered by an IRControlNet on the cleaner output's VAE latent (paper v2 §3.2), optionally
pulled back toward the stage-1 image by region-adaptive restoration guidance (§3.3). Then the wavelet colour fix
takes the low frequencies from stage 1, and the result is resized to ``input size x upscale``.

Sizes as the official ``pipeline.py``: stage 1's output has its short side raised to ``min_size`` (512); the
condition is zero-padded to a multiple of 64 (8 when tiled) and everything is cropped back afterwards.
x1 cleaners (SwinIR, SCUNet) run on the bicubic-upscaled input (SwinIR after the 512 resize, SCUNet before it);
BSRNet runs on the input and its x4 output is resized.

The pixel backend (``config.backend == "pixel"``, issue 14) runs the same stages with ``sd`` = a pixel-space
``Prior`` (``blindsr.methods.prior``): the condition is the stage-1 image itself (``2 I - 1``, the identity plays
the VAE's role), the UNet sees the prior's null context (no prompt, no CFG), there is no 512 resize, and the
diffusion tiles and the guidance work on pixels.

Large images: the cleaner, the VAE encoder, the diffusion (ControlNet + UNet, every step, cond and uncond) and
the VAE decoder are each tiled automatically once the image exceeds their tile. UNet/ControlNet may run in
fp16/bf16 (norms stay fp32; VAE and text encoder stay fp32, as official); ``offload`` keeps every module on the
CPU except while it is used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindsr.diffusion.samplers import Generators, make_stepper, randn, sample
from blindsr.errors import BlindSRError
from blindsr.methods.diffbir.config import DiffBIRConfig
from blindsr.methods.diffbir.denoiser import CLDMDenoiser
from blindsr.methods.diffbir.guidance import GuidanceTarget, RestorationGuidance
from blindsr.methods.diffbir.weights import WeightPaths
from blindsr.models.sd.vae_tiling import tiled_decode, tiled_encode
from blindsr.ops.colorfix import color_fix
from blindsr.ops.precision import cast_keep_norms_fp32
from blindsr.ops.progress import Progress
from blindsr.ops.resize import pad_to_multiple, resize_short_edge


@dataclass
class DiffBIRResult:
    image: Tensor  # (B,3,h*upscale,w*upscale) in [0, 1]
    stage1: Tensor  # cleaner output at the stage-2 resolution
    timings: dict[str, float] = field(default_factory=dict)
    guidance_losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------
class DiffBIRPipeline:
    """``pipe(lq (B,3,h,w) in [0,1], generator) -> DiffBIRResult``; ``sd``/``controlnet`` may be None for
    stage-1-only use. ``sd``: a ``models.sd.StableDiffusion`` (backend sd) or a ``methods.prior.Prior`` (backend
    pixel). ``tokenizer``: a callable ``list[str] -> (B, 77)`` ids (default: ``load_tokenizer()``)."""

    def __init__(self, cleaner: nn.Module, sd: Any | None, controlnet: nn.Module | None, config: DiffBIRConfig,
                 device: torch.device | str = "cpu", tokenizer: Any | None = None):
        self.cleaner, self.sd, self.controlnet, self.config = cleaner, sd, controlnet, config
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self._home = torch.device("cpu") if config.offload else self.device
        self.pixel = config.backend == "pixel"
        self.cleaner.eval().requires_grad_(False).to(self._home)
        if sd is not None:
            if controlnet is None:
                raise BlindSRError("DiffBIR stage 2 needs a ControlNet")
            if self.pixel != hasattr(sd, "unet_config"):
                raise BlindSRError(f"backend {config.backend} needs {'a pixel prior' if self.pixel else 'SD 2.1'}")
            if self.pixel:
                self._check_prior(sd)
            cast_keep_norms_fp32(sd.unet, config.dtype)
            cast_keep_norms_fp32(controlnet, config.dtype)
            for m in (sd.unet, controlnet, self.vae, self.text_encoder):
                if m is not None:
                    m.eval().requires_grad_(False).to(self._home)

    @property
    def vae(self) -> nn.Module | None:
        return None if self.pixel else self.sd.vae

    @property
    def text_encoder(self) -> nn.Module | None:
        return None if self.pixel else self.sd.text_encoder

    def _check_prior(self, prior: Any) -> None:
        d = prior.diffusion
        if (d.diffusion_steps, d.schedule, d.prediction) != (1000, "scaled_linear", self.config.prediction):
            raise BlindSRError(f"the pixel prior's process ({d.diffusion_steps} steps, {d.schedule}, "
                               f"{d.prediction}) is not SD's (1000, scaled_linear, {self.config.prediction})")
        m = prior.unet_config.multiple
        if self.config.tiling.diffusion_tile % m:
            raise BlindSRError(f"diffusion tile {self.config.tiling.diffusion_tile} must be a multiple of {m} "
                               "(the prior's levels)")

    @classmethod
    def from_paths(cls, config: DiffBIRConfig, paths: WeightPaths, device: torch.device | str = "cpu",
                   tokenizer: Any | None = None) -> DiffBIRPipeline:
        """Load the cleaner, SD (checkpoint file or diffusers folder) and the ControlNet from local paths."""
        from blindsr.models.ircontrolnet import IRControlNetConfig, load_controlnet, load_official_controlnet
        from blindsr.models.restorers import load_restorer
        from blindsr.models.sd import load_sd

        cleaner = load_restorer(paths.cleaner_kind, paths.cleaner)
        sd = controlnet = None
        if paths.prior is not None:
            from blindsr.methods.prior.model import load_prior

            sd, controlnet = load_prior(paths.prior), load_controlnet(paths.controlnet)
        elif paths.sd is not None:
            sd = load_sd(paths.sd)
            ccfg = IRControlNetConfig.from_unet_config(dict(sd.unet.config))
            controlnet = load_official_controlnet(paths.controlnet, ccfg)
        return cls(cleaner, sd, controlnet, config, device, tokenizer)

    # -- device placement --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self, *modules: nn.Module) -> Iterator[None]:
        """With offload: move ``modules`` to the device for the block, then back to the CPU."""
        modules = tuple(m for m in modules if m is not None)
        if not self.config.offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to(self._home)

    # -- stage 1 -----------------------------------------------------------------------------------------
    def output_size(self, lq: Tensor) -> tuple[int, int]:
        h, w = lq.shape[-2:]
        return int(h * self.config.upscale), int(w * self.config.upscale)

    def _clean(self, x: Tensor, progress: Progress = False) -> Tensor:
        from blindsr.models.restorers import restore_tiled

        t = self.config.tiling
        with self._on_device(self.cleaner), torch.no_grad():
            if t.cleaner_tile > 0:
                return restore_tiled(self.cleaner, x, t.cleaner_tile, min(t.cleaner_overlap, t.cleaner_tile - 1),
                                     progress=progress)
            return self.cleaner(x)

    def stage1(self, lq: Tensor, min_size: int | None = None, progress: Progress = False) -> Tensor:
        """The cleaner output (B,3,H,W), short side >= ``min_size`` (default ``config.min_size``);
        ``progress`` over the cleaner's tiles (``ops.progress``)."""
        from blindsr.degradations.operators import imresize

        min_size = self.config.min_size if min_size is None else min_size
        out_size = self.output_size(lq)
        lq = lq.to(self.device, torch.float32)
        scale = float(getattr(getattr(self.cleaner, "config", None), "scale", 1))  # no config (identity): x1
        if scale == 1:  # x1 cleaner on the bicubic-upscaled input (official PIL BICUBIC ~ MATLAB bicubic)
            x = imresize(lq, size=out_size) if out_size != tuple(lq.shape[-2:]) else lq
            before = type(self.cleaner).__name__ == "SwinIR"  # official SwinIRPipeline resizes before
            if before and min(x.shape[-2:]) < min_size:
                x = resize_short_edge(x, min_size)
            y = self._clean(x, progress)
        else:  # BSRNet x4 on the input, then to the output size
            y = self._clean(lq, progress)
            if min(out_size) >= min_size:
                return F.interpolate(y, size=out_size, mode="bicubic", antialias=True)
        if min(y.shape[-2:]) < min_size:
            y = resize_short_edge(y, min_size)
        return y

    # -- stage 2 -----------------------------------------------------------------------------------------
    def _tokens(self, prompts: list[str]) -> Tensor:
        if self.tokenizer is None:
            from blindsr.models.sd.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer()
        return self.tokenizer(prompts)

    def encode_prompts(self, batch: int) -> tuple[Tensor, Tensor | None]:
        """``c_txt`` for the positive prompt and (when CFG is on) for the negative prompt, (B, 77, C)."""
        from blindsr.models.sd import encode_text

        c = self.config
        if self.pixel:  # the prior's fixed null token; CFG is refused by the config
            from blindsr.methods.prior.model import null_context

            return null_context(self.sd.unet, batch).float(), None
        need_uncond = c.cfg != 1 or c.rescale_cfg
        prompts = [c.pos_prompt] + ([c.neg_prompt] if need_uncond else [])
        with self._on_device(self.sd.text_encoder), torch.no_grad():
            emb = encode_text(self.sd.text_encoder, self._tokens(prompts).to(self.device)).float()
        emb = emb.to(self.device)
        expand = [e[None].expand(batch, -1, -1) for e in emb]
        return expand[0], (expand[1] if need_uncond else None)

    def encode_condition(self, cond: Tensor) -> Tensor:
        """``c_img`` = VAE posterior mode x 0.18215 of the (padded) stage-1 image in [0, 1]; tiled if large.
        Pixel backend: the image itself in the prior's [-1, 1]."""
        from blindsr.models.sd import vae_encode

        if self.pixel:
            return cond * 2 - 1
        t, vae = self.config.tiling.vae, self.sd.vae
        with self._on_device(vae), torch.no_grad():
            def enc(x: Tensor) -> Tensor:
                return vae_encode(vae, x.to(vae.dtype), scale_factor=self.sd.scale_factor).float()
            return tiled_encode(enc, cond, t.encoder_tile, t.overlap, t.encoder_margin)

    def decode(self, z: Tensor) -> Tensor:
        """Image in about [-1, 1] from a scaled latent; tiled if large; differentiable (for guidance).
        Pixel backend: the identity."""
        from blindsr.models.sd import vae_decode

        if self.pixel:
            return z
        t, vae = self.config.tiling.vae, self.sd.vae

        def dec(q: Tensor) -> Tensor:
            return vae_decode(vae, q.to(vae.dtype), scale_factor=self.sd.scale_factor).float()
        return tiled_decode(dec, z, t.decoder_tile, t.overlap, t.decoder_margin)

    def stage2(self, cond_img: Tensor, generator: Generators = None,
               progress: Progress = False, timings: dict[str, float] | None = None) -> tuple[Tensor, list[float]]:
        """Diffusion restoration of the stage-1 image (B,3,H,W) -> (B,3,H,W) in about [0, 1]."""
        if self.sd is None:
            raise BlindSRError("stage 2 needs the SD and ControlNet weights (or use --stage1-only)")
        c, timings = self.config, timings if timings is not None else {}
        B, _, h0, w0 = cond_img.shape
        tile_px = c.tiling.diffusion_tile
        diff_tiled = tile_px > 0 and max(h0, w0) > tile_px
        if self.pixel:  # whole prior levels; one pixel per position
            factor, multiple = 1, self.sd.unet_config.multiple
        else:
            enc_tiled = c.tiling.vae.encoder_tile > 0 and max(h0, w0) > c.tiling.vae.encoder_tile
            factor, multiple = 8, 8 if (diff_tiled or enc_tiled) else 64  # official rule
        cond = pad_to_multiple(cond_img, multiple, mode="zeros")
        t0 = time.perf_counter()
        c_txt, c_unc = self.encode_prompts(B)
        c_img = self.encode_condition(cond)
        h1, w1 = c_img.shape[-2:]
        base = c.process()
        T = base.num_timesteps
        if c.start_point == "cond":
            x_T = base.q_sample(c_img, torch.full((B,), T - 1, device=self.device),
                                randn(c_img.shape, generator, self.device))
        else:
            x_T = randn((B, self.sd.unet.config.in_channels, h1, w1), generator, self.device)
        c_clean = c_img
        if c.noise_aug > 0:
            c_img = base.q_sample(c_img, torch.full((B,), c.noise_aug, device=self.device),
                                  randn(c_img.shape, generator, self.device))
        timings["encode"] = time.perf_counter() - t0
        denoiser = CLDMDenoiser(self.sd.unet, self.controlnet, c_img, c_txt, c_unc, cfg=c.cfg,
                                rescale_cfg=c.rescale_cfg, strength=c.strength,
                                tile=tile_px // factor if diff_tiled else 0,
                                overlap=c.tiling.diffusion_overlap // factor,
                                batch_cfg=c.batch_cfg, dtype=c.dtype, prediction=c.prediction)
        guided = c.guidance.scale != 0
        guidance = RestorationGuidance(c.guidance, GuidanceTarget(cond, c_clean),
                                       self.decode, factor) if guided else None
        t0 = time.perf_counter()
        extra = (self.vae,) if guided else ()
        stepper = make_stepper(c.sampler, base, c.steps, spacing="leading" if c.sampler == "ddim" else "linspace",
                               var_type="fixed_small", unrescaled_betas=c.betas(zero_snr=False) if c.zero_snr else None,
                               device=self.device)
        with self._on_device(self.sd.unet, self.controlnet, *extra):
            z = sample(denoiser, x_T, stepper, generator, guidance=guidance, progress=progress)
        timings["sample"] = time.perf_counter() - t0
        timings["network_calls"] = float(denoiser.calls)
        t0 = time.perf_counter()
        with self._on_device(self.vae), torch.no_grad():
            x = self.decode(z[..., :h1, :w1])
        timings["decode"] = time.perf_counter() - t0
        return ((x[..., :h0, :w0] + 1) / 2).float(), (guidance.losses if guidance else [])

    def __call__(self, lq: Tensor, generator: Generators = None, *,
                 stage1_only: bool = False, progress: Progress = False) -> DiffBIRResult:
        """Restore ``lq`` ((B,3,h,w) or (3,h,w) in [0, 1]) to ``(h, w) x upscale``. ``progress``: the cleaner's
        tiles, then the sampling steps (``ops.progress``: True for tqdm bars, or ``report(done, total)``)."""
        single = lq.ndim == 3
        lq = lq[None] if single else lq
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise BlindSRError(f"DiffBIR needs RGB images (B,3,H,W), got {tuple(lq.shape)}")
        out_size, timings = self.output_size(lq), {}
        t0 = time.perf_counter()
        stage1 = self.stage1(lq, min_size=0 if stage1_only else None, progress=progress)
        timings["stage1"] = time.perf_counter() - t0
        losses: list[float] = []
        if stage1_only:
            out = stage1 if tuple(stage1.shape[-2:]) == out_size else \
                F.interpolate(stage1, size=out_size, mode="bicubic", antialias=True)
        else:
            x, losses = self.stage2(stage1, generator, progress, timings)
            x = color_fix(x, stage1, self.config.color_fix)
            out = F.interpolate(x, size=out_size, mode="bicubic", antialias=True)
        out = out.clamp(0, 1)
        result = DiffBIRResult(out[0] if single else out, stage1[0] if single else stage1, timings, losses)
        return result

    def with_config(self, **changes: Any) -> DiffBIRPipeline:
        """The same models with some settings changed (e.g. ``cfg=1.0``); shares all modules."""
        new = object.__new__(DiffBIRPipeline)
        new.__dict__.update(self.__dict__)
        new.config = replace(self.config, **changes)
        return new
