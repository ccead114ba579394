"""BlindDiff (Li et al., "BlindDiff: Empowering Degradation Modelling in Diffusion Models for Blind Image
Super-Resolution", 2024): Algorithm 1 (training loss) and Algorithm 2 (kernel-aware sampling).

Paper vs official code (lifengcs/BlindDiff; see research/blinddiff_uddm.md §1.3-1.5), each a switch:

==========================  ===========================  ==========================  ==========
item                        paper                        official code               default
==========================  ===========================  ==========================  ==========
kernel loss                 L1                           MSE on the 441 vector       mse (code)
guidance norm               ||.||^2                      ||.|| (DPS, non-squared)    l2 (code)
downsampling in A(x0)       "↓s"                         MATLAB bicubic x1/4         bicubic
extra 0.1 ||x0_hat|| term   absent                       present                     0.1 (code)
==========================  ===========================  ==========================  ==========

Sampler defaults follow the official code because that code produced the published numbers (and the
non-squared norm is the DPS form whose step size does not depend on the image size); the paper's
variants are one argument away (``norm="l2sq", x0_reg=0``).
Pixel space is [0, 1] (no [-1, 1] rescale) and x0_hat is never clipped inside the loop (official).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blindsr.diffusion.gaussian import GaussianDiffusion, hybrid_loss, mean_flat
from blindsr.diffusion.respace import make_diffusion
from blindsr.diffusion.samplers import (
    Generators,
    GuidanceResult,
    ModelOutput,
    StepState,
    ddim_sample,
    ddpm_sample,
    randn,
)
from blindsr.diffusion.tiling import Box, pad_to_multiple, tiled
from blindsr.errors import BlindSRError, WeightsError
from blindsr.models.mcformer import predicted_kernels, unwrap_model

NORMS = ("l2", "l2sq")
DOWNS = ("bicubic", "stride")
KERNEL_MODES = ("estimated", "bicubic")
SAMPLERS = ("ddpm", "ddim")
PREDICTIONS = ("eps", "x0", "v")


@dataclass
class BlindDiffConfig:
    """Diffusion process and Algorithm-2 defaults of a BlindDiff model."""

    diffusion_steps: int = 1000  # T of the base DDPM process
    schedule: str = "linear"  # DDPM linear betas 1e-4 -> 0.02
    train_respacing: str = "500"  # official: train AND sample on the same 500-step respacing (DiT style)
    sample_steps: int = 500  # default number of sampling steps (official: 500)
    lam: float = 1.0  # step size of the kernel-aware gradient (official alpha = 1)
    lam_ref_steps: int | None = None  # None: lam per step (official). N: lam * N / steps per step, i.e. the total
    #                                   pull of N steps at lam, whatever the step count (same as official at N)
    norm: str = "l2"  # "l2" (official, DPS) | "l2sq" (paper's squared norm)
    down: str = "bicubic"  # "bicubic" (MATLAB, official) | "stride" (s-fold subsampling)
    x0_reg: float = 0.1  # official extra 0.1 * ||x0_hat||_2 in the guidance loss; 0 = paper
    kernel_mode: str = "estimated"  # "estimated" (k_t from the model) | "bicubic" (identity kernel, ablation)
    tile_overlap: int = 32  # HR pixels of overlap between tiles when tiling is on
    sampler: str = "ddpm"  # "ddpm" (ancestral, learned variance: official) | "ddim" (deterministic, eta 0)
    start: float = 1.0  # 1 = from pure noise (Algorithm 2); s < 1: from bicubic↑y noised to s·T (SDEdit/StableSR-style)
    prediction: str = "eps"  # what the network's first 3 channels predict: "eps" (official, paper) | "x0" |
    #                          "v"; guided-diffusion's predict_xstart switch (x0) and Salimans & Ho's v

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlindDiffConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BlindSRError(f"BlindDiff config: unknown key(s) {sorted(unknown)}")
        return cls(**d)

    def __post_init__(self) -> None:
        _check_choice("prediction", self.prediction, PREDICTIONS)

    def train_diffusion(self) -> GaussianDiffusion:
        return make_diffusion(self.diffusion_steps, self.schedule, self.train_respacing)

    def sample_diffusion(self, steps: int | str | None = None) -> GaussianDiffusion:
        return make_diffusion(self.diffusion_steps, self.schedule, steps or self.sample_steps)


@dataclass
class BlindDiffLossConfig:
    """Algorithm 1 loss weights and the paper's ablation switches."""

    mse_weight: float = 1.0  # eps MSE
    vb_weight: float = 1.0  # learned-range VB term (improved-DDPM hybrid loss, mean detached)
    kernel_weight: float = 1.0  # kernel constraint; 0 = "w/o kernel constraint" ablation
    kernel_loss: str = "mse"  # "mse" (official, flat 441 vector) | "l1" (paper)
    learn_sigma: bool = True  # use the variance half of the output (needs out_channels = 6)
    nll_bins: str = "pm1"  # decoder NLL bins at t = 0: "pm1" (official constants) | "unit" ([0, 1] 8-bit)


