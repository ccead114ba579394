"""One sampling loop, pluggable steppers.

Denoiser contract (every method): ``model_fn(x_t, t) -> ModelOutput(pred, kind, var_values | None, extras)``
where ``t`` are ORIGINAL timesteps (B,) and ``pred`` is the raw prediction of ``kind`` (eps | x0 | v). The loop
turns it into ``(eps, x0)`` once, with :func:`blindsr.diffusion.parameterization.split`, at the stepper's
alpha_bar.

:func:`sample` runs ``stepper`` from ``x_T``; a stepper knows its timesteps and how to take one step from
``(x_t, eps, x0)``:

- :class:`DDPMStepper`: ancestral sampling (Ho et al. Alg. 2) over a (respaced) process, learned-range or fixed
  variances; our own, because the VB loss and the DPS gradient need its exact posterior;
- :class:`DDIMStepper`: DDIM (Song et al. 2021, Eq. 12) over a respaced process;
- :class:`SchedulerStepper`: any diffusers scheduler (DPM-Solver++, Euler, ...), fed with x0
  (``prediction_type="sample"``) so guidance works the same on every sampler.

:func:`make_stepper` builds one from a sampler name (``SAMPLERS``) and a timestep spacing.

Guidance hook: ``guidance(state) -> GuidanceResult | None`` sees a :class:`StepState` (x_t, t, eps, x0, the
model output with its extras, and ``x0_weight``: the coefficient of x0 in the next sample) and may (a) replace
x0 before the step, or (b) return a loss whose gradient w.r.t. x_t -- through the network, DPS form (Chung et
al. 2023, Alg. 1) -- is subtracted, times ``scale``, from x_{t-1}. A hook whose ``needs_grad`` attribute is
False runs the whole step under ``torch.no_grad``. A callback sees the finished step (``state.x_prev`` set).

Randomness: ``generator`` is one ``torch.Generator`` or a list with one per sample (diffusers'
``randn_tensor``); with a list every sample's noise comes from its own generator, so a batch gives the same
result as separate runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from blindsr.diffusion.gaussian import GaussianDiffusion, extract
from blindsr.diffusion.parameterization import eps_from_x0, split
from blindsr.diffusion.respace import respaced, space_timesteps
from blindsr.errors import BlindSRError
from blindsr.ops.progress import Progress, progress_bar
from blindsr.registry import SAMPLERS

Generators = torch.Generator | Sequence[torch.Generator] | None
SPACINGS = ("linspace", "leading")


@dataclass
class ModelOutput:
    """A denoiser's raw output: the prediction of ``kind``, learned-range values (or None) and extras."""

    pred: Tensor
    kind: str = "eps"
    var_values: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


ModelFn = Callable[[Tensor, Tensor], ModelOutput]


@dataclass
class StepState:
    """One sampling step as seen by guidance hooks and callbacks."""

    step: int  # 0 .. n-1 in sampling order
    t: Tensor  # (B,) original timestep given to the model
    x_t: Tensor  # current sample (a grad leaf when the guidance needs gradients)
    eps: Tensor
    x0: Tensor  # predicted x0 (after any replacement by the guidance)
    out: ModelOutput
    x0_weight: float  # the stepper's coefficient of x0 in the next sample (ddpm, ddim; 1 for diffusers solvers)
    x_prev: Tensor | None = None  # the next sample; set before the callback runs


@dataclass
class GuidanceResult:
    x0: Tensor | None = None  # replaces x0 before the step
    loss: Tensor | None = None  # scalar or (B,); x_{t-1} -= scale * grad_{x_t} loss.sum()
    scale: float | Tensor = 1.0  # float or (B,)


