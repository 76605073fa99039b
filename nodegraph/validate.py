"""Validation: find every problem in a graph at once, before any node runs or any weight loads.

Error codes (``Issue.code``):

======================  =================================================================================
``bad_json``            the file cannot be read (not a regular file, unreadable), is not JSON / msgpack
``bad_graph``           the document does not have the graph shape (pydantic reports where), holds a value
                        that is not JSON data (a tensor, bytes, a tuple in a msgpack graph), or a node id names
                        the same step as a node inside a graph-defined node (``t/first``)
``bad_version``         unsupported graph ``version`` (only the integer ``1``; ``true`` is not)
``duplicate_key``       an object repeats a key (JSON or msgpack); the path is named
``unknown_type``        no registered node type with that id (close matches in the hint)
``node_version``        the graph pins a major version different from the installed node type's
``unknown_input``       an input name the node type does not have
``missing_input``       a required input is neither linked nor given
``missing_node``        a link names a node that does not exist
``unknown_output``      a link names an output the source node does not have
``bad_reference``       ``{"input": ...}`` used outside a subgraph, or naming an undeclared subgraph input
``type_mismatch``       the linked output's type cannot flow into the input (both types named)
``wrong_type``          a literal of the wrong JSON type
``out_of_range``        a literal outside the input's bounds
``not_in_enum``         a literal not among the allowed choices
``needs_link``          a literal given to a port that only accepts links (tensors, models)
``cycle``               the graph has a cycle (the nodes on it are named; one issue per set of interlocked
                        cycles, at most 50)
``bad_output``          a graph output that links to a missing node or output
``bad_output_name``     a graph output name that cannot be a file name: empty, ``.``, ``..``, a path
                        separator, a drive, a control character, invalid Unicode, over 255 characters
``bad_override``        a ``--set NODE.INPUT=VALUE`` that names no node/input, or is not of that form
``bad_loop``            a loop node's options or body are inconsistent
``recursive_type``      a graph-defined node type that (directly or not) contains itself
``too_large``           over a :class:`~nodegraph.limits.Limits` field (named in the message with the value):
                        the document (``max_graph_bytes``), an integer literal over 4,300 digits, a loop
                        ``count`` or ``over`` list (``max_loop_iterations``), the expansion of graph-defined
                        nodes and loop bodies (``max_expanded_nodes``), a node type's ``cost`` hook
                        (``max_pixels``, ``max_tensor_elements``, ``max_loop_iterations``)
``too_deep``            nesting over the limits: a literal or ``meta`` deeper than ``max_nesting``, loop
                        bodies / graph-defined nodes nested deeper than ``max_nesting``, loops nested deeper
                        than cache keys hold (see below), a document deeper than the parsers take
``missing_dependency``  a node type ``requires`` a Python module that is not installed (nothing runs)
``bad_value``           a node type's ``resolve`` / ``refine`` hook refused a literal (a hook may give its own
                        code instead), or its ``cost`` hook failed
``bad_device``          (added by :class:`nodegraph.Engine`) a device pin (anywhere, loop bodies included)
                        that is malformed or that this machine cannot honour
======================  =================================================================================

Loops and graph-defined nodes are checked recursively; problems inside them name the node as ``outer/inner``.
Types flow through: the output types of a graph-defined node are those its subgraph produces for the concrete
input types it is given.

Limits are those of ``ctx.limits`` (:data:`nodegraph.limits.DEFAULT_LIMITS` when there is none); parsing and
document policy are in :mod:`nodegraph.source`. Before anything is checked, the graph's expansion is measured
(graph-defined types once each, loop bodies once): over ``max_expanded_nodes``, or bodies nested deeper than
``max_nesting``, stops validation with that one issue, so an exponential pack is refused at once.

Cache keys (:mod:`nodegraph.plan`) hold a loop's body inside the loop's key record and are encoded with at
most :data:`KEY_DEPTH` (128) levels: 3 for a node's record, 3 more per enclosing loop, plus the literal's own
depth. So loops nest at most :data:`MAX_LOOP_NESTING` (41) deep, and a literal inside ``L`` loops may be at
most ``min(max_nesting, 125 - 3 L)`` deep; beyond that is ``too_deep`` here rather than a failure when planning.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import networkx as nx
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from . import serialize
from . import types as T
from .errors import GraphValidationError, Issue
from .graph import LOOP_IMPLICIT, LOOP_OPTIONS, LOOP_TYPE, Graph, InputRef, Link, NodeSpec, Subgraph, literal_value
from .limits import DEFAULT_LIMITS, Limits
from .node import Context, NodeDef, parse_semver, takes_two
from .registry import Registry
from .source import _close, _short, apply_overrides, output_name_problem, parse_graph, parse_set, read_foreign

__all__ = ["LOOP_IMPLICIT", "LOOP_OPTIONS", "LOOP_TYPE", "CheckedNode", "CheckedScope", "ValidationResult",
           "apply_overrides", "output_name_problem", "parse_graph", "parse_set", "validate"]

KEY_DEPTH = serialize.DEFAULT_LIMITS.max_depth  # levels dumps_canonical encodes (cache keys)
MAX_LOOP_NESTING = (KEY_DEPTH - 4) // 3  # the innermost body's node record: 3 + 3 per loop + 1 for a link
_MAX_CYCLES = 50


@dataclass
class CheckedNode:
    """A node after validation: its definition, coerced literals and inferred output types."""

    id: str
    spec: NodeSpec
    defn: NodeDef | None
    literals: dict[str, Any] = field(default_factory=dict)
    output_types: dict[str, T.PortType] = field(default_factory=dict)
    body: "CheckedScope | None" = None  # loops and graph-defined nodes
    resolved: Any = None  # what the node type's ``resolve`` hook found (see nodegraph.node)


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
# checking
# ---------------------------------------------------------------------------------------------------------


def validate(graph_data: Any, registry: Registry, overrides: Mapping[str, Any] | None = None, *,
             ctx: Context | None = None) -> ValidationResult:
    """Validate a graph (any accepted form) with optional overrides; report every problem.

    ``ctx`` carries the engine's roots and limits to the node types' ``resolve``/``refine`` hooks."""
    limits = limits_of(ctx)
    try:
        graph_data = read_foreign(graph_data, registry.readers, registry, limits)
    except GraphValidationError as exc:
        return ValidationResult(None, list(exc.issues))
    graph, issues = parse_graph(graph_data, limits)
    if graph is None:
        return ValidationResult(None, issues)
    if overrides:
        graph, more = apply_overrides(graph, overrides, registry)
        issues.extend(more)
    for name in graph.outputs:
        why = output_name_problem(name)
        if why is not None:
            issues.append(Issue("bad_output_name", f"output name {_short(name)} cannot name a file: it {why}",
                                None, name, "use letters, digits, '_', '-' and '.'"))
    try:
        _Expansion(registry, limits).measure(graph.nodes)
        checker = _Checker(registry, issues, ctx=ctx, limits=limits)
        checker.nested(graph.meta, None, None, "the graph's meta", keyed=False)
        scope = checker.scope(graph.nodes, graph.outputs, None, prefix="")
        issues.extend(_id_clashes(scope))
    except _Refused as refused:  # too big or too deep to look further: that one issue says why
        return ValidationResult(graph, [*issues, refused.issue])
    except RecursionError:  # a safety net: the expansion measure bounds nesting before the checker recurses
        return ValidationResult(graph, [*issues, Issue("too_deep", "the graph nests too deeply to check")])
    return ValidationResult(graph, issues, scope)


def limits_of(ctx: Context | None) -> Limits:
    """The limits validation applies: ``ctx.limits``, else the defaults."""
    limits = getattr(ctx, "limits", None)
    return limits if isinstance(limits, Limits) else DEFAULT_LIMITS


def _id_clashes(top: CheckedScope) -> list[Issue]:
    """Node ids that name the same step once graph-defined nodes are expanded inline (``t/first`` written in the
    graph and node ``first`` inside graph-defined node ``t``): one would silently replace the other."""
    issues: list[Issue] = []
    spaces = [(top, "")]  # the graph and each loop body are separate namespaces of steps
    while spaces:
        space, space_prefix = spaces.pop()
        seen: dict[str, str | None] = {}  # step id -> the graph-defined node it comes from (None: written here)
        todo: list[tuple[CheckedScope, str, str | None]] = [(space, space_prefix, None)]
        while todo:
            scope, prefix, owner = todo.pop()
            for nid, cn in scope.nodes.items():
                sid = prefix + nid
                if cn.body is not None and cn.spec.type != LOOP_TYPE:
                    todo.append((cn.body, sid + "/", sid))  # expanded inline: no step of its own
                    continue
                if cn.body is not None:
                    spaces.append((cn.body, sid + "/"))
                if sid in seen:
                    other = seen[sid] if seen[sid] is not None else owner
                    issues.append(Issue("bad_graph", f"node id {sid!r} is also a node inside graph-defined node "
                                        f"{other!r} ('/' in an id names a nested node)", sid))
                seen[sid] = owner
    return issues


class _Refused(Exception):
    """Validation stops: the graph is too big or too deep to check further. ``issue`` says which limit."""

    def __init__(self, issue: Issue):
        super().__init__(issue.message)
        self.issue = issue


class _Expansion:
    """Measures what a graph expands to before it is checked: nodes once graph-defined types and loop bodies
    are expanded (each body once, not per iteration) and how deeply bodies nest. Each graph-defined type is
    measured once, so an exponential pack costs as many steps as it has types. Raises :class:`_Refused`."""

    def __init__(self, registry: Registry, limits: Limits):
        self.registry, self.limits = registry, limits
        self.types: dict[str, tuple[int, int]] = {}  # graph-defined type id -> (nodes, nesting) it expands to
        self.active: set[str] = set()  # types being measured (a recursive type is the checker's to report)

    def measure(self, nodes: Mapping[str, NodeSpec]) -> int:
        size = 0
        for nid, spec in nodes.items():
            size += self.node(spec, 0, nid)[0]
            if size > self.limits.max_expanded_nodes:
                raise _Refused(Issue("too_large", f"the graph expands to more than {self.limits.max_expanded_nodes:,} "
                                     "nodes once graph-defined nodes and loop bodies are expanded (passed at this "
                                     "node); the limit is max_expanded_nodes", nid))
        return size

    def nodes(self, nodes: Mapping[str, NodeSpec], depth: int, prefix: str) -> tuple[int, int]:
        size = height = 0
        for nid, spec in nodes.items():
            grown, levels = self.node(spec, depth, prefix + nid)
            size, height = size + grown, max(height, levels)
            if size > self.limits.max_expanded_nodes:
                break  # the top level reports it, on its node; sizes beyond the limit need not be exact
        return size, height

    def node(self, spec: NodeSpec, depth: int, nid: str) -> tuple[int, int]:
        if spec.type == LOOP_TYPE and spec.body is not None:
            self._enter(depth + 1, nid)
            size, height = self.nodes(spec.body.nodes, depth + 1, nid + "/")
            return 1 + size, 1 + height
        defn = self.registry.get(spec.type)
        if defn is None or defn.kind != "graph" or defn.type_id in self.active:
            return 1, 0
        known = self.types.get(defn.type_id)
        if known is None:
            self._enter(depth + 1, nid)
            self.active.add(defn.type_id)
            try:
                size, height = self.nodes(defn.subgraph.nodes, depth + 1, nid + "/")
            finally:
                self.active.discard(defn.type_id)
            known = self.types[defn.type_id] = (1 + size, 1 + height)
        self._enter(depth + known[1], nid)
        return known

    def _enter(self, depth: int, nid: str) -> None:
        if depth > self.limits.max_nesting:
            raise _Refused(Issue("too_deep", f"loop bodies and graph-defined nodes nest more than "
                                 f"{self.limits.max_nesting} deep here; the limit is max_nesting", nid))


@functools.lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether ``module`` can be imported here (looked up once per process; the module is not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 - a missing or broken parent package, a malformed name
        return False


class _Checker:
    def __init__(self, registry: Registry, issues: list[Issue], expanding: tuple[str, ...] = (),
                 ctx: Context | None = None, limits: Limits | None = None, loops: int = 0,
                 consts: Mapping[str, Any] | None = None):
        self.registry = registry
        self.issues = issues
        self.ctx = ctx if ctx is not None else Context("<validate>", None)
        self.limits = limits if limits is not None else limits_of(ctx)
        self.expanding = expanding  # graph-defined types being expanded (to refuse self-recursion)
        self.loops = loops  # loops around this scope (cache keys nest one level of record per loop)
        self.consts = dict(consts or {})  # literal values of this subgraph's inputs, for the validation hooks

    def err(self, code: str, message: str, node: str | None = None, port: str | None = None,
            hint: str | None = None) -> None:
        self.issues.append(Issue(code, message, node, port, hint))

    def nested(self, value: Any, nid: str | None, port: str | None, what: str, keyed: bool = True) -> bool:
        """Whether ``value`` nests within the limits here (``keyed``: it joins a cache key, see the module
        docstring); a ``too_deep`` issue when it does not."""
        allowed = min(self.limits.max_nesting, KEY_DEPTH - 3 - 3 * self.loops) if keyed else self.limits.max_nesting
        depth = _depth(value, allowed)
        if depth <= allowed:
            return True
        why = (f"the limit is max_nesting={self.limits.max_nesting}" if allowed == self.limits.max_nesting else
               f"cache keys hold {KEY_DEPTH} levels, 3 of them per enclosing loop ({self.loops} here) and 3 for "
               f"the node, so {allowed} is the most here")
        self.err("too_deep", f"{what} nests more than {allowed} levels deep; {why}", nid, port)
        return False

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
        cyclic = self._cycles(dag, prefix)
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

    def _cycles(self, dag: nx.DiGraph, prefix: str) -> set[str]:
        """Report one cycle per strongly connected component (interlocked cycles); return every node on one."""
        comps = sorted((c for c in nx.strongly_connected_components(dag)
                        if len(c) > 1 or dag.has_edge(next(iter(c)), next(iter(c)))), key=min)
        for comp in comps[:_MAX_CYCLES]:
            cycle = [u for u, _ in nx.find_cycle(dag.subgraph(comp), source=min(comp))]
            start = cycle.index(min(cycle))  # from its smallest id: the report is stable across processes
            cycle = cycle[start:] + cycle[:start]
            shown = [prefix + n for n in cycle[:20]] + (["..."] if len(cycle) > 20 else []) + [prefix + cycle[0]]
            others = sorted(comp - set(cycle))
            more = (f" ({len(others)} more node(s) on cycles interlocked with it: "
                    f"{', '.join(prefix + n for n in others[:10])}{', ...' if len(others) > 10 else ''})"
                    if others else "")
            self.err("cycle", f"the graph has a cycle: {' -> '.join(shown)}{more}", prefix + cycle[0])
        if len(comps) > _MAX_CYCLES:
            self.err("cycle", f"and {len(comps) - _MAX_CYCLES} more separate cycle(s), not listed",
                     prefix + min(comps[_MAX_CYCLES]))
        return set().union(*comps) if comps else set()

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
        for module in defn.requires:
            if not importable(module):
                self.err("missing_dependency", f"node type {spec.type} needs the Python module {module!r}, which "
                         "is not installed here", nid, None,
                         f"install the package that provides {module!r} (pip install "
                         f"{_DISTRIBUTIONS.get(module.split('.')[0], module.split('.')[0])})")
        if spec.meta:
            self.nested(spec.meta, nid, None, "the node's meta", keyed=False)
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
        sources: dict[str, T.PortType] = {}  # input -> the type linked into it (refine may sharpen the input)
        for name, value in spec.inputs.items():
            idef = defn.inputs.get(name)
            if idef is None:
                self.err("unknown_input", f"node type {spec.type} has no input {name!r}", nid, name,
                         _close(name, defn.inputs) or f"inputs: {sorted(defn.inputs)}")
                continue
            if isinstance(value, (Link, InputRef)):
                src_type = self._source_type(value, checked, inputs, nid, name)
                if src_type is not None and typed:
                    sources[name] = src_type
                    self._edge(src_type, idef.type, bindings, nid, name)
            elif self.nested(literal_value(value), nid, name, f"input {name!r}"):
                self._literal(cn, idef, name, literal_value(value), nid, bindings)
        for name, idef in defn.inputs.items():
            if idef.required and name not in spec.inputs:
                self.err("missing_input", f"required input {name!r} ({idef.type}) is not connected", nid, name)
            elif name not in spec.inputs and idef.adapter is not None:
                cn.literals.setdefault(name, idef.default)
        cn.output_types = {k: t.substitute(bindings).unbind() for k, t in defn.outputs.items()}
        if defn.kind == "graph":
            self.graph_node(cn, checked, inputs, prefix, bindings, typed)
        if typed and (defn.resolve is not None or defn.refine is not None or defn.cost is not None):
            literals = self._known_literals(cn)
            if defn.resolve is not None or defn.refine is not None:
                self._hooks(cn, defn, nid, literals, sources)
            if defn.cost is not None:
                self._cost(defn, nid, literals)

    def _known_literals(self, cn: CheckedNode) -> dict[str, Any]:
        """A node's literals plus the literal values its ``{"input": ...}`` references stand for in this
        subgraph (what a graph-defined node or a loop was given): what the validation hooks can see."""
        literals = dict(cn.literals)
        for port, value in cn.spec.inputs.items():
            if isinstance(value, InputRef) and value.input in self.consts:
                literals.setdefault(port, self.consts[value.input])
        return literals

    def _cost(self, defn: NodeDef, nid: str, literals: dict[str, Any]) -> None:
        """Compare what a node type's ``cost`` hook says running would allocate with the limits."""
        try:
            cost = defn.cost(literals)
            items = list(cost.items()) if cost else []
        except KeyError:
            return  # a literal the hook needs is linked, not given: only running can tell
        except Exception as exc:  # noqa: BLE001 - a broken hook must not pass a graph it cannot measure
            self.err("bad_value", f"the cost hook of {defn.type_id} failed: {type(exc).__name__}: {exc}", nid)
            return
        for key, value in items:
            limit_name = _COST_LIMITS.get(key)
            if limit_name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            limit = getattr(self.limits, limit_name)
            if value > limit:
                self.err("too_large", f"{defn.type_id} would need {_num(value)} {key}; the limit is "
                         f"{limit_name}={limit:,}", nid)

    def _hooks(self, cn: CheckedNode, defn: NodeDef, nid: str, literals: dict[str, Any],
               sources: Mapping[str, T.PortType]) -> None:
        """Run a node type's ``resolve`` then ``refine`` hook on its literals (see nodegraph.node). A refined
        *input* type (a LoRA file's family on the model input) is checked against what is linked into it."""
        try:
            if defn.resolve is not None:
                cn.resolved = defn.resolve(literals, self.ctx.for_node(nid))
            if defn.refine is not None:
                args = (literals, self.ctx.for_node(nid, cn.resolved)) if takes_two(defn.refine) else (literals,)
                for port, ptype in (defn.refine(*args) or {}).items():
                    if port.startswith("input:"):
                        if port[6:] in sources:
                            self._edge(sources[port[6:]], ptype, {}, nid, port[6:])
                    elif port in defn.outputs:
                        cn.output_types[port] = ptype
        except KeyError:
            pass  # a literal the hook needs is linked, not given: only running can tell
        except Exception as exc:  # noqa: BLE001 - hooks report user errors, e.g. an unknown model
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
        if self.loops + 1 > MAX_LOOP_NESTING:
            self.err("too_deep", f"loops nest more than {MAX_LOOP_NESTING} deep here: a loop's cache key holds its "
                     f"body's, 3 levels per loop, in at most {KEY_DEPTH}", nid)
            cn.output_types = {name: T.Any for name in body.outputs}  # not checked: no follow-up errors
            return
        opts = self._loop_options(spec, nid)
        has_over = "over" in spec.inputs
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
            if decl.default is not None:
                self.nested(decl.default, nid, name, f"the default of body input {name!r}")
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
            elif self.nested(literal_value(value), nid, name, f"loop body input {name!r}"):
                literal = literal_value(value)
                if declared.name in T.PY_TYPES and _is_json(literal):
                    try:
                        literal = TypeAdapter(T.PY_TYPES[declared.name]).validate_python(literal, strict=True)
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
        # The body is a scope one loop deeper; its constants (literal, not carried) reach its nodes' cost hooks.
        consts = {n: cn.literals[n] for n, d in body.inputs.items() if n in cn.literals and not d.carry}
        if isinstance(cn.literals.get("count"), int):
            consts["total"] = cn.literals["count"]
        saved = self.loops, self.consts
        self.loops, self.consts = self.loops + 1, consts
        try:
            cn.body = self.scope(body.nodes, body.outputs, body_types, prefix=nid + "/")
        finally:
            self.loops, self.consts = saved
        for name, decl in body.inputs.items():
            if decl.carry and name not in body.outputs:
                self.err("bad_loop", f"carried input {name!r} has no body output of the same name", nid, name)
        # Carried outputs keep their type; every other body output is stacked over iterations.
        carried = {n for n, d in body.inputs.items() if d.carry}
        cn.output_types = {n: (t if n in carried else T.Tensor) for n, t in cn.body.output_types.items()}
        for name, decl in body.inputs.items():
            if decl.carry and name in body.outputs and typed:
                self._edge(cn.body.output_types[name], body_types[name], {}, nid, name)

    def _loop_options(self, spec: NodeSpec, nid: str) -> dict[str, Any]:
        """Check a loop's options (``over`` / ``count``, ``pairs``, ``grad``); return them (links as they are)."""
        opts = {k: literal_value(v) for k, v in spec.inputs.items() if k in LOOP_OPTIONS}
        for key in [k for k, v in spec.inputs.items() if k in opts and not isinstance(v, (Link, InputRef))]:
            if not self.nested(opts[key], nid, key, f"loop option {key!r}"):
                del opts[key]
        has_over, has_count = "over" in spec.inputs, "count" in spec.inputs
        if has_over == has_count:
            self.err("bad_loop", "a loop needs exactly one of 'over' (a sequence) or 'count'", nid,
                     "over" if not has_over else "count")
        for key in ("pairs", "grad"):
            if key in opts and not isinstance(opts[key], bool):
                self.err("wrong_type", f"loop option {key!r} must be true or false, got {_short(opts[key])}", nid, key)
        most = self.limits.max_loop_iterations
        if has_count and "count" in opts and not isinstance(spec.inputs["count"], (Link, InputRef)):
            count = opts["count"]
            if not isinstance(count, int) or isinstance(count, bool):
                self.err("wrong_type", f"loop option 'count' must be an integer, got {_short(count)}", nid, "count")
            elif count < 0:
                self.err("out_of_range", f"loop option 'count' must be >= 0, got {_num(count)}", nid, "count")
            elif count > most:
                self.err("too_large", f"loop option 'count' is {_num(count)}; the limit is "
                         f"max_loop_iterations={most:,}", nid, "count")
        if has_over and "over" in opts and not isinstance(spec.inputs["over"], (Link, InputRef)):
            if not isinstance(opts["over"], list):
                self.err("wrong_type", "loop option 'over' must be a list or a link to a sequence", nid, "over")
            elif len(opts["over"]) > most:
                self.err("too_large", f"loop option 'over' has {len(opts['over']):,} items; the limit is "
                         f"max_loop_iterations={most:,}", nid, "over")
        return opts

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
        consts = dict(cn.literals)  # given literals and defaults; references to our own subgraph's constants too
        consts.update({n: self.consts[v.input] for n, v in cn.spec.inputs.items()
                       if isinstance(v, InputRef) and v.input in self.consts})
        sub_checker = _Checker(self.registry, inner, self.expanding + (defn.type_id,), ctx=self.ctx,
                               limits=self.limits, loops=self.loops, consts=consts)
        cn.body = sub_checker.scope(sub.nodes, sub.outputs, types_in, prefix=prefix + cn.id + "/")
        for issue in inner:
            self.issues.append(issue)
        # Declared output types are the interface; inferred ones refine them when they agree (e.g. a space).
        for name, inferred in cn.body.output_types.items():
            declared = cn.output_types.get(name)
            if declared is None or declared.name in ("Any", inferred.name):
                cn.output_types[name] = inferred


_COST_LIMITS = {"pixels": "max_pixels", "elements": "max_tensor_elements", "iterations": "max_loop_iterations"}


def _depth(value: Any, cap: int) -> int:
    """Container levels of a value (a scalar is 0, ``[1]`` is 1), counted without recursion up to ``cap + 1``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            deepest = max(deepest, level)
            if deepest > cap:
                return deepest
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _num(value: Any) -> str:
    """A number for a message: ``1,000,000``; an integer too long to print is described by its size."""
    if isinstance(value, int) and value.bit_length() > 64 * 8:
        return f"an integer of {value.bit_length():,} bits"
    return f"{value:,}" if isinstance(value, int) else repr(value)


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


# Modules whose pip distribution has another name (the hint of ``missing_dependency``).
_DISTRIBUTIONS = {"skimage": "scikit-image", "open3d": "open3d-cpu", "cv2": "opencv-python", "PIL": "pillow",
                  "mcubes": "PyMCubes", "yaml": "pyyaml"}
