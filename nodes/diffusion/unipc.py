"""UniPC (Zhao et al. 2023): a multistep predictor-corrector in ``lambda = -log sigma`` on x0 predictions, as
ComfyUI runs it (``uni_pc`` = B(h) = h, "bh1"; ``uni_pc_bh2`` = B(h) = e^h - 1).

ComfyUI's schedule for ``n`` steps: the orders are ``min(k, p, n + 1 - k)`` for the update to ``sigmas[k]``
(``p = min(3, n - 1)``: warm-up, then order ``p``, lower order on the last two), a final sigma of 0 becomes
``UNIPC_END = 0.001``, so the result is the sample at noise level 0.001, not the x0 prediction. The model is
evaluated once per step, at each *predicted* sample; the corrector then refines that sample with the new x0
prediction without evaluating again, and the refined sample is the base of the next update.

In a sampler loop body (one pair ``sigma -> sigma_next``, loop ``index`` of ``total``) the model is evaluated on
the carried ``x`` (the prediction at ``sigma``) and ``unipc_step`` corrects it, then predicts the sample at
``sigma_next``, carrying :class:`UniPCState`. ComfyUI computes in the VP space with float32 log-SNRs; here the
same update is written in sigma space with float64 coefficients (identical maths; ComfyUI's float32
``log(1 - exp(...))`` at sigma 0.001 moves its last step by ~1e-3 relative in ``h``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from .math import Sigma

UNIPC_END = 0.001
Variant = Literal["bh1", "bh2"]


class UniPCState(NamedTuple):
    """The corrected sample at the newest sigma, and the newest (at most 3) x0 predictions with their sigmas."""

    x: Tensor
    denoised: tuple[Tensor, ...]
    sigmas: tuple[float, ...]


def unipc_order(k: int, total: int, max_order: int = 3) -> int:
    """ComfyUI's order for the update to ``sigmas[k]`` (``1 <= k <= total``)."""
    return min(k, max_order, total - 1, total + 1 - k)


def _coefficients(h: float, rks: Sequence[float], order: int, variant: Variant) -> tuple[float, Tensor, Tensor]:
    """``(B(h), predictor weights, corrector weights)`` of UniPC's linear system for step ``h`` in lambda."""
    hh = -h  # data prediction: the integrator runs on e^{-h}
    h_phi_k = torch.expm1(torch.tensor(hh, dtype=torch.float64)).item() / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(torch.tensor(hh, dtype=torch.float64)).item()
    r = torch.tensor(list(rks) + [1.0], dtype=torch.float64)
    rows, rhs, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = torch.stack(rows), torch.tensor(rhs, dtype=torch.float64)
    half = torch.tensor([0.5], dtype=torch.float64)  # UniPC's simplified weights for orders 2 / 1
    predictor = b[:0] if order == 1 else half if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
    corrector = half if order == 1 else torch.linalg.solve(big_r, b)
    return b_h, predictor, corrector


def _update(state: UniPCState, sigma_to: float, order: int, variant: Variant,
            denoised_to: Tensor | None = None) -> Tensor:
    """The order-``order`` update from ``state`` to ``sigma_to``: the predictor, or with the model's x0 prediction
    at the predicted sample (``denoised_to``) the corrector."""
    x, m0, s0 = state.x, state.denoised[-1], state.sigmas[-1]
    lam0 = -torch.tensor(s0, dtype=torch.float64).log()
    h = float(-torch.tensor(sigma_to, dtype=torch.float64).log() - lam0)
    rks, diffs = [], []
    for m, s in zip(state.denoised[-order:-1][::-1], state.sigmas[-order:-1][::-1]):
        rk = float(-torch.tensor(s, dtype=torch.float64).log() - lam0) / h
        rks.append(rk)
        diffs.append((m - m0) / rk)
    b_h, rhos_p, rhos_c = _coefficients(h, rks, order, variant)
    ratio = sigma_to / s0
    out = x * ratio + m0 * (1 - ratio)  # the first-order (DDIM) part
    if denoised_to is None:
        terms = [float(w) * d for w, d in zip(rhos_p, diffs)] if diffs else []
    else:
        terms = [float(w) * d for w, d in zip(rhos_c[:-1], diffs)] + [float(rhos_c[-1]) * (denoised_to - m0)]
    return out - b_h * sum(terms) if terms else out


def unipc_step(
    x: Tensor, denoised: Tensor, sigma: Sigma, sigma_next: Sigma, index: int, total: int,
    state: UniPCState | None, variant: Variant = "bh1",
) -> tuple[Tensor, UniPCState]:
    """One loop-body step of UniPC: correct the predicted ``x`` at ``sigma`` with ``denoised`` (the model there),
    then predict the sample at ``sigma_next`` (0.001 for a final 0). Returns the prediction and the new state."""
    if total < 2:
        raise ValueError("uni_pc needs at least 2 steps (ComfyUI returns a 1-step uni_pc run unsampled)")
    sigma_f = float(sigma)
    if state is None:
        base = x
    else:
        base = _update(state, sigma_f, unipc_order(index, total), variant, denoised_to=denoised)
    keep = min(3, total - 1)
    prev_d, prev_s = (state.denoised, state.sigmas) if state is not None else ((), ())
    new = UniPCState(base, (prev_d + (denoised,))[-keep:], (prev_s + (sigma_f,))[-keep:])
    target = float(sigma_next) or UNIPC_END
    return _update(new, target, unipc_order(index + 1, total), variant), new
