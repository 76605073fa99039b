"""Toy nodes for the executor, loop, cache, device and engine-API tests.

Every node records its calls in :data:`CALLS` (node id, and whatever else the test needs), so a test can tell
exactly which steps ran. Call :func:`reset` before a run; :func:`registry` builds a fresh registry holding
this pack only (``pack="exec"``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

import nodegraph
from nodegraph import Context, node, types as T

CALLS: list[dict[str, Any]] = []
_LOCK = threading.Lock()
EVENTS: dict[str, threading.Event] = {}
STATE: dict[str, Any] = {}


def reset() -> None:
    with _LOCK:
        CALLS.clear()
        EVENTS.clear()
        STATE.clear()


def _record(ctx: Context, **extra: Any) -> None:
    with _LOCK:
        CALLS.append({"node": ctx.node_id, "thread": threading.current_thread().name, **extra})


def called(kind: str | None = None) -> list[str]:
    """Node ids in call order (optionally only calls recorded with ``kind``)."""
    with _LOCK:
        return [c["node"] for c in CALLS if kind is None or c.get("kind") == kind]


def registry() -> nodegraph.Registry:
    import sys

    reg = nodegraph.Registry()
    reg.add_module(sys.modules[__name__], "exec")
    return reg


# -- scalars -------------------------------------------------------------------------------------------------


@node("ex.num", output="out")
def num(ctx: Context, value: float = 0.0, after: Any = None) -> float:
    """A number (``after`` only orders the step after another one)."""
    _record(ctx)
    return value


@node("ex.add", output="out")
def add(ctx: Context, a: float, b: float = 0.0) -> float:
    _record(ctx)
    return a + b


@node("ex.append", output="out")
def append(ctx: Context, value: Any, acc: list | None = None) -> list:
    """``acc + [value]``; records whether ``acc`` arrived as None."""
    _record(ctx, kind="append", acc_was_none=acc is None)
    return [*(acc or []), value]


# -- tensors -------------------------------------------------------------------------------------------------


@node("ex.tensor", output="out")
def tensor(ctx: Context, shape: list[int], value: float = 0.0, seed: int = -1) -> T.Tensor:
    """``torch.full`` (or seeded normal noise when ``seed >= 0``)."""
    _record(ctx, inference=torch.is_inference_mode_enabled())
    if seed >= 0:
        return torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(seed))
    return torch.full(shape, float(value))


@node("ex.scale", output="out")
def scale(ctx: Context, x: T.Tensor, factor: float = 1.0) -> T.Tensor:
    _record(ctx, kind="scale")
    return x * factor


@node("ex.tadd", output="out")
def tadd(ctx: Context, a: T.Tensor, b: T.Tensor) -> T.Tensor:
    _record(ctx)
    return a + b


@node("ex.modes")
def modes(ctx: Context, x: Any = None) -> {"inference": T.Bool, "grad": T.Bool}:
    """Reports the autograd mode the node runs under."""
    _record(ctx)
    return {"inference": torch.is_inference_mode_enabled(), "grad": torch.is_grad_enabled()}


@node("ex.grad_sq", output="grad", grad=True)
def grad_sq(ctx: Context, x: T.Tensor) -> T.Tensor:
    """d/dx sum(x**2) = 2x, by backprop (needs autograd)."""
    _record(ctx, inference=torch.is_inference_mode_enabled(), grad_enabled=torch.is_grad_enabled(),
            input_is_inference=x.is_inference())
    y = x.detach().requires_grad_(True)
    (y ** 2).sum().backward()
    return y.grad


@node("ex.step", output="out")
def step(x: T.Tensor, sigma: Any, sigma_next: Any) -> T.Tensor:
    """An Euler-like step with a non-linearity (the loop-vs-Python reference step)."""
    return x + (sigma_next - sigma) * torch.tanh(x) * 0.5


def reference_step(x: torch.Tensor, sigma: Any, sigma_next: Any) -> torch.Tensor:
    return step(x, sigma, sigma_next)


@node("ex.gd_step", output="out")
def gd_step(p: T.Tensor, target: T.Tensor, lr: float = 0.1, weight: Any = 1.0) -> T.Tensor:
    """One step of gradient descent on ``sum(weight * (p - target)**2)`` (needs autograd)."""
    q = p.detach().requires_grad_(True)
    loss = (weight * (q - target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, q)
    return (q - lr * g).detach()


@node("ex.gd_step_grad", output="out", grad=True)
def gd_step_grad(p: T.Tensor, target: T.Tensor, lr: float = 0.1, weight: Any = 1.0) -> T.Tensor:
    """:func:`gd_step` declared as a gradient node."""
    return gd_step(p, target, lr, weight)


@node("ex.probe", output="out")
def probe(ctx: Context, x: T.Tensor) -> T.Tensor:
    """``x.sum()``; used for per-iteration (stacked) loop outputs."""
    _record(ctx, kind="probe")
    return x.sum()


@node("ex.shift", output="out")
def shift(x: float, k: Any = 1.0) -> float:
    return x + float(k)


# -- failures, waiting, cancelling ---------------------------------------------------------------------------


@node("ex.fragile", output="out")
def fragile(ctx: Context, x: Any, y: float = 0.0) -> float:
    """Raises ValueError while ``STATE["broken"]`` is true (the 'bug' a test then fixes)."""
    _record(ctx)
    if STATE.get("broken", False):
        raise ValueError(f"boom {y}")
    return float(x if not isinstance(x, torch.Tensor) else x.sum()) + y


@node("ex.rendezvous", output="out")
def rendezvous(ctx: Context, me: str, other: str, after: Any = None) -> bool:
    """Sets event ``me`` and waits (bounded) for event ``other``: True only if both ran at the same time."""
    _record(ctx)
    with _LOCK:
        mine = EVENTS.setdefault(me, threading.Event())
        theirs = EVENTS.setdefault(other, threading.Event())
    mine.set()
    return theirs.wait(timeout=10)


@node("ex.cancel", output="out")
def cancel(ctx: Context, x: float = 0.0) -> float:
    """Cancels ``STATE["token"]`` from inside a running node."""
    _record(ctx)
    STATE["token"].cancel()
    return x


@node("ex.cancel_at", output="out")
def cancel_at(ctx: Context, x: float, index: int, at: int = 0) -> float:
    """Adds 1 to ``x``; cancels ``STATE["token"]`` in iteration ``at``."""
    _record(ctx, kind="iteration", index=index)
    if index == at:
        STATE["token"].cancel()
    return x + 1


# -- models --------------------------------------------------------------------------------------------------


@node("ex.load_model", output="model")
def load_model(ctx: Context, seed: int = 0, width: int = 32, after: Any = None) -> T.Model:
    """A real ``nn.Linear(width, width)`` with seeded weights."""
    _record(ctx, kind="load")
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        model = torch.nn.Linear(width, width)
        model.weight.copy_(torch.randn(width, width, generator=gen) / width ** 0.5)
        model.bias.copy_(torch.randn(width, generator=gen))
    return model


@node("ex.apply_model", output="out")
def apply_model(ctx: Context, model: T.Model, x: T.Tensor) -> T.Tensor:
    _record(ctx, kind="apply", device=str(next(model.parameters()).device))
    return model(x.to(next(model.parameters()).device))


@node("ex.identity", output="out")
def identity(ctx: Context, x: Any) -> Any:
    """Returns its input unchanged (the very same object)."""
    _record(ctx, kind="identity", device=str(ctx.device))
    return x


@node("ex.linspace", output="out")
def linspace(start: float, stop: float, count: int) -> T.Tensor:
    return torch.linspace(start, stop, count)


@node("ex.impure", output="out", cache=False)
def impure(ctx: Context, x: float = 0.0) -> float:
    """Declared impure (``cache=False``): it must run every time."""
    _record(ctx, kind="impure")
    return x


# A graph-defined node type whose implementation contains a loop: shifts ``x`` by ``k`` ``n`` times.
GRAPH_NODES = [{
    "type": "ex.repeat_shift",
    "version": "1.0.0",
    "inputs": {"x": {"type": "Float"}, "n": {"type": "Int", "default": 3}, "k": {"type": "Float", "default": 2.0}},
    "nodes": {
        "lp": {
            "type": "loop",
            "inputs": {"count": {"input": "n"}, "x": {"input": "x"}, "k": {"input": "k"}},
            "body": {
                "inputs": {"x": {"type": "Float", "carry": True}, "k": {"type": "Float"}},
                "nodes": {"s": {"type": "ex.shift", "inputs": {"x": {"input": "x"}, "k": {"input": "k"}}}},
                "outputs": {"x": {"node": "s", "output": "out"}},
            },
        }
    },
    "outputs": {"x": {"node": "lp", "output": "x"}},
}]


# -- graph-building helpers shared by the executor, loop, cache, device and API tests ------------------------

def L(node: str, output: str = "out") -> dict:
    return {"node": node, "output": output}


def graph(nodes: dict, outputs: dict) -> dict:
    return {"version": 1, "nodes": nodes, "outputs": outputs}
