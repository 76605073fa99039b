"""Score distillation sampling (Poole et al. 2022, DreamFusion) and the functional optimiser nodes around it.

SDS
---
The rendered image goes to the denoiser's space: ``x = 2 * image - 1`` for a pixel-space denoiser, or the
VAE's scaled posterior mean for a latent one (see ``target`` below for where the gradient is taken).
One noise level per call is drawn from ``[t_min, t_max]`` (fractions of the training schedule: timestep
``t * (N - 1)`` for eps / v / x0 models, ``sigma = t`` for flow models) and the noise from ``(seed, index)``
on CPU. The denoiser is evaluated without gradients on ``x_t`` (``x + sigma * eps`` in the sampler's sigma
space, ``(1 - t) x + t eps`` for flow), giving ``x0_hat``. With the VP-style coefficients of ``x_t``
(``alpha = 1 / sqrt(1 + sigma^2)``, ``s = sigma / sqrt(1 + sigma^2)``; flow: ``alpha = 1 - t``, ``s = t``) the
noise residual of every parameterisation is ``eps_hat - eps = (alpha / s) * (x - x0_hat)``, so one x0-space
formula serves them all. ``weighting`` picks ``w(t)`` in ``g = w(t) * (eps_hat - eps)``:

* ``dreamfusion``: ``w = s^2`` (= ``1 - alpha_bar`` for VP), the paper's choice: ``g = alpha * s * (x - x0_hat)``;
* ``uniform``: ``w = 1``: ``g = (alpha / s) * (x - x0_hat)`` (large at low noise);
* ``x0``: ``w = s / alpha``: ``g = x - x0_hat``, the plain x0-space residual.

The loss is the stop-gradient target form ``0.5 * sum((x - sg(x - g))^2) / B``, whose gradient with respect to
``x`` is ``g / B`` (B views in the batch); its value is not meaningful, only its gradient. Classifier-free
guidance is not an option here: wire a ``guidance.cfg`` model in (DreamFusion uses large scales).

With a VAE, ``target`` says where the residual is taken:

* ``latent`` (latent SDS, Metzer et al. 2022; Magic3D, Lin et al. 2023): ``x`` is the latent and the gradient
  ``g`` flows back through ``vae.encode``, which therefore runs with autograd.
* ``image``: the denoised latent is decoded and the residual is taken in image space,
  ``g = w(t) * (2 * image - 1 - decode(x0_hat))`` (an image-space score-distillation target, cf. HiFA,
  Zhu et al. 2023); encoder and decoder run without gradients. It avoids the encoder's Jacobian, which is
  unreliable for renders far from a small autoencoder's training data: with a pilot of the ``tiny-shapes`` VAE
  (which reconstructs a grey blob as purple) and an exact latent denoiser of red-circle latents, latent SDS
  left a grey blob greenish after 400 steps while the image target made it a red disk in all 8 test views
  after 200. ``graphs/text_to_3d.json`` uses ``image``.

Optimisation as graph nodes
---------------------------
``optim.watch`` makes the (carried) parameters a fresh autograd leaf, the renderer and ``sds.loss`` build the
graph from it, ``optim.grad`` takes ``d loss / d params`` and ``optim.adam`` (Kingma & Ba 2015, bit-for-bit the
update of ``torch.optim.Adam``) returns new parameters and state. The update is written here because
``torch.optim.Adam`` keeps its state inside the optimizer object and updates in place, where a loop carries state
as data; torch's functional form (``torch.optim._functional``) is private. Parameters, gradients and state are
plain tensors or dicts / lists of tensors, so a ``loop`` carries them. The watch and grad nodes declare
``grad=True``, so a loop containing them runs its body with autograd; both refuse to run without it, which
turns the classic silent failure (gradients quietly missing under ``inference_mode``) into an error.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Annotated, Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodegraph import Field, node
from nodegraph import types as T
from nodegraph.types import Var

from . import adapters
from .diffusion.math import expand_sigma, vp_scale
from .diffusion.parameterization import noised
from .diffusion.schedules import timestep_to_sigma
from .geometry.cameras import generator

S, C, D = Var("space"), Var("channels"), Var("dim")
Weighting = Literal["dreamfusion", "uniform", "x0"]
Fraction = Annotated[float, Field(ge=0, le=1)]
Tree = Any  # a tensor, or a dict / list / tuple of trees


# --- SDS ----------------------------------------------------------------------------------------------------


def sds_sigma(model: Any, fraction: float) -> Tensor:
    """The noise level at ``fraction`` of the denoiser's training schedule."""
    base = adapters.base_of(model)
    if base.kind == "flow":
        return torch.tensor(float(fraction)).clamp(1e-4, 1.0)
    sigmas = base.train_sigmas.float()
    if not sigmas.numel():
        raise ValueError("this denoiser has no training schedule to draw SDS noise levels from")
    return timestep_to_sigma(torch.tensor(fraction * (sigmas.numel() - 1)), sigmas.cpu(), "log").float()


