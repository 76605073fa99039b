"""ControlNet nodes: load a ControlNet, apply it to a denoiser, and make control images from pictures.

Wiring: ``model.load_denoiser`` -> ``control.apply`` (one per ControlNet; chain them to stack) ->
``guidance.cfg`` -> sampler. The ControlNet wrapper (:class:`Controlled`) implements the denoiser interface
``(x, sigma, cond) -> x0`` and must sit *inside* guidance: it computes residuals for whatever batch reaches it
(cond and uncond together under batched CFG, one at a time under sequential CFG) and hands them to the base
network in ``cond["control"]``. ``control.apply`` refuses a model that is already guided.

Policy of the wrapper:

* **Inputs.** The ControlNet sees the same network input and timestep as the base network (``c_in`` and
  ``model_timestep`` of the base :class:`nodes.adapters.DenoiserModel`'s parameterisation) and the same
  conditioning (tokens, mask; pooled for a DiT).
* **Schedule window.** ``start`` / ``end`` are fractions of the sampling steps of the ``sigmas`` wired into
  ``control.apply`` (the schedule the sampler runs), with diffusers' ``control_guidance_start/end`` rule: step
  ``i`` of ``n`` (evaluating at ``sigmas[i]``) is controlled iff ``i / n >= start`` and ``(i + 1) / n <= end``.
  The rule becomes a sigma interval once, so any evaluation whose sigma lies in it is controlled (Heun's second
  evaluation at ``sigmas[i + 1]`` included). With the defaults 0 and 1 every step is controlled and ``sigmas``
  may be left out.
* **Strength** multiplies the residuals; 0 leaves the base model's output bit-identical (nothing is computed).
* **Stacking.** Each wrapper adds its residuals to those already in ``cond["control"]`` (summed element-wise,
  shapes checked), so chained ControlNets give the sum of their residuals.
* **Control image.** (B, C, H, W) in [0, 1]; B is 1 or the latent batch (repeated for the CFG batch). One
  channel is repeated to the ControlNet's hint channels, an alpha channel is dropped. It must be the latent's
  size times the ControlNet's factor (the VAE factor): an image of the same aspect ratio but another size is
  resized (bilinear, antialiased) with a :class:`ControlImageResized` warning; another aspect ratio is refused
  (crop it first with ``image.crop``). Its hint embedding is computed once per size and device when gradients
  are off (sampling) and repeated to the batch.

Preprocessors: ``control.edges`` (Sobel magnitude, or Canny-like: Gaussian blur, Sobel, non-maximum suppression,
hysteresis) and ``control.object_mask`` (pixels clearly brighter than a near-black background, or of a colour).
"""

from __future__ import annotations

import math
import warnings
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodegraph import Field, node
from nodegraph import types as T
from nodegraph.types import Var

from . import adapters
from .diffusion.math import append_dims, expand_sigma
from .diffusion.parameterization import c_in, model_timestep
from .model_nodes import DType, load_checked, read_config, weights_fingerprint
from .models.controlnet import ControlNetDiT, ControlNetUNet
from .models.dit import DiT
from .models.unet import UNet

S, C, D = Var("space"), Var("channels"), Var("dim")
_M = T.Denoiser(space=S, channels=C, context_dim=D)
CONTROLNET_TYPES = ("controlnet_unet", "controlnet_dit")
Fraction = Annotated[float, Field(ge=0, le=1)]


class ControlImageResized(UserWarning):
    """A control image of the right aspect ratio but the wrong size was resized to the latent's pixel size."""


# -- the wrapper -----------------------------------------------------------------------------------------------


