"""Numerical agreement with diffusers' schedulers.

For every scheduler case: (a) the sigma / timestep sequence equals diffusers', (b) one step (two for
Heun's evaluations and DPM-Solver++'s second order) agrees for the same raw model outputs, and (c) a
full trajectory with a fixed stub network agrees at every step to 1e-5 in float32.

Coordinates: diffusers' DDPM, DDIM and DPM-Solver carry the VP sample ``x_vp = x * vp_scale(sigma)``;
Euler, Euler ancestral and Heun carry the sigma-space sample itself; flow matching carries ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.guiders.guider_utils import rescale_noise_cfg

from nodes.diffusion.math import append_dims, vp_scale
from nodes.diffusion.parameterization import Denoiser, cfg_combine, model_timestep, to_denoised
from nodes.diffusion.reference import SAMPLERS
from nodes.diffusion.schedules import (
    PRESETS,
    TrainSchedule,
    alphas_cumprod,
    scheduler_sigmas,
    sigmas_from_alphas_cumprod,
)

TOL = 1e-5
SHAPE = (2, 3, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "epsilon"}


@dataclass(frozen=True)
class Case:
    """One diffusers scheduler configuration and the matching sigma-space setup."""

    id: str
    sampler: str
    make: Callable[[str], Any]  # diffusers prediction_type -> scheduler
    train: TrainSchedule
    space: Literal["vp", "ve"] = "ve"
    kinds: tuple[str, ...] = ("eps", "v")
    schedule: dict[str, Any] = field(default_factory=dict)  # scheduler_sigmas keyword arguments
    interpolation: Literal["log", "linear"] = "log"
    eta: float = 0.0
    ns: tuple[int, ...] = (20, 25, 37)

    def sigmas(self, n: int) -> torch.Tensor:
        return scheduler_sigmas(self.sampler, n, self.train, **self.schedule)

    def denoiser(self, kind: str) -> Denoiser:
        train_sigmas = None if kind == "flow" else self.train.train_sigmas()
        return Denoiser(stub, kind, train_sigmas, self.interpolation, self.train.num_train_timesteps)


CASES = [
    Case("ddpm", "ddpm", lambda p: DDPMScheduler(clip_sample=False, prediction_type=p), PRESETS["ddpm"], "vp"),
    Case("ddim-sd", "ddim",
         lambda p: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=p),
         PRESETS["sd15"], "vp", ("eps", "v", "x0"), dict(steps_offset=1, final="sigma_min")),
    Case("ddim-eta", "ddim",
         lambda p: DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing", prediction_type=p),
         PRESETS["sd15"], "vp", schedule=dict(spacing="trailing"), eta=0.7, ns=(20, 25, 50)),
    Case("ddim-cosine", "ddim",
         lambda p: DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type=p),
         PRESETS["improved_ddpm"], "vp", ("eps",)),
    Case("euler", "euler", lambda p: EulerDiscreteScheduler(**SD, prediction_type=p), PRESETS["sd15"],
         interpolation="linear"),
    Case("euler-leading", "euler",
         lambda p: EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1, prediction_type=p),
         PRESETS["sd15"], schedule=dict(spacing="leading", steps_offset=1), interpolation="linear"),
    Case("euler-karras", "euler", lambda p: EulerDiscreteScheduler(**SD, use_karras_sigmas=True, prediction_type=p),
         PRESETS["sd15"], schedule=dict(spread="karras")),
    Case("euler-ancestral", "euler_ancestral", lambda p: EulerAncestralDiscreteScheduler(**SD, prediction_type=p),
         PRESETS["sd15"], interpolation="linear"),
    Case("heun", "heun", lambda p: HeunDiscreteScheduler(**SD, prediction_type=p), PRESETS["sd15"],
         interpolation="linear"),
    Case("dpmpp-2m", "dpmpp_2m",
         lambda p: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, prediction_type=p),
         PRESETS["sd15"], "vp"),
    Case("flow-euler", "flow_euler", lambda _: FlowMatchEulerDiscreteScheduler(shift=3.0), PRESETS["sd3"],
         kinds=("flow",)),
]
CASE_KINDS = [pytest.param(c, k, id=f"{c.id}-{k}") for c in CASES for k in c.kinds]
N_STEPS = 25


def stub(x_in: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """Fixed smooth function of (input, timestep) standing in for a network; not a scheduler output.

    Close to the identity, like a real eps/v network at high noise, so trajectories stay O(1).
    """
    tau = append_dims(t.to(x_in.dtype).reshape(-1), x_in.ndim) / 1000
    return 0.9 * x_in + 0.2 * torch.tanh(x_in) * (1 - 0.5 * tau) + 0.1 * torch.sin(3 * x_in + 2 * tau) + 0.05 * tau


def randn(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def noise_stream(seed: int, count: int) -> list[torch.Tensor]:
    """The standard-normal draws diffusers makes from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(count)]


