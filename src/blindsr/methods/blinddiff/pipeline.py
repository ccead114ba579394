"""BlindDiff Algorithm 2: kernel-aware sampling with an MCFormer, and loading / saving pipelines.

Each respaced step runs MCFormer once (prediction, learned variance, kernel k_t), forms x̂0, takes the posterior
step and subtracts λ∇‖y − (k_t ⊗ x̂0)↓s‖ (:class:`KernelGuidance`, DPS form through the network). Defaults and
the paper-vs-code switches are in ``BlindDiffConfig`` (``config.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blindsr.config import from_dict, to_dict
from blindsr.degradations.kernel_fit import fit_gaussian_kernel
from blindsr.diffusion.samplers import (
    Generators,
    GuidanceResult,
    ModelOutput,
    StepState,
    make_stepper,
    randn,
    sample,
)
from blindsr.diffusion.tiling import tiled
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.base import SRResult
from blindsr.methods.blinddiff.config import PROCESS_FIELDS, BlindDiffConfig
from blindsr.models.mcformer import predicted_kernels, unwrap_model
from blindsr.ops.progress import Progress, progress_bar
from blindsr.ops.resize import pad_to_multiple
from blindsr.ops.tiling import Box, tile_boxes


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


class BlindDiffPipeline:
    """Kernel-aware blind SR (Algorithm 2) with an MCFormer: ``pipe(lr, steps=..., generator=...)``."""

    def __init__(self, model: torch.nn.Module, config: BlindDiffConfig | None = None):
        self.model = model
        self.config = config or BlindDiffConfig()
        self._base = self.config.base_diffusion()

    @property
    def scale(self) -> int:
        return int(getattr(unwrap_model(self.model).config, "scale", 4))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_fn(self, lr: Tensor) -> Callable[..., ModelOutput]:
        """Denoiser on the full (padded) LR condition; with ``box`` it uses the matching LR crop (tiling)."""
        s, dtype, kind = self.scale, next(self.model.parameters()).dtype, self.config.prediction

        def fn(x: Tensor, t: Tensor, box: Box | None = None) -> ModelOutput:
            cond = lr
            if box is not None:
                cond = lr[..., box.top // s:(box.top + box.height) // s, box.left // s:(box.left + box.width) // s]
            out, k = self.model(x.to(dtype), t, cond.to(dtype))
            out, c = out.float(), x.shape[1]
            return ModelOutput(pred=out[:, :c], kind=kind, var_values=out[:, c:] if out.shape[1] == 2 * c else None,
                               extras={"kernel": k})
        return fn

    def __call__(self, lr: Tensor, *, steps: int | None = None, generator: Generators = None,
                 return_trajectory: bool = False, progress: Progress = False, max_memory: int | None = None,
                 **overrides: Any) -> SRResult:
        """Super-resolve ``lr`` (B, 3, h, w) in [0, 1].

        ``steps``: sampling steps (default ``config.sample_steps``); ``overrides``: any other
        ``BlindDiffConfig`` field for this call (``lam``, ``norm``, ``tile``, ``sampler``, ...; None = the
        config's). ``generator``: one generator, or a list with one per image (then each image's result does
        not depend on the batch it is in). ``max_memory``: bytes the sampling of this call may use; when no
        ``tile`` is set, the denoiser is tiled just enough to fit it (:meth:`auto_tile`).
        ``progress``: one bar over steps x tiles (True: tqdm; or ``report(done, total)``, ``ops.progress``)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if steps is not None:
            changes["sample_steps"] = steps
        unknown = set(changes) - {f.name for f in dataclasses.fields(BlindDiffConfig)}
        if unknown:
            raise TypeError(f"unknown BlindDiff setting(s): {', '.join(sorted(unknown))}")
        fixed = sorted(k for k in set(changes) & set(PROCESS_FIELDS) if changes[k] != getattr(self.config, k))
        if fixed:
            raise BlindSRError(f"{', '.join(fixed)}: a property of the model (set in its config), not of a call")
        cfg = dataclasses.replace(self.config, **changes)  # validates every choice
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise BlindSRError(f"BlindDiff expects LR images (B, 3, h, w), got {tuple(lr.shape)}")
        s, dev = self.scale, self.device
        b, _, h, w = lr.shape
        lr_p = pad_to_multiple(lr.to(dev, torch.float32), 8 // math.gcd(8, s))  # HR side a multiple of 8
        stepper = make_stepper(cfg.sampler, self._base, cfg.sample_steps, spacing="linspace",
                               t_start=cfg.start if cfg.start < 1.0 else None)
        fn = self.model_fn(lr_p)
        H, W = lr_p.shape[-2] * s, lr_p.shape[-1] * s
        tile = cfg.tile if cfg.tile is not None or max_memory is None else \
            self.auto_tile(b, H, W, max_memory, guided=cfg.lam != 0, overlap=cfg.tile_overlap)
        n_tiles = 1 if tile is None else len(tile_boxes(H, W, tile, cfg.tile_overlap, math.lcm(8, s)))
        bar = progress_bar(len(stepper) * n_tiles, progress, "sampling")
        if tile is not None:
            fn = tiled(fn, tile, cfg.tile_overlap, align=math.lcm(8, s), pass_box=True,
                       on_tile=bar.update if bar is not None else None)
        elif bar is not None:
            fn = _counting(fn, bar)
        n = stepper.process.num_timesteps
        step_lam = cfg.lam * cfg.lam_ref_steps / n if cfg.lam_ref_steps else cfg.lam
        guidance = KernelGuidance(lr_p, s, lambda raw: predicted_kernels(self.model, raw), step_lam, cfg.norm,
                                  cfg.down, cfg.x0_reg, cfg.kernel_mode) if cfg.lam != 0 else None

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
        if cfg.start < 1.0:  # x_{t0} = q_sample(bicubic↑y, t0): skip the high-noise steps (not Algorithm 2)
            from blindsr.degradations.operators import imresize

            t0 = torch.full((b,), stepper.indices[0], device=dev, dtype=torch.long)
            x_T = stepper.process.q_sample(imresize(lr_p, scale=s).clamp(0, 1), t0, x_T)
        was_training = self.model.training
        self.model.eval()
        try:
            x0 = sample(fn, x_T, stepper, generator, guidance=guidance, callback=callback)
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        if not torch.isfinite(x0).all():  # e.g. a guidance step far too large for the norm: never write NaNs
            raise BlindSRError(f"sampling diverged (non-finite values) with --lambda {cfg.lam} --norm {cfg.norm}; "
                               "use a smaller --lambda")
        sr, kernel = x0[..., : s * h, : s * w].clamp(0, 1), last["kernel"]
        if cfg.kernel_estimate == "fit":  # the measurement's own kernel given the result (kernel_fit.py)
            kernel = fit_gaussian_kernel(sr, lr, s, size=kernel.shape[-1], down=cfg.down)
        return SRResult(sr=sr, kernel=kernel,
                        kernels_traj=torch.stack(kernels) if return_trajectory else None,
                        x0_traj=torch.stack(x0s) if return_trajectory else None,
                        traj_steps=sorted(snap) if return_trajectory else None)


    def auto_tile(self, batch: int, height: int, width: int, budget: int, *, guided: bool = True,
                  overlap: int = 32) -> int | None:
        """The HR tile that keeps one sampling step of ``batch`` images within ``budget`` bytes (None: no tiling
        needed). ``budget`` is what the step may use on top of what is already held (the CLI measures the
        process once, after loading the model, so the tile depends only on the image size and the budget).

        Per tile pixel: the model's activations (``MCFormerConfig.activation_bytes_per_pixel``; with the
        guidance, one tile's forward + backward: the backward revisits the tiles one at a time,
        ``diffusion.tiling``), times 1.25 for a tile (measured: 1.12 on a 272² tile of Lincoln). Per image
        pixel: 160 bytes for the full-size sample, the blended outputs, x0, the guidance loss and its gradient,
        the next sample (measured about 115 on CPU: LR 160² and 240² with 96-pixel tiles) -- the part that is
        never tiled, so it bounds the largest output (about 4000² within 3 GiB)."""
        from blindsr.ops.tiling import choose_tile

        act = batch * unwrap_model(self.model).config.activation_bytes_per_pixel(grad=guided)
        return choose_tile(height, width, budget, 1.25 * act, batch * 160.0, align=math.lcm(8, self.scale),
                           overlap=overlap, whole_per_pixel=act + batch * 160.0)


def _counting(fn: Callable[..., ModelOutput], bar) -> Callable[..., ModelOutput]:
    """``fn`` that advances ``bar`` once per call (an untiled denoiser: once per step)."""
    def counted(x: Tensor, t: Tensor) -> ModelOutput:
        out = fn(x, t)
        bar.update(1)
        return out
    return counted


# ---------------------------------------------------------------------------------------------- loading
def default_model_path() -> Path:
    """The embedded default model (BlindDiff-S) shipped in ``blindsr/weights``."""
    from blindsr.weights import default_model_path as shipped

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
    from blindsr.io.weights import check_finite, load_into, load_state_dict
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
    check_finite(sd, path)
    if cfg is None:
        model, bd = load_official(sd), BlindDiffConfig()
    else:
        model_cfg, bd_cfg = split_config(cfg)
        model = MCFormer(MCFormerConfig.from_official(model_cfg))
        load_into(model, sd, strict=True)
        bd = from_dict(BlindDiffConfig, bd_cfg, "blinddiff")
    # frozen: the guidance gradient is taken w.r.t. x_t only (compiled blocks would otherwise form weight grads)
    return BlindDiffPipeline(model.to(device=device, dtype=dtype).eval().requires_grad_(False), bd)


def save_pipeline(pipe: BlindDiffPipeline, path: str | Path) -> None:
    """Write the model as safetensors with its config in the metadata (what ``load_pipeline`` reads)."""
    from blindsr.io.weights import save_safetensors

    cfg = {"model": to_dict(unwrap_model(pipe.model).config), "blinddiff": to_dict(pipe.config)}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in pipe.model.state_dict().items()}
    save_safetensors(sd, path, metadata={"config": json.dumps(cfg)})
