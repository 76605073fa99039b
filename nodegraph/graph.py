"""The graph format: plain JSON data parsed once into frozen pydantic models.

A graph::

    {
      "version": 1,
      "nodes": {
        "noise":  {"type": "tensor.randn", "inputs": {"seed": 1, "shape": [1, 4, 8, 8]}},
        "scaled": {"type": "tensor.affine", "inputs": {"x": {"node": "noise", "output": "out"}, "scale": 0.5},
                   "device": "cpu"}
      },
      "outputs": {"result": {"node": "scaled", "output": "out"}},
      "meta": {"title": "anything"}
    }

An input value is a literal (any JSON value), a link ``{"node": ID, "output": NAME}``, or — inside a
subgraph (loop body, graph-defined node) — a reference to a subgraph input ``{"input": NAME}``. A literal
object that would look like a link is written ``{"literal": {...}}``.

A ``loop`` node additionally carries a ``body`` subgraph; a graph-defined node type is a subgraph with
declared ``inputs`` plus ``type``/``version`` metadata (see :func:`nodegraph.registry.graph_node_def`). The
loop vocabulary (:data:`LOOP_TYPE`, its options and the implicit body inputs) is defined here, once.

Round trips: ``Graph.model_validate_json(g.model_dump_json())`` and the msgpack equivalents are lossless.
"""

from __future__ import annotations

import json
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from . import types as T

GRAPH_VERSION = 1
SUPPORTED_VERSIONS = (1,)

LOOP_TYPE = "loop"  # the one built-in node type: runs its ``body`` per item of ``over`` or ``count`` times
LOOP_OPTIONS = {"over": T.Any, "count": T.Int, "pairs": T.Bool, "grad": T.Bool}  # the loop node's own inputs
LOOP_IMPLICIT = {"index": T.Int, "item": T.Any, "next_item": T.Any, "total": T.Int}  # inputs every body sees


class Link(BaseModel):
    """A reference to another node's named output."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    node: str
    output: str


class InputRef(BaseModel):
    """A reference to an input of the enclosing subgraph (loop body or graph-defined node)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    input: str


class Literal(BaseModel):
    """An escaped literal, for values that would otherwise parse as a link or input reference."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    literal: Any


InputValue = Union[Link, InputRef, Literal, Any]


def parse_input_value(value: Any) -> Any:
    """Turn link-shaped dicts into :class:`Link`/:class:`InputRef`; leave other JSON values as they are."""
    if isinstance(value, (Link, InputRef, Literal)):
        return value
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"node", "output"}:
            return Link.model_validate(value)
        if keys == {"input"}:
            return InputRef.model_validate(value)
        if keys == {"literal"}:
            return Literal.model_validate(value)
    return value


def literal_value(value: Any) -> Any:
    """The literal carried by an input value (unwraps :class:`Literal`)."""
    return value.literal if isinstance(value, Literal) else value


def _dump_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value


class PortDecl(BaseModel):
    """A declared input of a subgraph: its type, and for loop bodies whether it is carried state."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: Any = "Any"
    carry: bool = False
    optional: bool = False
    default: Any = None
    description: str = ""


class NodeSpec(BaseModel):
    """One node of a graph: its type, pinned version, inputs, device and (loops only) body."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: str
    version: str | None = None
    inputs: dict[str, InputValue] = Field(default_factory=dict)
    device: str | None = None
    body: "Subgraph | None" = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs", mode="before")
    @classmethod
    def _parse_inputs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: parse_input_value(v) for k, v in value.items()}
        return value

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.version is not None:
            out["version"] = self.version
        out["inputs"] = {k: _dump_value(v) for k, v in self.inputs.items()}
        if self.device is not None:
            out["device"] = self.device
        if self.body is not None:
            out["body"] = self.body.model_dump()
        if self.meta:
            out["meta"] = self.meta
        return out


class Subgraph(BaseModel):
    """A graph with declared inputs: a loop body or the implementation of a graph-defined node type."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    inputs: dict[str, PortDecl] = Field(default_factory=dict)
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)
    outputs: dict[str, Link | InputRef] = Field(default_factory=dict)

    @field_validator("outputs", mode="before")
    @classmethod
    def _parse_outputs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: parse_input_value(v) for k, v in value.items()}
        return value


class Graph(BaseModel):
    """A whole graph: version, nodes, named outputs and free metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: int = GRAPH_VERSION
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)
    outputs: dict[str, Link] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.model_dump(), **kwargs)

    def to_msgpack(self) -> bytes:
        from .serialize import packb

        return packb(self.model_dump())

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Graph":
        from .serialize import unpackb

        return cls.model_validate(unpackb(data))

    def with_inputs(self, overrides: dict[tuple[str, str], Any]) -> "Graph":
        """A copy with literal inputs replaced: ``{(node_id, input_name): value}``."""
        nodes = dict(self.nodes)
        for (node_id, name), value in overrides.items():
            spec = nodes[node_id]
            inputs = dict(spec.inputs)
            inputs[name] = parse_input_value(value)
            nodes[node_id] = spec.model_copy(update={"inputs": inputs})
        return self.model_copy(update={"nodes": nodes})


NodeSpec.model_rebuild()


def graph_json_schema() -> dict[str, Any]:
    """The JSON Schema of the graph format (``nodegraph schema``)."""
    schema = Graph.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nodegraph graph"
    return schema
