"""Port types with parameters, type variables and the unification rules used by validation.

A port type is a name plus frozen parameters: ``Latent(space="sd15", channels=4)``. A parameter that is
``None`` is unconstrained; a :class:`Var` is a type variable scoped to one node instance, so a node can
say "my output latent lives in the same space as my input VAE":

    S = Var("space")
    def decode(vae: VAE(space=S), latent: Latent(space=S)) -> Image: ...

Policy, in the order :func:`check_edge` applies it:

1. ``Any`` on either side matches.
2. Scalars coerce explicitly: ``Int`` -> ``Float`` is allowed (widening), ``Float`` -> ``Int`` is not,
   ``Bool`` is neither an ``Int`` nor a ``Float``.
3. A tensor-valued type (``Latent``, ``Image``, ``Mask``, ``Sigmas``, ``Noise``) may feed a ``Tensor`` port.
4. Otherwise the names must be equal and every parameter must unify: equal concrete values, or one side
   unconstrained (``None``), or a ``Var`` which binds to the other side's value (first binding wins; a later
   conflicting binding is a mismatch that names both types).

Port types are descriptive only: they never hold data. Values flowing along an edge are plain Python / torch
objects.
"""

from __future__ import annotations

import enum
import types as _pytypes
import typing
from dataclasses import dataclass, field
from typing import Any as _Any
from typing import Mapping


@dataclass(frozen=True)
class Var:
    """A type variable, e.g. ``Var("space")``; bound per node instance during validation."""

    name: str

    def __repr__(self) -> str:
        return f"?{self.name}"


