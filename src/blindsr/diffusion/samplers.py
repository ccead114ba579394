"""Samplers as pure functions of (model_fn, x_T, diffusion, generator, guidance, callback).

Denoiser contract: ``model_fn(x_t, t) -> ModelOutput(eps, var_values | None, extras)`` where ``t`` are the
ORIGINAL timestep indices (the sampler maps respaced indices through ``diffusion.timestep_map``).

Guidance hook: ``guidance(state) -> GuidanceResult | None`` sees x_t, t, x0_hat and the model output
(extras included, e.g. BlindDiff's kernel) and may (a) replace x0_hat before the posterior step, or
(b) return a loss whose gradient w.r.t. x_t -- through the network, DPS form (Chung et al. 2023, Alg. 1) --
is subtracted, times ``scale``, from x_{t-1}. A hook whose ``needs_grad`` attribute is False runs the
whole step under ``torch.no_grad``.

Randomness: ``generator`` is one ``torch.Generator`` or a list with one per sample; with a list, every
sample's noise comes from its own generator, so a batch gives the same result as separate runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from blindsr.diffusion.gaussian import GaussianDiffusion, extract

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class ModelOutput:
    """What a denoiser returns: eps prediction, learned-range values (or None) and extras (e.g. kernel)."""

    eps: Tensor
    var_values: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


ModelFn = Callable[[Tensor, Tensor], ModelOutput]


@dataclass
class StepState:
    """One sampling step as seen by guidance hooks and callbacks."""

    step: int  # 0 .. n-1 in sampling order
    t: Tensor  # (B,) index in the (respaced) process
    t_orig: Tensor  # (B,) original timestep given to the model
    x_t: Tensor  # current sample (a grad leaf when the guidance needs gradients)
    x0: Tensor  # predicted x0 (after any replacement by the guidance)
    out: ModelOutput
    x_prev: Tensor | None = None  # the next sample; set before the callback runs


@dataclass
class GuidanceResult:
    x0: Tensor | None = None  # replaces x0_hat before the posterior
    loss: Tensor | None = None  # scalar or (B,); x_{t-1} -= scale * grad_{x_t} loss.sum()
    scale: float | Tensor = 1.0  # float or (B,)


Guidance = Callable[[StepState], GuidanceResult | None]
Callback = Callable[[StepState], None]


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise; a list of generators draws sample i from generator i.

    Noise is drawn on the generator's own device, then moved, so a CPU generator gives the same numbers on
    any device. ``None`` uses the global RNG (not reproducible; library callers pass a generator)."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    return torch.stack([randn(shape[1:], g, device, dtype) for g in gens])


def _bcast(v: float | Tensor, like: Tensor) -> float | Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like) if isinstance(v, Tensor) else v


def _steps(diffusion: GaussianDiffusion, t_start: int | None, progress: bool) -> list[int] | object:
    last = diffusion.num_timesteps - 1 if t_start is None else int(t_start)
    idx = list(range(last, -1, -1))
    if progress:
        from tqdm.auto import tqdm

        return tqdm(idx, desc="sampling", leave=False, dynamic_ncols=True)
    return idx


def _predict(model_fn: ModelFn, diffusion: GaussianDiffusion, x: Tensor, step: int, idx: int,
             guidance: Guidance | None, clip_x0: tuple[float, float] | None, need_grad: bool
             ) -> tuple[StepState, GuidanceResult | None]:
    """Run the model once at respaced index ``idx``; form x0_hat; let the guidance see / replace it."""
    t = torch.full((x.shape[0],), idx, device=x.device, dtype=torch.long)
    x_in = x.detach().requires_grad_(need_grad)
    t_orig = diffusion.original_t(t)
    out = model_fn(x_in, t_orig)
    x0 = diffusion.x0_from_eps(x_in, t, out.eps)
    if clip_x0 is not None:
        x0 = x0.clamp(*clip_x0)
    state = StepState(step=step, t=t, t_orig=t_orig, x_t=x_in, x0=x0, out=out)
    res = guidance(state) if guidance is not None else None
    if res is not None and res.x0 is not None:
        state.x0 = res.x0
    return state, res


def _apply_gradient(x_prev: Tensor, state: StepState, res: GuidanceResult | None) -> Tensor:
    """DPS step: x_{t-1} <- x_{t-1}' - scale * grad_{x_t} loss (the gradient flows through the network)."""
    if res is None or res.loss is None:
        return x_prev
    (grad,) = torch.autograd.grad(res.loss.sum(), state.x_t)
    return x_prev - _bcast(res.scale, x_prev) * grad


