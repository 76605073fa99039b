"""Model handles that samplers see: ``denoiser(x, sigma, cond) -> x0``.

* :class:`DenoiserModel` wraps a native network (U-Net or DiT) with its parameterisation (eps / v / x0 /
  flow) and training noise schedule, through :class:`nodes.diffusion.parameterization.Denoiser`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diffusion.parameterization import KINDS, Denoiser, cfg_combine, to_denoised, to_model_output
from .diffusion.schedules import PRESETS as TRAIN_PRESETS
from .diffusion.schedules import TrainSchedule

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


def schedule_of(info: DenoiserInfo) -> TrainSchedule | None:
    return None if info.prediction == "flow" else TRAIN_PRESETS[info.train_schedule]


class DenoiserModel(nn.Module):
    """A U-Net or DiT network plus its parameterisation: ``forward(x, sigma, cond) -> x0``."""

    def __init__(self, net: nn.Module, info: DenoiserInfo):
        super().__init__()
        self.net = net
        self.info = info
        schedule = schedule_of(info)
        self.num_train_timesteps = schedule.num_train_timesteps if schedule else 1000
        train_sigmas = schedule.train_sigmas() if schedule else None
        self.register_buffer("train_sigmas", train_sigmas if train_sigmas is not None else torch.zeros(0),
                             persistent=False)
        self.uses_pooled = "pooled" in net.forward.__code__.co_varnames

    @property
    def kind(self) -> str:
        return self.info.prediction

    @property
    def space(self) -> str | None:
        return self.info.latent_space

    def _raw(self, x_in: Tensor, t: Tensor, cond: dict[str, Any] | None) -> Tensor:
        cond = cond or {}
        kwargs: dict[str, Any] = {"context": cond.get("tokens"), "context_mask": cond.get("mask")}
        if self.uses_pooled:
            kwargs["pooled"] = cond.get("pooled")
        if cond.get("control") is not None:
            kwargs["control"] = cond["control"]
        dtype = next(self.net.parameters()).dtype
        kwargs = {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
        return self.net(x_in.to(dtype), t, **kwargs).to(x_in.dtype)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Any] | None = None) -> Tensor:
        sigmas = self.train_sigmas.float() if self.train_sigmas.numel() else None
        den = Denoiser(self._raw, self.kind, sigmas, self.info.interpolation, self.num_train_timesteps)
        return den(x, sigma, cond)

    def to_output(self, denoised: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The raw network output that would give ``denoised`` (used by guidance rescale)."""
        return to_model_output(self.kind, denoised, x, sigma)

    def from_output(self, out: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        return to_denoised(self.kind, out, x, sigma)


def concat_cond(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Stack two conditionings along the batch, padding token sequences to the same length."""
    out: dict[str, Any] = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            if va is not None or vb is not None:
                raise ValueError(f"conditionings differ: only one has {key!r}")
            continue
        if key == "control":
            raise ValueError("ControlNet residuals are added by the ControlNet wrapper, after guidance batching")
        if va.dim() >= 2 and va.shape[1] != vb.shape[1]:
            length = max(va.shape[1], vb.shape[1])
            va, vb = _pad_tokens(va, length), _pad_tokens(vb, length)
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
