"""ComfyUI's noise schedules for discrete-time models, as its ``KSampler`` computes them.

ComfyUI keeps a discrete model's training sigmas ascending (``model_sampling.sigmas``: ``sigma_min`` is the
first, ``sigma_max`` the last; here a DenoiserModel's ``train_sigmas``) and converts with two rules, in float32:

* ``timestep(sigma)``: the index of the training sigma nearest in log-sigma, an integer (the first on a tie);
  this is also the timestep ComfyUI feeds the network (``sigma_to_timestep(..., "nearest")``);
* ``sigma(t)``: ``exp((1 - w) * log_sigmas[floor t] + w * log_sigmas[ceil t])``, ``w = frac(t)``, ``t`` clamped
  to ``[0, T - 1]``.

Each scheduler maps ``(train_sigmas, steps)`` to a float32 schedule, usually ``steps + 1`` values ending in 0:

* ``normal``: ``steps`` timesteps evenly spaced from ``timestep(sigma_max)`` to ``timestep(sigma_min)``
  (both ends included), then 0; ``sgm_uniform`` spaces ``steps + 1`` and drops the last instead;
* ``karras`` / ``exponential``: k-diffusion's ``get_sigmas_karras`` (rho 7) / ``get_sigmas_exponential``
  between ``sigma_min`` and ``sigma_max``, in float32;
* ``simple``: every ``T / steps``-th training sigma from the top (``sigmas[-(1 + int(i * T / steps))]``);
* ``ddim_uniform``: training sigmas ``1, 1 + T // steps, ...`` below ``T`` reversed, then 0; this gives
  ``ceil((T - 1) / (T // steps))`` steps, not always ``steps`` (30 steps on 1000 sigmas make 31);
* ``beta``: training sigmas at ``rint(betaincinv(0.6, 0.6, 1 - i / steps) * (T - 1))``, consecutive repeats
  dropped (Lee et al. 2024), then 0; needs scipy;
* ``linear_quadratic``: Mochi's schedule (linear below 0.025 for half the steps, quadratic after) times
  ``sigma_max``; ``kl_optimal``: ``tan`` evenly spaced in ``atan(sigma)`` (Sabour et al. 2024), then 0.

``normal`` and ``ddim_uniform`` have ComfyUI's rule for tables whose smallest sigma is ~0 (one more level, no
appended 0). ``ksampler_sigmas`` adds KSampler's two rules: ``denoise < 1`` computes ``int(steps / denoise)``
steps and keeps the last ``steps + 1`` sigmas; dpm_2, dpm_2_ancestral and uni_pc get one more step and drop
the next-to-last sigma.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor

from .math import append_zero
from .schedules import exponential_sigmas, karras_sigmas, sigma_to_timestep

SchedulerName = Literal["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                        "linear_quadratic", "kl_optimal"]
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _near_zero(value: Tensor | float) -> bool:
    return math.isclose(float(value), 0.0, abs_tol=1e-5)


def sigma_at(t: Tensor, train_sigmas: Tensor) -> Tensor:
    """ComfyUI's ``sigma(t)``: log-sigma interpolated between ``floor(t)`` and ``ceil(t)``, in float32."""
    log_sigmas = train_sigmas.float().log()
    t = t.float().clamp(0, log_sigmas.numel() - 1)
    w = t.frac()
    return ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp()


# ---------------------------------------------------------------------------------------------- schedulers
def normal(train_sigmas: Tensor, steps: int, sgm: bool = False) -> Tensor:
    """Timesteps evenly spaced between the ends (``sgm``: ``steps + 1`` of them without the last), then 0."""
    ends = sigma_to_timestep(train_sigmas[[-1, 0]].float(), train_sigmas.float(), "nearest")
    start, end = float(ends[0]), float(ends[1])
    if sgm:
        t = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    elif _near_zero(sigma_at(torch.tensor(end), train_sigmas)):
        return sigma_at(torch.linspace(start, end, steps + 1, dtype=torch.float32), train_sigmas)
    else:
        t = torch.linspace(start, end, steps, dtype=torch.float32)
    return append_zero(sigma_at(t, train_sigmas))


