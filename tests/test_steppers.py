"""Conformance of the steppers in ``blindsr.diffusion.samplers`` with diffusers' schedulers.

Each test runs our loop (:func:`sample` + :func:`make_stepper`) and a plain diffusers loop
(``scale_model_input`` -> model -> ``step``) from the same x_T with the same deterministic toy denoiser, and
compares the whole trajectory (every step's sample), not only the end point.

The toy (:class:`ToyDenoiser`) is the exact posterior-mean denoiser of per-channel Gaussian data
x0 ~ N(m, c^2) plus a small smooth channel-mixing term: trajectories stay bounded (so absolute tolerances
mean something) and the prediction depends nonlinearly on (x, t). It returns the raw prediction of its kind
(eps or v); our loop splits it at the stepper's alpha_bar, the diffusers loop hands it to a scheduler
configured with the matching ``prediction_type``.

Precision: diffusers keeps alpha_bar in float32. Where its step math runs in the sample's dtype (DDPM,
DDIM), the tests give the scheduler the same alpha_bar in float64 (after checking its own float32 copy
against ours), so they compare the per-step formulas to ~1e-10 rather than float32 rounding (DDPM's
1 - abar_t / abar_prev loses ~1e-3 relative in float32 at small t). DPM-Solver and Euler upcast to float32
inside ``step``; those tests use float32 tolerances.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from torch import Tensor

from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.samplers import ModelOutput, make_stepper, randn, sample, timesteps_for
from blindsr.diffusion.schedules import get_betas

T = 1000
SHAPE = (2, 3, 8, 8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ToyDenoiser:
    """Exact E[eps | x_t] or E[v | x_t] for data x0 ~ N(m, c^2) per channel under ``abar`` (the model's
    training schedule), plus ``k tanh(W x) (1 + t / T)``, k = 0.05 for v and 0.05 sqrt(abar) for eps (whose
    x0 error is its eps error / sqrt(abar)). float64, deterministic, batch-independent; records its calls."""

    def __init__(self, abar: Tensor, kind: str):
        g = gen(7)
        self.abar, self.kind = abar, kind
        self.m = (0.5 * torch.randn(3, generator=g, dtype=torch.float64)).view(1, 3, 1, 1)
        self.c = (0.5 + torch.rand(3, generator=g, dtype=torch.float64)).view(1, 3, 1, 1)
        self.w = 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
        self.calls: list[tuple[int, Tensor]] = []  # (t, x) as seen by the model

    def raw(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((int(t[0]), x.detach().clone()))
        a2 = self.abar[t.long()].to(x).view(-1, 1, 1, 1)
        a, s = a2.sqrt(), (1 - a2).sqrt()
        r = (x - a * self.m) / (a2 * self.c**2 + s**2)  # (x_t - E x_t) / Var x_t
        eps, x0 = s * r, self.m + a * self.c**2 * r
        pred, amp = (eps, 0.05 * a) if self.kind == "eps" else (a * eps - s * x0, 0.05)
        wiggle = torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x)) * (1 + t.view(-1, 1, 1, 1) / T)
        return pred + amp * wiggle

    def __call__(self, x: Tensor, t: Tensor) -> ModelOutput:
        return ModelOutput(pred=self.raw(x, t), kind=self.kind)


def run_ours(model: ToyDenoiser, x_T: Tensor, stepper, generator=None) -> tuple[list[Tensor], list]:
    """Our loop; returns every step's sample and every step's :class:`StepState`."""
    states: list = []
    sample(model, x_T, stepper, generator, callback=states.append)
    return [s.x_prev for s in states], states


def run_diffusers(model: ToyDenoiser, x_T: Tensor, scheduler, generator=None, adjust=None) -> list[Tensor]:
    """The plain diffusers loop fed the raw prediction (passed through ``adjust(t, x_in, pred)`` if given);
    returns every step's sample."""
    xs, x = [], x_T
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = model.raw(x_in, torch.full((x.shape[0],), int(t), dtype=torch.long))
        if adjust is not None:
            out = adjust(int(t), x_in, out)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
        xs.append(x)
    return xs