@dataclass(frozen=True)
class PortType:
    """A named port type with parameters (``None`` = unconstrained, :class:`Var` = type variable)."""

    name: str
    params: tuple[tuple[str, _Any], ...] = ()
    choices: tuple[_Any, ...] | None = field(default=None, compare=False)

    def __call__(self, **params: _Any) -> "PortType":
        """Return this type with some parameters set: ``Latent(space="sd15")``."""
        known = dict(self.params)
        unknown = set(params) - set(known)
        if unknown:
            raise TypeError(f"{self.name} has no parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        known.update(params)
        return PortType(self.name, tuple(known.items()), self.choices)

    def param(self, key: str) -> _Any:
        return dict(self.params).get(key)

    @property
    def is_scalar(self) -> bool:
        return self.name in _SCALARS

    def variables(self) -> set[str]:
        return {v.name for _, v in self.params if isinstance(v, Var)}

    def substitute(self, bindings: Mapping[str, _Any]) -> "PortType":
        """Replace bound variables by their values."""
        new = tuple((k, bindings.get(v.name, v) if isinstance(v, Var) else v) for k, v in self.params)
        return PortType(self.name, new, self.choices)

    def unbind(self) -> "PortType":
        """Replace type variables left unbound by ``None`` (unconstrained)."""
        if not any(isinstance(v, Var) for _, v in self.params):
            return self
        return PortType(self.name, tuple((k, None if isinstance(v, Var) else v) for k, v in self.params), self.choices)

    def __str__(self) -> str:
        shown = [f"{k}={v!r}" for k, v in self.params if v is not None]
        return f"{self.name}({', '.join(shown)})" if shown else self.name

    def to_json(self) -> dict[str, _Any]:
        out: dict[str, _Any] = {"name": self.name}
        params = {k: (repr(v) if isinstance(v, Var) else v) for k, v in self.params if v is not None}
        if params:
            out["params"] = params
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def _t(name: str, **params: _Any) -> PortType:
    return PortType(name, tuple(params.items()))


# Scalars and generic values.
Any = _t("Any")
Int = _t("Int")
Float = _t("Float")
Bool = _t("Bool")
String = _t("String")
List = _t("List")
Dict = _t("Dict")
# Tensors.
Tensor = _t("Tensor")
Image = _t("Image")  # float (B, C, H, W) in [0, 1]
Mask = _t("Mask")  # float (B, 1, H, W) in [0, 1]
Sigmas = _t("Sigmas")  # 1-d float tensor, decreasing, usually ending in 0
Noise = _t("Noise")
Latent = _t("Latent", space=None, channels=None)
Conditioning = _t("Conditioning", dim=None)
Mesh = _t("Mesh")
File = _t("File")  # a path to a file a node wrote (inside the output root)
# Model handles.
Denoiser = _t("Denoiser", space=None, channels=None, context_dim=None, family=None)
VAE = _t("VAE", space=None, channels=None)
TextEncoder = _t("TextEncoder", dim=None, family=None)
ControlNet = _t("ControlNet", space=None)
Model = _t("Model")

_SCALARS = {"Int", "Float", "Bool", "String"}
_TENSORLIKE = {"Latent", "Image", "Mask", "Sigmas", "Noise", "Tensor"}

BUILTIN_TYPES: dict[str, PortType] = {
    t.name: t
    for t in (Any, Int, Float, Bool, String, List, Dict, Tensor, Image, Mask, Sigmas, Noise, Latent,
              Conditioning, Mesh, File, Denoiser, VAE, TextEncoder, ControlNet, Model)
}


class TypeMismatch(Exception):
    """Raised by :func:`check_edge` with a human-readable reason."""


def check_edge(src: PortType, dst: PortType, bindings: dict[str, _Any]) -> None:
    """Check that a value of type ``src`` may flow into a port of type ``dst``.

    ``bindings`` holds the destination node's type-variable bindings and is updated in place.
    Raises :class:`TypeMismatch` naming both types.
    """
    if src.name == "Any" or dst.name == "Any":
        return
    if src.name != dst.name:
        if src.name == "Int" and dst.name == "Float":
            return
        if dst.name == "Tensor" and src.name in _TENSORLIKE:
            return
        raise TypeMismatch(f"{src} cannot flow into {dst}")
    dparams = dict(dst.params)
    pending: dict[str, _Any] = {}
    for key, want in dparams.items():
        have = src.param(key)
        if isinstance(want, Var):
            want = bindings.get(want.name, pending.get(want.name, want))
        if isinstance(have, Var) or have is None:
            continue
        if isinstance(want, Var):
            pending[want.name] = have
            continue
        if want is not None and want != have:
            raise TypeMismatch(f"{src} cannot flow into {dst.substitute(bindings)}: {key} {have!r} != {want!r}")
    bindings.update(pending)


# ---------------------------------------------------------------------------------------------------------
# Python annotations -> port types
# ---------------------------------------------------------------------------------------------------------

#: The one map between port-type names and the Python types their literals have (JSON's scalars and containers).
PY_TYPES: dict[str, type] = {"Int": int, "Float": float, "Bool": bool, "String": str, "List": list, "Dict": dict}
_PY_SCALARS: dict[_Any, PortType] = {py: BUILTIN_TYPES[name] for name, py in PY_TYPES.items()}


def from_annotation(ann: _Any) -> PortType:
    """Map a Python annotation (``int``, ``Literal[...]``, an Enum, ``Annotated[...]``, a PortType) to a port type."""
    if isinstance(ann, PortType):
        return ann
    if ann is None or ann is _Any or ann is typing.Any or ann is type(None):
        return Any
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(ann)
        for item in extra:
            if isinstance(item, PortType):
                return item
        return from_annotation(base)
    if origin is typing.Literal:
        choices = typing.get_args(ann)
        kinds = {type(c) for c in choices}
        base = _PY_SCALARS.get(kinds.pop(), Any) if len(kinds) == 1 else Any
        return PortType(base.name, base.params, tuple(choices))
    if origin in (typing.Union, _pytypes.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return from_annotation(args[0]) if len(args) == 1 else Any
    if origin in (list, tuple):
        return List
    if origin is dict:
        return Dict
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return PortType(String.name, (), tuple(m.value for m in ann))
    if ann in _PY_SCALARS:
        return _PY_SCALARS[ann]
    if isinstance(ann, type):
        try:
            import torch

            if issubclass(ann, torch.Tensor):
                return Tensor
            if issubclass(ann, torch.nn.Module):
                return Model
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    return Any


def type_of_value(value: _Any) -> PortType:
    """The port type of a literal value found in a graph (used to check literals against linked ports)."""
    if isinstance(value, bool):
        return Bool
    if isinstance(value, int):
        return Int
    if isinstance(value, float):
        return Float
    if isinstance(value, str):
        return String
    if isinstance(value, list):
        return List
    if isinstance(value, dict):
        return Dict
    return Any


def parse_type(spec: _Any) -> PortType:
    """Parse a type written in JSON: ``"Latent"`` or ``{"name": "Latent", "params": {"space": "sd15"}}``."""
    if isinstance(spec, PortType):
        return spec
    if isinstance(spec, str):
        if spec not in BUILTIN_TYPES:
            raise ValueError(f"unknown port type {spec!r}; known: {sorted(BUILTIN_TYPES)}")
        return BUILTIN_TYPES[spec]
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        base = parse_type(spec["name"])
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"type params must be an object, got {params!r}")
        params = {k: Var(v[1:]) if isinstance(v, str) and v.startswith("?") else v for k, v in params.items()}
        try:
            return base(**params)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError(f"cannot parse port type {spec!r}")
