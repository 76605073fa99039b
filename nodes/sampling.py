"""Sampling nodes: noise schedules, one denoiser evaluation, guidance, and one node per sampler step.

The sampling loop itself is a graph: the built-in samplers (``sample.euler`` ...) are graph-defined nodes in
``nodes/samplers/*.json`` made of a ``loop`` over sigma pairs whose body is ``denoise`` + a step node. Open one,
copy it into your graph as an explicit loop, and insert per-step nodes (inpaint blending, previews, ControlNet).

All maths lives in :mod:`nodes.diffusion`; these functions only adapt it to typed ports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from nodegraph import Context, Field, node
from nodegraph import types as T
from nodegraph.types import Var

from . import adapters
from .diffusion import comfy, schedules, steps
from .diffusion.math import ancestral_split, append_zero, expand_sigma, log_lerp
from .diffusion.noise import brownian_noise, sequential_noise
from .diffusion.parameterization import noised
from .diffusion.unipc import unipc_step

S, C, D = Var("space"), Var("channels"), Var("dim")
_M = T.Denoiser(space=S, channels=C, context_dim=D)
Steps = Annotated[int, Field(ge=1, le=1000, description="number of sampling steps")]
GRAPH_NODES = sorted(str(p) for p in (Path(__file__).parent / "samplers").glob("*.json"))
SchedulerName = Literal["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "flow_euler"]
ComfySampler = Literal["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                       "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"]
Eta = Annotated[float, Field(ge=0, le=100, description="noise amount; 0 = deterministic")]


# -- schedules ---------------------------------------------------------------------------------------------


@node("schedule.scheduler", category="schedule", output="sigmas")
def scheduler_schedule(
    model: T.Denoiser, steps: Steps = 20, scheduler: SchedulerName = "euler",
    spacing: Literal["default", "leading", "trailing", "linspace"] = "default",
    spread: Literal["uniform", "karras", "exponential"] = "uniform",
) -> T.Sigmas:
    """The sigmas (ending in 0) that the matching diffusers scheduler would use for this model and step count."""
    base = adapters.base_of(model)
    if base.kind == "flow" or scheduler == "flow_euler":
        if base.kind != "flow":
            raise ValueError(f"flow_euler needs a flow-matching model; this one predicts {base.kind!r}")
        return append_zero(schedules.flow_sigmas(steps))
    defaults = base.sampling
    if spacing == "default":  # the model's scheduler config decides (a checkpoint's), else each scheduler's own
        spacing = defaults.spacing
    return schedules.scheduler_sigmas(scheduler, steps, base.schedule, spacing=spacing, spread=spread,
                                      steps_offset=defaults.steps_offset)


@node("schedule.betas", category="schedule", output="sigmas")
def betas_schedule(
    betas: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear", steps: Steps = 20,
    scheduler: Literal["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"] = "euler",
    beta_start: Annotated[float, Field(gt=0, lt=1)] = 0.00085, beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.012,
    train_steps: Annotated[int, Field(ge=2, le=100000)] = 1000,
    spacing: Literal["default", "leading", "trailing", "linspace"] = "default",
    spread: Literal["uniform", "karras", "exponential"] = "uniform",
) -> T.Sigmas:
    """Sigmas from a discrete beta schedule (linear, scaled-linear, cosine) as the named diffusers scheduler spaces them."""
    if betas != "cosine" and beta_start >= beta_end:
        raise ValueError(f"beta_start ({beta_start}) must be below beta_end ({beta_end})")
    train = schedules.TrainSchedule(betas, train_steps, beta_start, beta_end)
    return schedules.scheduler_sigmas(scheduler, steps, train, spacing=None if spacing == "default" else spacing,
                                      spread=spread)


@node("schedule.karras", category="schedule", output="sigmas")
def karras(steps: Steps = 20, sigma_min: Annotated[float, Field(gt=0)] = 0.0292,
           sigma_max: Annotated[float, Field(gt=0)] = 14.6146, rho: Annotated[float, Field(gt=0)] = 7.0) -> T.Sigmas:
    """Karras et al. 2022 sigmas (eq. 5), with a final 0."""
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be below sigma_max ({sigma_max})")
    return append_zero(schedules.karras_sigmas(steps, sigma_min, sigma_max, rho))


@node("schedule.exponential", category="schedule", output="sigmas")
def exponential(steps: Steps = 20, sigma_min: Annotated[float, Field(gt=0)] = 0.0292,
                sigma_max: Annotated[float, Field(gt=0)] = 14.6146) -> T.Sigmas:
    """Sigmas evenly spaced in log-sigma, with a final 0."""
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be below sigma_max ({sigma_max})")
    return append_zero(schedules.exponential_sigmas(steps, sigma_min, sigma_max))


@node("schedule.flow", category="schedule", output="sigmas")
def flow(steps: Steps = 20, shift: Annotated[float, Field(gt=0, le=100)] = 1.0) -> T.Sigmas:
    """Rectified-flow times from 1 towards 0 with SD3-style shift, with a final 0."""
    return append_zero(schedules.flow_sigmas(steps, shift))


@node("schedule.truncate", category="schedule", output="sigmas")
def truncate(sigmas: T.Sigmas, strength: Annotated[float, Field(ge=0, le=1)] = 0.6) -> T.Sigmas:
    """Keep the last ``round(strength * steps)`` steps (img2img: denoise from part-way down the schedule)."""
    n = len(sigmas) - 1
    keep = int(round(strength * n))
    return sigmas[n - keep:].clone() if keep > 0 else sigmas[-1:].clone()


@node("schedule.comfy", category="schedule", output="sigmas")
def comfy_schedule(
    model: T.Denoiser, steps: Steps = 20, scheduler: comfy.SchedulerName = "normal",
    denoise: Annotated[float, Field(gt=0, le=1, description="fraction of the schedule to run (img2img)")] = 1.0,
    sampler: ComfySampler = "euler",
) -> T.Sigmas:
    """The sigmas ComfyUI's KSampler uses: its scheduler on the model's training sigmas, ``denoise`` and the
    sampler's rule (dpm_2, dpm_2_ancestral and uni_pc drop the next-to-last sigma of one more step)."""
    base = adapters.base_of(model)
    if base.kind == "flow" or not base.train_sigmas.numel():
        raise ValueError("schedule.comfy needs a discrete-time model with training sigmas; use schedule.flow")
    return comfy.ksampler_sigmas(base.train_sigmas, steps, scheduler, denoise, sampler)


