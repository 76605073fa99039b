"""Checks on the values that flow along edges: what a node returned against its declared port type, bounds from
:class:`nodegraph.limits.Limits`, and the in-place-mutation guard.

Policy
------
* **Outputs are checked where they are made.** After a node runs, each output value is checked against the port
  type the node declared (:func:`check_output`): a ``Tensor``/``Latent``/``Image``/... port holds a
  ``torch.Tensor``, ``Int``/``Float``/``Bool``/``String`` hold those scalars, ``List``/``Dict`` their containers;
  model handles and ``Any`` may hold any object. Every value is also walked: nesting over ``max_nesting`` (a
  reference cycle counts as infinitely deep), a tensor over ``max_tensor_elements`` or a string/bytes value over
  ``max_value_bytes`` fails the node that produced it — the producer is blamed, not its consumer. A value that
  passes is safe to cache, summarise and write.
* **Cache hits are checked too** (:func:`matches`): a disk entry that decodes to something else than the step's
  declared outputs is a miss, and the step runs again.
* **Inputs are never changed.** A node receives its inputs' containers (lists, dicts, tuples) as fresh copies
  (:func:`nodegraph.devices.move_to` rebuilds them at the edge; the tensors inside are shared, not copied). Tensors are shared with the cache, so a node that
  changes one in place (``x.add_(1)``) would change what every other consumer and every later run sees: the
  executor records each input tensor's version counter before the node runs (:func:`tensor_versions`, also the
  parameters of input models) and compares after (:func:`changed`). A change fails the node with an error
  naming the port and the producer, and the executor drops the damaged cache entries. Steps run under
  ``torch.no_grad`` rather than ``torch.inference_mode`` because inference tensors have no version counter; a
  tensor made under ``inference_mode`` (by a node itself, or inside a loop body, which runs under it for speed)
  is cloned once when it is stored, so every cached tensor can be checked. Inside a loop body only the loop's
  own inputs are guarded, not one body node's outputs against another's. Changes through ``.data`` or ``.numpy()`` views escape the counter: nodes must not do that.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from . import types as T
from .limits import Limits, LimitExceeded

_TENSOR_TYPES = {"Tensor", "Latent", "Image", "Mask", "Sigmas", "Noise"}
_PY_CHECKS: dict[str, tuple[type, ...]] = {
    "Int": (int,), "Float": (float, int), "Bool": (bool,), "String": (str,), "List": (list, tuple), "Dict": (dict,),
}


class OutputTypeError(TypeError):
    """A node returned a value that its declared output port cannot hold."""


def _kind_ok(value: Any, ptype: T.PortType) -> bool:
    name = ptype.name
    if name in _TENSOR_TYPES:
        return isinstance(value, torch.Tensor)
    if name in _PY_CHECKS:
        if name in ("Int", "Float") and isinstance(value, bool):
            return False
        if name == "Float" and isinstance(value, torch.Tensor):  # a 0-d tensor is accepted where a float is
            return value.dim() == 0
        return isinstance(value, _PY_CHECKS[name])
    return True  # Any, model handles, Conditioning, Mesh, File: shape is the producer's contract


def check_output(value: Any, ptype: T.PortType | None, limits: Limits, where: str) -> None:
    """Raise :class:`OutputTypeError` or :class:`LimitExceeded` when ``value`` may not leave its producer."""
    if ptype is not None and not _kind_ok(value, ptype):
        raise OutputTypeError(f"output {where!r} is declared {ptype} but the node returned a {type(value).__name__}")
    if _needs_walk(value):
        walk(value, limits, where)


def walk(value: Any, limits: Limits, where: str) -> None:
    """Bound a value's nesting, tensor sizes and string sizes; a reference cycle counts as too deep."""
    _walk(value, 0, limits, where, set(), set())


_LEAVES = (torch.Tensor, str, bytes, bytearray)
_CONTAINERS = (list, tuple, dict)
_PLAIN = (int, float, str, bool, type(None))  # values that hold no tensor (the walkers' fast path)


def _walk(item: Any, depth: int, limits: Limits, where: str, on_path: set[int], done: set[int]) -> None:
    if isinstance(item, torch.Tensor):
        if item.numel() > limits.max_tensor_elements:
            raise LimitExceeded(f"output {where!r} holds a tensor of {item.numel():,} elements, over the limit of "
                                f"{limits.max_tensor_elements:,} (max_tensor_elements)", "max_tensor_elements")
        return
    if isinstance(item, (str, bytes, bytearray)):
        if len(item) > limits.max_value_bytes:
            raise LimitExceeded(f"output {where!r} holds a {type(item).__name__} of {len(item):,} characters/bytes, "
                                f"over the limit of {limits.max_value_bytes:,} (max_value_bytes)", "max_value_bytes")
        return
    key = id(item)
    if key in on_path:
        raise LimitExceeded(f"output {where!r} refers to itself (a reference cycle)", "max_nesting")
    if key in done:
        return  # shared by two parents: checked once
    if depth >= limits.max_nesting:
        raise LimitExceeded(f"output {where!r} is nested deeper than {limits.max_nesting} levels", "max_nesting")
    on_path.add(key)
    for child in (item.values() if isinstance(item, dict) else item):
        if isinstance(child, _CONTAINERS) or isinstance(child, _LEAVES):
            _walk(child, depth + 1, limits, where, on_path, done)
    on_path.discard(key)
    done.add(key)


def _needs_walk(value: Any) -> bool:
    return isinstance(value, _CONTAINERS) or isinstance(value, _LEAVES)


def matches(outputs: Any, types: dict[str, T.PortType], limits: Limits) -> bool:
    """Whether a cache entry holds what the step's declared outputs promise (see the module docstring)."""
    if not isinstance(outputs, dict):
        return False
    for name, ptype in types.items():
        if name in outputs:
            try:
                check_output(outputs[name], ptype, limits, name)
            except (OutputTypeError, LimitExceeded):
                return False
    return True


def tensors_in(value: Any, modules_of: Any = None, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor reachable from a value: inside lists, tuples and dicts (16 levels), and the parameters and
    buffers of the models ``modules_of(value)`` lists."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        if depth < 16:
            for v in (value.values() if isinstance(value, dict) else value):
                yield from tensors_in(v, modules_of, depth + 1)
    elif modules_of is not None:
        for module in modules_of(value):
            yield from module.parameters()
            yield from module.buffers()


def tensor_versions(inputs: dict[str, Any], modules_of: Any) -> list[tuple[str, torch.Tensor, int]]:
    """``(port, tensor, version)`` for every tensor reachable from the inputs, model parameters included
    (inference tensors have no version counter and are skipped)."""
    return [(port, t, t._version) for port, value in inputs.items() if not isinstance(value, _PLAIN)
            for t in tensors_in(value, modules_of) if not t.is_inference()]


def changed(before: list[tuple[str, torch.Tensor, int]]) -> list[tuple[str, torch.Tensor]]:
    """``(port, tensor)`` of the tensors changed in place since :func:`tensor_versions` recorded them."""
    return [(port, t) for port, t, version in before if t._version != version]


def detach_inference(outputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs with inference tensors cloned into normal ones (so their version counters exist)."""
    if not any(t.is_inference() for v in outputs.values() if not isinstance(v, _PLAIN) for t in tensors_in(v)):
        return outputs
    with torch.inference_mode(False):
        return {k: _clone_inference(v) for k, v in outputs.items()}


def _clone_inference(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, list):
        return [_clone_inference(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_inference(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_inference(v) for k, v in value.items()}
    return value