def assert_trajectories_close(ours: list[Tensor], theirs: list[Tensor], **tol) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b.to(a.dtype), msg=lambda m, i=i: f"step {i}: {m}", **tol)


def float64_schedule(scheduler, base: GaussianDiffusion):
    """Give a DDPM / DDIM scheduler ``base``'s alpha_bar in float64 (the same numbers as its float32 copy)."""
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), base.alphas_cumprod, rtol=1e-5, atol=0)
    f64 = torch.float64
    scheduler.alphas_cumprod = base.alphas_cumprod.clone()
    scheduler.one = torch.tensor(1.0, dtype=f64)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM
        final = torch.tensor(1.0, dtype=f64) if scheduler.config.set_alpha_to_one else base.alphas_cumprod[0]
        scheduler.final_alpha_cumprod = final.clone()
    return scheduler


def set_timesteps(scheduler, steps: int):
    with warnings.catch_warnings():  # numpy-2 DeprecationWarning inside some diffusers' sigma computations
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps)
    return scheduler


@pytest.fixture(scope="module")
def linear_base() -> GaussianDiffusion:
    return GaussianDiffusion(get_betas("linear", T))


@pytest.fixture(scope="module")
def sd_base() -> GaussianDiffusion:
    return GaussianDiffusion(get_betas("scaled_linear", T))


# ------------------------------------------------------------------------------------------------ timesteps
STEP_COUNTS = [1, 2, 3, 7, 10, 20, 25, 30, 49, 50, 51, 99, 100, 250, 333, 500, 501, 999]


@pytest.mark.parametrize("steps", [*STEP_COUNTS, 1000])
def test_linspace_timesteps_are_iddpm_respacing(steps):
    """IDDPM respacing (guided-diffusion, BlindDiff, LDM/StableSR): the stride (T - 1)/(N - 1) accumulated in
    floats, each position rounded half to even. diffusers' linspace rounds j (T - 1)/(N - 1) directly, which
    lands one step off for some N (e.g. 501): at most 1 apart. N = 1 on purpose: both keep t = 0 only, where a
    one-step sampler returns its noise; ours is T - 1."""
    ref = set_timesteps(DDPMScheduler(num_train_timesteps=T, timestep_spacing="linspace"), steps)
    ours = timesteps_for("linspace", steps, T)
    if steps == 1:
        assert ref.timesteps.tolist() == [0] and ours == [T - 1]
        return
    position, iddpm = 0.0, []
    for _ in range(steps):
        iddpm.append(round(position))
        position += (T - 1) / (steps - 1)
    assert ours == iddpm
    assert len(ours) == steps and ours[0] == 0 and ours[-1] == T - 1
    assert max(abs(a - b) for a, b in zip(ours, sorted(ref.timesteps.tolist()), strict=True)) <= 1


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("cls", ["DDIM", "DDPM"])
def test_leading_timesteps_match_diffusers(cls, steps):
    """1 + k (T // N), k = 0..N-1, == diffusers' ``timestep_spacing="leading", steps_offset=1``."""
    scheduler = {"DDIM": DDIMScheduler, "DDPM": DDPMScheduler}[cls]
    ref = set_timesteps(scheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=1), steps)
    ours = timesteps_for("leading", steps, T)
    assert ours == sorted(ref.timesteps.tolist()) and len(ours) == steps


def test_leading_timesteps_drop_the_out_of_range_step():
    """N = T: diffusers' leading rule gives t = T (no such training step); ours drops it."""
    ref = set_timesteps(DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=1), T)
    assert ref.timesteps.max().item() == T
    assert timesteps_for("leading", T, T) == sorted(t for t in ref.timesteps.tolist() if t < T)