@node("schedule.log_lerp", category="schedule", output="sigma")
def sigma_log_lerp(sigma: T.Any, sigma_next: T.Any, r: Annotated[float, Field(gt=0, lt=1)] = 0.5) -> T.Any:
    """The noise level a fraction r of the way from sigma to sigma_next in log-sigma (DPM-Solver's midpoint)."""
    return log_lerp(sigma, sigma_next, r)


# -- model evaluation ----------------------------------------------------------------------------------------


@node("denoise", category="sampling", output="denoised")
def denoise(model: _M, x: T.Latent(space=S, channels=C), sigma: T.Any,
            cond: T.Conditioning(dim=D) = None) -> T.Latent(space=S, channels=C):
    """One denoiser evaluation: the model's x0 prediction for x at noise level sigma."""
    if x.dim() != 4:
        raise ValueError(f"a latent must be (B, C, H, W); got shape {tuple(x.shape)}")
    return model(x, sigma, cond or {})


@node("guidance.cfg", category="guidance", output="model")
def cfg(model: _M, negative: T.Conditioning(dim=D),
        scale: Annotated[float, Field(ge=0, le=100, description="guidance scale; 1 = no guidance")] = 5.0,
        rescale: Annotated[float, Field(ge=0, le=1, description="guidance rescale phi (Lin et al. 2023)")] = 0.0,
        mode: Literal["batched", "sequential"] = "batched") -> _M:
    """Classifier-free guidance around a denoiser (negative prompt, rescale, batched or sequential)."""
    return adapters.Guided(model, negative, scale, rescale, mode)


