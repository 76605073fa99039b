"""Properties of the schedule, parameterisation and step math, and samplers on an analytic Gaussian.

With data ``x0 ~ N(MU, S**2)`` the exact denoiser is ``E[x0 | x] = MU + S**2 / (S**2 + sigma**2) * (x - MU)``
and the probability-flow ODE maps a start ``x`` at ``sigma_max`` to ``MU + (x - MU) * S / sqrt(S**2 +
sigma_max**2)``; deterministic samplers must converge to it at their order, stochastic ones in law.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.diffusion.math import ancestral_split, append_dims, append_zero, to_d, vp_scale
from nodes.diffusion.parameterization import (
    KINDS,
    Denoiser,
    c_in,
    cfg_combine,
    model_timestep,
    to_denoised,
    to_model_output,
)
from nodes.diffusion.reference import SAMPLERS, sample_ddim, sample_ddpm, sample_euler, sample_euler_ancestral
from nodes.diffusion.schedules import (
    PRESETS,
    TrainSchedule,
    alphas_cumprod,
    cosine_betas,
    exponential_sigmas,
    flow_sigmas,
    karras_sigmas,
    linear_betas,
    scaled_linear_betas,
    scheduler_sigmas,
    shift_sigmas,
    sigma_to_timestep,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    timestep_to_sigma,
)
from nodes.diffusion.steps import (
    DPMHistory,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    heun_step,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True)
ratios = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))
sigma_pairs = st.tuples(st.floats(0.01, 80.0), ratios).map(lambda p: (p[0], p[0] * p[1]))
SD_SIGMAS = PRESETS["sd15"].train_sigmas()


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------- schedules
def test_betas() -> None:
    lin, scaled, cos = linear_betas(), scaled_linear_betas(), cosine_betas()
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    steps = scaled.sqrt().diff()
    torch.testing.assert_close(steps, torch.full((999,), steps[0].item()), atol=1e-7, rtol=0)
    assert 0 < cos.min() and cos.max() <= 0.999
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = alphas_cumprod(cos)
    for t in (0, 100, 500, 900):
        assert ab[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-4)


def test_sigmas_from_alphas_cumprod() -> None:
    ab = alphas_cumprod(scaled_linear_betas())
    sig = sigmas_from_alphas_cumprod(ab)
    assert (sig.diff() > 0).all()
    torch.testing.assert_close(1 / (1 + sig**2), ab)
    torch.testing.assert_close(vp_scale(sig) ** 2, ab)


@FAST
@given(st.integers(1, 1000), st.sampled_from(["leading", "trailing", "linspace"]), st.integers(0, 1))
def test_spaced_timesteps(n: int, spacing: Any, offset: int) -> None:
    t = spaced_timesteps(n, spacing, 1000, offset if spacing == "leading" else 0)
    assert t.shape == (n,) and (t.diff() < 0).all()
    assert t.min() >= 0 and t.max() <= 999 + offset
    if spacing == "trailing":
        assert t[0] == 999 and (t == t.round()).all()
    if spacing == "linspace" and n > 1:
        assert t[0] == 999 and t[-1] == 0
    if spacing == "leading":
        assert t[-1] == offset and ((t - offset) % (1000 // n) == 0).all()


@FAST
@given(st.floats(0.0, 999.0), st.sampled_from(["log", "linear"]))
def test_sigma_timestep_round_trip(t: float, interpolation: Any) -> None:
    sigma = timestep_to_sigma(torch.tensor(t, dtype=torch.float64), SD_SIGMAS, interpolation)
    assert sigma_to_timestep(sigma, SD_SIGMAS, interpolation).item() == pytest.approx(t, abs=1e-6)


def test_integer_timesteps_map_to_training_sigmas() -> None:
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(timestep_to_sigma(t, SD_SIGMAS).float(), SD_SIGMAS[t])
    assert torch.equal(sigma_to_timestep(SD_SIGMAS[t], SD_SIGMAS), t.float())
    assert sigma_to_timestep(torch.tensor([1e-6, 1e6]), SD_SIGMAS).tolist() == [0.0, 999.0]  # clamped


@FAST
@given(st.integers(2, 200), st.floats(0.001, 1.0), st.floats(2.0, 200.0), st.floats(1.0, 10.0))
def test_karras_sigmas(n: int, lo: float, hi: float, rho: float) -> None:
    s = karras_sigmas(n, lo, hi, rho, dtype=torch.float64)
    assert s.shape == (n,) and (s.diff() < 0).all()
    assert s[0].item() == pytest.approx(hi) and s[-1].item() == pytest.approx(lo)
    torch.testing.assert_close(s ** (1 / rho), torch.linspace(hi ** (1 / rho), lo ** (1 / rho), n, dtype=torch.float64))


def test_karras_rho_one_is_linear_and_exponential_is_geometric() -> None:
    torch.testing.assert_close(karras_sigmas(11, 1.0, 11.0, rho=1.0), torch.linspace(11.0, 1.0, 11))
    e = exponential_sigmas(10, 0.1, 10.0, dtype=torch.float64)
    ratios = e[1:] / e[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    assert e[0].item() == pytest.approx(10.0) and e[-1].item() == pytest.approx(0.1)


@FAST
@given(st.floats(0.01, 0.99), st.floats(0.1, 10.0))
def test_shift_scales_noise_to_signal_ratio(s: float, shift: float) -> None:
    t = shift_sigmas(torch.tensor(s, dtype=torch.float64), shift).item()
    assert t / (1 - t) == pytest.approx(shift * s / (1 - s), rel=1e-9)
    assert shift_sigmas(torch.tensor([0.0, 1.0], dtype=torch.float64), shift).tolist() == pytest.approx([0.0, 1.0])


def test_flow_sigmas() -> None:
    plain = flow_sigmas(20, shift=1.0, dtype=torch.float64)
    torch.testing.assert_close(plain, torch.linspace(1.0, 1e-3, 20, dtype=torch.float64), atol=1e-7, rtol=0)
    shifted = flow_sigmas(20, shift=3.0)
    assert shifted[0] == 1.0 and (shifted.diff() < 0).all() and (shifted[1:] > plain[1:].float()).all()
    twice = shift_sigmas(shift_sigmas(torch.tensor(1e-3), 3.0), 3.0)  # diffusers' double shift of sigma_min
    assert shifted[-1].item() == pytest.approx(twice.item(), rel=1e-5)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_scheduler_sigmas_shape(scheduler: Any, final: Any) -> None:
    for spread in ("uniform", "karras", "exponential"):
        s = scheduler_sigmas(scheduler, 30, PRESETS["sd15"], spread=spread, final=final)
        assert s.shape == (31,) and s.dtype == torch.float32
        # with final sigma_min the last step may be empty, as in diffusers
        assert (s[:-1].diff() < 0).all() and s[-1] <= s[-2]
        assert s[-1].item() == (0.0 if final == "zero" else SD_SIGMAS[0].item())


def test_schedule_presets_and_errors() -> None:
    assert TrainSchedule.from_name("sd3").kind == "flow"
    with pytest.raises(ValueError, match="valid:.*sd15"):
        TrainSchedule.from_name("nope")
    with pytest.raises(ValueError):
        scheduler_sigmas("flow_euler", 10, PRESETS["sd15"])
    with pytest.raises(ValueError):
        scheduler_sigmas("euler", 10, PRESETS["sd3"])
    with pytest.raises(ValueError):
        spaced_timesteps(10, "bogus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ math
def test_append_dims() -> None:
    assert append_dims(torch.tensor(2.0), 4).shape == (1, 1, 1, 1)
    assert append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        append_dims(torch.ones(2, 2), 1)
    assert append_zero(torch.tensor([3.0, 1.0])).tolist() == [3.0, 1.0, 0.0]


@FAST
@given(sigma_pairs, st.floats(0.0, 1.0))
def test_ancestral_split(pair: tuple[float, float], eta: float) -> None:
    sigma, sigma_next = (torch.tensor(v, dtype=torch.float64) for v in pair)
    down, up = ancestral_split(sigma, sigma_next, eta)
    assert (down**2 + up**2).item() == pytest.approx(sigma_next.item() ** 2, rel=1e-9, abs=1e-12)
    assert 0 <= up <= sigma_next and 0 <= down <= sigma_next
    if eta == 1.0:
        assert down.item() == pytest.approx((sigma_next**2 / sigma).item(), rel=1e-6, abs=1e-12)
    assert ancestral_split(sigma, sigma_next, 0.0) == (sigma_next, 0.0)


# ----------------------------------------------------------------------------- parameterisation
@FAST
@given(st.floats(0.01, 0.99), st.sampled_from(KINDS))
def test_denoised_recovers_x0_from_the_training_target(level: float, kind: Any) -> None:
    """Build x and the network target from (x0, noise) as each kind is trained; to_denoised returns x0."""
    x0, noise = randn(4, 5, seed=1, dtype=torch.float64), randn(4, 5, seed=2, dtype=torch.float64)
    sigma = torch.tensor(level if kind == "flow" else 20 * level, dtype=torch.float64)
    a, b = vp_scale(sigma), sigma * vp_scale(sigma)  # VP: x_vp = a x0 + b noise
    x, target = {
        "eps": (x0 + sigma * noise, noise),
        "v": (x0 + sigma * noise, a * noise - b * x0),
        "x0": (x0 + sigma * noise, x0),
        "flow": ((1 - sigma) * x0 + sigma * noise, noise - x0),
    }[kind]
    torch.testing.assert_close(to_denoised(kind, target, x, sigma), x0)
    torch.testing.assert_close(to_model_output(kind, x0, x, sigma), target)
    expected_in = x if kind == "flow" else a * x0 + b * noise
    torch.testing.assert_close(x * c_in(kind, sigma), expected_in)


def test_denoiser_feeds_the_model_its_input_and_timestep() -> None:
    seen: dict[str, torch.Tensor] = {}
    def model(x_in: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        seen.update(x_in=x_in, t=t)
        return torch.zeros_like(x_in) + cond
    x = randn(3, 2, 4, 4)
    out = Denoiser(model, "eps", SD_SIGMAS)(x, SD_SIGMAS[700], 0.5)
    assert seen["t"].tolist() == [700.0] * 3
    torch.testing.assert_close(seen["x_in"], x * vp_scale(SD_SIGMAS[700]))
    torch.testing.assert_close(out, x - SD_SIGMAS[700] * 0.5)
    flow = Denoiser(model, "flow", num_train_timesteps=1000)
    torch.testing.assert_close(flow(x, 0.25, 1.0), x - 0.25)
    assert seen["t"].tolist() == [250.0] * 3 and seen["x_in"] is not None
    with pytest.raises(ValueError):
        model_timestep("eps", 1.0)
    with pytest.raises(ValueError):
        to_denoised("noise", x, x, 1.0)  # type: ignore[arg-type]


def test_cfg_combine() -> None:
    cond, uncond = randn(2, 3, 8, seed=1), randn(2, 3, 8, seed=2) * 0.3
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), uncond)
    plain = cfg_combine(cond, uncond, 7.0)
    torch.testing.assert_close(plain, uncond + 7 * (cond - uncond))
    full = cfg_combine(cond, uncond, 7.0, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2)), cond.std(dim=(1, 2)))
    torch.testing.assert_close(cfg_combine(cond, uncond, 7.0, rescale=0.3), 0.3 * full + 0.7 * plain)


# ----------------------------------------------------------------------------------------- steps
def test_samplers_that_coincide_in_sigma_space() -> None:
    x, den, noise = randn(2, 3, seed=1) * 5, randn(2, 3, seed=2), randn(2, 3, seed=3)
    s, s1 = torch.tensor(5.0), torch.tensor(3.0)
    assert torch.equal(ddim_step(x, den, s, s1), euler_step(x, den, s, s1))
    assert torch.equal(ddpm_step(x, den, s, s1, noise), euler_ancestral_step(x, den, s, s1, noise, 1.0))
    assert torch.equal(flow_euler_step(x, den, 0.8, 0.6), euler_step(x, den, 0.8, 0.6))
    assert torch.equal(dpmpp_2m_step(x, den, s, s1, None)[0], euler_step(x, den, s, s1))
    assert torch.equal(dpmpp_2m_step(x, den, s, s1, DPMHistory(den, torch.tensor(8.0)))[0], euler_step(x, den, s, s1))
    with pytest.raises(ValueError):
        ddim_step(x, den, s, s1, eta=0.5)


def test_step_formulas() -> None:
    x, den, noise = randn(2, 3, seed=1) * 5, randn(2, 3, seed=2), randn(2, 3, seed=3)
    s, s1 = 5.0, 3.0
    torch.testing.assert_close(euler_step(x, den, s, 0.0), den)
    torch.testing.assert_close(euler_step(x, den, s, s1), den + (s1 / s) * (x - den))
    down, up = ancestral_split(s, s1)
    torch.testing.assert_close(euler_ancestral_step(x, den, s, s1, noise), den + (down / s) * (x - den) + up * noise)
    torch.testing.assert_close(to_d(x, s, den), (x - den) / s)
    # Heun is exact when the derivative is constant along the path: denoised = x - sigma * c.
    c = randn(2, 3, seed=4)
    x_pred = euler_step(x, x - s * c, s, s1)
    torch.testing.assert_close(heun_step(x, x - s * c, s, s1, x_pred - s1 * c), x + (s1 - s) * c)
    # DPM-Solver++(2M) extrapolates x0 linearly in log-sigma, by half a step ratio.
    old = randn(2, 3, seed=5)
    x_next, hist = dpmpp_2m_step(x, den, s, s1, DPMHistory(old, torch.tensor(8.0)))
    r = math.log(8.0 / s) / math.log(s / s1)
    torch.testing.assert_close(x_next, euler_step(x, den + (den - old) / (2 * r), s, s1))
    assert hist.denoised is den and hist.sigma.item() == s


def test_steps_do_not_modify_inputs() -> None:
    x, den, noise = randn(2, 3, seed=1), randn(2, 3, seed=2), randn(2, 3, seed=3)
    copies = [t.clone() for t in (x, den, noise)]
    euler_ancestral_step(x, den, 2.0, 1.0, noise)
    heun_step(x, den, 2.0, 1.0, den)
    dpmpp_2m_step(x, den, 2.0, 1.0, DPMHistory(noise, torch.tensor(3.0)))
    assert all(torch.equal(a, b) for a, b in zip(copies, (x, den, noise)))


def test_reference_loops() -> None:
    sigmas = append_zero(karras_sigmas(6, 0.1, 10.0))
    x, noises = randn(2, 3, seed=1) * 10, [randn(2, 3, seed=i) for i in range(6)]
    target = randn(2, 3, seed=9)
    constant = lambda x_, s, cond: target  # noqa: E731
    for name, sample in SAMPLERS.items():
        seen: list[int] = []
        out = sample(constant, x, sigmas, None, noises, callback=lambda i, x_: seen.append(i))
        assert seen == list(range(6)), name
        torch.testing.assert_close(out, target, msg=name)  # every sampler lands on a constant x0 at sigma 0
    assert torch.equal(sample_ddim(constant, x, sigmas), sample_euler(constant, x, sigmas))
    assert torch.equal(sample_ddpm(constant, x, sigmas, None, noises),
                       sample_euler_ancestral(constant, x, sigmas, None, noises))
    with pytest.raises(ValueError, match="noise"):
        sample_euler_ancestral(constant, x, sigmas)


# ------------------------------------------------------------------------------ analytic Gaussian
MU, S, SIGMA_MAX = 0.5, 0.3, 80.0
Z = randn(20000, seed=0, dtype=torch.float64)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def flow_gaussian_denoiser(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
    return MU + (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * MU)


def gaussian_run(name: str, n: int, noises: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, exact ODE solution) from the exact marginal at sigma_max."""
    sigmas = append_zero(karras_sigmas(n, 0.002, SIGMA_MAX, dtype=torch.float64))
    x = MU + (S**2 + SIGMA_MAX**2) ** 0.5 * Z
    return SAMPLERS[name](gaussian_denoiser, x, sigmas, None, noises), MU + S * Z


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_gaussian_ode_samplers_converge_at_their_order(name: str, order: int) -> None:
    errors = []
    for n in (20, 40, 80):
        out, exact = gaussian_run(name, n)
        errors.append((out - exact).abs().max().item())
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(abs(r - 0.5**order) < 0.1 for r in ratios), (errors, ratios)
    out, _ = gaussian_run(name, 200)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.01


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral"])
def test_gaussian_ancestral_samplers_converge_in_law(name: str) -> None:
    std_errors = []
    for n in (50, 400):
        g = torch.Generator().manual_seed(1)
        noises = [torch.randn(Z.shape, generator=g, dtype=torch.float64) for _ in range(n)]
        out, _ = gaussian_run(name, n, noises)
        std_errors.append(abs(out.std().item() - S))
        assert abs(out.mean().item() - MU) < 0.015
    assert std_errors[1] < std_errors[0] / 2 and std_errors[1] < 0.015


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_gaussian_flow_euler_converges(shift: float) -> None:
    errors = []
    for n in (20, 40, 80):
        sigmas = append_zero(flow_sigmas(n, shift, dtype=torch.float64))
        out = SAMPLERS["flow_euler"](flow_gaussian_denoiser, Z.clone(), sigmas)
        errors.append((out - (MU + S * Z)).abs().max().item())
    assert errors[2] < errors[1] < errors[0] and errors[2] / errors[1] == pytest.approx(0.5, abs=0.1)
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() - S) < 0.02