def sgm_uniform(train_sigmas: Tensor, steps: int) -> Tensor:
    return normal(train_sigmas, steps, sgm=True)


def karras(train_sigmas: Tensor, steps: int) -> Tensor:
    lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
    return append_zero(karras_sigmas(steps, lo, hi, 7.0, precision=torch.float32))


def exponential(train_sigmas: Tensor, steps: int) -> Tensor:
    lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
    return append_zero(exponential_sigmas(steps, lo, hi, precision=torch.float32))


def simple(train_sigmas: Tensor, steps: int) -> Tensor:
    stride = len(train_sigmas) / steps
    picks = [len(train_sigmas) - 1 - int(i * stride) for i in range(steps)]
    return append_zero(train_sigmas.float()[picks])


def ddim_uniform(train_sigmas: Tensor, steps: int) -> Tensor:
    sigmas = train_sigmas.float()
    n = len(sigmas)
    zero_end = _near_zero(sigmas[1])
    picks = list(range(1, n, max(n // (steps + zero_end), 1)))[::-1]
    return sigmas[picks] if zero_end else append_zero(sigmas[picks])


def beta(train_sigmas: Tensor, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    try:
        from scipy.special import betaincinv
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 'beta' scheduler needs scipy (pip install scipy)") from exc
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    t = np.rint(betaincinv(alpha, beta, quantiles) * (len(train_sigmas) - 1)).astype(np.int64)
    keep = np.concatenate([[True], t[1:] != t[:-1]])
    return append_zero(train_sigmas.float()[torch.from_numpy(t[keep])])


def linear_quadratic(train_sigmas: Tensor, steps: int, threshold: float = 0.025) -> Tensor:
    if steps == 1:
        levels = [1.0, 0.0]
    else:
        lin = steps // 2
        quad = steps - lin
        gap = lin - threshold * steps
        a = gap / (lin * quad**2)
        b = threshold / lin - 2 * gap / quad**2
        c = a * lin**2
        ramp = [i * threshold / lin for i in range(lin)] + [a * i**2 + b * i + c for i in range(lin, steps)] + [1.0]
        levels = [1.0 - r for r in ramp]
    return torch.tensor(levels, dtype=torch.float32) * train_sigmas[-1].float()


def kl_optimal(train_sigmas: Tensor, steps: int) -> Tensor:
    w = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    lo, hi = math.atan(float(train_sigmas[0])), math.atan(float(train_sigmas[-1]))
    return append_zero((w * lo + (1 - w) * hi).tan())


SCHEDULERS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "normal": normal, "karras": karras, "exponential": exponential, "sgm_uniform": sgm_uniform,
    "simple": simple, "ddim_uniform": ddim_uniform, "beta": beta, "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}


def scheduler_sigmas(train_sigmas: Tensor, scheduler: str, steps: int) -> Tensor:
    """ComfyUI's ``calculate_sigmas``: the named scheduler's float32 schedule for ``steps`` steps."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown ComfyUI scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if train_sigmas.numel() < 2:
        raise ValueError("ComfyUI's schedulers need the model's training sigmas (a discrete-time model)")
    return SCHEDULERS[scheduler](train_sigmas.detach().cpu(), steps)


def ksampler_sigmas(train_sigmas: Tensor, steps: int, scheduler: str, denoise: float = 1.0,
                    sampler: str = "euler") -> Tensor:
    """The sigmas ComfyUI's ``KSampler(steps, sampler, scheduler, denoise)`` samples with."""
    def calculate(n: int) -> Tensor:
        if sampler in DISCARD_PENULTIMATE:
            sigmas = scheduler_sigmas(train_sigmas, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return scheduler_sigmas(train_sigmas, scheduler, n)

    if denoise > 0.9999:
        return calculate(steps)
    if denoise <= 0.0:
        raise ValueError(f"denoise must be above 0, got {denoise}")
    return calculate(int(steps / denoise))[-(steps + 1):]