def coefficients(kind: str, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha, s)`` with ``x_t = alpha * x + s * eps`` up to the sampler's scaling (see the module doc)."""
    if kind == "flow":
        return 1 - sigma, sigma
    alpha = vp_scale(sigma)
    return alpha, sigma * alpha


def residual_weight(kind: str, sigma: Tensor, weighting: Weighting) -> Tensor:
    """The factor on the x0-space residual ``x - x0_hat`` that gives ``w(t) * (eps_hat - eps)``."""
    alpha, s = coefficients(kind, sigma)
    return {"dreamfusion": alpha * s, "uniform": alpha / s, "x0": torch.ones_like(s)}[weighting]


def predict_x0(model: Callable[..., Tensor], x: Tensor, cond: Any, sigma: Tensor, noise: Tensor) -> Tensor:
    """The denoiser's x0 prediction for ``x`` noised to ``sigma`` with ``noise`` (no gradients)."""
    with torch.no_grad():
        x = x.detach()
        return model(noised(adapters.base_of(model).kind, x, noise, sigma), sigma.to(x), cond)


def sds_gradient(model: Callable[..., Tensor], x: Tensor, cond: Any, sigma: Tensor, noise: Tensor,
                 weighting: Weighting = "dreamfusion") -> Tensor:
    """``w(t) * (eps_hat - eps)`` for ``x`` (the module doc gives the weightings); no gradient flows through
    the denoiser."""
    weight = residual_weight(adapters.base_of(model).kind, sigma, weighting)
    return expand_sigma(weight, x) * (x.detach() - predict_x0(model, x, cond, sigma, noise))


def sds_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * sum((x - sg(x - grad))^2) / B``: its gradient with respect to ``x`` is ``grad / B``."""
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / x.shape[0]


_GRAD_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, nn.Module]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def autograd_ready(module: nn.Module) -> nn.Module:
    """``module`` itself, or (when its weights were made under ``inference_mode``, as the loaders' are) a frozen
    copy with ordinary tensors, kept while the original lives: inference tensors cannot enter autograd."""
    tensors = list(module.parameters()) + list(module.buffers())
    if not any(t.is_inference() for t in tensors):
        return module
    where = tuple((t.device, t.dtype) for t in tensors[:1])
    with _LOCK:
        hit = _GRAD_COPIES.get(module)
        if hit is None or hit[0] != where:
            with torch.inference_mode(False):
                hit = (where, copy.deepcopy(module).requires_grad_(False))
            _GRAD_COPIES[module] = hit
    return hit[1]


def to_pixels(image: Tensor, size: int) -> Tensor:
    """Rendered image in [0, 1] -> ``[-1, 1]``, resized to ``size`` x ``size`` when set, differentiably."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"sds.loss needs an RGB image batch (B, 3, H, W); got shape {tuple(image.shape)}")
    if size and tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    return image * 2 - 1


def encode(vae: nn.Module, pixels: Tensor) -> Tensor:
    """The VAE's scaled posterior mean; differentiable when autograd is on (see :func:`autograd_ready`)."""
    vae = autograd_ready(vae) if torch.is_grad_enabled() else vae
    mean, _ = vae.encode(pixels.to(next(vae.parameters()).dtype))
    return vae.scale_latent(mean).float()


def decode(vae: nn.Module, latent: Tensor) -> Tensor:
    return vae.decode(vae.unscale_latent(latent.to(next(vae.parameters()).dtype))).float()


def _expand_batch(cond: dict[str, Any] | None, batch: int) -> dict[str, Any]:
    out = {}
    for key, value in (cond or {}).items():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        out[key] = value
    return out


@node("sds.loss", category="3d", grad=True)
def sds_loss_node(model: T.Denoiser(space=S, channels=C, context_dim=D), image: T.Image,
                  cond: T.Conditioning(dim=D) = None, vae: T.VAE(space=S, channels=C) = None,
                  target: Literal["latent", "image"] = "latent",
                  t_min: Fraction = 0.02, t_max: Fraction = 0.98, weighting: Weighting = "dreamfusion",
                  size: Annotated[int, Field(ge=0, le=4096, description="resize the image to this side first; "
                                                                        "0 = as rendered")] = 0,
                  seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0,
                  index: Annotated[int, Field(ge=0)] = 0) -> {"loss": T.Tensor, "sigma": T.Tensor}:
    """Score distillation loss (DreamFusion) of a rendered image under any denoiser, in pixel or VAE latent space."""
    if t_min > t_max:
        raise ValueError(f"t_min ({t_min}) must not exceed t_max ({t_max})")
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError("sds.loss is running without autograd; run it in a loop with \"grad\": true")
    pixels = to_pixels(image, size)
    in_image = vae is not None and target == "image"
    with torch.set_grad_enabled(not in_image):
        x = pixels if vae is None else encode(vae, pixels)
    gen = generator(seed, index)
    fraction = t_min + (t_max - t_min) * torch.rand((), generator=gen, dtype=torch.float64).item()
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
    sigma = sds_sigma(model, fraction).to(x.device)
    cond = _expand_batch(cond, x.shape[0])
    if in_image:  # the residual in image space, against the decoded x0 prediction
        with torch.no_grad():
            target_image = decode(vae, predict_x0(model, x, cond, sigma, noise))
            weight = residual_weight(adapters.base_of(model).kind, sigma, weighting)
            grad = expand_sigma(weight, pixels) * (pixels.detach() - target_image)
        return {"loss": sds_loss(pixels, grad), "sigma": sigma.detach()}
    grad = sds_gradient(model, x, cond, sigma, noise, weighting)
    return {"loss": sds_loss(x, grad), "sigma": sigma.detach()}


# --- functional optimisation ---------------------------------------------------------------------------------


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over matching trees of tensors (dicts, lists, tuples); None leaves stay None."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, *items) for items in zip(tree, *rest))
    return None if tree is None else fn(tree, *rest)


def leaves(tree: Tree) -> list[Tensor]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in leaves(v)]
    return [] if tree is None else [tree]


