"""Plain-Python reference sampling loops built from the step functions.

Each ``sample_<name>(denoiser, x, sigmas, cond, noises=None)`` walks ``sigmas`` (``n + 1`` values,
step ``i`` from ``sigmas[i]`` to ``sigmas[i + 1]``) and returns the final sample. They exist to prove
that the graph's loop construct, which calls the same steps in the same order, is bit-identical.
``x`` starts in the sampler's space (``noise * sigmas[0]`` for a VE start). ``noises[i]`` is the
standard-normal tensor step ``i`` injects; deterministic samplers ignore it. ``callback(i, x)``
sees the sample after each step.

Every loop has the graph's shape: a body ``(i, x, sigma, sigma_next, state) -> (x, state)`` run once
per sigma pair, with carried state (``None`` unless the sampler has history).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from .steps import (
    DPMHistory,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    heun_step,
)

DenoiserFn = Callable[[Tensor, Tensor, Any], Tensor]
Noises = Sequence[Tensor] | None
Callback = Callable[[int, Tensor], None] | None
Body = Callable[[int, Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]]


def _loop(body: Body, x: Tensor, sigmas: Tensor, callback: Callback) -> Tensor:
    state: Any = None
    for i in range(len(sigmas) - 1):
        x, state = body(i, x, sigmas[i], sigmas[i + 1], state)
        if callback is not None:
            callback(i, x)
    return x


def _noise(noises: Noises, i: int, sampler: str) -> Tensor:
    if noises is None:
        raise ValueError(f"{sampler} is stochastic: pass one noise tensor per step as noises")
    return noises[i]


def sample_euler(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None, callback: Callback = None
) -> Tensor:
    """Euler ODE sampler (Karras et al. 2022)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        return euler_step(x, denoiser(x, s, cond), s, s_next), state
    return _loop(body, x, sigmas, callback)


def sample_euler_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None,
    callback: Callback = None, eta: float = 1.0,
) -> Tensor:
    """Euler ancestral sampler (k-diffusion)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        noise = _noise(noises, i, "euler_ancestral")
        return euler_ancestral_step(x, denoiser(x, s, cond), s, s_next, noise, eta), state
    return _loop(body, x, sigmas, callback)


def sample_ddpm(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None, callback: Callback = None
) -> Tensor:
    """DDPM ancestral sampler (Ho et al. 2020)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        return ddpm_step(x, denoiser(x, s, cond), s, s_next, _noise(noises, i, "ddpm")), state
    return _loop(body, x, sigmas, callback)


def sample_ddim(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None,
    callback: Callback = None, eta: float = 0.0,
) -> Tensor:
    """DDIM sampler (Song et al. 2021)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        noise = _noise(noises, i, "ddim with eta > 0") if eta else None
        return ddim_step(x, denoiser(x, s, cond), s, s_next, eta, noise), state
    return _loop(body, x, sigmas, callback)


def sample_heun(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None, callback: Callback = None
) -> Tensor:
    """Heun 2nd-order sampler, Euler on the last step to sigma 0 (Karras et al. 2022, Alg. 1)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        denoised = denoiser(x, s, cond)
        x_pred = euler_step(x, denoised, s, s_next)
        if s_next == 0:
            return x_pred, state
        return heun_step(x, denoised, s, s_next, denoiser(x_pred, s_next, cond)), state
    return _loop(body, x, sigmas, callback)


def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(2M) sampler (Lu et al. 2022)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, history: DPMHistory | None) -> tuple[Tensor, Any]:
        return dpmpp_2m_step(x, denoiser(x, s, cond), s, s_next, history)
    return _loop(body, x, sigmas, callback)


def sample_flow_euler(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, cond: Any = None, noises: Noises = None, callback: Callback = None
) -> Tensor:
    """Flow-matching Euler sampler (Liu et al. 2022; Esser et al. 2024)."""
    def body(i: int, x: Tensor, s: Tensor, s_next: Tensor, state: Any) -> tuple[Tensor, Any]:
        return flow_euler_step(x, denoiser(x, s, cond), s, s_next), state
    return _loop(body, x, sigmas, callback)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "ddpm": sample_ddpm,
    "ddim": sample_ddim, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "flow_euler": sample_flow_euler,
}