def _end_step(x_prev: Tensor, state: StepState, callback: Callback | None) -> Tensor:
    """Detach x_{t-1} (ends the step's graph) and show the finished step to the callback."""
    x = x_prev.detach()
    if callback is not None:
        state.x_prev = x
        callback(state)
    return x


def _needs_grad(guidance: Guidance | None) -> bool:
    return guidance is not None and bool(getattr(guidance, "needs_grad", True))


def ddpm_sample(model_fn: ModelFn, x_T: Tensor, diffusion: GaussianDiffusion, generator: Generators = None, *,
                var_type: str = "auto", clip_x0: tuple[float, float] | None = None, guidance: Guidance | None = None,
                callback: Callback | None = None, progress: bool = False, t_start: int | None = None) -> Tensor:
    """Ancestral sampling (Ho et al. Alg. 2) over ``diffusion`` (respaced or not).

    ``var_type``: ``auto`` (learned range when the model returns var_values, else fixed small),
    ``fixed_small``, ``fixed_large`` or ``learned_range``. ``t_start``: begin at this (respaced) index,
    with x_T the sample at that noise level (SDEdit-style starts)."""
    x, need_grad = x_T, _needs_grad(guidance)
    for step, idx in enumerate(_steps(diffusion, t_start, progress)):
        with torch.enable_grad() if need_grad else torch.no_grad():
            state, res = _predict(model_fn, diffusion, x, step, idx, guidance, clip_x0, need_grad)
            vt = var_type if var_type != "auto" else ("learned_range" if state.out.var_values is not None
                                                      else "fixed_small")
            mean, _, _ = diffusion.q_posterior(state.x0, state.x_t, state.t)  # Ho et al. Eq. 7
            logvar = diffusion.model_logvar(state.t, state.x_t, vt, state.out.var_values)
            x_prev = mean
            if idx > 0:  # no noise on the last step
                x_prev = mean + torch.exp(0.5 * logvar) * randn(x.shape, generator, x.device, x.dtype)
            x_prev = _apply_gradient(x_prev, state, res)
        x = _end_step(x_prev, state, callback)
    return x


def ddim_sample(model_fn: ModelFn, x_T: Tensor, diffusion: GaussianDiffusion, generator: Generators = None, *,
                eta: float = 0.0, clip_x0: tuple[float, float] | None = None, guidance: Guidance | None = None,
                callback: Callback | None = None, progress: bool = False, t_start: int | None = None) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over a respaced process; ``eta = 0`` is deterministic."""
    x, need_grad = x_T, _needs_grad(guidance)
    for step, idx in enumerate(_steps(diffusion, t_start, progress)):
        with torch.enable_grad() if need_grad else torch.no_grad():
            state, res = _predict(model_fn, diffusion, x, step, idx, guidance, clip_x0, need_grad)
            x_t, t, x0 = state.x_t, state.t, state.x0
            eps = diffusion.eps_from_x0(x_t, t, x0)  # consistent with a clipped / replaced x0
            abar = diffusion.abar(t, x_t)
            abar_prev = extract(diffusion.alphas_cumprod_prev, t, x_t)
            sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
            x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and idx > 0:
                x_prev = x_prev + sigma * randn(x.shape, generator, x.device, x.dtype)
            x_prev = _apply_gradient(x_prev, state, res)
        x = _end_step(x_prev, state, callback)
    return x