# ------------------------------------------------------------------------------------------------ DDPM
def ddpm_scheduler(base: GaussianDiffusion, spacing: str, steps: int, f64: bool = True):
    s = DDPMScheduler(num_train_timesteps=T, trained_betas=base.betas.numpy(), variance_type="fixed_small",
                      clip_sample=False, timestep_spacing=spacing, steps_offset=int(spacing == "leading"))
    if steps == 1 and spacing == "linspace":  # ours: t = T-1 on purpose (diffusers' linspace keeps t = 0)
        s.set_timesteps(timesteps=[T - 1])
    else:
        set_timesteps(s, steps)
    return float64_schedule(s, base) if f64 else s


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_ddpm_matches_diffusers_with_the_same_noise(linear_base, spacing, steps):
    """Ancestral DDPM over the respaced process == DDPMScheduler on the same timesteps, step by step.

    Same noise: both draw one ``randn_tensor(x.shape, generator)`` per step with t > 0 (ours: every step but
    the last), so identically seeded generators line up and the whole stochastic trajectory must agree,
    which tests the posterior mean (the coefficients of x0 and x_t) and the fixed-small posterior std
    together. At a last step t = 1 (leading spacing) diffusers adds sqrt(1e-20) z (its clamped zero
    variance) and ours nothing: hence atol 1e-9 (measured 3e-10; 1e-15 with linspace)."""
    stepper = make_stepper("ddpm", linear_base, steps, spacing=spacing, var_type="fixed_small")
    ref = ddpm_scheduler(linear_base, spacing, steps)
    assert [stepper.timestep(i) for i in range(len(stepper))] == ref.timesteps.tolist()
    model = ToyDenoiser(linear_base.alphas_cumprod, "eps")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, _ = run_ours(model, x_T, stepper, gen(1))
    assert_trajectories_close(ours, run_diffusers(model, x_T, ref, gen(1)), atol=1e-9, rtol=1e-9)
    assert ours[-1].abs().max() < 10  # the toy keeps samples bounded
    if steps > 1:  # the noise really enters: the variance is tested, not only the mean
        again = make_stepper("ddpm", linear_base, steps, spacing=spacing, var_type="fixed_small")
        other, _ = run_ours(model, x_T, again, gen(2))
        assert (other[-1] - ours[-1]).abs().max() > 1e-3  # 2 steps: one draw of std ~0.01


