"""Sampler steps: pure functions over explicit state, in sigma space, driven by x0 predictions.

Every step maps ``(x, denoised, sigma, sigma_next, ...)`` to the sample at ``sigma_next``, where
``denoised = denoiser(x, sigma, cond)``. Stochastic steps take their noise (a standard-normal tensor
shaped like ``x``) as an argument; multistep samplers take their history and return the new one.
Nothing is stored between calls. ``sigma`` values are floats or 0-d tensors.

In sigma space several classic samplers coincide, so they share one implementation:
DDIM(eta=0) = DPM-Solver++(1) = Euler; DDIM(eta) = Euler ancestral(eta); DDPM = Euler ancestral(1);
flow-matching Euler = Euler (its velocity ``noise - x0`` is ``(x - x0) / t``). DPM-Solver++'s exponential-
integrator update ``(s'/s) x - expm1(-h) x0`` is the Euler step with that x0, so DPM-Solver++(2S) and the
stochastic DPM-Solver++ are Euler (ancestral) steps with a better x0.

Where k-diffusion and ComfyUI differ these follow ComfyUI: the step to sigma 0 of LMS and DPM-Solver++ SDE
returns the x0 prediction (k-diffusion takes an LMS / Euler step there), as do DPM-Solver++(2M) SDE and LCM.

Heun, DPM-Solver-2 and DPM-Solver++(2S)/SDE need the denoiser twice per step (the step node calls it at the
point the step names: ``euler_step`` for Heun, ``dpm_2_midpoint`` for the others). A loop body calls::

    denoised = denoiser(x, sigma, cond)
    if sigma_next == 0:
        x = euler_step(x, denoised, sigma, sigma_next)
    else:
        x_pred = euler_step(x, denoised, sigma, sigma_next)
        x = heun_step(x, denoised, sigma, sigma_next, denoiser(x_pred, sigma_next, cond))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .math import Sigma, ancestral_split, expand_sigma, log_lerp, to_d
from .parameterization import Kind, noised


def euler_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """Euler step of the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    return x + to_d(x, sigma, denoised) * expand_sigma(torch.as_tensor(sigma_next) - sigma, x)


def euler_ancestral_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, noise: Tensor, eta: float = 1.0
) -> Tensor:
    """Euler ancestral: ODE step to sigma_down plus fresh noise of sigma_up (k-diffusion; Song et al. 2021)."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    return euler_step(x, denoised, sigma, sigma_down) + noise * expand_sigma(sigma_up, x)


def ddpm_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, noise: Tensor) -> Tensor:
    """DDPM ancestral posterior sample, fixed_small variance (Ho et al. 2020) = Euler ancestral, eta 1."""
    return euler_ancestral_step(x, denoised, sigma, sigma_next, noise, eta=1.0)


def ddim_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """DDIM (Song et al. 2021): eta 0 is the Euler ODE step, eta > 0 adds eta-scaled posterior noise."""
    if eta == 0.0:
        return euler_step(x, denoised, sigma, sigma_next)
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs a noise tensor")
    return euler_ancestral_step(x, denoised, sigma, sigma_next, noise, eta)


def heun_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, denoised_next: Tensor) -> Tensor:
    """Heun 2nd-order step (Karras et al. 2022, Alg. 1); denoised_next is at euler_step's result, sigma_next > 0."""
    x_pred = euler_step(x, denoised, sigma, sigma_next)
    d = (to_d(x, sigma, denoised) + to_d(x_pred, sigma_next, denoised_next)) / 2
    return x + d * expand_sigma(torch.as_tensor(sigma_next) - sigma, x)


class DPMHistory(NamedTuple):
    """What DPM-Solver++(2M) carries between steps: the previous x0 prediction and its sigma."""

    denoised: Tensor
    sigma: Tensor


def dpmpp_2m_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, history: DPMHistory | None
) -> tuple[Tensor, DPMHistory]:
    """DPM-Solver++(2M) (Lu et al. 2022): first-order step on x0 extrapolated in log-sigma; returns new history.

    First order when there is no history or ``sigma_next == 0`` (diffusers' lower_order_final).
    """
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    d = denoised
    if history is not None and bool(sigma_next > 0):
        h, h_last = sigma.log() - sigma_next.log(), torch.as_tensor(history.sigma).log() - sigma.log()
        d = denoised + (denoised - history.denoised) * expand_sigma(h / (2 * h_last), x)
    return euler_step(x, d, sigma, sigma_next), DPMHistory(denoised, sigma)


def flow_euler_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """Flow-matching Euler (Liu et al. 2022; Esser et al. 2024): x + (t_next - t) * v with v = (x - x0) / t."""
    return euler_step(x, denoised, sigma, sigma_next)


def _is_zero(sigma: Sigma) -> bool:
    return float(sigma) == 0.0


# ------------------------------------------------------------------------------ two evaluations per step
def dpm_2_midpoint(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma) -> tuple[Tensor, Tensor]:
    """``(x_mid, sigma_mid)``: an Euler step to halfway in log-sigma, where the second evaluation happens."""
    sigma_mid = log_lerp(sigma, sigma_next, 0.5)
    return euler_step(x, denoised, sigma, sigma_mid), sigma_mid


