"""Model handles that samplers see: ``denoiser(x, sigma, cond) -> x0``.

* :class:`DenoiserModel` wraps a native network (U-Net or DiT) with its parameterisation (eps / v / x0 /
  flow) and training noise schedule (:mod:`nodes.diffusion.parameterization`); it is the one path from
  ``(x, sigma, cond)`` to the network's inputs and back.
* :class:`Controlled` adds a ControlNet's residuals to a :class:`DenoiserModel`'s network call (its docstring
  has the policy).
* :class:`Guided` is classifier-free guidance (Ho & Salimans 2022) as one more wrapper around any denoiser,
  with guidance rescale (Lin et al. 2023). ``batched`` runs cond and uncond in one forward pass;
  ``sequential`` runs them one after the other (lower peak memory); both give the same result.

Conditioning travels as a plain dict of tensors ``{"tokens": (B, L, D), "mask": (B, L) bool,
"pooled": (B, D)}`` (so it caches to disk like any tensor output); an optional ``"control"`` entry carries
ControlNet residuals to the network.

Wrappers are not ``nn.Module``s themselves: they expose ``__nodegraph_modules__`` so the engine's residency
manager moves and charges the wrapped network once, not once per wrapper.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion.math import append_dims
from .diffusion.parameterization import KINDS, cfg_combine, network_input, to_denoised, to_model_output
from .diffusion.schedules import PRESETS as TRAIN_PRESETS
from .diffusion.schedules import TrainSchedule
from .models.controlnet import ControlNetDiT, ControlNetUNet
from .models.dit import DiT
from .models.unet import UNet

SIDECAR = "denoiser.json"


@dataclass(frozen=True)
class DenoiserInfo:
    """What a sampler needs to know about a denoiser checkpoint (``denoiser.json`` beside ``config.json``)."""

    prediction: str = "eps"
    train_schedule: str = "sd15"
    latent_space: str | None = None
    interpolation: str = "log"

    @classmethod
    def read(cls, folder: str | Path) -> "DenoiserInfo":
        path = Path(folder) / SIDECAR
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        info = cls(**data)
        if info.prediction not in KINDS:
            raise ValueError(f"{path}: prediction must be one of {KINDS}, got {info.prediction!r}")
        if info.prediction != "flow" and info.train_schedule not in TRAIN_PRESETS:
            raise ValueError(f"{path}: train_schedule must be one of {sorted(TRAIN_PRESETS)}")
        return info

    def write(self, folder: str | Path) -> None:
        Path(folder, SIDECAR).write_text(json.dumps(self.__dict__, indent=2) + "\n")


@dataclass(frozen=True)
class SamplingDefaults:
    """How a checkpoint's own scheduler config spaces steps (what ``schedule.scheduler`` uses for ``spacing=
    "default"``) and scales the first noise: ``spacing`` None means each scheduler's own default; ``start`` is
    diffusers' ``init_noise_sigma`` rule ("sigma": the first sigma; "vp": ``sqrt(sigma**2 + 1)``, what diffusers'
    Euler schedulers use with leading spacing and ComfyUI's KSampler at full denoise)."""

    spacing: str | None = None
    steps_offset: int = 0
    start: str = "sigma"


def schedule_of(info: DenoiserInfo) -> TrainSchedule | None:
    return None if info.prediction == "flow" else TRAIN_PRESETS[info.train_schedule]