def test_ddpm_agrees_with_diffusers_float32_schedule(linear_base):
    """With diffusers' own float32 alpha_bar the 50-step trajectory agrees to float32 rounding (2e-5)."""
    stepper = make_stepper("ddpm", linear_base, 50, var_type="fixed_small")
    ref = ddpm_scheduler(linear_base, "linspace", 50, f64=False)
    model = ToyDenoiser(linear_base.alphas_cumprod, "eps")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, _ = run_ours(model, x_T, stepper, gen(1))
    assert_trajectories_close(ours, run_diffusers(model, x_T, ref, gen(1)), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ DDIM
def ddim_scheduler(base: GaussianDiffusion, steps: int, set_alpha_to_one: bool):
    s = DDIMScheduler(num_train_timesteps=T, trained_betas=base.betas.numpy(), steps_offset=1,
                      timestep_spacing="leading", set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    return float64_schedule(set_timesteps(s, steps), base)


@pytest.mark.parametrize("base_name", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_ddim_matches_diffusers(base_name, steps):
    """DDIM (eta 0) over the leading-respaced process == DDIMScheduler(leading, steps_offset=1,
    set_alpha_to_one=True): same timesteps, same deterministic trajectory to 1e-10 (measured 3e-15).

    Our last step goes to alpha_bar = 1 (a respaced process has alpha_bar_prev = 1 at its first step, as
    Song et al.'s alpha_0 = 1), so the final sample is the predicted x0: diffusers' ``set_alpha_to_one=True``.
    The next test covers ``set_alpha_to_one=False``."""
    base = GaussianDiffusion(get_betas(base_name, T))
    stepper = make_stepper("ddim", base, steps, spacing="leading")
    ref = ddim_scheduler(base, steps, set_alpha_to_one=True)
    assert [stepper.timestep(i) for i in range(len(stepper))] == ref.timesteps.tolist()
    model = ToyDenoiser(base.alphas_cumprod, "eps")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, states = run_ours(model, x_T, stepper)
    assert_trajectories_close(ours, run_diffusers(model, x_T, ref), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours[-1], states[-1].x0, atol=1e-12, rtol=0)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_last_step_convention_vs_set_alpha_to_one_false(sd_base, steps):
    """DDIMScheduler(set_alpha_to_one=False) -- the Stable Diffusion configs, and LDM's / DiffBIR's
    DDIMSampler, whose alphas_prev start with alphas_cumprod[0] -- ends one training step short of clean,
    at sqrt(abar_0) x0 + sqrt(1 - abar_0) eps. Every step before the last agrees with ours; the last differs
    by exactly that convention (ours returns x0; sqrt(1 - abar_0) = 0.029 here)."""
    stepper = make_stepper("ddim", sd_base, steps, spacing="leading")
    ref = ddim_scheduler(sd_base, steps, set_alpha_to_one=False)
    model = ToyDenoiser(sd_base.alphas_cumprod, "eps")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, states = run_ours(model, x_T, stepper)
    theirs = run_diffusers(model, x_T, ref)
    assert_trajectories_close(ours[:-1], theirs[:-1], atol=1e-10, rtol=1e-10)
    a0, last = sd_base.alphas_cumprod[0], states[-1]
    want = a0.sqrt() * last.x0 + (1 - a0).sqrt() * last.eps
    torch.testing.assert_close(theirs[-1], want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours[-1], last.x0, atol=1e-12, rtol=0)
    assert (theirs[-1] - ours[-1]).abs().max() > 1e-3  # a real, small, difference


# ---------------------------------------------------------------------------------------------- DPM-Solver++
def dpm_scheduler(zero_snr: bool, steps: int):
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=get_betas("scaled_linear", T).numpy(),
        rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction", algorithm_type="dpmsolver++",
        solver_order=2, lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")
    return set_timesteps(s, steps)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_dpmpp_2m_from_v_prediction_matches_diffusers(zero_snr, steps):
    """``dpm++_2m`` (our split of the v output, x0 fed to a ``prediction_type="sample"`` scheduler) ==
    DPMSolverMultistepScheduler(v_prediction, dpmsolver++, order 2, lower_order_final, final sigma zero,
    linspace) fed the raw v, at every step. 20 steps runs the true second-order update (lower_order_final
    then only acts on the last step). float32 tolerance (diffusers' step upcasts): measured <= 2e-6.

    Zero terminal SNR (our base rescaled in float64, diffusers given the un-rescaled betas and
    ``rescale_betas_zero_snr=True``): diffusers clips alpha_bar_T to 2**-24 and converts v with it, so at
    t = 999 its x0 is 2**-12 x_T - sqrt(1 - 2**-24) v where ours is the exact -v (our claim: the split uses
    the training alpha_bar, exact at zero SNR). The raw-v trajectories then differ by up to ~2**-12 |x_T|
    (measured 7.7e-4 at 1 step, 2e-5 at 20 steps); the next test shows this clip is the only difference."""
    base = GaussianDiffusion(get_betas("scaled_linear", T, zero_terminal_snr=zero_snr))
    unrescaled = get_betas("scaled_linear", T, zero_terminal_snr=False)
    stepper = make_stepper("dpm++_2m", base, steps, unrescaled_betas=unrescaled if zero_snr else None)
    ref = dpm_scheduler(zero_snr, steps)
    assert [stepper.timestep(i) for i in range(len(stepper))] == ref.timesteps.tolist()
    assert stepper.timestep(0) == T - 1
    model = ToyDenoiser(base.alphas_cumprod, "v")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, states = run_ours(model, x_T, stepper)
    atol = 1.5 * 2**-12 * x_T.abs().max().item() if zero_snr else 1e-5
    assert_trajectories_close(ours, run_diffusers(model, x_T, ref), atol=atol, rtol=1e-5)
    assert ours[-1].abs().max() < 10
    if zero_snr:  # exact at alpha_bar = 0: x0 = -v, eps = x_T
        torch.testing.assert_close(states[0].x0, -states[0].out.pred, atol=0, rtol=0)
        torch.testing.assert_close(states[0].eps, x_T, atol=0, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 10, 20])
def test_dpmpp_2m_zero_snr_differs_from_diffusers_only_by_its_alpha_bar_clip(steps):
    """Fed, at t = 999 only, the v' for which its clipped conversion returns our exact x0 = -v
    (2**-12 x - sqrt(1 - 2**-24) v' = -v), diffusers agrees with ours to float32 rounding (measured 2e-6)."""
    base = GaussianDiffusion(get_betas("scaled_linear", T, zero_terminal_snr=True))
    stepper = make_stepper("dpm++_2m", base, steps, unrescaled_betas=get_betas("scaled_linear", T, False))
    ref = dpm_scheduler(True, steps)
    a, s = 2.0**-12, (1 - 2.0**-24) ** 0.5

    def unclip(t, x_in, v):
        return (v + a * x_in) / s if t == T - 1 else v
    model = ToyDenoiser(base.alphas_cumprod, "v")
    x_T = randn(SHAPE, gen(0), dtype=torch.float64)
    ours, _ = run_ours(model, x_T, stepper)
    assert_trajectories_close(ours, run_diffusers(model, x_T, ref, adjust=unclip), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ Euler
@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_euler_matches_diffusers_in_sigma_space(sd_base, steps):
    """``euler`` == EulerDiscreteScheduler(trailing, epsilon). Samples live in sigma space: x_T = noise *
    init_noise_sigma; the model sees ``scale_model_input(x)`` = x / sqrt(1 + sigma^2) (our loop asks
    ``stepper.model_input``), and our split of eps at alpha_bar gives x0 = x - sigma eps, diffusers' own
    epsilon conversion. Checked: the timesteps (999 first), the model's inputs, every step's sample
    (float32 tolerance; measured <= 4e-6)."""
    stepper = make_stepper("euler", sd_base, steps)
    ref = EulerDiscreteScheduler(num_train_timesteps=T, trained_betas=sd_base.betas.numpy(),
                                 timestep_spacing="trailing", prediction_type="epsilon")
    set_timesteps(ref, steps)
    assert [stepper.timestep(i) for i in range(len(stepper))] == [int(t) for t in ref.timesteps]
    assert stepper.timestep(0) == T - 1
    assert stepper.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    x_T = randn(SHAPE, gen(0), dtype=torch.float64) * stepper.init_noise_sigma
    ours_model, ref_model = (ToyDenoiser(sd_base.alphas_cumprod, "eps") for _ in range(2))
    ours, _ = run_ours(ours_model, x_T, stepper)
    theirs = run_diffusers(ref_model, x_T, ref)
    assert [t for t, _ in ours_model.calls] == [t for t, _ in ref_model.calls]
    for (_, a), (_, b) in zip(ours_model.calls, ref_model.calls, strict=True):  # the VP-scaled model input
        torch.testing.assert_close(a, b.double(), atol=1e-5, rtol=1e-5)
    assert_trajectories_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if steps == 1:  # one Euler step to sigma = 0 lands on the predicted x0
        sigma = stepper.init_noise_sigma
        eps = ours_model.raw(x_T / (1 + sigma**2) ** 0.5, torch.full((SHAPE[0],), T - 1))
        torch.testing.assert_close(ours[-1], x_T - sigma * eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["dpm++_2m", "euler", "ddpm"])
def test_a_stepper_can_run_twice(sd_base, sampler):
    """A multistep solver keeps state between steps: a second run of the same stepper starts afresh."""
    model = ToyDenoiser(sd_base.alphas_cumprod, "eps")
    stepper = make_stepper(sampler, sd_base, 5)
    x_T = randn((1, 3, 4, 4), gen(0), dtype=torch.float64) * stepper.init_noise_sigma
    first = sample(model, x_T, stepper, gen(1))
    assert torch.equal(sample(model, x_T, stepper, gen(1)), first)