@node("noise.step", category="sampling", output="noise")
def step_noise(like: T.Tensor, seed: Annotated[int, Field(ge=0)] = 0, index: Annotated[int, Field(ge=0)] = 0) -> T.Noise:
    """Standard-normal noise for one sampler step, from (seed, index) on CPU: the same on every device."""
    gen = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.device, like.dtype)


@node("noise.sequential", category="sampling")
def noise_sequential(like: T.Tensor, seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
                     state: T.Any = None) -> {"noise": T.Noise, "state": T.Any}:
    """The next draw of one CPU generator seeded with seed (ComfyUI's sampler noise); carry state between steps."""
    out, state = sequential_noise(like.shape, seed, state)
    return {"noise": out.to(like.device, like.dtype), "state": state}


@node("noise.brownian", category="sampling", output="noise")
def noise_brownian(like: T.Tensor, sigmas: T.Sigmas, sigma: T.Any, sigma_next: T.Any,
                   seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0) -> T.Noise:
    """Brownian-tree noise for the step sigma -> sigma_next, as ComfyUI's SDE samplers draw it (needs torchsde)."""
    return brownian_noise(like.shape, seed, sigmas, sigma, sigma_next).to(like.device, like.dtype)


# -- steps -------------------------------------------------------------------------------------------------

_L = T.Latent(space=S)


@node("step.euler", category="sampler step", output="x")
def euler(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any) -> _L:
    """Euler step (Karras et al. 2022, Alg. 2); also DDIM with eta 0 and flow-matching Euler."""
    return steps.euler_step(x, denoised, sigma, sigma_next)


@node("step.flow_euler", category="sampler step", output="x")
def flow_euler(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any) -> _L:
    """Flow-matching Euler step (Liu et al. 2022; Esser et al. 2024)."""
    return steps.flow_euler_step(x, denoised, sigma, sigma_next)


@node("step.euler_ancestral", category="sampler step", output="x")
def euler_ancestral(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, noise: T.Noise,
                    eta: Annotated[float, Field(ge=0, le=1)] = 1.0) -> _L:
    """Euler ancestral step (k-diffusion; Song et al. 2021)."""
    return steps.euler_ancestral_step(x, denoised, sigma, sigma_next, noise, eta)


@node("step.ddpm", category="sampler step", output="x")
def ddpm(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, noise: T.Noise) -> _L:
    """DDPM ancestral posterior sample (Ho et al. 2020)."""
    return steps.ddpm_step(x, denoised, sigma, sigma_next, noise)


@node("step.ddim", category="sampler step", output="x")
def ddim(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, noise: T.Noise = None,
         eta: Annotated[float, Field(ge=0, le=1)] = 0.0) -> _L:
    """DDIM step with eta (Song et al. 2021)."""
    return steps.ddim_step(x, denoised, sigma, sigma_next, eta, noise)


@node("step.heun", category="sampler step", output="x")
def heun(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any,
         cond: T.Conditioning = None) -> _L:
    """Heun 2nd-order step (Karras et al. 2022, Alg. 1): evaluates the model once more at sigma_next."""
    x_pred = steps.euler_step(x, denoised, sigma, sigma_next)
    if float(sigma_next) == 0.0:
        return x_pred
    return steps.heun_step(x, denoised, sigma, sigma_next, model(x_pred, sigma_next, cond or {}))


@node("step.dpmpp_2m", category="sampler step")
def dpmpp_2m(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any,
             history: T.Any = None) -> {"x": _L, "history": T.Any}:
    """DPM-Solver++(2M) step (Lu et al. 2022); carries the previous x0 prediction as history."""
    x_next, hist = steps.dpmpp_2m_step(x, denoised, sigma, sigma_next, history)
    return {"x": x_next, "history": hist}