def sigma_window(sigmas: Tensor | None, start: float, end: float) -> tuple[float, float] | None:
    """The (low, high) sigma interval of the controlled steps, ``(0, inf)`` for all, None for no step."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1; got start={start}, end={end}")
    if start == 0.0 and end == 1.0:
        return 0.0, math.inf
    if sigmas is None or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError("start/end are fractions of the sampling schedule: wire the sampler's sigmas into 'sigmas'")
    n = len(sigmas) - 1
    first, last = math.ceil(start * n - 1e-9), math.floor(end * n + 1e-9) - 1
    if first > last:
        return None
    s = sigmas.detach().double().cpu()
    low, high = float(s[last]), float(s[first])
    return low - 1e-6 * abs(low), high + 1e-6 * abs(high)


def network_inputs(base: adapters.DenoiserModel, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(x * c_in(sigma), timestep (N,))``: what the base network receives for the sampler-space ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    train_sigmas = base.train_sigmas.float() if base.train_sigmas.numel() else None
    t = model_timestep(base.kind, sigma, train_sigmas, base.info.interpolation, base.num_train_timesteps)
    return x * expand_sigma(c_in(base.kind, sigma), x), (t.expand(x.shape[:1]) if t.ndim == 0 else t)


def add_control(a: Any, b: Any) -> Any:
    """Element-wise sum of two residual sets (U-Net dicts or DiT lists; None entries are zero)."""
    if a is None:
        return b
    if isinstance(a, dict) != isinstance(b, dict):
        raise ValueError("stacked ControlNets are of different kinds (U-Net and DiT residuals cannot be summed)")
    if isinstance(a, dict):
        down_a, down_b = a.get("down"), b.get("down")
        down = down_b if down_a is None else down_a if down_b is None else _add_lists(down_a, down_b, "down")
        return {"down": down, "mid": _add(a.get("mid"), b.get("mid"), "mid")}
    return _add_lists(a, b, "block")


def _add_lists(a: list, b: list, what: str) -> list:
    if len(a) != len(b):
        raise ValueError(f"stacked ControlNets give {len(a)} and {len(b)} {what} residuals")
    return [_add(x, y, f"{what}[{i}]") for i, (x, y) in enumerate(zip(a, b))]


def _add(x: Tensor | None, y: Tensor | None, where: str) -> Tensor | None:
    if x is None or y is None:
        return y if x is None else x
    if x.shape != y.shape:
        raise ValueError(f"stacked ControlNets disagree on residual {where}: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x + y


def check_pair(controlnet: nn.Module, net: nn.Module) -> None:
    """Refuse a ControlNet whose residuals do not fit the denoiser network, naming what differs."""
    if isinstance(controlnet, ControlNetUNet) and isinstance(net, UNet):
        have, want = controlnet.encoder, net.encoder
        if (have.skip_channels, have.mid_channels) != (want.skip_channels, want.mid_channels):
            raise ValueError(f"this ControlNet gives residuals with channels {have.skip_channels} (mid "
                             f"{have.mid_channels}) but the U-Net's skips have {want.skip_channels} (mid "
                             f"{want.mid_channels}): it was made for another U-Net")
        fields = ("in_channels", "context_dim")
    elif isinstance(controlnet, ControlNetDiT) and isinstance(net, DiT):
        fields = ("in_channels", "hidden_size", "depth", "patch_size", "context_dim", "pooled_dim", "pooled_tokens",
                  "text_tokens")
    else:
        raise ValueError(f"a {type(controlnet).__name__} cannot control a {type(net).__name__}")
    wrong = [f"{f} {getattr(controlnet.config, f)} != {getattr(net.config, f)}" for f in fields
             if getattr(controlnet.config, f) != getattr(net.config, f)]
    if wrong:
        raise ValueError(f"this ControlNet was made for another {type(net).__name__}: {'; '.join(wrong)}")


class Controlled:
    """A denoiser with a ControlNet: ``(x, sigma, cond) -> x0`` of ``inner`` with residuals in ``cond["control"]``.

    ``inner`` is a :class:`nodes.adapters.DenoiserModel` or another ``Controlled`` (never a guided model); see
    the module docstring for the schedule window, strength, stacking and control-image policy.
    """

    def __init__(self, inner: Any, controlnet: nn.Module, image: Tensor, strength: float = 1.0,
                 start: float = 0.0, end: float = 1.0, sigmas: Tensor | None = None):
        chain = inner
        while hasattr(chain, "inner") and not isinstance(chain, adapters.Guided):
            chain = chain.inner
        if isinstance(chain, adapters.Guided):
            raise ValueError("apply the ControlNet before guidance: wire the loader's model into control.apply and "
                             "control.apply into guidance.cfg (residuals must be computed for the CFG batch)")
        if not isinstance(chain, adapters.DenoiserModel):
            raise TypeError(f"a ControlNet wraps a DenoiserModel, got {type(chain).__name__}")
        check_pair(controlnet, chain.net)
        if image.dim() != 4:
            raise ValueError(f"a control image must be (B, C, H, W); got shape {tuple(image.shape)}")
        self.inner, self.controlnet, self.image, self.strength = inner, controlnet, image, float(strength)
        self.window = sigma_window(sigmas, start, end)
        self._hints: dict[tuple, Tensor] = {}
        self._noted: set[tuple[int, int]] = set()

    def __nodegraph_modules__(self) -> list[nn.Module]:
        modules = {id(m): m for m in [*adapters.modules_of(self.inner), self.controlnet]}  # each network once
        return list(modules.values())

    @property
    def space(self) -> str | None:
        return getattr(adapters.base_of(self), "space", None)

    def active(self, sigma: Tensor | float, batch: int) -> Tensor | None:
        """Per-sample bool (N,) of samples whose sigma lies in the window; None when none does."""
        if self.strength == 0.0 or self.window is None:
            return None
        s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1).expand(batch)
        on = (s >= self.window[0]) & (s <= self.window[1])
        return on if bool(on.any()) else None

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any] | None = None) -> Tensor:
        cond = cond or {}
        on = self.active(sigma, x.shape[0])
        if on is None:
            return self.inner(x, sigma, cond)
        control = self.residuals(x, sigma, cond, on)
        return self.inner(x, sigma, {**cond, "control": add_control(cond.get("control"), control)})

    def residuals(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any], on: Tensor | None = None) -> Any:
        """This ControlNet's residuals for the batch ``x`` at ``sigma``, times strength; ``on`` (N,) bool (from
        :meth:`active`) zeroes the samples outside the schedule window. Differentiable when grad is enabled."""
        base = adapters.base_of(self)
        x_in, t = network_inputs(base, x, sigma)
        dtype = next(self.controlnet.parameters()).dtype
        kwargs: dict[str, Any] = {"context": cond.get("tokens"), "context_mask": cond.get("mask")}
        if isinstance(self.controlnet, ControlNetDiT):
            kwargs["pooled"] = cond.get("pooled")
        kwargs = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        out = self.controlnet(x_in.to(dtype), t, hint_embedding=self.hint(x), **kwargs)
        weight: Tensor | float = self.strength
        if on is not None and not bool(on.all()):
            weight = self.strength * on.to(x.device, dtype)
        out_dtype = next(base.net.parameters()).dtype

        def scale(r: Tensor | None) -> Tensor | None:
            if r is None:
                return None
            w = append_dims(weight, r.dim()) if isinstance(weight, Tensor) else weight
            return (r * w).to(out_dtype)

        if isinstance(out, dict):
            return {"down": [scale(r) for r in out["down"]], "mid": scale(out["mid"])}
        return [scale(r) for r in out]

    def hint(self, x: Tensor) -> Tensor:
        """The control image's hint embedding for the latent batch ``x`` (cached per size while sampling)."""
        net = self.controlnet
        dtype = next(net.parameters()).dtype
        key = (tuple(x.shape[-2:]), str(x.device), dtype)
        emb = None if torch.is_grad_enabled() else self._hints.get(key)
        if emb is None:
            image = self.fit_image(x.shape[-2] * net.config.hint_factor, x.shape[-1] * net.config.hint_factor)
            emb = net.embed_hint(image.to(x.device, dtype))
            if not torch.is_grad_enabled():
                self._hints[key] = emb
        n, b = x.shape[0], emb.shape[0]
        if n % b:
            raise ValueError(f"control image batch {b} does not divide the latent batch {n}")
        return emb if n == b else emb.repeat(n // b, *([1] * (emb.dim() - 1)))

    def fit_image(self, height: int, width: int) -> Tensor:
        """The control image with the ControlNet's channel count at ``height`` x ``width`` (see the policy)."""
        image, want = self.image.float(), self.controlnet.config.hint_channels
        if image.shape[1] == 4 and want == 3:
            image = image[:, :3]
        elif image.shape[1] == 1 and want != 1:
            image = image.expand(-1, want, -1, -1)
        if image.shape[1] != want:
            raise ValueError(f"the control image has {image.shape[1]} channels; this ControlNet takes {want}")
        h, w = image.shape[-2:]
        if (h, w) == (height, width):
            return image
        if h * width != w * height:
            raise ValueError(f"the control image is {w}x{h} but the latent needs {width}x{height} (another aspect "
                             "ratio); crop it to that ratio (image.crop) or resize it (image.resize) first")
        if (h, w) not in self._noted:
            self._noted.add((h, w))
            warnings.warn(f"control image {w}x{h} resized to {width}x{height} (the latent's pixel size)",
                          ControlImageResized, stacklevel=2)
        return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


# -- nodes ----------------------------------------------------------------------------------------------------


def _controlnet_types(literals: dict) -> dict[str, T.PortType]:
    cfg = read_config(literals["path"], CONTROLNET_TYPES)
    return {"controlnet": T.ControlNet(space=cfg.get("space"))}


@node("model.load_controlnet", category="model", output="controlnet", fingerprint=weights_fingerprint,
      refine=_controlnet_types)
def load_controlnet(path: str, dtype: DType = "float32") -> T.ControlNet:
    """Load a U-Net or DiT ControlNet from a checkpoint folder (safetensors only)."""
    return load_checked(path, dtype, CONTROLNET_TYPES)


@node("control.apply", category="control", output="model")
def apply_controlnet(model: _M, controlnet: T.ControlNet(space=S), image: T.Image, sigmas: T.Sigmas = None,
                     strength: Annotated[float, Field(ge=0, le=10, description="residual scale; 0 = off")] = 1.0,
                     start: Fraction = 0.0, end: Fraction = 1.0) -> _M:
    """Apply a ControlNet to a denoiser (before guidance); chain several to stack them."""
    return Controlled(model, controlnet, image, strength, start, end, sigmas)


def _sobel(image: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel Sobel gradients (B, C, H, W) each, replicate-padded; a 0 -> 1 step gives |g| = 4."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype, device=image.device)
    c = image.shape[1]
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.expand(c, 1, 3, 3), groups=c)
    gy = F.conv2d(padded, kx.t().expand(c, 1, 3, 3), groups=c)
    return gx, gy


def _blur(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device) ** 2 / (2 * sigma**2))
    k, c = k / k.sum(), image.shape[1]
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                     groups=c)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def _shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., y, x] = t[..., y + dy, x + dx]``, zero outside."""
    h, w = t.shape[-2:]
    return F.pad(t, (1, 1, 1, 1))[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _non_max_suppression(mag: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """Keep pixels that are a maximum along their gradient direction (4 quantised directions)."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = torch.round(angle / 45.0).long() % 4
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        peak = (mag > _shift(mag, dy, dx)) & (mag >= _shift(mag, -dy, -dx))
        keep |= (sector == k) & peak
    return mag * keep


