"""DiffBIR stage 2 sampling: the controlled denoiser (CFG, control strength, tiles) and the samplers.

- ``CLDMDenoiser``: official ``ControlLDM.forward`` + classifier-free guidance. The unconditional branch uses the
  negative prompt with the *same* condition latent ``c_img`` (so CFG contrasts text only); ``cfg == 1`` runs the
  conditional branch alone. With a ``tile`` the latent is cut into overlapping windows at every call, the
  ControlNet sees the matching crop of ``c_img``, and the outputs are blended with Gaussian weights
  (MultiDiffusion-style; official ``--cldm_tiled``, Gaussian sigma 0.1 of the tile as the official weights).
- ``sample``: ``spaced`` (IDDPM respacing + ancestral DDPM with fixed-small variance; paper setting), ``ddim``
  (eta 0, LDM "uniform" steps 1, 1+T/S, ...), ``dpm++_m2`` (DPM-Solver++(2M)) and ``dpm++_3m_sde``
  (SDE-DPM-Solver++, order 3; our stand-in for the official default of v2.1, k-diffusion's
  ``edm_dpm++_3m_sde``). The first two run on the shared samplers of ``blindsr.diffusion``; the DPM solvers on
  diffusers' ``DPMSolverMultistepScheduler`` built from an explicit config.
- eps- and v-prediction (v2.1, with zero-terminal-SNR betas: alpha_bar_999 = 0, so x0 comes straight from v).
- Region-adaptive restoration guidance (paper v2 §3.3; ``blindsr.diffusion.region_guidance``) on every sampler:
  the x0 estimate is moved by ``-s * 3000 * dL/dx0 / c`` where ``c`` is the sampler's coefficient of x0 in the
  next sample (``posterior_mean_coef1`` for ``spaced``, as official v2.0.0), so the next sample moves by exactly
  the guidance step; DPM solvers use c = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blindsr.diffusion import gaussian
from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.region_guidance import GuidanceConfig, apply_guidance, gradient_weight_map
from blindsr.diffusion.respace import respaced, space_timesteps
from blindsr.diffusion.samplers import GuidanceResult, ModelOutput, StepState, ddim_sample, ddpm_sample, randn
from blindsr.diffusion.schedules import get_betas
from blindsr.diffusion.tiling import Box, tiled
from blindsr.errors import BlindSRError
from blindsr.models.ircontrolnet import controlled_unet

SAMPLERS = ("spaced", "ddim", "dpm++_m2", "dpm++_3m_sde")
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class Schedule:
    """The SD training schedule (DiffBIR ``Diffusion``): scaled linear 0.00085 -> 0.012, T = 1000."""

    num_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    prediction: str = "eps"  # "eps" (v1, v2) or "v" (v2.1)
    zero_snr: bool = False  # Lin et al. 2024 rescale (v2.1)

    def betas(self, zero_snr: bool | None = None) -> Tensor:
        return get_betas(self.beta_schedule, self.num_timesteps, self.zero_snr if zero_snr is None else zero_snr)

    def base(self) -> GaussianDiffusion:
        if self.prediction not in ("eps", "v"):
            raise BlindSRError(f"prediction must be eps or v, not {self.prediction!r}")
        if self.zero_snr and self.prediction == "eps":
            raise BlindSRError("zero-terminal-SNR needs v-prediction (eps is undefined at alpha_bar = 0)")
        return GaussianDiffusion(self.betas())


def cfg_rescale(t: Tensor, cfg: float, T: int = 1000) -> Tensor:
    """Official ``--rescale_cfg``: cfg_t = 1 + cfg * (1 - cos(pi * ((T - t) / T) ** 5)) / 2."""
    return 1 + cfg * (1 - torch.cos(math.pi * ((T - t.float()) / T) ** 5)) / 2


class CLDMDenoiser:
    """``(z_t, t) -> raw UNet output`` (eps or v) with the control branch, CFG and optional tiling."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, c_img: Tensor, c_txt: Tensor,
                 c_txt_uncond: Tensor | None = None, *, cfg: float = 1.0, rescale_cfg: bool = False,
                 strength: float = 1.0, tile: int = 0, overlap: int = 32, sigma: float = 0.1,
                 batch_cfg: bool = True, dtype: torch.dtype | None = None):
        self.unet, self.controlnet = unet, controlnet
        self.c_img, self.c_txt, self.c_txt_uncond = c_img, c_txt, c_txt_uncond
        self.cfg, self.rescale_cfg, self.strength, self.batch_cfg = cfg, rescale_cfg, strength, batch_cfg
        self.dtype = dtype or next(unet.parameters()).dtype
        self.tile, self.overlap, self.sigma = tile, overlap, sigma
        self.calls = 0  # network evaluations (cond + uncond count once each); for benchmarks

    def _net(self, z: Tensor, t: Tensor, c_img: Tensor, c_txt: Tensor) -> Tensor:
        self.calls += 1
        z, c_img, c_txt = z.to(self.dtype), c_img.to(self.dtype), c_txt.to(self.dtype)
        controls = self.controlnet(z, t, c_img, c_txt)
        return controlled_unet(self.unet, z, t, c_txt, controls, self.strength).float()

    def _guided(self, z: Tensor, t: Tensor, box: Box | None = None) -> Tensor:
        """CFG on one window: ``uncond + cfg * (cond - uncond)`` (official order)."""
        c_img = self.c_img if box is None else self.c_img[..., box.slices[0], box.slices[1]]
        if self.c_txt_uncond is None or (self.cfg == 1 and not self.rescale_cfg):
            return self._net(z, t, c_img, self.c_txt)
        if self.batch_cfg:
            out = self._net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c_img, c_img]),
                            torch.cat([self.c_txt, self.c_txt_uncond]))
            cond, uncond = out.chunk(2)
        else:
            cond = self._net(z, t, c_img, self.c_txt)
            uncond = self._net(z, t, c_img, self.c_txt_uncond)
        scale = cfg_rescale(t, self.cfg).view(-1, 1, 1, 1) if self.rescale_cfg else self.cfg
        return uncond + scale * (cond - uncond)

    def __call__(self, z: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        h, w = z.shape[-2:]
        if self.tile <= 0 or (h <= self.tile and w <= self.tile):
            return self._guided(z, t)
        fn = tiled(lambda x, tt, box: ModelOutput(self._guided(x, tt, box)), self.tile, self.overlap, align=1,
                   sigma=self.sigma, pass_box=True)
        return fn(z, t).eps


class _FP32GroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class _FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def cast_keep_norms_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` but keep GroupNorm / LayerNorm parameters and math in fp32 (official ``cast_dtype``)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    nn.Module.to(module, dtype)  # plain nn.Module.to: diffusers' override would warn about fp32 modules
    for m in module.modules():
        if type(m) in (nn.GroupNorm, nn.LayerNorm):
            m.float()
            m.__class__ = _FP32GroupNorm if isinstance(m, nn.GroupNorm) else _FP32LayerNorm
    return module


# ----------------------------------------------------------------------------------------------------------
# Restoration guidance as a sampler hook
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GuidanceTarget:
    """What the guidance compares with: the stage-1 image in [0, 1] (rgb) or its latent (latent space)."""

    image: Tensor  # (B,3,H,W) stage-1 output, cropped to the latent's un-padded area x 8
    latent: Tensor | None = None  # c_img (posterior mode), for the latent-space variant


class RestorationGuidance:
    """x0 hook: v-prediction x0 (exact at alpha_bar = 0) and the region-adaptive guidance step."""

    needs_grad = False  # the gradient goes through the VAE decoder only, never through the UNet

    def __init__(self, config: GuidanceConfig, target: GuidanceTarget | None,
                 decode: Callable[[Tensor], Tensor] | None):
        self.config, self.decode = config, decode
        self.coef: Callable[[StepState], float] = lambda state: 1.0  # set by `sample` for its sampler
        self.losses: list[float] = []
        self.target = self.weight = None
        if target is not None and config.scale != 0:
            if config.space == "rgb":
                self.target = target.image * 2 - 1
                self.weight = gradient_weight_map(target.image, config.patch_size) if config.loss == "w_mse" else None
            else:
                if target.latent is None:
                    raise BlindSRError("latent-space guidance needs the condition latent")
                self.target, self.weight = target.latent, None  # official: w_mse is RGB-only
                if config.loss == "w_mse":
                    from blindsr.diffusion.region_guidance import latent_weight_map
                    self.weight = latent_weight_map(target.image, 8, config.patch_size)

    def guide(self, x0: Tensor, t_orig: int, coef: float) -> Tensor:
        """Return x0 moved by the guidance step when the step is inside [start, stop]."""
        if self.target is None or not self.config.active(t_orig):
            return x0
        h, w = self.target.shape[-2:]
        f = 8 if self.config.space == "rgb" else 1
        part = x0[..., : h // f, : w // f]  # the padding is not compared
        decode = self.decode if self.config.space == "rgb" else None
        res = apply_guidance(part, decode, self.target, self.config.scale, weight=self.weight,
                             posterior_coef1=coef, repeat=self.config.repeat)
        self.losses.append(res.loss)
        x0 = x0.clone()
        x0[..., : h // f, : w // f] = res.z0.to(x0.dtype)
        return x0

    def __call__(self, state: StepState) -> GuidanceResult:
        x0 = state.out.extras["x0"]
        return GuidanceResult(x0=self.guide(x0, int(state.t_orig[0]), self.coef(state)))


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------
def ldm_ddim_timesteps(steps: int, T: int = 1000) -> list[int]:
    """LDM ``make_ddim_timesteps(uniform)``: 1, 1 + c, 1 + 2c, ... with c = T // steps (official DDIM)."""
    c = T // steps
    return [i * c + 1 for i in range(steps) if i * c + 1 < T]


def _x0_eps(raw: Tensor, x: Tensor, abar: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    if prediction == "v":
        return gaussian.x0_from_v(x, raw, abar), gaussian.eps_from_v(x, raw, abar)
    return gaussian.x0_from_eps(x, raw, abar), raw


def sample(denoiser: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, schedule: Schedule, sampler: str,
           steps: int, generator: Generators = None, guidance: RestorationGuidance | None = None,
           progress: bool = False, callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run ``sampler`` for ``steps`` steps from ``x_T``; returns the clean latent."""
    if sampler not in SAMPLERS:
        raise BlindSRError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise BlindSRError("--steps must be at least 1")
    base = schedule.base()
    if sampler.startswith("dpm++"):
        return _dpm_solver(denoiser, x_T, schedule, base, sampler, steps, generator, guidance, progress, callback)
    if sampler == "spaced":
        process = respaced(base, space_timesteps(base.num_timesteps, str(steps)))
    else:
        process = respaced(base, ldm_ddim_timesteps(steps, base.num_timesteps))

    def model_fn(x: Tensor, t_orig: Tensor) -> ModelOutput:
        raw = denoiser(x, t_orig)
        x0, eps = _x0_eps(raw, x, gaussian.extract(base.alphas_cumprod, t_orig, x), schedule.prediction)
        return ModelOutput(eps=eps, extras={"x0": x0})

    def coef(state: StepState) -> float:
        i = int(state.t[0])
        if sampler == "spaced":
            return float(process.posterior_mean_coef1[i])
        a, a_prev = float(process.alphas_cumprod[i]), float(process.alphas_cumprod_prev[i])
        return math.sqrt(a_prev) - math.sqrt((1 - a_prev) * a / (1 - a))  # DDIM (eta 0): x_prev's x0 weight

    hook = guidance or RestorationGuidance(GuidanceConfig(scale=0.0), None, None)
    hook.coef = coef
    cb = (lambda s: callback(s.step, s.x_prev)) if callback is not None else None
    if sampler == "spaced":
        return ddpm_sample(model_fn, x_T, process, generator, var_type="fixed_small", guidance=hook,
                           callback=cb, progress=progress)
    return ddim_sample(model_fn, x_T, process, generator, eta=0.0, guidance=hook, callback=cb, progress=progress)


def _dpm_solver(denoiser, x_T: Tensor, schedule: Schedule, base: GaussianDiffusion, sampler: str, steps: int,
                generator: Generators, guidance: RestorationGuidance | None, progress: bool,
                callback) -> Tensor:
    """DPM-Solver++ on diffusers' scheduler, fed with x0 (``prediction_type="sample"``) so guidance applies."""
    import warnings

    from diffusers import DPMSolverMultistepScheduler

    sde = sampler.endswith("sde")
    with warnings.catch_warnings():  # numpy-2 DeprecationWarning inside diffusers' sigma computation
        warnings.simplefilter("ignore", DeprecationWarning)
        sched = _dpm_scheduler(DPMSolverMultistepScheduler, schedule, sampler, sde)
        sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False, dynamic_ncols=True)
    for i, t in enumerate(timesteps):
        t_b = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with torch.no_grad():
            raw = denoiser(x, t_b)
        x0, _ = _x0_eps(raw, x, gaussian.extract(base.alphas_cumprod, t_b, x), schedule.prediction)
        if guidance is not None:
            x0 = guidance.guide(x0, int(t), 1.0)
        noise = randn(x.shape, generator, x.device, x.dtype) if sde else None
        x = sched.step(x0, t, x, variance_noise=noise).prev_sample
        if callback is not None:
            callback(i, x)
    return x


def _dpm_scheduler(cls, schedule: Schedule, sampler: str, sde: bool):
    """diffusers' DPM-Solver++ from an explicit config (no hub): our betas, x0 ("sample") model outputs."""
    return cls(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas(zero_snr=False).numpy(),
               rescale_betas_zero_snr=schedule.zero_snr,  # diffusers clips alpha_bar_T to 2**-24 for the solver
               prediction_type="sample", algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
               solver_order=3 if sampler == "dpm++_3m_sde" else 2, lower_order_final=True,
               final_sigmas_type="zero", timestep_spacing="linspace")
