"""Noise for stochastic sampler steps as ComfyUI draws it: from the sampling seed, on the CPU, in float32.

* ``sequential_noise``: the next standard-normal draw of one torch CPU generator seeded once per sampling run
  with the seed; the generator's state is passed in and out explicitly, so each draw is a pure function of
  ``(seed, state)``. This is ComfyUI's ``default_noise_sampler(x, seed)`` (the ancestral samplers, DDPM, LCM),
  which ComfyUI seeds with the KSampler seed, the same seed its initial noise uses: the first draw equals
  ``latent.noise`` of the same seed. (ComfyUI draws on the latent's device, so only its CPU runs give these
  numbers; a CUDA generator is another stream.)
* ``brownian_noise``: the increment of a Brownian motion over ``[sigma_next, sigma]`` divided by its standard
  deviation, from a torchsde ``BrownianTree`` over ``[min positive sigma, max sigma]`` of the schedule with the
  seed as entropy (ComfyUI's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=True)``, used by the
  SDE samplers). A tree's value at an interval does not depend on earlier queries, so building the tree per call
  gives ComfyUI's numbers; torchsde is an optional dependency. The step to sigma 0 draws nothing in ComfyUI and
  gets zeros here.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

from .math import Sigma


def sequential_noise(shape: Sequence[int], seed: int, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(noise, state)``: the draw after ``state`` (the first draw of ``seed`` when None) and the state after it."""
    gen = torch.Generator("cpu")
    if state is None:
        gen.manual_seed(seed)
    else:
        gen.set_state(state.cpu())
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return noise, gen.get_state()


def brownian_noise(shape: Sequence[int], seed: int, sigmas: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """Standard-normal Brownian increment for the step ``sigma -> sigma_next`` of the schedule ``sigmas``."""
    sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float32).cpu() for s in (sigma, sigma_next))
    if float(sigma_next) == 0.0 or float(sigma) == float(sigma_next):
        return torch.zeros(tuple(shape))
    try:
        import torchsde
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Brownian-tree noise (dpmpp_sde, dpmpp_2m_sde) needs torchsde: pip install torchsde") from exc
    sigmas = sigmas.detach().float().cpu()
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    tree = torchsde.BrownianTree(lo, torch.zeros(tuple(shape)), hi, entropy=seed)
    first, last = sorted((sigma, sigma_next), key=float)
    with warnings.catch_warnings():  # torchsde rounds the tree's ends and warns when a query at an end is clamped
        warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
        w = tree(first, last)
    w = -w if float(sigma) > float(sigma_next) else w
    return w / (sigma_next - sigma).abs().sqrt()
