"""Sampler steps: pure functions over explicit state, in sigma space, driven by x0 predictions.

Every step maps ``(x, denoised, sigma, sigma_next, ...)`` to the sample at ``sigma_next``, where
``denoised = denoiser(x, sigma, cond)``. Stochastic steps take their noise (a standard-normal tensor
shaped like ``x``) as an argument; multistep samplers take their history and return the new one.
Nothing is stored between calls. ``sigma`` values are floats or 0-d tensors.

In sigma space several classic samplers coincide, so they share one implementation:
DDIM(eta=0) = DPM-Solver++(1) = Euler; DDIM(eta) = Euler ancestral(eta); DDPM = Euler ancestral(1);
flow-matching Euler = Euler (its velocity ``noise - x0`` is ``(x - x0) / t``).

Heun needs the denoiser twice per step. A loop body calls::

    denoised = denoiser(x, sigma, cond)
    if sigma_next == 0:
        x = euler_step(x, denoised, sigma, sigma_next)
    else:
        x_pred = euler_step(x, denoised, sigma, sigma_next)
        x = heun_step(x, denoised, sigma, sigma_next, denoiser(x_pred, sigma_next, cond))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .math import Sigma, ancestral_split, expand_sigma, to_d


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
