"""Model configs, named presets and safetensors checkpoint folders.

Every native model is built from a frozen dataclass config (a :class:`ModelConfig`) and picks sizes by
name from its module's ``PRESETS`` through ``Config.from_name`` (the gpt-fast ``ModelArgs`` pattern).

A checkpoint is a folder holding exactly two things this module reads:

- ``config.json``: ``{"model_type": "vae", <config fields>}``; ``model_type`` picks the classes from
  :data:`MODEL_TYPES`, the remaining fields build the config (an unknown field is an error).
- ``model.safetensors``: the model's ``state_dict``.

Loading policy (:func:`load_folder`), in order:

1. Only safetensors is ever read. Pickle-based weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ...)
   are refused by name, never opened.
2. The file's tensor names and shapes are checked against the model before any data is read: missing and
   unexpected keys are reported together, a shape mismatch names the tensor.
3. The model is built on the ``meta`` device (no random init, no memory), then the file's tensors are
   assigned to it, cast to ``dtype`` when one is given (floating tensors only) and moved to ``device``.
   Models therefore keep every tensor they need in their ``state_dict`` (no non-persistent buffers).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
)

# model_type -> (module, config class name, model class name); resolved lazily because the model
# modules import this one.
MODEL_TYPES: Mapping[str, tuple[str, str, str]] = MappingProxyType(
    {
        "vae": ("nodes.models.vae", "VAEConfig", "AutoencoderKL"),
        "text": ("nodes.models.text", "TextConfig", "TextEncoder"),
        "dit": ("nodes.models.dit", "DiTConfig", "DiT"),
        "unet": ("nodes.models.unet", "UNetConfig", "UNet"),
        "controlnet_unet": ("nodes.models.controlnet", "ControlNetUNetConfig", "ControlNetUNet"),
        "controlnet_dit": ("nodes.models.controlnet", "ControlNetDiTConfig", "ControlNetDiT"),
    }
)


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded: bad format, wrong keys or shapes, unknown model type."""


C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model config: plain-data round trip through JSON."""

    model_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, ``model_type`` first."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from :meth:`to_dict` output; lists become tuples, unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type"})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
        if data.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{cls.__name__} expects model_type {cls.model_type!r}, got {data['model_type']!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def from_preset(presets: Mapping[str, C], name: str, kind: str) -> C:
    """Look up a named preset; an unknown name lists the valid ones."""
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; valid names: {', '.join(sorted(presets))}")
    return presets[name]


def model_classes(model_type: str) -> tuple[type[ModelConfig], type[nn.Module]]:
    """The (config class, model class) registered for ``model_type``."""
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model_type {model_type!r}; valid: {', '.join(sorted(MODEL_TYPES))}")
    module_name, config_name, model_name = MODEL_TYPES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def save_folder(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into the folder ``path``."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig) or config.model_type not in MODEL_TYPES:
        raise TypeError(f"{type(model).__name__} has no registered ModelConfig in .config")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "model_type": config.model_type})
    return folder


def load_folder(
    path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the model described by ``path/config.json`` and load ``path/model.safetensors`` into it.

    ``dtype`` (``torch.float32`` / ``float16`` / ``bfloat16`` or their names) casts floating tensors;
    ``None`` keeps the file's dtypes. Returns the model in eval mode on ``device``.
    """
    cast = _as_dtype(dtype)
    folder = Path(path)
    if folder.is_file():
        _refuse_pickle([folder])
        raise CheckpointError(f"{folder} is a file; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        _refuse_pickle(sorted(folder.iterdir()))
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}" + (f" (found {others})" if others else ""))
    config = _read_config(folder / CONFIG_NAME)
    _, model_cls = model_classes(config.model_type)
    with torch.device("meta"):
        model = model_cls(config)
    _check_tensors(weights, {k: tuple(v.shape) for k, v in model.state_dict().items()})

    state = load_file(str(weights), device="cpu")
    state = {k: v.to(device, cast if cast is not None and v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{model_cls.__name__} keeps tensors outside its state_dict: {left}")
    return model.eval()


def _refuse_pickle(files: list[Path]) -> None:
    pickled = [str(f) for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise CheckpointError(
            f"refusing to load {', '.join(pickled)}: pickle-based weight files are never opened; "
            f"only safetensors ({WEIGHTS_NAME}) is supported"
        )


def _read_config(file: Path) -> ModelConfig:
    if not file.is_file():
        raise CheckpointError(f"checkpoint folder {file.parent} has no {CONFIG_NAME}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{file} must be a JSON object with a 'model_type' field")
    config_cls, _ = model_classes(data["model_type"])
    try:
        return config_cls.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from None


def _check_tensors(weights: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights} as safetensors: {err}") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the model: missing keys {_few(missing)}; unexpected keys {_few(unexpected)}"
        )
    wrong = [f"{k}: expected {expected[k]}, file has {found[k]}" for k in expected if expected[k] != found[k]]
    if wrong:
        raise CheckpointError(f"{weights} has tensors of the wrong shape: {'; '.join(wrong)}")


def _few(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a floating torch.dtype or one of {', '.join(DTYPES)}; got {dtype!r}")
