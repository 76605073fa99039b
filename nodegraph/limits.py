"""Resource limits: one frozen config object for everything a hostile or mistaken graph could make unbounded.

An :class:`Engine` holds one :class:`Limits` (``Engine(limits=...)``; the CLI's ``--timeout`` sets the deadline).
Policy:

* **At validation**, where the cost is visible from literals, a graph over a limit is refused with the issue
  code ``too_large`` (or ``too_deep`` for nesting) and nothing runs: loop ``count`` literals over
  ``max_loop_iterations``; graph-defined node expansion over ``max_expanded_nodes``; node types that declare a
  ``cost`` hook (``tensor.randn``'s shape, an empty latent's width x height x batch, ...) over ``max_pixels`` or
  ``max_tensor_elements``; literals nested deeper than ``max_nesting``; graph documents over ``max_graph_bytes``.
* **While running**, what only running can see: a loop over a linked sequence longer than
  ``max_loop_iterations``; a node output holding a tensor over ``max_tensor_elements``, a string or bytes over
  ``max_value_bytes``, or nesting over ``max_nesting`` fails that node (exit 1); the run is cancelled at
  ``deadline_s`` seconds (checked between steps, between loop iterations and at every progress report).

The defaults let every shipped graph and a 2048 x 2048 SD-class image run and refuse the bombs (an 8192 x 8192
image, a 10^30-iteration loop, an exponential graph-defined pack).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 4096  # per image (height x width), pixel or latent-implied
    max_tensor_elements: int = 1 << 28  # one tensor: 268M elements (1 GiB as float32)
    max_loop_iterations: int = 100_000  # one loop execution
    max_expanded_nodes: int = 100_000  # nodes after expanding every graph-defined node and loop body
    max_nesting: int = 128  # depth of literals, loop/graph-node nesting, and node output values
    max_value_bytes: int = 256 << 20  # one string / bytes value produced by a node
    max_graph_bytes: int = 64 << 20  # a graph document read from a file or given as text
    max_cache_entry_bytes: int = 16 << 30  # one disk-cache entry read back
    deadline_s: float | None = None  # wall-clock seconds for a whole run; None = no deadline

    def with_(self, **changes: Any) -> "Limits":
        return replace(self, **changes)


DEFAULT_LIMITS = Limits()


class LimitExceeded(Exception):
    """A value or a loop went over a :class:`Limits` field while running; ``limit`` names the field."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit
