"""Noise schedules: functions returning tensors.

Conventions
-----------
* ``train_sigmas[t]`` is the sigma-space noise level of discrete training timestep ``t`` (ascending in
  ``t``): ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, so ``x_t = x0 + sigma * noise``.
* A *sampling schedule* is a 1-D float32 tensor of ``n + 1`` descending sigmas; step ``i`` goes from
  ``sigmas[i]`` to ``sigmas[i + 1]``. The last entry is the final noise level: 0, or the smallest
  training sigma where a diffusers config asks for it (``final="sigma_min"``).
* ``karras_sigmas``, ``exponential_sigmas`` and ``flow_sigmas`` return the ``n`` levels at which the
  model is evaluated, without the final one (``append_zero`` adds it).
* Flow-matching (rectified flow) models use ``sigma = t`` in [0, 1] with ``x = (1 - t) * x0 + t * noise``;
  their model timestep is ``t * num_train_timesteps``.

``scheduler_sigmas`` reproduces the sequence each diffusers scheduler builds in ``set_timesteps``
(float32 arithmetic where diffusers uses it, so sequences agree to float32 rounding). One known
difference: diffusers' DDIM steps from timestep ``t`` to ``t - T // n`` whatever the spacing, which
disagrees with its own next timestep for "trailing"/"linspace" spacing when ``T % n != 0``; a single
sigma list cannot express that, and here DDIM steps to the next listed timestep (as DDPM does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .math import append_zero

Spacing = Literal["leading", "trailing", "linspace"]
Spread = Literal["uniform", "karras", "exponential"]
Final = Literal["zero", "sigma_min"]
Interpolation = Literal["log", "linear", "nearest"]
SchedulerName = Literal["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "flow_euler"]

DEFAULT_SPACING: dict[str, Spacing] = {
    "ddpm": "leading", "ddim": "leading", "euler": "linspace", "euler_ancestral": "linspace",
    "heun": "linspace", "dpmpp_2m": "linspace",
}


# ----------------------------------------------------------------------------------- training betas
def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Betas linear in ``sqrt(beta)`` (Stable Diffusion / latent diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Cosine schedule, ``alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)**2`` (Nichol & Dhariwal 2021)."""
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta).to(torch.float32)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``alpha_bar[t] = prod_{s <= t} (1 - beta[s])``."""
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alpha_bar: Tensor) -> Tensor:
    """Sigma-space noise level of each training timestep, ``sqrt((1 - alpha_bar) / alpha_bar)``."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


