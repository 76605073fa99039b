"""Planning: turn a validated graph into executable steps with content-addressed cache keys.

* Graph-defined node types are expanded inline: node ``s`` of type ``sample.euler`` becomes steps ``s/loop``,
  ``s/sigmas``, ... whose ``{"input": ...}`` references are replaced by what ``s`` was given. Expansion happens
  once, at plan time, so the executor only sees function steps and loop steps.
* A loop step carries its body as a :class:`Body`: steps in a fixed topological order with their sources
  resolved, planned once and reused for every iteration.
* Every top-level step gets a cache key, Merkle style::

      key = sha256(canonical({type, version, literal inputs, {port: (upstream key, output)}, fingerprint}))

  computed with :func:`nodegraph.serialize.dumps_canonical`, so keys are stable across processes and machines
  (never Python's ``hash()``). A loop's key covers its options, its inputs' keys and its whole body.
  Seeds are plain literal inputs, so they are part of the key like any other value.
* Pruning: only the steps that requested outputs need are kept (:meth:`Plan.needed`).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import networkx as nx

from .graph import LOOP_IMPLICIT, LOOP_OPTIONS, LOOP_TYPE, InputRef, Link, literal_value
from .node import Context, NodeDef
from .serialize import dumps_canonical
from .validate import CheckedNode, CheckedScope


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Ref:
    step: str
    output: str


@dataclass(frozen=True)
class Arg:
    """A loop-body input: carried state, a constant fed from outside, or an implicit (index, item, ...)."""

    name: str


Source = Const | Ref | Arg


@dataclass
class Step:
    id: str
    type: str
    defn: NodeDef | None  # None for loops
    inputs: dict[str, Source]
    device: str | None
    outputs: tuple[str, ...]
    grad: bool = False
    body: "Body | None" = None
    loop_options: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    resolved: Any = None  # the node type's ``resolve`` result from validation, handed to it as ctx.resolved
    types: dict[str, Any] = field(default_factory=dict)  # output name -> declared/inferred PortType
    pure: bool = True  # False: its key is a nonce (impure, unfingerprinted; for loops: such a node in the body)
    fingerprint: Any = None  # the node type's fingerprint of its literal inputs, when it declares one

    @property
    def is_loop(self) -> bool:
        return self.type == LOOP_TYPE

    def upstream(self) -> frozenset[str]:
        """The ids of the steps whose outputs this one reads (computed once: a plan's steps do not change)."""
        found = self.__dict__.get("_upstream")
        if found is None:
            found = self.__dict__["_upstream"] = frozenset(s.step for s in self.inputs.values() if isinstance(s, Ref))
        return found


@dataclass
class Body:
    """A loop body planned once: steps in execution order and the sources of its outputs."""

    steps: list[Step]
    outputs: dict[str, Source]
    carried: dict[str, Any]  # carried input name -> PortDecl
    declared: dict[str, Any]  # every declared body input -> PortDecl
    grad: bool

    def signature(self) -> Any:
        """A canonical, process-independent description used in the loop's cache key."""
        return {
            "steps": [_step_signature(s) for s in self.steps],
            "outputs": {k: _src_signature(v) for k, v in sorted(self.outputs.items())},
            "carried": sorted(self.carried),
        }


@dataclass
class Plan:
    steps: dict[str, Step]  # in topological order
    outputs: dict[str, Source]

    def needed(self, names: list[str] | None = None) -> list[str]:
        """Step ids the named graph outputs depend on, in execution order."""
        names = list(self.outputs) if names is None else names
        todo = [s.step for n in names for s in [self.outputs[n]] if isinstance(s, Ref)]
        seen: set[str] = set()
        while todo:
            sid = todo.pop()
            if sid in seen:
                continue
            seen.add(sid)
            todo.extend(self.steps[sid].upstream())
        return [sid for sid in self.steps if sid in seen]

    def consumers(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {sid: set() for sid in self.steps}
        for sid, step in self.steps.items():
            for up in step.upstream():
                out[up].add(sid)
        return out


# ---------------------------------------------------------------------------------------------------------
# flattening
# ---------------------------------------------------------------------------------------------------------


def build_plan(scope: CheckedScope, *, default_device: str | None = None, fingerprint_ctx: Context | None = None,
               ) -> Plan:
    """Flatten a validated top-level scope into a :class:`Plan` with cache keys."""
    steps: dict[str, Step] = {}
    outputs = _flatten(scope, {}, "", default_device, steps)
    order = _toposort(steps)
    plan = Plan({sid: steps[sid] for sid in order}, outputs)
    _assign_keys(plan, fingerprint_ctx)
    return plan


def _source(value: Any, prefix: str, env: Mapping[str, Source], resolved: Mapping[str, dict[str, Source]]) -> Source:
    if isinstance(value, InputRef):
        return env[value.input]
    if isinstance(value, Link):
        outs = resolved.get(value.node)
        if outs is not None and value.output in outs:  # output of an expanded graph node
            return outs[value.output]
        return Ref(prefix + value.node, value.output)
    return Const(literal_value(value))


def _flatten(scope: CheckedScope, env: Mapping[str, Source], prefix: str, device: str | None,
             steps: dict[str, Step]) -> dict[str, Source]:
    """Add the scope's steps to ``steps``; return the sources of the scope's outputs."""
    resolved: dict[str, dict[str, Source]] = {}  # graph-node id -> its outputs' sources
    for nid in scope.order:
        cn = scope.nodes[nid]
        sid = prefix + nid
        node_device = cn.spec.device or device
        inputs = {name: _source(v, prefix, env, resolved) for name, v in cn.spec.inputs.items()}
        if cn.defn is not None and cn.defn.kind == "graph":
            inputs.update({name: Const(value) for name, value in cn.literals.items() if name in cn.spec.inputs})
            inner_env: dict[str, Source] = {}
            for name, idef in cn.defn.inputs.items():
                inner_env[name] = inputs.get(name, Const(cn.literals.get(name, idef.default)))
            resolved[nid] = _flatten(cn.body, inner_env, sid + "/", node_device, steps)
            continue
        if cn.spec.type == LOOP_TYPE:
            steps[sid] = _loop_step(cn, sid, inputs, node_device)
            continue
        for name, value in cn.literals.items():
            inputs[name] = Const(value)
        steps[sid] = Step(sid, cn.spec.type, cn.defn, inputs, node_device, tuple(cn.output_types),
                          grad=cn.defn.grad, resolved=cn.resolved, types=dict(cn.output_types))
    return {name: _source(ref, prefix, env, resolved) for name, ref in scope.outputs.items()}


def _loop_step(cn: CheckedNode, sid: str, inputs: dict[str, Source], device: str | None) -> Step:
    body_spec = cn.spec.body
    body_env: dict[str, Source] = {name: Arg(name) for name in (*LOOP_IMPLICIT, *body_spec.inputs)}
    body_steps: dict[str, Step] = {}
    body_outputs = _flatten(cn.body, body_env, sid + "/", device, body_steps)
    order = _toposort(body_steps)
    options = {k: src.value for k, src in inputs.items() if k in LOOP_OPTIONS and isinstance(src, Const)}
    loop_inputs = {k: v for k, v in inputs.items() if k not in options}
    for name, decl in body_spec.inputs.items():
        if name not in loop_inputs:
            loop_inputs[name] = Const(decl.default)
    steps = [body_steps[s] for s in order]
    grad = bool(options.get("grad")) or any(s.grad for s in steps)
    body = Body(steps, body_outputs, {n: d for n, d in body_spec.inputs.items() if d.carry},
                dict(body_spec.inputs), grad)
    return Step(sid, LOOP_TYPE, None, loop_inputs, device, tuple(cn.output_types), grad=grad, body=body,
                loop_options=options, types=dict(cn.output_types))


def _toposort(steps: Mapping[str, Step]) -> list[str]:
    dag = nx.DiGraph()
    dag.add_nodes_from(steps)
    for sid, step in steps.items():
        for up in step.upstream():
            if up in steps:
                dag.add_edge(up, sid)
    return list(nx.lexicographical_topological_sort(dag))


# ---------------------------------------------------------------------------------------------------------
# cache keys
# ---------------------------------------------------------------------------------------------------------


def _src_signature(src: Source) -> Any:
    if isinstance(src, Const):
        return ["const", _canon_value(src.value)]
    if isinstance(src, Ref):
        return ["ref", src.step, src.output]
    return ["arg", src.name]


def _canon_value(value: Any) -> Any:
    """Values that the canonical encoder cannot take (models, arbitrary objects) are keyed by identity."""
    try:
        dumps_canonical(value)
        return value
    except TypeError:
        return {"object": f"{type(value).__qualname__}@{id(value):x}"}


def _step_signature(step: Step) -> Any:
    sig: dict[str, Any] = {
        "id": step.id.rsplit("/", 1)[-1],
        "type": step.type,
        "version": step.defn.version if step.defn is not None else None,
        "inputs": {k: _relative(_src_signature(v), step.id) for k, v in sorted(step.inputs.items())},
    }
    if step.fingerprint is not None:
        sig["fingerprint"] = step.fingerprint
    if step.body is not None:
        sig["options"] = _canon_value(step.loop_options)
        sig["body"] = step.body.signature()
    return sig


def _relative(sig: Any, step_id: str) -> Any:
    """Inside a body, refer to sibling steps by their local names so the signature is position independent."""
    if sig[0] == "ref":
        prefix = step_id.rsplit("/", 1)[0] + "/" if "/" in step_id else ""
        name = sig[1][len(prefix):] if sig[1].startswith(prefix) else sig[1]
        return ["ref", name, sig[2]]
    return sig


def digest(obj: Any) -> str:
    return hashlib.sha256(dumps_canonical(obj)).hexdigest()


def _fingerprint(step: Step, ctx: Context | None) -> tuple[bool, Any]:
    """(pure, fingerprint) of a function step: impure unfingerprinted nodes and failing fingerprints are impure."""
    defn = step.defn
    if defn.fingerprint is None:
        return defn.cache, None
    literals = {k: s.value for k, s in step.inputs.items() if isinstance(s, Const)}
    try:
        node_ctx = ctx.for_node(step.id, step.resolved) if ctx is not None else None
        return True, _canon_value(defn.fingerprint(literals, node_ctx))
    except Exception:  # noqa: BLE001 - a linked path or a missing file: never reuse; running reports the problem
        return False, None


def _prepare(steps: list[Step], ctx: Context | None) -> bool:
    """Fingerprint every step (loop bodies included, recursively); return whether all of them are pure."""
    pure = True
    for step in steps:
        if step.body is not None:
            step.pure = _prepare(step.body.steps, ctx)
        elif step.defn is not None:
            step.pure, step.fingerprint = _fingerprint(step, ctx)
        pure = pure and step.pure
    return pure


def _assign_keys(plan: Plan, fingerprint_ctx: Context | None) -> None:
    """Keys in topological order. A step that is not pure (an impure node, a failing fingerprint, or — for a
    loop — such a node anywhere in its body) gets a random nonce: it is never found in the cache again."""
    _prepare(list(plan.steps.values()), fingerprint_ctx)
    for step in plan.steps.values():
        ins: dict[str, Any] = {}
        for name, src in sorted(step.inputs.items()):
            if isinstance(src, Ref):
                ins[name] = ["ref", plan.steps[src.step].key, src.output]
            else:
                ins[name] = _src_signature(src)
        record: dict[str, Any] = {"type": step.type, "inputs": ins}
        if step.defn is not None:
            record["version"] = step.defn.version
        if step.fingerprint is not None:
            record["fingerprint"] = step.fingerprint
        if not step.pure:
            record["nonce"] = uuid.uuid4().hex
        if step.body is not None:
            record["options"] = _canon_value(step.loop_options)
            record["body"] = step.body.signature()
        step.key = digest(record)