def to_theirs(case: Case, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * vp_scale(sigma) if case.space == "vp" else x


def to_ours(case: Case, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / vp_scale(sigma) if case.space == "vp" else x


def diffusers_sequence(case: Case, sched: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' step targets as sigmas (n + 1, starting level first) and the timesteps it evaluates."""
    if case.sampler in ("ddpm", "ddim"):
        train_sigmas = case.train.train_sigmas()
        ts = sched.timesteps
        if case.sampler == "ddpm":
            prev, final = [int(sched.previous_timestep(t)) for t in ts], torch.tensor(0.0)
        else:  # DDIM steps to t - T // n, to final_alpha_cumprod below 0
            prev = [int(t) - case.train.num_train_timesteps // n for t in ts]
            final = sigmas_from_alphas_cumprod(sched.final_alpha_cumprod)
        targets = [train_sigmas[p] if p >= 0 else final for p in prev]
        return torch.stack([train_sigmas[ts[0]], *targets]), ts
    if case.sampler == "heun":  # diffusers interleaves [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        return torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]]), sched.timesteps[0::2]
    return sched.sigmas, sched.timesteps


def diffusers_steps(case: Case, sched: Any, x: torch.Tensor, outputs: Callable[[int, torch.Tensor, Any], torch.Tensor],
                    indices: list[int], noises: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Run diffusers' step at the given indices; ``outputs(call, x_in, t)`` gives the raw model output."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(indices[0])
    xs = []
    for count, j in enumerate(indices):
        t = sched.timesteps[j]
        kwargs: dict[str, Any] = {}
        if case.sampler in ("ddpm", "euler_ancestral"):
            kwargs["generator"] = generator
        if case.sampler == "ddim":
            kwargs.update(eta=case.eta, variance_noise=noises[count] if case.eta else None)
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(outputs(count, x_in, t), t, x, **kwargs).prev_sample
        xs.append(x)
    return xs


def diffusers_indices(case: Case, k: int, steps: int) -> list[int]:
    """diffusers' step indices for our steps k .. k + steps - 1 (Heun takes two calls per step)."""
    if case.sampler == "heun":  # no correction on the last step, to sigma 0
        return [j for j in range(2 * k, 2 * (k + steps)) if j < 2 * N_STEPS - 1]
    return list(range(k, k + steps))


# ------------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sigma_and_timestep_sequences_match(case: Case) -> None:
    for n in case.ns:
        sched = case.make("epsilon")
        sched.set_timesteps(n)
        sigmas, timesteps = diffusers_sequence(case, sched, n)
        ours = case.sigmas(n)
        assert ours.shape == (n + 1,) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, sigmas.to(torch.float32), rtol=1e-6, atol=1e-7, msg=f"{case.id} n={n}")
        kind = case.kinds[0]
        ts = model_timestep(kind, ours[:-1], None if kind == "flow" else case.train.train_sigmas(),
                            case.interpolation, case.train.num_train_timesteps)
        torch.testing.assert_close(ts.double(), timesteps.double(), rtol=0, atol=2e-3, msg=f"{case.id} n={n}")


def test_dpm_karras_differs_from_diffusers_only_by_timestep_rounding() -> None:
    sched = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    sched.set_timesteps(N_STEPS)
    ours = scheduler_sigmas("dpmpp_2m", N_STEPS, PRESETS["sd15"], spread="karras")
    torch.testing.assert_close(ours, sched.sigmas, rtol=1e-6, atol=1e-7)
    ts = model_timestep("eps", ours[:-1], PRESETS["sd15"].train_sigmas())
    assert (ts - sched.timesteps).abs().max() > 0.01  # diffusers feeds the model rounded timesteps
    torch.testing.assert_close(ts.round().long(), sched.timesteps)


@pytest.mark.parametrize("preset,config", [
    ("ddpm", {}), ("sd15", SD), ("improved_ddpm", {"beta_schedule": "squaredcos_cap_v2"})])
def test_training_schedules_match(preset: str, config: dict[str, Any]) -> None:
    theirs = DDPMScheduler(**config)
    betas = PRESETS[preset].betas()
    torch.testing.assert_close(betas, theirs.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(alphas_cumprod(betas), theirs.alphas_cumprod, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ (b)
@pytest.mark.parametrize("case,kind", CASE_KINDS)
def test_single_step_matches(case: Case, kind: str) -> None:
    """Same raw outputs in, same sample out; DPM-Solver++ takes two steps to reach its 2nd-order update."""
    k, steps = 9, (2 if case.sampler == "dpmpp_2m" else 1)
    sched = case.make(PREDICTION[kind])
    sched.set_timesteps(N_STEPS)
    sigmas = case.sigmas(N_STEPS)
    outs = noise_stream(100, 4)
    noises = noise_stream(7, steps)
    x = randn(1) * (2.0 if case.space == "vp" else float(sigmas[k]))
    theirs = diffusers_steps(case, sched, x, lambda call, x_in, t: outs[call], diffusers_indices(case, k, steps),
                             noises, seed=7)[-1]

    calls = iter(range(4))
    def scripted(x_: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return to_denoised(kind, outs[next(calls)], x_, sigma)
    kwargs = {"eta": case.eta} if case.sampler == "ddim" else {}
    x_ours = to_ours(case, x, sigmas[k])
    ours = SAMPLERS[case.sampler](scripted, x_ours, sigmas[k: k + steps + 1], None, noises, **kwargs)
    diff = (to_theirs(case, ours, sigmas[k + steps]) - theirs).abs().max().item()
    assert diff <= TOL, f"{case.id}/{kind}: max abs diff {diff:.2e}"


# ------------------------------------------------------------------------------------------ (c)
@pytest.mark.parametrize("case,kind", CASE_KINDS)
def test_trajectory_matches(case: Case, kind: str) -> None:
    sched = case.make(PREDICTION[kind])
    sched.set_timesteps(N_STEPS)
    sigmas = case.sigmas(N_STEPS)
    noises = noise_stream(11, N_STEPS)
    z = randn(2)
    x_theirs = z if case.space == "vp" or kind == "flow" else z * sigmas[0]
    theirs = diffusers_steps(case, sched, x_theirs, lambda j, x_in, t: stub(x_in, t),
                             diffusers_indices(case, 0, N_STEPS), noises, seed=11)
    if case.sampler == "heun":  # keep the sample after each completed step
        theirs = theirs[1::2] + theirs[-1:]

    ours: list[torch.Tensor] = []
    kwargs = {"eta": case.eta} if case.sampler == "ddim" else {}
    SAMPLERS[case.sampler](case.denoiser(kind), to_ours(case, x_theirs, sigmas[0]), sigmas, None, noises,
                           callback=lambda i, x: ours.append(x), **kwargs)
    assert len(ours) == len(theirs) == N_STEPS
    for i, (a, b) in enumerate(zip(ours, theirs)):
        diff = (to_theirs(case, a, sigmas[i + 1]) - b).abs().max().item()
        assert diff <= TOL, f"{case.id}/{kind} step {i}: max abs diff {diff:.2e}"
    assert theirs[-1].abs().max() > 0.1  # the trajectory did something


# ------------------------------------------------------------------------------------ guidance
def test_cfg_rescale_matches_diffusers() -> None:
    cond, uncond = randn(3), randn(4) * 0.5
    for scale, phi in [(7.5, 0.0), (7.5, 0.7), (3.0, 1.0)]:
        theirs = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
        torch.testing.assert_close(cfg_combine(cond, uncond, scale, phi), theirs, rtol=1e-6, atol=1e-6)
