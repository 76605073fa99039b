"""Shared diffusion math: broadcasting, the ODE derivative, the ancestral split, VP <-> VE scaling.

Everything here works in k-diffusion "sigma space": a noisy sample is ``x = x0 + sigma * noise``
(variance exploding). A model trained VP-style sees ``x_vp = x / sqrt(1 + sigma**2)``, the sample
diffusers' DDPM/DDIM/DPM-Solver schedulers carry; ``vp_scale`` converts between the two.

A ``sigma`` is a Python float, a 0-d tensor (one noise level for the batch) or a ``(batch,)``
tensor; ``expand_sigma`` broadcasts any of these against a sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

Sigma = Tensor | float


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dimensions to ``x`` until it has ``target_dims`` dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"tensor has {x.ndim} dims, more than target_dims={target_dims}")
    return x[(...,) + (None,) * missing]


def expand_sigma(sigma: Sigma, x: Tensor) -> Tensor:
    """``sigma`` as a tensor on ``x``'s device and dtype, broadcastable against ``x``."""
    return append_dims(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)


def append_zero(sigmas: Tensor) -> Tensor:
    """Append a final noise level of 0 to a 1-D sigma schedule."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def to_d(x: Tensor, sigma: Sigma, denoised: Tensor) -> Tensor:
    """Probability-flow ODE derivative ``dx/dsigma = (x - x0) / sigma`` (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / expand_sigma(sigma, x)


def vp_scale(sigma: Sigma) -> Tensor:
    """``sqrt(alpha_bar) = 1 / sqrt(1 + sigma**2)``: multiply a sigma-space sample by it to get the VP one."""
    sigma = torch.as_tensor(sigma)
    return (sigma**2 + 1) ** -0.5


def ancestral_split(sigma: Sigma, sigma_next: Sigma, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step ``sigma -> sigma_next`` into a deterministic part to ``sigma_down`` plus fresh noise.

    ``sigma_up = eta * sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)`` (capped at
    ``sigma_next``) and ``sigma_down**2 + sigma_up**2 = sigma_next**2``. With ``eta = 1`` this is the
    DDPM posterior (Ho et al. 2020) and ``sigma_down = sigma_next**2 / sigma``; ``eta`` is DDIM's
    (Song et al. 2021); ``eta = 0`` is the deterministic ODE step.
    """
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    posterior = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    sigma_up = torch.minimum(sigma_next, eta * posterior.clamp(min=0) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0) ** 0.5
    return sigma_down, sigma_up


def log_lerp(sigma: Sigma, sigma_next: Sigma, r: float = 0.5) -> Tensor:
    """The noise level a fraction ``r`` of the way from ``sigma`` to ``sigma_next`` in ``lambda = -log sigma``.

    DPM-Solver's intermediate point (Lu et al. 2022), written as ComfyUI's DPM-Solver++ SDE writes it,
    ``exp(-(lambda + r * (lambda_next - lambda)))``, so a Brownian-tree query there hits the same float.
    0 when ``sigma_next`` is 0.
    """
    lam, lam_next = -torch.as_tensor(sigma).log(), -torch.as_tensor(sigma_next).log()
    return (-(lam + r * (lam_next - lam))).exp()
