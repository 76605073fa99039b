"""A small typed node pack for engine tests (no model code; every node is cheap and runs on CPU).

Every node records its execution in :data:`CALLS` (type id -> count), and, when the environment variable
``NODEGRAPH_TOY_LOG`` names a file, appends its type id to that file, so tests can tell whether a node ran
in this process or in a CLI subprocess. The module imports only ``nodegraph`` and ``torch``: the CLI tests
copy it into a plugin folder as it is.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Annotated, Any, Literal

import torch

from nodegraph import Field, node, types as T
from nodegraph.types import Var

CALLS: Counter[str] = Counter()
_LOCK = threading.Lock()
LOG_ENV = "NODEGRAPH_TOY_LOG"
S = Var("s")  # the latent space a VAE and a latent must share


def _ran(type_id: str) -> None:
    with _LOCK:
        CALLS[type_id] += 1
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(type_id + "\n")


class ToyVAE:
    """A stand-in for a VAE model handle: remembers its latent space."""

    def __init__(self, space: str):
        self.space = space


@node("toy.const", category="toy", output="out")
def const(value: float = 0.0) -> T.Float:
    """Float source: returns ``value``."""
    _ran("toy.const")
    return value


@node("toy.int", category="toy", output="out")
def int_source(value: int = 0) -> T.Int:
    """Int source: returns ``value``."""
    _ran("toy.int")
    return value


@node("toy.flag", category="toy", output="out")
def flag(value: bool = False) -> T.Bool:
    """Bool source: returns ``value``."""
    _ran("toy.flag")
    return value


@node("toy.add", category="toy", output="out")
def add(a: float, b: float = 0.0) -> T.Float:
    """a + b; ``a`` is required."""
    _ran("toy.add")
    return a + b


@node("toy.repeat", category="toy", output="out")
def repeat(text: str = "x", times: Annotated[int, Field(ge=0, le=10)] = 1) -> T.String:
    """``text * times``; ``times`` is an Int bounded to [0, 10]."""
    _ran("toy.repeat")
    return text * times


@node("toy.choose", category="toy", output="out")
def choose(mode: Literal["a", "b", "c"] = "a") -> T.String:
    """Returns ``mode``, an enum of "a" / "b" / "c"."""
    _ran("toy.choose")
    return mode


@node("toy.divmod", category="toy")
def divmod_(a: int, b: Annotated[int, Field(ge=1)] = 1) -> {"quotient": T.Int, "remainder": T.Int}:
    """Two outputs: ``a // b`` and ``a % b`` (``b`` >= 1)."""
    _ran("toy.divmod")
    return {"quotient": a // b, "remainder": a % b}


def _vae_type(literals) -> dict:
    return {"out": T.VAE(space=literals.get("space"))}


@node("toy.load_vae", category="toy", output="out", refine=_vae_type)
def load_vae(space: Literal["sd15", "sdxl"]) -> T.VAE:
    """A VAE handle whose output type is refined from the literal: VAE(space=<space>)."""
    _ran("toy.load_vae")
    return ToyVAE(space)


def _latent_type(literals) -> dict:
    return {"out": T.Latent(space=literals.get("space"), channels=literals.get("channels"))}


@node("toy.latent", category="toy", output="out", refine=_latent_type)
def latent(space: Literal["sd15", "sdxl"], channels: Annotated[int, Field(ge=1, le=16)] = 4,
           size: Annotated[int, Field(ge=1, le=64)] = 2) -> T.Latent:
    """A zero latent (1, channels, size, size) typed Latent(space=<space>, channels=<channels>)."""
    _ran("toy.latent")
    return torch.zeros(1, channels, size, size)


@node("toy.vae_encode", category="toy", output="out")
def vae_encode(vae: T.VAE(space=S), image: T.Image) -> T.Latent(space=S):
    """Image -> Latent in the VAE's space (output type bound through the type variable)."""
    _ran("toy.vae_encode")
    return image.mean(dim=1, keepdim=True).repeat(1, 4, 1, 1)


@node("toy.vae_decode", category="toy", output="image")
def vae_decode(vae: T.VAE(space=S), latent: T.Latent(space=S)) -> T.Image:
    """Latent -> Image; VAE and latent must agree on the space."""
    _ran("toy.vae_decode")
    return latent[:, :3].clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


@node("toy.image", category="toy", output="image")
def image(size: Annotated[int, Field(ge=1, le=64)] = 4, value: Annotated[float, Field(ge=0, le=1)] = 0.5) -> T.Image:
    """A constant grey image (1, 3, size, size)."""
    _ran("toy.image")
    return torch.full((1, 3, size, size), float(value))


@node("toy.tensor_sum", category="toy", output="out")
def tensor_sum(x: T.Tensor) -> T.Float:
    """Sum of a tensor's elements (any tensor-like port type may feed it)."""
    _ran("toy.tensor_sum")
    return float(x.sum())


@node("toy.counter", category="toy", output="out")
def counter(x: float = 0.0) -> T.Float:
    """Returns ``x``; its executions are counted in CALLS["toy.counter"] (the 'did anything run' probe)."""
    _ran("toy.counter")
    return x


@node("toy.echo", category="toy", output="out")
def echo(value: Any = None) -> T.Any:
    """Returns ``value`` unchanged: an untyped port that takes any literal or link."""
    _ran("toy.echo")
    return value


@node("toy.fail", category="toy", output="out")
def fail(x: float = 0.0, message: str = "toy failure") -> T.Float:
    """Always raises RuntimeError(message) at run time (validation passes)."""
    _ran("toy.fail")
    raise RuntimeError(message)


def link(node_id: str, output: str = "out") -> dict:
    """The JSON form of a link to ``node_id``'s output."""
    return {"node": node_id, "output": output}


#: a graph-defined node type: out = (x + y) + y, built from toy.add
GRAPH_NODES = [{
    "type": "toy.add_twice",
    "version": "1.0.0",
    "inputs": {"x": {"type": "Float"}, "y": {"type": "Float", "optional": True, "default": 1.0}},
    "nodes": {
        "first": {"type": "toy.add", "inputs": {"a": {"input": "x"}, "b": {"input": "y"}}},
        "second": {"type": "toy.add", "inputs": {"a": {"node": "first", "output": "out"}, "b": {"input": "y"}}},
    },
    "outputs": {"out": {"node": "second", "output": "out"}},
    "output_types": {"out": "Float"},
}]