@dataclass(frozen=True)
class TrainSchedule:
    """How a model was trained: discrete VP betas ("linear", "scaled_linear", "cosine") or "flow"."""

    kind: Literal["linear", "scaled_linear", "cosine", "flow"] = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    shift: float = 1.0  # flow only: SD3-style timestep shift

    def betas(self) -> Tensor:
        if self.kind == "linear":
            return linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.kind == "scaled_linear":
            return scaled_linear_betas(self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.kind == "cosine":
            return cosine_betas(self.num_train_timesteps)
        raise ValueError("a flow schedule has no betas")

    def train_sigmas(self) -> Tensor:
        """Sigma of every training timestep, ascending in ``t``."""
        return sigmas_from_alphas_cumprod(alphas_cumprod(self.betas()))

    @staticmethod
    def from_name(name: str) -> TrainSchedule:
        if name not in PRESETS:
            raise ValueError(f"unknown schedule {name!r}; valid: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, TrainSchedule] = {
    "ddpm": TrainSchedule("linear", 1000, 1e-4, 0.02),
    "sd15": TrainSchedule("scaled_linear", 1000, 0.00085, 0.012),
    "sdxl": TrainSchedule("scaled_linear", 1000, 0.00085, 0.012),
    "improved_ddpm": TrainSchedule("cosine", 1000),
    "sd3": TrainSchedule("flow", 1000, shift=3.0),
}


# ---------------------------------------------------------------------------- timesteps <-> sigmas
def spaced_timesteps(n: int, spacing: Spacing, num_train_timesteps: int = 1000, steps_offset: int = 0) -> Tensor:
    """The ``n`` descending (float64) training timesteps diffusers picks for ``n`` steps.

    "leading": ``i * (T // n) + steps_offset``; "trailing": ``round(T - i * T / n) - 1``;
    "linspace": ``linspace(0, T - 1, n)`` (not rounded; DDPM/DDIM round it, Euler-family do not).
    """
    T, i = num_train_timesteps, torch.arange(n, dtype=torch.float64)
    if spacing == "leading":
        return (i * (T // n)).flip(0) + steps_offset
    if spacing == "trailing":
        return (T - i * (T / n)).round() - 1
    if spacing == "linspace":
        return torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    raise ValueError(f"unknown spacing {spacing!r}; valid: leading, trailing, linspace")


def _interp_index(values: Tensor, table: Tensor) -> Tensor:
    """Fractional index of ``values`` in the ascending ``table`` (piecewise linear, clamped)."""
    low = (torch.searchsorted(table, values, right=True) - 1).clamp(0, table.numel() - 2)
    w = ((values - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
    return low + w


def timestep_to_sigma(t: Tensor, train_sigmas: Tensor, interpolation: Interpolation = "linear") -> Tensor:
    """Sigma at a (possibly fractional) timestep, interpolating ``train_sigmas`` linearly or in log-sigma
    ("nearest": the sigma of the rounded timestep)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    table = train_sigmas.to(torch.float64)
    if interpolation == "nearest":
        return table[t.round().clamp(0, table.numel() - 1).long()]
    table = table.log() if interpolation == "log" else table
    low = t.floor().clamp(0, table.numel() - 2).long()
    out = torch.lerp(table[low], table[low + 1], (t - low).clamp(0, 1))
    return out.exp() if interpolation == "log" else out


def sigma_to_timestep(sigma: Tensor, train_sigmas: Tensor, interpolation: Interpolation = "log") -> Tensor:
    """Inverse of ``timestep_to_sigma``; "log" is what k-diffusion and diffusers' Karras path use.

    "nearest" is ComfyUI's discrete-model rule (``ModelSamplingDiscrete.timestep``): the index of the training
    sigma nearest in log-sigma (the first on a tie), computed in the table's precision, as a float.
    """
    sigma = torch.as_tensor(sigma)
    if interpolation == "nearest":
        table = train_sigmas.log()
        dist = (sigma.to(table.dtype).clamp(min=1e-10).log()[..., None] - table).abs()
        return dist.argmin(dim=-1).to(sigma.dtype if sigma.is_floating_point() else torch.float32)
    s, table = sigma.to(torch.float64), train_sigmas.to(torch.float64)
    if interpolation == "log":
        s, table = s.clamp(min=1e-10).log(), table.log()
    dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
    return _interp_index(s, table).to(dtype)


# --------------------------------------------------------------------------------- sigma spreads
def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype: torch.dtype = torch.float32,
    precision: torch.dtype = torch.float64,
) -> Tensor:
    """``n`` sigmas uniform in ``sigma**(1/rho)`` from ``sigma_max`` to ``sigma_min`` (Karras et al. 2022, eq. 5).

    Computed in ``precision`` (float64, as diffusers' numpy; float32 is k-diffusion's and ComfyUI's arithmetic)."""
    ramp = torch.linspace(0, 1, n, dtype=precision)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype)


def exponential_sigmas(
    n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float32,
    precision: torch.dtype = torch.float64,
) -> Tensor:
    """``n`` sigmas uniform in log-sigma from ``sigma_max`` to ``sigma_min``, computed in ``precision``."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=precision).exp().to(dtype)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 timestep shift ``shift * s / (1 + (shift - 1) * s)``: scales the noise-to-signal ratio by ``shift``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(
    n: int, shift: float = 1.0, num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``n`` rectified-flow sigmas as diffusers' FlowMatchEulerDiscreteScheduler (Esser et al. 2024).

    Linear in ``t`` from 1 to the shifted smallest training sigma, then shifted; diffusers applies the
    shift to an already-shifted ``sigma_min``, so the last level is ``shift(shift(1/T))``. Reproduced.
    """
    T = num_train_timesteps
    sigma_min = float(shift_sigmas(torch.tensor(1.0 / T, dtype=torch.float32), shift))
    t = torch.linspace(1.0 * T, sigma_min * T, n, dtype=torch.float64) / T
    return shift_sigmas(t, shift).to(dtype)


# ------------------------------------------------------------------------- diffusers' sequences
def inference_timesteps(
    scheduler: SchedulerName, n: int, num_train_timesteps: int = 1000, spacing: Spacing | None = None,
    steps_offset: int = 0,
) -> Tensor:
    """The ``n`` (float64) timesteps a diffusers VP scheduler evaluates, before any sigma respreading."""
    spacing = spacing or DEFAULT_SPACING[scheduler]
    if scheduler == "dpmpp_2m" and spacing != "trailing":  # DPMSolverMultistep spaces n + 1 and drops t = 0
        return spaced_timesteps(n + 1, spacing, num_train_timesteps, steps_offset)[:-1].round()
    t = spaced_timesteps(n, spacing, num_train_timesteps, steps_offset)
    if scheduler in ("ddpm", "ddim"):
        return t.round()
    return t.to(torch.float32).to(torch.float64)  # Euler-family keep fractional float32 timesteps


def scheduler_sigmas(
    scheduler: SchedulerName, n: int, train: TrainSchedule, spacing: Spacing | None = None,
    steps_offset: int = 0, spread: Spread = "uniform", final: Final = "zero",
) -> Tensor:
    """The ``n + 1`` float32 sigmas diffusers' ``scheduler`` steps through for ``n`` inference steps.

    ``spread`` respreads the noise levels between the spaced ends ("karras" = ``use_karras_sigmas``);
    ``final`` is diffusers' ``final_sigmas_type`` ("sigma_min" is also DDIM's ``set_alpha_to_one=False``).
    Combinations a diffusers scheduler lacks (e.g. Karras sigmas for DDIM) follow the same rules.
    """
    if (scheduler == "flow_euler") != (train.kind == "flow"):
        raise ValueError(f"scheduler {scheduler!r} does not fit a {train.kind!r} training schedule")
    if scheduler == "flow_euler":
        return append_zero(flow_sigmas(n, train.shift, train.num_train_timesteps))
    train_sigmas = train.train_sigmas()
    t = inference_timesteps(scheduler, n, train.num_train_timesteps, spacing, steps_offset)
    sigmas = timestep_to_sigma(t, train_sigmas)
    # DPMSolverMultistep respreads over the whole training range, the others between the spaced ends.
    ends = train_sigmas[[0, -1]] if scheduler == "dpmpp_2m" else sigmas[[-1, 0]]
    if spread == "karras":
        sigmas = karras_sigmas(n, float(ends[0]), float(ends[1]), dtype=torch.float64)
    elif spread == "exponential":
        sigmas = exponential_sigmas(n, float(ends[0]), float(ends[1]), dtype=torch.float64)
    last = train_sigmas[:1].to(torch.float64) if final == "sigma_min" else sigmas.new_zeros(1)
    return torch.cat([sigmas, last]).to(torch.float32)
