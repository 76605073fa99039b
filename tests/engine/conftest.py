"""Shared fixtures for engine tests: a fresh registry holding the toy pack, an Engine on it, call counters.

Toy node types are documented one per line in :mod:`tests.engine.toy_nodes`; ``toy_nodes.link(id, out)``
builds a link. ``toy_graph`` is a small valid graph using several of them.
"""

from __future__ import annotations

import copy

import pytest

import nodegraph
from tests.engine import toy_nodes

TOY_PACK = "toy"

TOY_GRAPH = {
    "version": 1,
    "nodes": {
        "a": {"type": "toy.const", "inputs": {"value": 1.5}},
        "b": {"type": "toy.add", "inputs": {"a": toy_nodes.link("a"), "b": 2}},
        "n": {"type": "toy.int", "inputs": {"value": 7}},
        "dm": {"type": "toy.divmod", "inputs": {"a": toy_nodes.link("n"), "b": 3}},
        "vae": {"type": "toy.load_vae", "inputs": {"space": "sd15"}},
        "lat": {"type": "toy.latent", "inputs": {"space": "sd15"}},
        "img": {"type": "toy.vae_decode", "inputs": {"vae": toy_nodes.link("vae"), "latent": toy_nodes.link("lat")}},
        "count": {"type": "toy.counter", "inputs": {"x": toy_nodes.link("b")}},
    },
    "outputs": {
        "sum": toy_nodes.link("count"),
        "quotient": toy_nodes.link("dm", "quotient"),
        "image": toy_nodes.link("img", "image"),
    },
}


def make_registry() -> nodegraph.Registry:
    """A new registry holding only the toy pack (no entry points, no plugin folders)."""
    reg = nodegraph.Registry()
    reg.add_module(toy_nodes, TOY_PACK)
    return reg


@pytest.fixture
def registry() -> nodegraph.Registry:
    """A fresh registry with the toy pack; tests may add more node types to it."""
    return make_registry()


@pytest.fixture
def calls():
    """The toy pack's execution counter (type id -> count), cleared before and after the test."""
    toy_nodes.CALLS.clear()
    yield toy_nodes.CALLS
    toy_nodes.CALLS.clear()


@pytest.fixture
def engine(registry, tmp_path) -> nodegraph.Engine:
    """A CPU Engine on the toy registry, with its output and input roots in tmp_path (memory cache only)."""
    return nodegraph.Engine(registry, device="cpu", output_root=tmp_path / "out", input_root=tmp_path)


@pytest.fixture
def toy_graph() -> dict:
    """A deep copy of TOY_GRAPH (valid for the toy registry), free to mutate."""
    return copy.deepcopy(TOY_GRAPH)


@pytest.fixture(autouse=True)
def _reset_exec_nodes():
    """Clear the call log of the executor-test nodes (tests/engine/exec_nodes.py) around every test."""
    from . import exec_nodes

    exec_nodes.reset()
    yield
    exec_nodes.reset()


@pytest.fixture
def reg():
    """A fresh registry holding the executor-test nodes."""
    from . import exec_nodes

    return exec_nodes.registry()