class DenoiserModel(nn.Module):
    """A U-Net or DiT network plus its parameterisation: ``forward(x, sigma, cond) -> x0``.

    The one network-call path: :meth:`network_inputs` turns the sampler-space ``x``, ``sigma`` and the
    conditioning dict into what the network takes (``x * c_in``, the timestep, keyword arguments),
    :meth:`call_network` calls it in its dtype, :meth:`network_output` is the two together (the raw output the
    training loss compares with its target), and :meth:`forward` maps that output to x0. ControlNets
    (:class:`Controlled`) and training reach the network through these methods. An adapter for another network
    class (diffusers' ``UNet2DConditionModel``, a transformer) subclasses this and overrides
    :meth:`call_network` to rename the keyword arguments and unwrap the output; the scaling stays here.

    ``takes_pooled`` says whether the network takes the pooled text vector; by default the network's own
    ``takes_pooled`` attribute (False when it has none). ``schedule`` is the training noise schedule (default: the
    preset ``info.train_schedule`` names; a checkpoint passes the one its scheduler config gives) and ``sampling``
    the scheduler config's spacing rules (:class:`SamplingDefaults`).
    """

    def __init__(self, net: nn.Module, info: DenoiserInfo, takes_pooled: bool | None = None,
                 schedule: TrainSchedule | None = None, sampling: SamplingDefaults | None = None):
        super().__init__()
        self.net = net
        self.info = info
        self.schedule = schedule = schedule if schedule is not None else schedule_of(info)
        self.sampling = sampling or SamplingDefaults()
        self.num_train_timesteps = schedule.num_train_timesteps if schedule else 1000
        train_sigmas = schedule.train_sigmas() if schedule else None
        self.register_buffer("train_sigmas", train_sigmas if train_sigmas is not None else torch.zeros(0),
                             persistent=False)
        self.takes_pooled = bool(getattr(net, "takes_pooled", False) if takes_pooled is None else takes_pooled)

    @property
    def kind(self) -> str:
        return self.info.prediction

    @property
    def space(self) -> str | None:
        return self.info.latent_space

    def network_inputs(self, x: Tensor, sigma: Tensor | float,
                       cond: dict[str, Any] | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``(x * c_in(sigma), timestep (N,), kwargs)`` for the sampler-space ``x``, in ``x``'s dtype.

        ``kwargs`` holds ``context`` and ``context_mask`` (the conditioning's tokens and mask), ``pooled`` when
        the network takes it, and ``control`` (ControlNet residuals) when the conditioning carries them.
        """
        cond = cond or {}
        sigmas = self.train_sigmas.float() if self.train_sigmas.numel() else None
        x_in, t = network_input(self.kind, x, sigma, sigmas, self.info.interpolation, self.num_train_timesteps)
        kwargs: dict[str, Any] = {"context": cond.get("tokens"), "context_mask": cond.get("mask")}
        if self.takes_pooled:
            kwargs["pooled"] = cond.get("pooled")
        if cond.get("control") is not None:
            kwargs["control"] = cond["control"]
        return x_in, t, kwargs

    def call_network(self, x_in: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The network's raw output for inputs from :meth:`network_inputs`, computed in the network's dtype and
        returned in ``x_in``'s."""
        dtype = next(self.net.parameters()).dtype
        return self.net(x_in.to(dtype), t, **to_dtype(kwargs, dtype)).to(x_in.dtype)

    def network_output(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any] | None = None) -> Tensor:
        """The raw network output (eps / v / x0 / velocity) for the sampler-space ``x`` at ``sigma``."""
        return self.call_network(*self.network_inputs(x, sigma, cond))

    def forward(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any] | None = None) -> Tensor:
        return to_denoised(self.kind, self.network_output(x, sigma, cond), x, sigma)

    def to_output(self, denoised: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The raw network output that would give ``denoised`` (used by guidance rescale)."""
        return to_model_output(self.kind, denoised, x, sigma)

    def from_output(self, out: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        return to_denoised(self.kind, out, x, sigma)


def to_dtype(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating-point tensors among the values cast to ``dtype`` (masks, None and residual lists untouched)."""
    return {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


def concat_cond(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Stack two conditionings along the batch. Token sequences of different lengths (a long prompt in chunks
    against a short negative) are padded when both carry a mask, else repeated to a common length (what ComfyUI
    does: attention over a sequence repeated k times gives the same result)."""
    out: dict[str, Any] = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            if va is not None or vb is not None:
                raise ValueError(f"conditionings differ: only one has {key!r}")
            continue
        if key == "control":
            raise ValueError("ControlNet residuals are added by the ControlNet wrapper, after guidance batching")
        if va.dim() >= 2 and va.shape[1] != vb.shape[1] and key in ("tokens", "mask"):
            if "mask" in a and "mask" in b:  # masked: pad, the padding is masked out
                length = max(va.shape[1], vb.shape[1])
                va, vb = _pad_tokens(va, length), _pad_tokens(vb, length)
            else:  # unmasked (checkpoint encoders): repeat each to a common length, which attention cannot tell
                length = math.lcm(va.shape[1], vb.shape[1])
                va = va.repeat(1, length // va.shape[1], *([1] * (va.dim() - 2)))
                vb = vb.repeat(1, length // vb.shape[1], *([1] * (vb.dim() - 2)))
        out[key] = torch.cat([va, vb])
    return out


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    pad = length - t.shape[1]
    if pad == 0:
        return t
    shape = (t.shape[0], pad, *t.shape[2:])
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=1)


def modules_of(model: Any) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return [model]
    return list(getattr(model, "__nodegraph_modules__", lambda: [])())


def base_of(model: Any) -> Any:
    """The innermost handle (a :class:`DenoiserModel`) under any number of wrappers."""
    while hasattr(model, "inner"):
        model = model.inner
    return model


class Guided:
    """Classifier-free guidance around a denoiser, with guidance rescale and batched/sequential modes."""

    def __init__(self, inner: Any, negative: dict[str, Any], scale: float, rescale: float = 0.0,
                 mode: str = "batched"):
        if mode not in ("batched", "sequential"):
            raise ValueError(f"mode must be 'batched' or 'sequential', got {mode!r}")
        self.inner, self.negative, self.scale, self.rescale, self.mode = inner, negative, scale, rescale, mode

    def __nodegraph_modules__(self) -> list[nn.Module]:
        return modules_of(self.inner)

    @property
    def space(self) -> str | None:
        return getattr(base_of(self), "space", None)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any]) -> Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, cond)
        negative = _match_batch(self.negative, x.shape[0])
        cond = _match_batch(cond, x.shape[0])
        if self.mode == "batched":
            both = self.inner(torch.cat([x, x]), sigma, concat_cond(cond, negative))
            d_cond, d_uncond = both.chunk(2)
        else:
            d_cond = self.inner(x, sigma, cond)
            d_uncond = self.inner(x, sigma, negative)
        if self.rescale == 0.0:
            return cfg_combine(d_cond, d_uncond, self.scale)
        # Rescale acts on the model's own output space (Lin et al. 2023 apply it to noise predictions).
        base = base_of(self)
        out = cfg_combine(base.to_output(d_cond, x, sigma), base.to_output(d_uncond, x, sigma), self.scale,
                          self.rescale)
        return base.from_output(out, x, sigma)


def _match_batch(cond: dict[str, Any], batch: int) -> dict[str, Any]:
    out = {}
    for key, value in cond.items():
        if isinstance(value, Tensor) and value.shape[0] != batch:
            if value.shape[0] != 1:
                raise ValueError(f"negative conditioning has batch {value.shape[0]}, latent has {batch}")
            value = value.expand(batch, *value.shape[1:])
        out[key] = value
    return out


# -- ControlNet ----------------------------------------------------------------------------------------------


class ControlImageResized(UserWarning):
    """A control image of the right aspect ratio but the wrong size was resized to the latent's pixel size."""


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
    """Refuse a ControlNet whose residuals do not fit the denoiser network, naming what differs. A ControlNet of
    another class (a checkpoint's, :mod:`nodes.checkpoints.controlnet`) is asked itself: ``check_fits(net)``."""
    check_fits = getattr(controlnet, "check_fits", None)
    if callable(check_fits):
        check_fits(net)
        return
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

    ``inner`` is a :class:`DenoiserModel` or another ``Controlled``, never a guided model: the wrapper sits *inside*
    guidance (``model.load_denoiser`` -> ``control.apply``, one per ControlNet, chained to stack -> ``guidance.cfg``
    -> sampler) and computes residuals for whatever batch reaches it (cond and uncond together under batched CFG,
    one at a time under sequential CFG). Policy:

    * Inputs. The ControlNet sees what the base network sees: the base DenoiserModel's ``network_inputs``
      (``x * c_in``, the timestep, tokens and mask; pooled when the ControlNet takes it).
    * Schedule window. ``start`` / ``end`` are fractions of the sampling steps of the ``sigmas`` wired into
      ``control.apply`` (the schedule the sampler runs), with diffusers' ``control_guidance_start/end`` rule: step
      ``i`` of ``n`` (evaluating at ``sigmas[i]``) is controlled iff ``i / n >= start`` and ``(i + 1) / n <= end``.
      The rule becomes a sigma interval once, so any evaluation whose sigma lies in it is controlled (Heun's second
      evaluation at ``sigmas[i + 1]`` included). With the defaults 0 and 1 every step is controlled and ``sigmas``
      may be left out.
    * Strength multiplies the residuals; 0 leaves the base model's output bit-identical (nothing is computed).
    * Stacking. Each wrapper adds its residuals to those already in ``cond["control"]`` (summed element-wise,
      shapes checked), so chained ControlNets give the sum of their residuals.
    * Control image. (B, C, H, W) in [0, 1]; B is 1 or the latent batch (repeated for the CFG batch). One channel
      is repeated to the ControlNet's hint channels, an alpha channel is dropped. It must be the latent's size times
      the ControlNet's factor (the VAE factor): an image of the same aspect ratio but another size is resized
      (bilinear, antialiased) with a ControlImageResized warning; another aspect ratio is refused (crop it first
      with ``image.crop``). Its hint embedding is computed once per size and device when gradients are off
      (sampling) and repeated to the batch.
    """

    def __init__(self, inner: Any, controlnet: nn.Module, image: Tensor, strength: float = 1.0,
                 start: float = 0.0, end: float = 1.0, sigmas: Tensor | None = None):
        chain = inner
        while hasattr(chain, "inner") and not isinstance(chain, Guided):
            chain = chain.inner
        if isinstance(chain, Guided):
            raise ValueError("apply the ControlNet before guidance: wire the loader's model into control.apply and "
                             "control.apply into guidance.cfg (residuals must be computed for the CFG batch)")
        if not isinstance(chain, DenoiserModel):
            raise TypeError(f"a ControlNet wraps a DenoiserModel, got {type(chain).__name__}")
        check_pair(controlnet, chain.net)
        if image.dim() != 4:
            raise ValueError(f"a control image must be (B, C, H, W); got shape {tuple(image.shape)}")
        self.inner, self.controlnet, self.image, self.strength = inner, controlnet, image, float(strength)
        self.window = sigma_window(sigmas, start, end)
        self._hints: dict[tuple, Tensor] = {}
        self._noted: set[tuple[int, int]] = set()

    def __nodegraph_modules__(self) -> list[nn.Module]:
        modules = {id(m): m for m in [*modules_of(self.inner), self.controlnet]}  # each network once
        return list(modules.values())

    @property
    def space(self) -> str | None:
        return getattr(base_of(self), "space", None)

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
        base = base_of(self)
        x_in, t, kwargs = base.network_inputs(x, sigma, {k: v for k, v in cond.items() if k != "control"})
        if not getattr(self.controlnet, "takes_pooled", False):
            kwargs.pop("pooled", None)
        dtype = next(self.controlnet.parameters()).dtype
        out = self.controlnet(x_in.to(dtype), t, hint_embedding=self.hint(x), **to_dtype(kwargs, dtype))
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