def _hysteresis(mag: Tensor, low: float, high: float) -> Tensor:
    """Edges: pixels >= high, grown through 8-connected pixels >= low."""
    weak, edges = mag >= low, mag >= high
    for _ in range(mag.shape[-1] * mag.shape[-2]):
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


@node("control.edges", category="control", output="image")
def edges(image: T.Image, method: Literal["canny", "sobel"] = "canny",
          low: Annotated[float, Field(ge=0, le=1, description="hysteresis: weak edge threshold")] = 0.1,
          high: Annotated[float, Field(ge=0, le=1, description="hysteresis: strong edge threshold")] = 0.2,
          blur: Annotated[float, Field(ge=0, le=8, description="Gaussian sigma before the gradient")] = 0.0) -> T.Image:
    """Edge map (B, 3, H, W): Sobel magnitude, or Canny-like binary edges (non-max suppression + hysteresis).

    The gradient of each pixel is that of its colour channel with the largest Sobel magnitude, scaled so a 0 -> 1
    step gives 1; thresholds are on that scale.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W); got shape {tuple(image.shape)}")
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    rgb = image[:, :3].float() if image.shape[1] >= 3 else image[:, :1].float()
    if blur > 0:
        rgb = _blur(rgb, blur)
    gx, gy = _sobel(rgb)
    mags = (gx**2 + gy**2).sqrt() / 4.0
    mag, idx = mags.max(dim=1, keepdim=True)  # (B, 1, H, W)
    if method == "sobel":
        out = mag.clamp(0, 1)
    else:
        gx, gy = gx.gather(1, idx), gy.gather(1, idx)
        out = _hysteresis(_non_max_suppression(mag, gx, gy), low, high).float()
    return out.expand(-1, 3, -1, -1).contiguous()


@node("control.object_mask", category="control")
def object_mask(image: T.Image, method: Literal["brightness", "color"] = "brightness",
                threshold: Annotated[float, Field(ge=0, le=1, description="brightness: min of the max channel")] = 0.3,
                color: Annotated[list[float], Field(min_length=3, max_length=3)] = [1.0, 0.0, 0.0],
                tolerance: Annotated[float, Field(ge=0, le=1, description="color: max per-channel distance")] = 0.15,
                ) -> {"image": T.Image, "mask": T.Mask}:
    """Object mask: pixels clearly brighter than a near-black background, or within ``tolerance`` of ``color``.

    ``image`` is the mask as a grey (B, 3, H, W) control image, ``mask`` the same as (B, 1, H, W).
    """
    if image.dim() != 4 or image.shape[1] not in (1, 3, 4):
        raise ValueError(f"image must be (B, C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
    rgb = image[:, :3].float() if image.shape[1] >= 3 else image.float().expand(-1, 3, -1, -1)
    if method == "brightness":
        mask = rgb.amax(dim=1, keepdim=True) > threshold
    else:
        ref = torch.tensor(color, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        mask = (rgb - ref).abs().amax(dim=1, keepdim=True) <= tolerance
    mask = mask.float()
    return {"image": mask.expand(-1, 3, -1, -1).contiguous(), "mask": mask}