def _second_order(model: Any, cond: Any, x: torch.Tensor, denoised: torch.Tensor, sigma: Any, sigma_next: Any,
                  combine: Any) -> torch.Tensor:
    """A step that evaluates the model again at ``dpm_2_midpoint``; Euler on the step to sigma 0."""
    if float(sigma_next) == 0.0:
        return steps.euler_step(x, denoised, sigma, sigma_next)
    x_mid, sigma_mid = steps.dpm_2_midpoint(x, denoised, sigma, sigma_next)
    return combine(x, denoised, sigma, sigma_next, model(x_mid, sigma_mid, cond or {}))


def _ancestral(model: Any, cond: Any, x: torch.Tensor, denoised: torch.Tensor, sigma: Any, sigma_next: Any,
               noise: torch.Tensor, eta: float, combine: Any) -> torch.Tensor:
    """``combine``'s second-order step down to sigma_down, then fresh noise of sigma_up (the ancestral split)."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
    x = _second_order(model, cond, x, denoised, sigma, sigma_down, combine)
    return x + noise.to(x) * expand_sigma(sigma_up, x)


@node("step.dpm_2", category="sampler step", output="x")
def dpm_2(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any,
          cond: T.Conditioning = None) -> _L:
    """DPM-Solver-2 step (Lu et al. 2022; k-diffusion): evaluates the model once more at the log-sigma midpoint."""
    return _second_order(model, cond, x, denoised, sigma, sigma_next, steps.dpm_2_step)


@node("step.dpm_2_ancestral", category="sampler step", output="x")
def dpm_2_ancestral(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any,
                    noise: T.Noise, cond: T.Conditioning = None, eta: Eta = 1.0) -> _L:
    """DPM-Solver-2 ancestral step (k-diffusion): DPM-Solver-2 to sigma_down plus fresh noise."""
    return _ancestral(model, cond, x, denoised, sigma, sigma_next, noise, eta, steps.dpm_2_step)


@node("step.dpmpp_2s_ancestral", category="sampler step", output="x")
def dpmpp_2s_ancestral(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any,
                       noise: T.Noise, cond: T.Conditioning = None, eta: Eta = 1.0) -> _L:
    """DPM-Solver++(2S) ancestral step (Lu et al. 2022; k-diffusion): second-order to sigma_down plus fresh noise."""
    return _ancestral(model, cond, x, denoised, sigma, sigma_next, noise, eta, steps.dpmpp_2s_step)


@node("step.dpmpp_sde", category="sampler step", output="x")
def dpmpp_sde(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_mid: T.Any, sigma_next: T.Any,
              noise_mid: T.Noise, noise: T.Noise, cond: T.Conditioning = None, eta: Eta = 1.0) -> _L:
    """Stochastic DPM-Solver++ step (k-diffusion's dpmpp_sde): an ancestral step to sigma_mid (noise_mid), the model
    there, then an ancestral step with the mixed x0 prediction (noise)."""
    if float(sigma_next) == 0.0:
        return denoised
    x_mid = steps.euler_ancestral_step(x, denoised, sigma, sigma_mid, noise_mid.to(x), eta)
    denoised_mid = model(x_mid, sigma_mid, cond or {})
    return steps.dpmpp_sde_step(x, denoised, sigma, sigma_next, sigma_mid, denoised_mid, noise.to(x), eta)


@node("step.dpmpp_2m_sde", category="sampler step")
def dpmpp_2m_sde(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, noise: T.Noise, history: T.Any = None,
                 eta: Eta = 1.0) -> {"x": _L, "history": T.Any}:
    """DPM-Solver++(2M) SDE step, midpoint (Lu et al. 2022; k-diffusion); carries the previous x0 prediction."""
    x_next, hist = steps.dpmpp_2m_sde_step(x, denoised, sigma, sigma_next, history, noise.to(x), eta)
    return {"x": x_next, "history": hist}


@node("step.lms", category="sampler step")
def lms(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, history: T.Any = None,
        order: Annotated[int, Field(ge=1, le=4)] = 4) -> {"x": _L, "history": T.Any}:
    """Linear multistep step (k-diffusion's lms, order 4); carries the past derivatives."""
    x_next, hist = steps.lms_step(x, denoised, sigma, sigma_next, history, order)
    return {"x": x_next, "history": hist}


@node("step.uni_pc", category="sampler step")
def uni_pc(x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, index: Annotated[int, Field(ge=0)],
           total: Annotated[int, Field(ge=1)], state: T.Any = None,
           variant: Literal["bh1", "bh2"] = "bh1") -> {"x": _L, "state": T.Any}:
    """UniPC predictor-corrector step (Zhao et al. 2023) as ComfyUI's uni_pc (bh1) / uni_pc_bh2; carries its state."""
    x_next, new = unipc_step(x, denoised, sigma, sigma_next, index, total, state, variant)
    return {"x": x_next, "state": new}


@node("step.lcm", category="sampler step", output="x")
def lcm(model: T.Denoiser(space=S), x: _L, denoised: _L, sigma: T.Any, sigma_next: T.Any, noise: T.Noise) -> _L:
    """Latent consistency step (Luo et al. 2023): the x0 prediction re-noised to sigma_next."""
    return steps.lcm_step(x, denoised, sigma, sigma_next, noise, adapters.base_of(model).kind)


@node("latent.add_noise", category="latent", output="latent")
def add_noise(model: T.Denoiser(space=S), latent: T.Latent(space=S), noise: T.Noise, sigmas: T.Sigmas,
              start: Literal["sigma", "vp", "scheduler", "auto"] = "sigma") -> T.Latent(space=S):
    """Noise a latent to the first sigma of a schedule (txt2img from a zero latent, img2img from an encoded one).

    ``start`` scales the noise of a VP model: "sigma" gives ``latent + sigma * noise`` (the forward process);
    "vp" gives ``latent + sqrt(sigma**2 + 1) * noise`` (ComfyUI's KSampler at full denoise); "scheduler" does what
    the model's scheduler config does for a pipeline's first latent (diffusers' ``init_noise_sigma``); "auto" is
    ComfyUI's rule: "vp" when the schedule starts at the model's largest training sigma (full denoise), else
    "sigma"."""
    if noise.shape != latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(latent.shape)}")
    base = adapters.base_of(model)
    sigma = sigmas[0].to(latent.device, latent.dtype)
    rule = base.sampling.start if start == "scheduler" else start
    if rule == "auto":
        top = float(base.train_sigmas[-1]) if base.train_sigmas.numel() else math.inf
        rule = "vp" if float(sigmas[0]) >= top * (1 - 1e-5) else "sigma"
    if rule == "vp" and base.kind != "flow":
        return latent + (sigma**2 + 1) ** 0.5 * noise.to(latent)
    return noised(base.kind, latent, noise.to(latent), sigma)


@node("latent.inpaint_blend", category="latent", output="x")
def inpaint_blend(model: T.Denoiser(space=S), x: T.Latent(space=S), original: T.Latent(space=S), mask: T.Mask,
                  noise: T.Noise, sigma_next: T.Any) -> T.Latent(space=S):
    """Inside a sampler loop: keep generating where mask is 1, put back the original (noised to sigma_next) where 0."""
    if mask.shape[-2:] != x.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.to(x.device, x.dtype)
    known = noised(adapters.base_of(model).kind, original, noise.to(x), sigma_next)
    return mask * x + (1 - mask) * known


@node("sampling.progress_preview", category="sampling", output="x")
def preview(x: T.Latent(space=S), ctx: Context) -> T.Latent(space=S):
    """Pass a latent through unchanged and publish it as a preview event (insert into a sampler body)."""
    ctx.preview(x)
    return x
