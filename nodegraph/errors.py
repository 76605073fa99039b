"""Errors are data: every problem the engine reports carries a code, the node id, the port and a message."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One validation problem. ``node``/``port`` are ``None`` when the problem is graph-wide."""

    code: str
    message: str
    node: str | None = None
    port: str | None = None
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["hint"] is None:
            del out["hint"]
        return out

    def __str__(self) -> str:
        where = ".".join(p for p in (self.node, self.port) if p) or "graph"
        text = f"[{self.code}] {where}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class NodegraphError(Exception):
    """Base class of every error the engine raises on purpose."""


class GraphValidationError(NodegraphError):
    """The graph (or an override) is invalid; no node was executed. ``issues`` lists every problem."""

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        lines = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"invalid graph: {len(self.issues)} problem(s)\n{lines}")


class NodeExecutionError(NodegraphError):
    """A node raised while running. Names the node, its type, the exception and summaries of its inputs."""

    def __init__(self, node: str, node_type: str, error: BaseException, inputs: dict[str, str]):
        self.node = node
        self.node_type = node_type
        self.error = error
        self.inputs = inputs
        shown = ", ".join(f"{k}={v}" for k, v in inputs.items())
        super().__init__(f"node {node!r} ({node_type}) failed: {type(error).__name__}: {error}\n  inputs: {shown}")

    def to_json(self) -> dict[str, Any]:
        return {
            "code": "node_failed",
            "node": self.node,
            "type": self.node_type,
            "exception": type(self.error).__name__,
            "message": str(self.error),
            "inputs": self.inputs,
        }


class Cancelled(NodegraphError):
    """The run was cancelled: through its :class:`~nodegraph.events.CancelToken` (``code == "cancelled"``), by an
    interrupt (``"interrupted"``) or at its deadline (``"deadline"``)."""

    def __init__(self, message: str = "run cancelled", code: str = "cancelled"):
        super().__init__(message)
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self)}


class PluginError(NodegraphError):
    """A node pack could not be registered (duplicate type id, bad definition)."""


def summarize(value: Any, limit: int = 80) -> str:
    """A short, safe description of an input value for error messages."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"Tensor({str(value.dtype).replace('torch.', '')}, {list(value.shape)}, {value.device})"
    if isinstance(value, torch.nn.Module):
        return f"{type(value).__name__}(module)"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(summarize(v, 24) for v in list(value)[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__}[{len(value)}]({inner}{more})"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
