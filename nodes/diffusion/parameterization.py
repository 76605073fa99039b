"""Model parameterisations: the one place for the forward process, the network's input scaling, and the map
from raw network outputs to x0 predictions (and back, and the training target).

Samplers only ever see ``denoiser(x, sigma, cond) -> x0``. Kinds and their spaces:

* ``eps``, ``v``, ``x0``: trained VP-style; samplers run in sigma space ``x = x0 + sigma * noise`` and
  the network receives ``x * c_in`` with ``c_in = 1 / sqrt(1 + sigma**2)`` (the VP sample) and the
  training timestep found from sigma (``sigma_to_timestep``).
* ``flow``: rectified flow; ``x = (1 - t) * x0 + t * noise`` with ``sigma = t``, ``c_in = 1``, the
  network predicts the velocity ``noise - x0`` and receives ``t * num_train_timesteps``.

The forward process (``noised``) is what noising means everywhere: txt2img/img2img starts, inpainting's known
region, SDS and training. ``training_target`` is what a network of each kind is trained to output there, so
``to_denoised(kind, training_target(...), noised(...), sigma)`` is the clean sample. ``network_input`` is the one
map from a sampler-space sample to what the network sees (``x * c_in``, the timestep).

Classifier-free guidance is arithmetic on two outputs (``cfg_combine``), applied by whatever wraps
the denoiser; it is not a sampler option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from .math import Sigma, expand_sigma, vp_scale
from .schedules import Interpolation, sigma_to_timestep

Kind = Literal["eps", "v", "x0", "flow"]
Model = Callable[[Tensor, Tensor, Any], Tensor]
KINDS: tuple[Kind, ...] = ("eps", "v", "x0", "flow")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parameterisation {kind!r}; valid: {', '.join(KINDS)}")


def c_in(kind: Kind, sigma: Sigma) -> Tensor:
    """Input scaling: the network sees ``x * c_in(sigma)``."""
    _check(kind)
    sigma = torch.as_tensor(sigma)
    return torch.ones_like(sigma) if kind == "flow" else vp_scale(sigma)


def model_timestep(
    kind: Kind, sigma: Sigma, train_sigmas: Tensor | None = None, interpolation: Interpolation = "log",
    num_train_timesteps: int = 1000,
) -> Tensor:
    """The timestep the network was trained with at noise level ``sigma``."""
    _check(kind)
    sigma = torch.as_tensor(sigma)
    if kind == "flow":
        return sigma * num_train_timesteps
    if train_sigmas is None:
        raise ValueError(f"a {kind!r} model needs train_sigmas to map sigma to its timestep")
    return sigma_to_timestep(sigma, train_sigmas, interpolation)


def network_input(
    kind: Kind, x: Tensor, sigma: Sigma, train_sigmas: Tensor | None = None, interpolation: Interpolation = "log",
    num_train_timesteps: int = 1000,
) -> tuple[Tensor, Tensor]:
    """``(x * c_in(sigma), timestep (N,))``: what a network of ``kind`` receives for the sampler-space ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    t = model_timestep(kind, sigma, train_sigmas, interpolation, num_train_timesteps)
    return x * expand_sigma(c_in(kind, sigma), x), (t.expand(x.shape[:1]) if t.ndim == 0 else t)


def noised(kind: Kind, x0: Tensor, noise: Tensor, sigma: Sigma) -> Tensor:
    """The forward process in sampler space: ``(1 - t) x0 + t noise`` for flow, ``x0 + sigma noise`` otherwise."""
    _check(kind)
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * noise if kind == "flow" else x0 + s * noise


def training_target(kind: Kind, x0: Tensor, noise: Tensor, sigma: Sigma) -> Tensor:
    """What a network of ``kind`` is trained to output at ``noised(kind, x0, noise, sigma)``."""
    _check(kind)
    if kind == "flow":
        return noise - x0
    if kind == "eps":
        return noise
    if kind == "v":  # sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0
        s = expand_sigma(sigma, x0)
        return (noise - s * x0) / (1 + s**2) ** 0.5
    return x0


def to_denoised(kind: Kind, model_output: Tensor, x: Tensor, sigma: Sigma) -> Tensor:
    """x0 prediction from a raw output; ``x`` is the sampler-space sample (not scaled by ``c_in``)."""
    _check(kind)
    s = expand_sigma(sigma, x)
    if kind in ("eps", "flow"):  # eps: x = x0 + s * eps;  flow: x - t * (noise - x0) = x0
        return x - s * model_output
    if kind == "v":  # v = sqrt(ab) * eps - sqrt(1 - ab) * x0 in VP coordinates
        return x / (s**2 + 1) - model_output * s / (s**2 + 1) ** 0.5
    return model_output


def to_model_output(kind: Kind, denoised: Tensor, x: Tensor, sigma: Sigma) -> Tensor:
    """Inverse of ``to_denoised``: the output a network of ``kind`` would give for this x0."""
    _check(kind)
    s = expand_sigma(sigma, x)
    if kind in ("eps", "flow"):
        return (x - denoised) / s
    if kind == "v":
        return (x / (s**2 + 1) - denoised) * (s**2 + 1) ** 0.5 / s
    return denoised


@dataclass(frozen=True, eq=False)
class Denoiser:
    """``denoiser(x, sigma, cond) -> x0`` around a raw network ``model(x_in, t, cond) -> output``.

    ``train_sigmas``/``interpolation`` map sigma to the model's timestep for VP kinds: "log" for
    Karras/exponential schedules (k-diffusion, diffusers), "linear" to invert diffusers' default
    Euler/Heun sigmas exactly. The timestep reaches the model as a ``(batch,)`` tensor.
    """

    model: Model
    kind: Kind
    train_sigmas: Tensor | None = None
    interpolation: Interpolation = "log"
    num_train_timesteps: int = 1000

    def __call__(self, x: Tensor, sigma: Sigma, cond: Any = None) -> Tensor:
        x_in, t = network_input(self.kind, x, sigma, self.train_sigmas, self.interpolation, self.num_train_timesteps)
        return to_denoised(self.kind, self.model(x_in, t, cond), x, sigma)


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2023, eq. 15-16).

    ``rescale = phi`` blends the guided output with a copy whose per-sample std matches ``cond_out``.
    diffusers applies it to noise predictions, so rescale in the model's output space for parity.
    """
    guided = uncond_out + scale * (cond_out - uncond_out)
    if rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided
