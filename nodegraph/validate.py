"""Validation: find every problem in a graph at once, before any node runs or any weight loads.

Error codes (``Issue.code``):

==================  =====================================================================================
``bad_json``        the file is not JSON / msgpack
``bad_graph``       the document does not have the graph shape (pydantic reports where)
``bad_version``     unsupported graph ``version``
``unknown_type``    no registered node type with that id (close matches in the hint)
``node_version``    the graph pins a major version different from the installed node type's
``unknown_input``   an input name the node type does not have
``missing_input``   a required input is neither linked nor given
``missing_node``    a link names a node that does not exist
``unknown_output``  a link names an output the source node does not have
``bad_reference``   ``{"input": ...}`` used outside a subgraph, or naming an undeclared subgraph input
``type_mismatch``   the linked output's type cannot flow into the input (both types named)
``wrong_type``      a literal of the wrong JSON type
``out_of_range``    a literal outside the input's bounds
``not_in_enum``     a literal not among the allowed choices
``needs_link``      a literal given to a port that only accepts links (tensors, models)
``cycle``           the graph has a cycle (the nodes on it are named)
``bad_output``      a graph output that links to a missing node or output
``bad_override``    a ``--set NODE.INPUT=VALUE`` that names no node/input, or is not of that form
``bad_loop``        a loop node's options or body are inconsistent
``recursive_type``  a graph-defined node type that (directly or not) contains itself
==================  =====================================================================================

:class:`nodegraph.Engine` adds ``bad_device`` for a device pin (anywhere, loop bodies included) that this
machine cannot honour. Loops and graph-defined nodes are checked recursively; problems inside them name the node as
``outer/inner``. Types flow through: the output types of a graph-defined node are those its subgraph produces
for the concrete input types it is given.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import networkx as nx
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from . import types as T
from .errors import Issue
from .graph import SUPPORTED_VERSIONS, Graph, InputRef, Link, NodeSpec, Subgraph, literal_value, parse_input_value
from .node import NodeDef, parse_semver
from .registry import Registry

LOOP_TYPE = "loop"
LOOP_OPTIONS = {"over": T.Any, "count": T.Int, "pairs": T.Bool, "grad": T.Bool}
LOOP_IMPLICIT = {"index": T.Int, "item": T.Any, "next_item": T.Any, "total": T.Int}


@dataclass
class CheckedNode:
    """A node after validation: its definition, coerced literals and inferred output types."""

    id: str
    spec: NodeSpec
    defn: NodeDef | None
    literals: dict[str, Any] = field(default_factory=dict)
    output_types: dict[str, T.PortType] = field(default_factory=dict)
    body: "CheckedScope | None" = None  # loops and graph-defined nodes


@dataclass
class CheckedScope:
    nodes: dict[str, CheckedNode]
    order: list[str]
    outputs: dict[str, Any]  # name -> Link | InputRef
    output_types: dict[str, T.PortType]


@dataclass
class ValidationResult:
    graph: Graph | None
    issues: list[Issue]
    scope: CheckedScope | None = None

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": [i.to_json() for i in self.issues]}


# ---------------------------------------------------------------------------------------------------------
# parsing and overrides
# ---------------------------------------------------------------------------------------------------------


def parse_graph(data: Any) -> tuple[Graph | None, list[Issue]]:
    """Parse JSON text / bytes / a dict into a :class:`Graph`, turning every failure into issues."""
    if isinstance(data, Graph):
        return data, []
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, [Issue("bad_json", f"not UTF-8 text: {exc}")]
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            return None, [Issue("bad_json", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
    if not isinstance(data, dict):
        return None, [Issue("bad_graph", f"a graph must be a JSON object, got {type(data).__name__}")]
    version = data.get("version", 1)
    if version not in SUPPORTED_VERSIONS:
        return None, [
            Issue("bad_version", f"graph version {version!r} is not supported", hint=f"supported: {SUPPORTED_VERSIONS}")
        ]
    try:
        return Graph.model_validate(data), []
    except PydanticValidationError as exc:
        return None, [_pydantic_issue(e) for e in exc.errors()]


def _pydantic_issue(err: Mapping[str, Any]) -> Issue:
    loc = [str(p) for p in err.get("loc", ())]
    node = port = None
    if len(loc) >= 2 and loc[0] == "nodes":
        node = loc[1]
        if len(loc) >= 4 and loc[2] == "inputs":
            port = loc[3]
    elif len(loc) >= 2 and loc[0] == "outputs":
        port = loc[1]
    where = ".".join(loc)
    return Issue("bad_graph", f"{where}: {err.get('msg')}", node=node, port=port)


def parse_set(expr: str) -> tuple[str, str, Any]:
    """Parse ``NODE.INPUT=VALUE``; VALUE is JSON if it parses, else a plain string. Raises ValueError."""
    if "=" not in expr:
        raise ValueError(f"--set {expr!r}: expected NODE.INPUT=VALUE")
    target, raw = expr.split("=", 1)
    if "." not in target:
        raise ValueError(f"--set {expr!r}: expected NODE.INPUT=VALUE (no '.' in {target!r})")
    node, name = target.rsplit(".", 1)
    if not node or not name:
        raise ValueError(f"--set {expr!r}: empty node or input name")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node, name, value


def apply_overrides(graph: Graph, overrides: Mapping[str, Any], registry: Registry) -> tuple[Graph, list[Issue]]:
    """Apply ``{"node.input": value}`` overrides; unknown targets become ``bad_override`` issues."""
    issues: list[Issue] = []
    changes: dict[tuple[str, str], Any] = {}
    for target, value in overrides.items():
        if "." not in target:
            issues.append(Issue("bad_override", f"override {target!r} is not of the form NODE.INPUT"))
            continue
        node, name = target.rsplit(".", 1)
        spec = graph.nodes.get(node)
        if spec is None:
            issues.append(Issue("bad_override", f"no node {node!r} to set {name!r} on", node=node, port=name,
                                hint=_close(node, graph.nodes)))
            continue
        allowed = _input_names(spec, registry)
        if allowed is not None and name not in allowed:
            issues.append(Issue("bad_override", f"node {node!r} ({spec.type}) has no input {name!r}", node=node,
                                port=name, hint=_close(name, allowed)))
            continue
        try:
            parse_input_value(value)
        except PydanticValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            issues.append(Issue("bad_override", f"override for {target!r} looks like a link or input reference "
                                f"but is malformed ({msgs})", node=node, port=name))
            continue
        changes[(node, name)] = value
    return (graph.with_inputs(changes) if changes else graph), issues


def _input_names(spec: NodeSpec, registry: Registry) -> set[str] | None:
    if spec.type == LOOP_TYPE:
        return set(LOOP_OPTIONS) | set(spec.body.inputs if spec.body else ())
    defn = registry.get(spec.type)
    return None if defn is None else set(defn.inputs)


def _close(name: str, candidates) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=3)
    return f"did you mean {', '.join(repr(f) for f in found)}?" if found else None


# ---------------------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------------------


def validate(graph_data: Any, registry: Registry, overrides: Mapping[str, Any] | None = None) -> ValidationResult:
    """Validate a graph (any accepted form) with optional overrides; report every problem."""
    graph, issues = parse_graph(graph_data)
    if graph is None:
        return ValidationResult(None, issues)
    if overrides:
        graph, more = apply_overrides(graph, overrides, registry)
        issues.extend(more)
    checker = _Checker(registry, issues)
    scope = checker.scope(graph.nodes, graph.outputs, None, prefix="")
    return ValidationResult(graph, issues, scope)


class _Checker:
    def __init__(self, registry: Registry, issues: list[Issue], expanding: tuple[str, ...] = ()):
        self.registry = registry
        self.issues = issues
        self.expanding = expanding  # graph-defined types being expanded (to refuse self-recursion)
        self._graph_outputs_cache: dict[tuple, dict[str, T.PortType]] = {}

    def err(self, code: str, message: str, node: str | None = None, port: str | None = None,
            hint: str | None = None) -> None:
        self.issues.append(Issue(code, message, node, port, hint))

    # A scope is a top-level graph or a subgraph body. ``inputs`` maps subgraph input names to their types
    # (None at top level, where {"input": ...} references are not allowed).
    def scope(self, nodes: Mapping[str, NodeSpec], outputs: Mapping[str, Any],
              inputs: Mapping[str, T.PortType] | None, prefix: str) -> CheckedScope:
        checked = {nid: CheckedNode(nid, spec, None) for nid, spec in nodes.items()}
        dag = nx.DiGraph()
        dag.add_nodes_from(nodes)
        for nid, spec in nodes.items():
            for port, value in spec.inputs.items():
                if isinstance(value, Link):
                    if value.node not in nodes:
                        self.err("missing_node", f"input links to node {value.node!r}, which does not exist",
                                 prefix + nid, port, _close(value.node, nodes))
                    else:
                        dag.add_edge(value.node, nid)
                elif isinstance(value, InputRef) and (inputs is None or value.input not in inputs):
                    self._bad_ref(value, inputs, prefix + nid, port)
        cyclic: set[str] = set()
        cycles = []
        for cycle in nx.simple_cycles(dag):
            start = cycle.index(min(cycle))  # report each cycle from its smallest id: stable across processes
            cycles.append(cycle[start:] + cycle[:start])
            if len(cycles) >= 50:
                break
        for cycle in sorted(cycles):
            cyclic.update(cycle)
            names = " -> ".join(prefix + n for n in [*cycle, cycle[0]])
            self.err("cycle", f"the graph has a cycle: {names}", prefix + cycle[0])
        # Nodes on a cycle are checked without types first (so their outputs are known); the acyclic rest is
        # then checked in topological order with full type inference.
        for nid in sorted(cyclic):
            self.node(checked[nid], checked, inputs, prefix, typed=False)
        order = list(nx.topological_sort(dag.subgraph(n for n in nodes if n not in cyclic)))
        for nid in order:
            self.node(checked[nid], checked, inputs, prefix, typed=True)
        order = [*sorted(cyclic), *order]
        out_types: dict[str, T.PortType] = {}
        for name, ref in outputs.items():
            out_types[name] = self._output_ref(name, ref, checked, inputs, prefix)
        return CheckedScope(checked, order, dict(outputs), out_types)

    def _bad_ref(self, ref: InputRef, inputs: Mapping[str, T.PortType] | None, node: str | None,
                 port: str | None) -> None:
        if inputs is None:
            self.err("bad_reference", f"{{'input': {ref.input!r}}} is only allowed inside a subgraph", node, port)
        else:
            self.err("bad_reference", f"subgraph has no input {ref.input!r}", node, port, _close(ref.input, inputs))

    def _output_ref(self, name: str, ref: Any, checked: Mapping[str, CheckedNode],
                    inputs: Mapping[str, T.PortType] | None, prefix: str) -> T.PortType:
        where = prefix.rstrip("/") or None
        if isinstance(ref, InputRef):
            if inputs is None or ref.input not in inputs:
                self._bad_ref(ref, inputs, where, name)
                return T.Any
            return inputs[ref.input]
        src = checked.get(ref.node)
        if src is None:
            self.err("bad_output", f"output {name!r} links to node {ref.node!r}, which does not exist", where, name,
                     _close(ref.node, checked))
            return T.Any
        if src.defn is None and src.spec.type != LOOP_TYPE:
            return T.Any
        if ref.output not in src.output_types:
            self.err("bad_output", f"output {name!r} links to {ref.node}.{ref.output}, which does not exist",
                     where, name, _close(ref.output, src.output_types))
            return T.Any
        return src.output_types[ref.output]

    def _source_type(self, value: Any, checked: Mapping[str, CheckedNode], inputs: Mapping[str, T.PortType] | None,
                     nid: str, port: str) -> T.PortType | None:
        """Type of a linked value, reporting unknown outputs. None when unknown (error already reported)."""
        if isinstance(value, InputRef):
            return inputs.get(value.input) if inputs is not None else None
        src = checked.get(value.node)
        if src is None:
            return None
        if src.defn is None and src.spec.type != LOOP_TYPE:
            return None  # unknown type, already reported
        if value.output not in src.output_types:
            self.err("unknown_output", f"node {value.node!r} ({src.spec.type}) has no output {value.output!r}",
                     nid, port, _close(value.output, src.output_types) or f"outputs: {sorted(src.output_types)}")
            return None
        return src.output_types[value.output]

    def node(self, cn: CheckedNode, checked: Mapping[str, CheckedNode], inputs: Mapping[str, T.PortType] | None,
             prefix: str, typed: bool) -> None:
        nid = prefix + cn.id
        spec = cn.spec
        if spec.type == LOOP_TYPE:
            self.loop(cn, checked, inputs, prefix, typed)
            return
        defn = self.registry.get(spec.type)
        if defn is None:
            hint = _close(spec.type, self.registry.type_ids())
            if self.registry.failures:
                failed = "; ".join(f"{f.pack}: {f.error}" for f in self.registry.failures[:3])
                hint = f"{hint + ' ' if hint else ''}(node packs that failed to load: {failed})"
            self.err("unknown_type", f"unknown node type {spec.type!r}", nid, None, hint)
            return
        cn.defn = defn
        cn.output_types = dict(defn.outputs)  # provisional, so links among nodes on a cycle resolve
        if spec.version is not None:
            try:
                pinned = parse_semver(spec.version)
                if pinned[0] != defn.major:
                    self.err("node_version", f"graph pins {spec.type} {spec.version} but version {defn.version} is "
                             "installed (different major version)", nid)
            except ValueError as exc:
                self.err("node_version", str(exc), nid)
        if spec.body is not None:
            self.err("bad_graph", "only loop nodes have a body", nid)
        bindings: dict[str, Any] = {}
        for name, value in spec.inputs.items():
            idef = defn.inputs.get(name)
            if idef is None:
                self.err("unknown_input", f"node type {spec.type} has no input {name!r}", nid, name,
                         _close(name, defn.inputs) or f"inputs: {sorted(defn.inputs)}")
                continue
            if isinstance(value, (Link, InputRef)):
                src_type = self._source_type(value, checked, inputs, nid, name)
                if src_type is not None and typed:
                    self._edge(src_type, idef.type, bindings, nid, name)
            else:
                self._literal(cn, idef, name, literal_value(value), nid, bindings)
        for name, idef in defn.inputs.items():
            if idef.required and name not in spec.inputs:
                self.err("missing_input", f"required input {name!r} ({idef.type}) is not connected", nid, name)
            elif name not in spec.inputs and idef.adapter is not None:
                cn.literals.setdefault(name, idef.default)
        cn.output_types = {k: t.substitute(bindings).unbind() for k, t in defn.outputs.items()}
        if defn.kind == "graph":
            self.graph_node(cn, checked, inputs, prefix, bindings, typed)
        if defn.refine is not None and typed:
            try:
                refined = defn.refine(dict(cn.literals))
                cn.output_types.update(refined or {})
            except Exception as exc:  # noqa: BLE001 - refine hooks report user errors, e.g. unknown model
                self.err(getattr(exc, "code", "bad_value"), str(exc), nid, getattr(exc, "port", None),
                         getattr(exc, "hint", None))

    def _edge(self, src: T.PortType, dst: T.PortType, bindings: dict[str, Any], nid: str, port: str) -> None:
        try:
            T.check_edge(src, dst, bindings)
        except T.TypeMismatch as exc:
            self.err("type_mismatch", f"type mismatch: {exc}", nid, port)

    def _literal(self, cn: CheckedNode, idef, name: str, value: Any, nid: str, bindings: dict[str, Any]) -> None:
        if idef.adapter is None:
            if not _is_json(value):  # an API override may hand a tensor straight to a tensor port
                cn.literals[name] = value
                return
            self.err("needs_link", f"input {name!r} takes a {idef.type} from a link, not the literal {_short(value)}",
                     nid, name)
            return
        if not _is_json(value):
            cn.literals[name] = value
            return
        if not _finite(value):
            self.err("wrong_type", f"input {name!r}: {_short(value)} holds a non-finite number (inf or NaN), "
                     "which JSON cannot carry", nid, name)
            return
        try:
            cn.literals[name] = idef.validate_literal(value)
        except ValueError as exc:
            self.err(_literal_code(idef, value), f"input {name!r}: {exc}", nid, name)

    # -- loops -------------------------------------------------------------------------------------------
    def loop(self, cn: CheckedNode, checked: Mapping[str, CheckedNode], inputs: Mapping[str, T.PortType] | None,
             prefix: str, typed: bool) -> None:
        nid = prefix + cn.id
        spec = cn.spec
        body = spec.body
        if body is None:
            self.err("bad_loop", "a loop node needs a 'body' subgraph", nid)
            return
        opts = {k: literal_value(v) for k, v in spec.inputs.items() if k in LOOP_OPTIONS}
        has_over, has_count = "over" in spec.inputs, "count" in spec.inputs
        if has_over == has_count:
            self.err("bad_loop", "a loop needs exactly one of 'over' (a sequence) or 'count'", nid,
                     "over" if not has_over else "count")
        for key in ("pairs", "grad"):
            if key in opts and not isinstance(opts[key], bool):
                self.err("wrong_type", f"loop option {key!r} must be true or false, got {_short(opts[key])}", nid, key)
        if has_count and not isinstance(spec.inputs["count"], (Link, InputRef)):
            count = opts.get("count")
            if not isinstance(count, int) or isinstance(count, bool):
                self.err("wrong_type", f"loop option 'count' must be an integer, got {_short(count)}", nid, "count")
            elif count < 0:
                self.err("out_of_range", f"loop option 'count' must be >= 0, got {count}", nid, "count")
        if has_over and not isinstance(spec.inputs["over"], (Link, InputRef)):
            if not isinstance(opts["over"], list):
                self.err("wrong_type", "loop option 'over' must be a list or a link to a sequence", nid, "over")
        cn.literals = {k: v for k, v in opts.items() if k != "over" or not isinstance(spec.inputs[k], (Link, InputRef))}
        body_types: dict[str, T.PortType] = {"index": T.Int, "total": T.Int}
        if has_over:
            body_types["item"] = T.Any
            if opts.get("pairs") is True:
                body_types["next_item"] = T.Any
        for name, decl in body.inputs.items():
            if name in LOOP_OPTIONS or name in LOOP_IMPLICIT:
                self.err("bad_loop", f"body input {name!r} clashes with a reserved loop name", nid, name)
                continue
            try:
                declared = T.parse_type(decl.type)
            except (ValueError, TypeError) as exc:
                self.err("bad_loop", str(exc), nid, name)
                declared = T.Any
            body_types[name] = declared
            value = spec.inputs.get(name)
            if value is None:
                if not decl.optional and decl.default is None:
                    self.err("missing_input", f"loop body input {name!r} is not connected", nid, name)
                continue
            if isinstance(value, (Link, InputRef)):
                src = self._source_type(value, checked, inputs, nid, name)
                if src is not None and typed:
                    self._edge(src, declared, {}, nid, name)
                    if declared.name in ("Any", src.name):
                        body_types[name] = src  # concrete parameters (space, width) flow into the body
            else:
                literal = literal_value(value)
                if declared.name in _SCALAR_PY and _is_json(literal):
                    try:
                        literal = TypeAdapter(_SCALAR_PY[declared.name]).validate_python(literal, strict=True)
                    except PydanticValidationError as exc:
                        self.err("wrong_type", f"loop body input {name!r} expects {declared}: "
                                 f"{exc.errors()[0]['msg']} (got {_short(literal)})", nid, name)
                cn.literals[name] = literal
        for name in spec.inputs:
            if name not in LOOP_OPTIONS and name not in body.inputs:
                self.err("unknown_input", f"loop has no option or body input {name!r}", nid, name,
                         _close(name, [*LOOP_OPTIONS, *body.inputs]))
        for implicit in ("item", "next_item"):
            if implicit not in body_types and _refers_to(body, implicit):
                why = "a loop over 'count'" if implicit == "item" else "a loop without \"pairs\": true"
                self.err("bad_loop", f"the body uses {{'input': {implicit!r}}}, which {why} does not provide", nid)
                body_types[implicit] = T.Any  # reported once here, not again for each use
        cn.body = self.scope(body.nodes, body.outputs, body_types, prefix=nid + "/")
        for name, decl in body.inputs.items():
            if decl.carry and name not in body.outputs:
                self.err("bad_loop", f"carried input {name!r} has no body output of the same name", nid, name)
        # Carried outputs keep their type; every other body output is stacked over iterations.
        carried = {n for n, d in body.inputs.items() if d.carry}
        cn.output_types = {n: (t if n in carried else T.Tensor) for n, t in cn.body.output_types.items()}
        for name, decl in body.inputs.items():
            if decl.carry and name in body.outputs and typed:
                self._edge(cn.body.output_types[name], body_types[name], {}, nid, name)

    # -- graph-defined nodes -----------------------------------------------------------------------------
    def graph_node(self, cn: CheckedNode, checked: Mapping[str, CheckedNode], inputs: Mapping[str, T.PortType] | None,
                   prefix: str, bindings: dict[str, Any], typed: bool) -> None:
        defn = cn.defn
        sub: Subgraph = defn.subgraph
        if defn.type_id in self.expanding:
            self.err("recursive_type", f"graph-defined node type {defn.type_id!r} uses itself "
                     f"(through {' -> '.join(self.expanding)})", prefix + cn.id)
            return
        types_in: dict[str, T.PortType] = {}
        for name, idef in defn.inputs.items():
            value = cn.spec.inputs.get(name)
            src = None
            if isinstance(value, (Link, InputRef)):
                src = self._source_type(value, checked, inputs, prefix + cn.id, name)
            # A concrete source type (e.g. Latent(space="sd15")) flows into the body, so parameters propagate.
            use_src = src is not None and idef.type.name in ("Any", src.name)
            types_in[name] = src if use_src else idef.type.substitute(bindings)
        # The body is checked in a scratch list: problems in a registered definition are reported once, on
        # the node that uses it, rather than once per inner node.
        inner: list[Issue] = []
        sub_checker = _Checker(self.registry, inner, self.expanding + (defn.type_id,))
        cn.body = sub_checker.scope(sub.nodes, sub.outputs, types_in, prefix=prefix + cn.id + "/")
        for issue in inner:
            self.issues.append(issue)
        # Declared output types are the interface; inferred ones refine them when they agree (e.g. a space).
        for name, inferred in cn.body.output_types.items():
            declared = cn.output_types.get(name)
            if declared is None or declared.name in ("Any", inferred.name):
                cn.output_types[name] = inferred


_SCALAR_PY = {"Int": int, "Float": float, "Bool": bool, "String": str}


def _refers_to(body: Subgraph, name: str) -> bool:
    """Whether a body (not counting nested loop bodies, which have their own implicit inputs) uses an input."""
    refs = [v for n in body.nodes.values() for v in n.inputs.values()] + list(body.outputs.values())
    return any(isinstance(v, InputRef) and v.input == name for v in refs)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal_code(idef, value: Any) -> str:
    if idef.type.choices is not None:
        return "not_in_enum"
    try:
        idef.adapter.validate_python(value, strict=True)
    except PydanticValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        if kinds & {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                    "multiple_of"}:
            return "out_of_range"
        if kinds & {"literal_error", "enum"}:
            return "not_in_enum"
    return "wrong_type"
