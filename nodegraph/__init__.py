"""nodegraph: run generative-model pipelines written as typed JSON graphs.

Public API::

    from nodegraph import Engine, node, Context, Field, types
"""

from pydantic import Field

from . import types
from .engine import Engine, RunResult, default_registry
from .errors import Cancelled, GraphValidationError, Issue, NodeExecutionError, NodegraphError, PluginError
from .events import CancelToken, Event
from .executor import RunReport
from .graph import Graph, Link, Subgraph
from .node import Context, NodeDef, define, node
from .registry import Registry

__version__ = "0.1.0"

__all__ = [
    "CancelToken", "Cancelled", "Context", "Engine", "Event", "Field", "Graph", "GraphValidationError", "Issue",
    "Link", "NodeDef", "NodeExecutionError", "NodegraphError", "PluginError", "Registry", "RunReport", "RunResult",
    "Subgraph", "default_registry", "define", "node", "types",
]