def _fit_kernel(kernel: Tensor, size: int) -> Tensor:
    """Ground-truth kernels (B, h, w) centred in a (B, size, size) canvas (e.g. 11x11 x2 kernels in 21x21)."""
    kernel = kernel.reshape(kernel.shape[0], *kernel.shape[-2:]) if kernel.ndim == 3 else \
        kernel.reshape(kernel.shape[0], size, size)
    h, w = kernel.shape[-2:]
    if h > size or w > size or (size - h) % 2 or (size - w) % 2:
        raise BlindSRError(f"kernel of size {h}x{w} cannot be centred in the model's {size}x{size} kernel")
    ph, pw = (size - h) // 2, (size - w) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def _uniform_t(n: int, b: int, generator: Generators, device: torch.device) -> Tensor:
    """t ~ U{0..n-1} per sample (one generator, or one per sample), drawn on the generator's device."""
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else device
        return torch.randint(0, n, (b,), generator=generator, device=gdev).to(device)
    return torch.cat([_uniform_t(n, 1, g, device) for g in generator])


def eps_from_prediction(diffusion: GaussianDiffusion, prediction: str, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
    """The network's output in the ``prediction`` parameterisation -> eps (t: index into ``diffusion``)."""
    if prediction == "x0":
        return diffusion.eps_from_x0(x_t, t, pred)
    return diffusion.eps_from_v(x_t, t, pred) if prediction == "v" else pred


def training_losses(model: torch.nn.Module, diffusion: GaussianDiffusion, hr: Tensor, lr: Tensor,
                    kernel: Tensor | None, *, generator: Generators = None,
                    cfg: BlindDiffLossConfig | None = None, prediction: str = "eps") -> dict[str, Tensor]:
    """Algorithm 1 on a batch: scalar ``mse``, ``vb`` (learn_sigma), ``kernel`` (weight > 0) and ``loss``.

    ``diffusion`` is the RESPACED training process (``BlindDiffConfig().train_diffusion()``); t is uniform
    over its steps and the model sees the original timesteps. hr (B, 3, H, W), lr (B, 3, H/s, W/s) in
    [0, 1]; kernel (B, h, w) ground-truth blur kernels (or None when the kernel weight is 0).
    ``prediction``: the regression target of the first 3 output channels — eps (Algorithm 1), x0 or v; the
    loss is the MSE to that target, and the VB term sees the same eps-equivalent either way.
    """
    cfg = cfg or BlindDiffLossConfig()
    _check_choice("prediction", prediction, PREDICTIONS)
    if cfg.kernel_loss not in ("mse", "l1"):
        raise BlindSRError(f"kernel_loss must be 'mse' or 'l1', got {cfg.kernel_loss!r}")
    b, c = hr.shape[:2]
    t = _uniform_t(diffusion.num_timesteps, b, generator, hr.device)
    noise = randn(hr.shape, generator, hr.device, hr.dtype)
    x_t = diffusion.q_sample(hr, t, noise)  # Eq. 2
    out, k_raw = model(x_t, diffusion.original_t(t), lr)
    pred = out[:, :c]
    var_values = None
    if cfg.learn_sigma:
        if out.shape[1] != 2 * c:
            raise BlindSRError("learn_sigma=True needs a model with out_channels = 2 * in_channels")
        var_values = out[:, c:]
    terms = hybrid_loss(diffusion, eps_from_prediction(diffusion, prediction, x_t, t, pred), var_values, noise, hr,
                        x_t, t, bins=cfg.nll_bins)
    if prediction != "eps":  # the MSE term regresses the chosen target itself (not eps)
        target = hr if prediction == "x0" else diffusion.v_from_eps_x0(noise, hr, t)
        terms["mse"] = mean_flat((target.float() - pred.float()) ** 2)
    loss = cfg.mse_weight * terms["mse"] + (cfg.vb_weight * terms["vb"] if "vb" in terms else 0.0)
    if cfg.kernel_weight > 0:
        if kernel is None:
            raise BlindSRError("the kernel loss needs ground-truth kernels (or set kernel_weight=0)")
        k_hat = predicted_kernels(model, k_raw)
        diff = k_hat - _fit_kernel(kernel.to(k_hat), k_hat.shape[-1])
        terms["kernel"] = mean_flat(diff**2 if cfg.kernel_loss == "mse" else diff.abs())
        loss = loss + cfg.kernel_weight * terms["kernel"]
    terms["loss"] = loss
    return {k: v.mean() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------- Algorithm 2
@dataclass
class SRResult:
    sr: Tensor  # (B, 3, sH, sW) in [0, 1]
    kernel: Tensor  # (B, k, k) kernel estimated at the last step
    kernels_traj: Tensor | None = None  # (steps, B, k, k) when return_trajectory
    x0_traj: Tensor | None = None  # (n, B, 3, sH, sW) a few x0_hat snapshots when return_trajectory
    traj_steps: list[int] | None = None  # sampling-step numbers of the x0 snapshots


def degrade(x: Tensor, kernel: Tensor | None, scale: int, down: str = "bicubic") -> Tensor:
    """The measurement operator A(x) = (k ⊗ x)↓s: reflect-pad cross-correlation, then bicubic or stride."""
    from blindsr.degradations import operators

    if kernel is not None:
        x = operators.blur(x, kernel)
    if scale == 1:
        return x
    if down == "bicubic":
        return operators.imresize(x, scale=1.0 / scale)
    return operators.downsample_stride(x, scale)


@dataclass
class KernelGuidance:
    """Algorithm 2's data-consistency step: loss = ||y - (k_t ⊗ x0_hat)↓s|| (+ x0_reg ||x0_hat||), per sample.

    The sampler subtracts ``lam * grad_{x_t} loss`` from x_{t-1}; the gradient flows through x0_hat AND
    the kernel k_t, both produced by the network from x_t."""

    y: Tensor  # (B, 3, h, w) the (padded) LR measurement
    scale: int
    kernel_fn: Callable[[Tensor], Tensor]  # model kernel output -> (B, k, k)
    lam: float = 1.0
    norm: str = "l2"
    down: str = "bicubic"
    x0_reg: float = 0.1
    kernel_mode: str = "estimated"

    @property
    def needs_grad(self) -> bool:
        return self.lam != 0

    def loss(self, x0: Tensor, kernel_raw: Tensor | None) -> Tensor:
        k = self.kernel_fn(kernel_raw) if self.kernel_mode == "estimated" else None  # None = identity kernel
        r = (self.y.float() - degrade(x0.float(), k, self.scale, self.down)).flatten(1)
        loss = r.norm(dim=1) if self.norm == "l2" else r.pow(2).sum(1)
        if self.x0_reg:
            loss = loss + self.x0_reg * x0.float().flatten(1).norm(dim=1)
        return loss

    def __call__(self, state: StepState) -> GuidanceResult | None:
        if self.lam == 0:
            return None
        return GuidanceResult(loss=self.loss(state.x0, state.out.extras.get("kernel")), scale=self.lam)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BlindSRError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class BlindDiffPipeline:
    """Kernel-aware blind SR (Algorithm 2) with an MCFormer: ``pipe(lr, steps=..., generator=...)``."""

    def __init__(self, model: torch.nn.Module, config: BlindDiffConfig | None = None):
        self.model = model
        self.config = config or BlindDiffConfig()
        self._diffusions: dict[Any, GaussianDiffusion] = {}

    @property
    def scale(self) -> int:
        return int(getattr(unwrap_model(self.model).config, "scale", 4))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def diffusion(self, steps: int | str | None = None) -> GaussianDiffusion:
        key = steps or self.config.sample_steps
        if key not in self._diffusions:
            self._diffusions[key] = self.config.sample_diffusion(key)
        return self._diffusions[key]

    def model_fn(self, lr: Tensor) -> Callable[..., ModelOutput]:
        """Denoiser on the full (padded) LR condition; with ``box`` it uses the matching LR crop (tiling)."""
        s, dtype = self.scale, next(self.model.parameters()).dtype
        prediction, base = self.config.prediction, self.diffusion(self.config.diffusion_steps)  # base: original t

        def fn(x: Tensor, t: Tensor, box: Box | None = None) -> ModelOutput:
            cond = lr
            if box is not None:
                cond = lr[..., box.top // s:(box.top + box.height) // s, box.left // s:(box.left + box.width) // s]
            out, k = self.model(x.to(dtype), t, cond.to(dtype))
            out, c = out.float(), x.shape[1]
            eps = eps_from_prediction(base, prediction, x.float(), t, out[:, :c])  # the samplers' contract: eps
            return ModelOutput(eps=eps, var_values=out[:, c:] if out.shape[1] == 2 * c else None,
                               extras={"kernel": k})
        return fn

    def __call__(self, lr: Tensor, *, steps: int | str | None = None, lam: float | None = None,
                 generator: Generators = None, norm: str | None = None, down: str | None = None,
                 x0_reg: float | None = None, kernel_mode: str | None = None, tile: int | None = None,
                 tile_overlap: int | None = None, sampler: str | None = None, start: float | None = None,
                 return_trajectory: bool = False,
                 progress: bool = False) -> SRResult:
        """Super-resolve ``lr`` (B, 3, h, w) in [0, 1]; None arguments take the ``BlindDiffConfig`` defaults.

        ``generator``: one generator, or a list with one per image (then each image's result does not
        depend on the batch it is in). ``tile``: HR tile size for large images (None = whole image)."""
        cfg = self.config
        lam = cfg.lam if lam is None else float(lam)
        norm, down = norm or cfg.norm, down or cfg.down
        kernel_mode = kernel_mode or cfg.kernel_mode
        sampler = sampler or cfg.sampler
        _check_choice("sampler", sampler, SAMPLERS)
        start = cfg.start if start is None else float(start)
        if not 0.0 < start <= 1.0:
            raise BlindSRError(f"start must be in (0, 1], got {start}")
        x0_reg = cfg.x0_reg if x0_reg is None else float(x0_reg)
        _check_choice("norm", norm, NORMS)
        _check_choice("down", down, DOWNS)
        _check_choice("kernel_mode", kernel_mode, KERNEL_MODES)
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise BlindSRError(f"BlindDiff expects LR images (B, 3, h, w), got {tuple(lr.shape)}")
        s, dev = self.scale, self.device
        b, _, h, w = lr.shape
        lr_p = pad_to_multiple(lr.to(dev, torch.float32), 8 // math.gcd(8, s))  # HR side a multiple of 8
        diffusion = self.diffusion(steps)

        fn = self.model_fn(lr_p)
        if tile is not None:
            fn = tiled(fn, tile, cfg.tile_overlap if tile_overlap is None else tile_overlap,
                       align=math.lcm(8, s), pass_box=True)
        step_lam = lam * cfg.lam_ref_steps / diffusion.num_timesteps if cfg.lam_ref_steps else lam
        guidance = KernelGuidance(lr_p, s, lambda raw: predicted_kernels(self.model, raw), step_lam, norm, down,
                                  x0_reg, kernel_mode) if lam != 0 else None

        n = diffusion.num_timesteps
        snap = set(torch.linspace(0, n - 1, min(n, 8)).round().long().tolist()) if return_trajectory else set()
        kernels, x0s, last = [], [], {}

        def callback(state: StepState) -> None:
            k = predicted_kernels(self.model, state.out.extras["kernel"]).detach()
            last["kernel"] = k
            if return_trajectory:
                kernels.append(k.cpu())
                if state.step in snap:
                    x0s.append(state.x0.detach()[..., : s * h, : s * w].clamp(0, 1).cpu())

        x_T = randn((b, 3, lr_p.shape[-2] * s, lr_p.shape[-1] * s), generator, dev)
        t_start = None
        if start < 1.0:  # x_{t0} = q_sample(bicubic↑y, t0): skip the high-noise steps (not Algorithm 2)
            from blindsr.degradations.operators import imresize

            t_start = round(start * (diffusion.num_timesteps - 1))
            up = imresize(lr_p, scale=s).clamp(0, 1)
            x_T = diffusion.q_sample(up, torch.full((b,), t_start, device=dev, dtype=torch.long), x_T)
        was_training = self.model.training
        self.model.eval()
        try:
            if sampler == "ddim":
                x0 = ddim_sample(fn, x_T, diffusion, generator, eta=0.0, guidance=guidance, callback=callback,
                                 progress=progress, t_start=t_start)
            else:
                x0 = ddpm_sample(fn, x_T, diffusion, generator, var_type="auto", guidance=guidance,
                                 callback=callback, progress=progress, t_start=t_start)
        finally:
            self.model.train(was_training)
        if not torch.isfinite(x0).all():  # e.g. a guidance step far too large for the norm: never write NaNs
            raise BlindSRError(f"sampling diverged (non-finite values) with --lambda {lam} --norm {norm}; "
                               "use a smaller --lambda")
        return SRResult(sr=x0[..., : s * h, : s * w].clamp(0, 1), kernel=last["kernel"],
                        kernels_traj=torch.stack(kernels) if return_trajectory else None,
                        x0_traj=torch.stack(x0s) if return_trajectory else None,
                        traj_steps=sorted(snap) if return_trajectory else None)


def sample(model: torch.nn.Module, lr: Tensor, *, config: BlindDiffConfig | None = None, **kwargs: Any) -> SRResult:
    """Functional form of Algorithm 2: ``BlindDiffPipeline(model, config)(lr, **kwargs)``."""
    return BlindDiffPipeline(model, config)(lr, **kwargs)


# ---------------------------------------------------------------------------------------------- loading
def default_model_path() -> Path:
    """The embedded default model (BlindDiff-S) shipped in ``blindsr/weights``."""
    try:
        from blindsr.weights import default_model_path as shipped
    except ImportError:
        return Path(__file__).resolve().parents[1] / "weights" / "blinddiff_s.safetensors"
    return Path(shipped())


def read_config(path: Path) -> dict[str, Any] | None:
    """The JSON config of a checkpoint: safetensors metadata key "config", else a sidecar ``<stem>.json``.

    When both exist, the sidecar's ``"blinddiff"`` section (sampling defaults: steps, lam, ...) overrides the
    metadata's, so inference defaults can be tuned without rewriting the weights; the model section always
    comes from the metadata."""
    cfg = None
    if path.suffix == ".safetensors":
        from blindsr.io.weights import load_safetensors_metadata

        meta = load_safetensors_metadata(path)
        if "config" in meta:
            try:
                cfg = json.loads(meta["config"])
            except json.JSONDecodeError as e:
                raise WeightsError(f"{path}: the 'config' metadata is not valid JSON ({e})") from None
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return cfg
    try:
        side = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{sidecar}: invalid JSON ({e})") from None
    if cfg is None:
        return side
    if "model" in cfg and isinstance(side, dict) and isinstance(side.get("blinddiff"), dict):
        cfg = {**cfg, "blinddiff": {**cfg.get("blinddiff", {}), **side["blinddiff"]}}
    return cfg


def split_config(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MCFormer config, BlindDiff config) from ``{"model": {...}, "blinddiff": {...}}`` or a bare model dict."""
    if "model" in d:
        return dict(d["model"]), dict(d.get("blinddiff", {}))
    return dict(d), {}


def load_pipeline(ckpt: str | Path | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> BlindDiffPipeline:
    """A pipeline from a checkpoint (.safetensors/.pth/...) plus its JSON config; the default model if None.

    Without a config (metadata or sidecar) the MCFormer config is inferred from the weights (official
    checkpoints; scale 4)."""
    from blindsr.io.weights import load_into, load_state_dict
    from blindsr.models.mcformer import MCFormer, MCFormerConfig, load_official

    if ckpt is None:
        path = default_model_path()
        if not path.is_file():
            raise WeightsError(f"the default BlindDiff model is not installed ({path} is missing); "
                               "pass --ckpt FILE")
    else:
        path = Path(ckpt)
        if not path.is_file():
            raise WeightsError(f"checkpoint not found: {path}")
    cfg = read_config(path)
    sd = load_state_dict(path)
    if cfg is None:
        model, bd = load_official(sd), BlindDiffConfig()
    else:
        model_cfg, bd_cfg = split_config(cfg)
        model = MCFormer(MCFormerConfig.from_dict(model_cfg))
        load_into(model, sd, strict=True)
        bd = BlindDiffConfig.from_dict(bd_cfg)
    return BlindDiffPipeline(model.to(device=device, dtype=dtype).eval(), bd)


def save_pipeline(pipe: BlindDiffPipeline, path: str | Path) -> None:
    """Write the model as safetensors with its config in the metadata (what ``load_pipeline`` reads)."""
    from blindsr.io.weights import save_safetensors

    cfg = {"model": unwrap_model(pipe.model).config.to_dict(), "blinddiff": pipe.config.to_dict()}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    save_safetensors(sd, path, metadata={"config": json.dumps(cfg)})