Guidance = Callable[[StepState], GuidanceResult | None]
Callback = Callable[[StepState], None]


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise (diffusers ``randn_tensor``): drawn on the generator's device, then moved, so a
    CPU generator gives the same numbers on any device; a list of generators draws sample i from generator i."""
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, Sequence) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


# ---------------------------------------------------------------------------------------------- steppers
class _ProcessStepper:
    """Shared part of the DDPM and DDIM steppers: a (respaced) process walked from ``t_start`` down to 0."""

    init_noise_sigma = 1.0  # x_T = noise (variance-preserving samples)

    def __init__(self, process: GaussianDiffusion, t_start: int | None = None):
        self.process = process
        last = process.num_timesteps - 1 if t_start is None else int(t_start)
        self.indices = list(range(last, -1, -1))  # indices into the (respaced) process

    def __len__(self) -> int:
        return len(self.indices)

    def timestep(self, i: int) -> int:
        return int(self.process.timestep_map[self.indices[i]])

    def abar(self, i: int, like: Tensor) -> Tensor:
        return self.process.abar(self._idx(i, like), like)

    def model_input(self, i: int, x: Tensor) -> Tensor:
        return x

    def _idx(self, i: int, like: Tensor) -> Tensor:
        return torch.full((like.shape[0],), self.indices[i], device=like.device, dtype=torch.long)


class DDPMStepper(_ProcessStepper):
    """Ancestral step: x_{t-1} ~ N(posterior mean(x0, x_t), Sigma) (Ho et al. Eq. 7).

    ``var_type``: ``auto`` (learned range when the model returns var_values, else fixed small),
    ``fixed_small``, ``fixed_large`` or ``learned_range``."""

    def __init__(self, process: GaussianDiffusion, var_type: str = "auto", t_start: int | None = None):
        super().__init__(process, t_start)
        self.var_type = var_type

    def x0_weight(self, i: int) -> float:
        return float(self.process.posterior_mean_coef1[self.indices[i]])

    def step(self, i: int, state: StepState, generator: Generators) -> Tensor:
        idx = self._idx(i, state.x_t)
        var_values = state.out.var_values
        vt = self.var_type if self.var_type != "auto" else ("learned_range" if var_values is not None
                                                              else "fixed_small")
        mean, _, _ = self.process.q_posterior(state.x0, state.x_t, idx)
        if self.indices[i] == 0:  # no noise on the last step
            return mean
        logvar = self.process.model_logvar(idx, state.x_t, vt, var_values)
        x = state.x_t
        return mean + torch.exp(0.5 * logvar) * randn(x.shape, generator, x.device, x.dtype)


class DDIMStepper(_ProcessStepper):
    """DDIM: x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z; ``eta = 0`` is deterministic."""

    def __init__(self, process: GaussianDiffusion, eta: float = 0.0, t_start: int | None = None):
        super().__init__(process, t_start)
        self.eta = eta

    def x0_weight(self, i: int) -> float:
        j = self.indices[i]
        a, a_prev = float(self.process.alphas_cumprod[j]), float(self.process.alphas_cumprod_prev[j])
        return math.sqrt(a_prev) - math.sqrt((1 - a_prev - self._sigma2(a, a_prev)) * a / (1 - a))

    def _sigma2(self, a: float, a_prev: float) -> float:
        return self.eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)

    def step(self, i: int, state: StepState, generator: Generators) -> Tensor:
        x_t, idx = state.x_t, self._idx(i, state.x_t)
        abar = self.process.abar(idx, x_t)
        abar_prev = extract(self.process.alphas_cumprod_prev, idx, x_t)
        sigma = self.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x_prev = abar_prev.sqrt() * state.x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * state.eps
        if self.eta > 0 and self.indices[i] > 0:
            x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return x_prev


class SchedulerStepper:
    """A diffusers scheduler as a stepper, fed with x0 (its config must have ``prediction_type="sample"``).

    ``base`` is the model's training process: its alpha_bar splits the prediction (exact at zero terminal SNR,
    where diffusers clips alpha_bar_T for its own solver). Samplers that work on sigma-scaled samples (Euler:
    x = x0 + sigma eps) give the model ``scheduler.scale_model_input(x)`` = x / sqrt(1 + sigma^2), the
    variance-preserving x_t; x_T must then be scaled by ``init_noise_sigma``."""

    def __init__(self, scheduler, base: GaussianDiffusion, steps: int, device: torch.device | str = "cpu",
                 noise: bool = False):
        if scheduler.config.prediction_type != "sample":
            raise ValueError("SchedulerStepper feeds x0: build the scheduler with prediction_type='sample'")
        self.scheduler, self.base, self.noise, self.steps, self.device = scheduler, base, noise, steps, device
        self._reset()
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self.sigma_space = self.init_noise_sigma != 1.0  # Euler-type: samples are x0 + sigma * eps
        self._x: Tensor | None = None  # the current sample in the scheduler's own coordinates

    def _reset(self) -> None:
        """(Re)start the scheduler: a multistep solver keeps the previous outputs, so every run starts afresh."""
        import warnings

        with warnings.catch_warnings():  # numpy-2 DeprecationWarning inside diffusers' sigma computation
            warnings.simplefilter("ignore", DeprecationWarning)
            self.scheduler.set_timesteps(self.steps, device=self.device)

    def __len__(self) -> int:
        return len(self.scheduler.timesteps)

    def timestep(self, i: int) -> int:
        return int(self.scheduler.timesteps[i])

    def abar(self, i: int, like: Tensor) -> Tensor:
        t = torch.full((like.shape[0],), self.timestep(i), dtype=torch.long)
        return extract(self.base.alphas_cumprod, t, like)

    def model_input(self, i: int, x: Tensor) -> Tensor:
        if i == 0 and self._x is not None:  # a second run of the same stepper
            self._reset()
        self._x = x
        return self.scheduler.scale_model_input(x, self.scheduler.timesteps[i]) if self.sigma_space else x

    def x0_weight(self, i: int) -> float:
        return 1.0  # guidance moves x0 itself (DiffBIR official for its DPM solvers): no step-size correction

    def step(self, i: int, state: StepState, generator: Generators) -> Tensor:
        x = self._x
        kw = {"variance_noise": randn(x.shape, generator, x.device, x.dtype)} if self.noise else {}
        return self.scheduler.step(state.x0, self.scheduler.timesteps[i], x, **kw).prev_sample


def timesteps_for(spacing: str, steps: int, T: int) -> list[int]:
    """Original timesteps of a ``steps``-step sampler: ``linspace`` (IDDPM respacing: evenly spaced, both ends
    included; guided-diffusion / BlindDiff) or ``leading`` (LDM DDIM "uniform": 1, 1 + T/S, ...; diffusers
    ``timestep_spacing="leading", steps_offset=1``). One ``linspace`` step is t = T-1 (x0 predicted from pure
    noise): IDDPM's respacing would keep only t = 0, where the model takes the noise for a clean image."""
    if steps < 1:
        raise BlindSRError("--steps must be at least 1")
    if spacing == "linspace":
        return [T - 1] if steps == 1 else space_timesteps(T, str(steps))
    if spacing == "leading":
        c = T // steps
        return [i * c + 1 for i in range(steps) if i * c + 1 < T]
    raise BlindSRError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def _diffusers_scheduler(sampler: str, betas: Tensor, zero_snr: bool):
    """diffusers' scheduler for ``sampler`` from an explicit config (no hub): our betas, x0 model outputs.
    With ``zero_snr`` the betas are the un-rescaled ones: diffusers rescales them itself and clips alpha_bar_T
    to 2**-24 for the solver."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=betas.numel(), trained_betas=betas.numpy(), rescale_betas_zero_snr=zero_snr,
                  prediction_type="sample")
    if sampler == "euler":  # SD-Turbo's scheduler: trailing timesteps (integers, t = 999 first)
        return EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler(
        **common, algorithm_type="sde-dpmsolver++" if sampler.endswith("sde") else "dpmsolver++",
        solver_order=3 if sampler == "dpm++_3m_sde" else 2, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="linspace")


def make_stepper(sampler: str, base: GaussianDiffusion, steps: int, *, spacing: str = "linspace",
                 var_type: str = "auto", eta: float = 0.0, t_start: float | None = None,
                 unrescaled_betas: Tensor | None = None, device: torch.device | str = "cpu"):
    """The stepper of a named sampler (``SAMPLERS``) over the model's training process ``base``.

    ``spacing`` (ddpm / ddim): see :func:`timesteps_for`. The caller draws x_T as noise times
    ``stepper.init_noise_sigma`` (1 except for Euler, whose samples live in sigma space). ``t_start`` (ddpm / ddim): the fraction of the
    process to run, ending at t = 0 (SDEdit-style; the caller noises x_T to ``stepper.timestep(0)``).
    ``unrescaled_betas``: for a zero-terminal-SNR ``base``, its betas before the rescale (diffusers' solvers
    rescale them themselves)."""
    if sampler not in SAMPLERS:
        raise BlindSRError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler in ("ddpm", "ddim"):
        process = respaced(base, timesteps_for(spacing, steps, base.num_timesteps))
        start = None if t_start is None else round(t_start * (process.num_timesteps - 1))
        if sampler == "ddpm":
            return DDPMStepper(process, var_type, start)
        return DDIMStepper(process, eta, start)
    if t_start is not None:
        raise BlindSRError(f"the {sampler} sampler always starts from pure noise")
    if steps < 1:
        raise BlindSRError("--steps must be at least 1")
    zero_snr = unrescaled_betas is not None
    betas = unrescaled_betas if zero_snr else base.betas
    return SchedulerStepper(_diffusers_scheduler(sampler, betas, zero_snr), base, steps, device,
                            noise=sampler.endswith("sde"))


# ---------------------------------------------------------------------------------------------- the loop
def _bcast(v: float | Tensor, like: Tensor) -> float | Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like) if isinstance(v, Tensor) else v


def _needs_grad(guidance: Guidance | None) -> bool:
    return guidance is not None and bool(getattr(guidance, "needs_grad", True))


def sample(model_fn: ModelFn, x_T: Tensor, stepper, generator: Generators = None, *,
           clip_x0: tuple[float, float] | None = None, guidance: Guidance | None = None,
           callback: Callback | None = None, progress: Progress = False) -> Tensor:
    """Run ``stepper`` from ``x_T`` (the sample at ``stepper.timestep(0)``); returns the final sample.
    ``progress``: False, True (a tqdm bar) or ``report(done, total)`` per step (``ops.progress``)."""
    x, need_grad = x_T, _needs_grad(guidance)
    if need_grad and getattr(stepper, "sigma_space", False):
        raise BlindSRError("gradient guidance needs a variance-preserving sampler (ddpm, ddim, dpm++)")
    bar = progress_bar(len(stepper), progress, "sampling")  # an exception (a cancel) leaves it to the GC
    for i in range(len(stepper)):
        with torch.enable_grad() if need_grad else torch.no_grad():
            x_in = stepper.model_input(i, x.detach()).requires_grad_(need_grad)
            t = torch.full((x.shape[0],), stepper.timestep(i), device=x.device, dtype=torch.long)
            out = model_fn(x_in, t)
            abar = stepper.abar(i, x_in)
            eps, x0 = split(out.pred, out.kind, x_in, abar)
            if clip_x0 is not None:
                x0 = x0.clamp(*clip_x0)
            state = StepState(step=i, t=t, x_t=x_in, eps=eps, x0=x0, out=out, x0_weight=stepper.x0_weight(i))
            res = guidance(state) if guidance is not None else None
            if res is not None and res.x0 is not None:
                state.x0 = res.x0
            if state.x0 is not x0 or clip_x0 is not None:  # keep eps consistent with a changed x0 (DDIM)
                state.eps = eps_from_x0(x_in, state.x0, abar)
            grad = None
            if res is not None and res.loss is not None:  # DPS: the gradient flows through the network
                (grad,) = torch.autograd.grad(res.loss.sum(), x_in)  # first: frees the loss graph before the step
            with torch.no_grad():  # the step itself needs no graph
                x_prev = stepper.step(i, state, generator)
                if grad is not None:
                    x_prev = x_prev - _bcast(res.scale, x_prev) * grad
        x = x_prev.detach()  # ends the step's graph
        if callback is not None:
            state.x_prev = x
            callback(state)
        # free this step's image-sized tensors now, not when the next step overwrites the names
        del state, out, res, eps, x0, x_in, x_prev, grad
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x
