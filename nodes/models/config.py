"""Model configs, named presets and safetensors checkpoint folders.

Every native model is built from a frozen dataclass config (a :class:`ModelConfig`) and picks sizes by
name from its module's ``PRESETS`` through ``Config.from_name`` (the gpt-fast ``ModelArgs`` pattern).

A checkpoint is a folder holding exactly two things this module reads:

- ``config.json``: ``{"model_type": "vae", <config fields>}``; ``model_type`` picks the classes from
  :data:`MODEL_TYPES`, the remaining fields build the config (an unknown field or a field of the wrong type is
  an error).
- ``model.safetensors``: the model's ``state_dict``.

A folder may come from anyone (a model root is often a download folder), so :func:`read_config`, the one reader
of ``config.json``, reads at most :data:`MAX_CONFIG_BYTES` of a regular file, checks every field's type and
keeps string fields (a latent space's name) to short plain names; its error messages name the folder and what
is wrong, never a value or a field name taken from the file. Callers read the config once and pass it on
(``load_folder(..., config=...)``).

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
import functools
import importlib
import json
import re
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, TypeVar

import torch
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nodegraph.safeio import read_bytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes
PLAIN_STRING = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # what a string field of a read config may hold
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")  # a weight file's tensor names quoted in errors; others counted
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


class ForeignModel(CheckpointError):
    """``config.json`` names a ``model_type`` this package does not know (a folder of another program)."""


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
        """Build from :meth:`to_dict` output; lists become tuples, unknown fields and wrong types are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type"})
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}")
        if data.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{cls.__name__} expects model_type {cls.model_type!r}, got {data['model_type']!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        adapters = _field_adapters(cls)
        wrong = []
        for name, value in values.items():
            adapter, label = adapters[name]
            try:
                values[name] = adapter.validate_python(value, strict=True)
            except PydanticValidationError:
                wrong.append(f"{name} ({label})")
        if wrong:  # names this class's fields, never the offending values
            raise ValueError(f"{cls.__name__}: field(s) of the wrong type: {', '.join(wrong)}")
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def _field_adapters(cls: type[ModelConfig]) -> dict[str, tuple[TypeAdapter, str]]:
    """Field name -> (a strict validator of its annotation, the annotation as text)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (TypeAdapter(t), t.__name__ if isinstance(t, type) else str(t))
            for f in dataclasses.fields(cls) for t in [hints[f.name]]}


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
    path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu", *,
    config: ModelConfig | None = None,
) -> nn.Module:
    """Build the model described by ``path/config.json`` and load ``path/model.safetensors`` into it.

    ``dtype`` (``torch.float32`` / ``float16`` / ``bfloat16`` or their names) casts floating tensors;
    ``None`` keeps the file's dtypes. ``config`` is the folder's config when the caller has already read it
    (:func:`read_config`); it is not read again. Returns the model in eval mode on ``device``.
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
    config = read_config(folder) if config is None else config
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


def read_config(folder: str | Path) -> ModelConfig:
    """The checked config of ``folder/config.json`` (see the module docstring: the file may be anyone's).

    Raises :class:`ForeignModel` when its ``model_type`` is not one of :data:`MODEL_TYPES`, otherwise
    :class:`CheckpointError`; neither message quotes the file.
    """
    file = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(read_bytes(file, MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint folder {file.parent} has no {CONFIG_NAME}") from None
    except OSError as err:  # a folder, FIFO or device in its place, a file over the bound, no permission
        raise CheckpointError(f"cannot read {file}: {err.strerror or err}") from None
    except ValueError:  # bad JSON or bad UTF-8 (their messages quote the file)
        raise CheckpointError(f"{file} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointError(f"{file} must be a JSON object with a string 'model_type' field")
    if data["model_type"] not in MODEL_TYPES:
        raise ForeignModel(f"{file} holds a model of another kind (not one of {', '.join(MODEL_TYPES)})")
    config_cls, _ = model_classes(data["model_type"])
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(data) - fields - {"model_type"}
    if unknown:
        raise CheckpointError(f"{file} has {len(unknown)} field(s) a {config_cls.__name__} does not have")
    odd = sorted(k for k in fields & set(data) if isinstance(data[k], str) and not PLAIN_STRING.fullmatch(data[k]))
    if odd:
        raise CheckpointError(f"{file}: field(s) {', '.join(odd)} must be short plain names (letters, digits, "
                              "'.', '_', '+', '-')")
    try:  # from here on every value is a number, a bool, a tuple of numbers or a plain name
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
        shown = [k for k in unexpected if TENSOR_NAME.fullmatch(k)]
        odd = f" and {len(unexpected) - len(shown)} odd name(s)" if len(shown) < len(unexpected) else ""
        raise CheckpointError(
            f"{weights} does not match the model: missing keys {_few(missing)}; unexpected keys {_few(shown)}{odd}"
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