def _need_autograd(what: str) -> None:
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} is running without autograd (no_grad or inference mode); gradients would be "
                           "missing. Run it inside a loop with \"grad\": true or in a grad=True node")


def adam_step(params: Tree, grads: Tree, state: dict[str, Any] | None, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float = 0.0) -> tuple[Tree, dict[str, Any]]:
    """One Adam update (Kingma & Ba 2015) as ``torch.optim.Adam`` computes it; returns new params and state."""
    b1, b2 = betas
    if state is None:
        state = {"step": 0, "m": tree_map(torch.zeros_like, params), "v": tree_map(torch.zeros_like, params)}
    step = int(state["step"]) + 1
    with torch.no_grad():
        g = tree_map(lambda p, gr: torch.zeros_like(p) if gr is None else gr.detach(), params, grads)
        if weight_decay:
            g = tree_map(lambda gr, p: gr + weight_decay * p.detach(), g, params)
        m = tree_map(lambda mm, gr: torch.lerp(mm, gr, 1 - b1), state["m"], g)
        v = tree_map(lambda vv, gr: vv * b2 + (1 - b2) * gr * gr, state["v"], g)
        c1, c2 = 1 - b1**step, (1 - b2**step) ** 0.5
        new = tree_map(lambda p, mm, vv: p.detach() - (lr / c1) * mm / (vv.sqrt() / c2 + eps), params, m, v)
    return new, {"step": step, "m": m, "v": v}


@node("optim.watch", category="optim", output="params", grad=True)
def watch(params: T.Any) -> T.Any:
    """Make parameters (a tensor or a dict/list of tensors) a fresh autograd leaf to differentiate against."""
    _need_autograd("optim.watch")
    return tree_map(lambda p: p.detach().clone().requires_grad_(True), params)


@node("optim.grad", category="optim", output="grads", grad=True)
def grad_of(loss: T.Tensor, params: T.Any) -> T.Any:
    """Gradients of a scalar loss with respect to watched parameters (same structure as params)."""
    _need_autograd("optim.grad")
    flat = leaves(params)
    if loss.numel() != 1:
        raise ValueError(f"optim.grad needs a scalar loss; got shape {tuple(loss.shape)}")
    if not loss.requires_grad or not all(p.requires_grad for p in flat):
        raise RuntimeError("the loss does not depend on the parameters through autograd: pass the output of "
                           "optim.watch both to the nodes computing the loss and to optim.grad")
    found = torch.autograd.grad(loss.sum(), flat, allow_unused=True)  # None for a leaf the loss does not use
    grads = iter([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(flat, found)])
    return tree_map(lambda p: next(grads), params)


@node("optim.adam", category="optim")
def adam(params: T.Any, grads: T.Any, state: T.Any = None,
         lr: Annotated[float, Field(gt=0)] = 1e-3, beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9,
         beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999, eps: Annotated[float, Field(gt=0)] = 1e-8,
         weight_decay: Annotated[float, Field(ge=0)] = 0.0) -> {"params": T.Any, "state": T.Any}:
    """Functional Adam (Kingma & Ba 2015): (params, grads, state) -> (params, state); state starts as null."""
    new, state = adam_step(params, grads, state, lr, (beta1, beta2), eps, weight_decay)
    return {"params": new, "state": state}