def dpm_2_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, denoised_mid: Tensor) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) as k-diffusion's Karras-style sampler: the whole step with the slope at the
    log-sigma midpoint; ``denoised_mid`` is the model at ``dpm_2_midpoint``, ``sigma_next > 0``."""
    x_mid, sigma_mid = dpm_2_midpoint(x, denoised, sigma, sigma_next)
    return x + to_d(x_mid, sigma_mid, denoised_mid) * expand_sigma(torch.as_tensor(sigma_next) - sigma, x)


def dpmpp_2s_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, denoised_mid: Tensor) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022): the x0 prediction at ``dpm_2_midpoint`` drives the whole step."""
    return euler_step(x, denoised_mid, sigma, sigma_next)


def dpmpp_sde_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, sigma_mid: Sigma, denoised_mid: Tensor,
    noise: Tensor, eta: float = 1.0,
) -> Tensor:
    """Stochastic DPM-Solver++ (Lu et al. 2022; k-diffusion's ``dpmpp_sde``), second stage.

    The first stage is ``euler_ancestral_step(x, denoised, sigma, sigma_mid, noise_mid, eta)`` with ``sigma_mid =
    log_lerp(sigma, sigma_next, r)``; ``denoised_mid`` is the model there. This stage mixes the two x0
    predictions by ``1 / (2 r)`` and takes an ancestral step; the step to sigma 0 returns ``denoised``.
    """
    if _is_zero(sigma_next):
        return denoised
    lam, lam_mid, lam_next = (-torch.as_tensor(s, dtype=torch.float64).log() for s in (sigma, sigma_mid, sigma_next))
    fac = float((lam_next - lam) / (2 * (lam_mid - lam)))
    return euler_ancestral_step(x, torch.lerp(denoised, denoised_mid, fac), sigma, sigma_next, noise, eta)


# ----------------------------------------------------------------------------------------------- multistep
def dpmpp_2m_sde_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, history: DPMHistory | None, noise: Tensor,
    eta: float = 1.0,
) -> tuple[Tensor, DPMHistory]:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022; k-diffusion): exact decay of x, the x0 term and its
    first difference, plus noise of ``sigma_next * sqrt(1 - exp(-2 eta h))``. The step to sigma 0 returns x0."""
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    new = DPMHistory(denoised, sigma)
    if _is_zero(sigma_next):
        return denoised, new
    h = sigma.log() - sigma_next.log()
    gain = expand_sigma(-torch.expm1(-h * (eta + 1)), x)
    x = x * expand_sigma(sigma_next / sigma * torch.exp(-h * eta), x) + gain * denoised
    if history is not None:
        h_last = torch.as_tensor(history.sigma).log() - sigma.log()
        x = x + 0.5 * gain * expand_sigma(h / h_last, x) * (denoised - history.denoised)
    if eta:
        x = x + noise * expand_sigma(sigma_next * (-torch.expm1(-2 * h * eta)).sqrt(), x)
    return x, new


class LMSHistory(NamedTuple):
    """What linear multistep carries: the last ``order`` ODE derivatives and their sigmas, oldest first."""

    derivatives: tuple[Tensor, ...]
    sigmas: tuple[float, ...]


def lms_coefficients(sigmas: tuple[float, ...], sigma_next: float) -> list[float]:
    """Weights of the derivatives at ``sigmas`` (oldest first): the integral from ``sigmas[-1]`` to ``sigma_next`` of
    each one's Lagrange basis polynomial, exactly (k-diffusion integrates numerically)."""
    weights = []
    for j, sj in enumerate(sigmas):
        others = [s for k, s in enumerate(sigmas) if k != j]
        basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
        basis = basis / np.prod([sj - s for s in others])
        antiderivative = basis.integ()
        weights.append(float(antiderivative(sigma_next) - antiderivative(sigmas[-1])))
    return weights


def lms_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, history: LMSHistory | None, order: int = 4
) -> tuple[Tensor, LMSHistory]:
    """Linear multistep (k-diffusion's ``lms``; Adams-Bashforth in sigma with up to ``order`` past derivatives).

    The step to sigma 0 returns ``denoised`` (ComfyUI; k-diffusion takes an LMS step there)."""
    past = history if history is not None else LMSHistory((), ())
    new = LMSHistory((past.derivatives + (to_d(x, sigma, denoised),))[-order:],
                     (past.sigmas + (float(sigma),))[-order:])
    if _is_zero(sigma_next):
        return denoised, new
    weights = lms_coefficients(new.sigmas, float(sigma_next))
    return x + sum(w * d for w, d in zip(weights, new.derivatives)), new


# ------------------------------------------------------------------------------------------ one-shot x0
def lcm_step(x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, noise: Tensor,
             kind: Kind = "eps") -> Tensor:
    """Latent consistency model sampling (Luo et al. 2023): take the x0 prediction and re-noise it to
    ``sigma_next`` with fresh noise by the model's forward process; the last step returns it."""
    if _is_zero(sigma_next):
        return denoised
    return noised(kind, denoised, noise.to(denoised), sigma_next)
