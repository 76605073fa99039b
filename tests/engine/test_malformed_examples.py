"""Malformed variants derived from every example graph must exit 2 with a JSON error naming the bad node.

The variants are derived generically: each one inspects the graph and the node registry (which nodes have a
required input, a link, a bounded literal, an output whose type cannot flow into some port, ...), so new
example graphs under ``graphs/`` are covered without changes here. Nothing may run: the ``--out`` folder must
not be created.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from nodegraph import default_registry
from nodegraph import types as T
from nodegraph.cli import main
from nodegraph.validate import validate

REPO = Path(__file__).resolve().parents[2]
# graphs that run as they are; those marked requires_models need a user's checkpoint (tests/nodes/test_checkpoints.py)
EXAMPLES = sorted(p for p in (REPO / "graphs").glob("*.json")
                  if not json.loads(p.read_text()).get("meta", {}).get("requires_models"))
BAD = "zz_no_such"


@dataclass
class Variant:
    data: dict | str  # the malformed graph (or raw text)
    code: str
    nodes: set[str | None]  # the error's node must be one of these
    port: str | None | type(...) = ...  # ... = any port


# ---------------------------------------------------------------------------------------------------------
# graph inspection
# ---------------------------------------------------------------------------------------------------------


def is_link(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"node", "output"}


def upstream(graph: dict) -> dict[str, set[str]]:
    return {nid: {v["node"] for v in spec.get("inputs", {}).values() if is_link(v)}
            for nid, spec in graph["nodes"].items()}


def descendants(graph: dict, nid: str) -> set[str]:
    ups = upstream(graph)
    found = {nid}
    changed = True
    while changed:
        changed = False
        for other, srcs in ups.items():
            if other not in found and srcs & found:
                found.add(other)
                changed = True
    return found


def ancestors(graph: dict, nid: str) -> set[str]:
    ups = upstream(graph)
    found, todo = set(), [nid]
    while todo:
        n = todo.pop()
        if n not in found:
            found.add(n)
            todo.extend(ups[n])
    return found


class Info:
    """An example graph with its validated scope: node definitions and inferred output types."""

    def __init__(self, graph: dict):
        self.graph = graph
        self.registry = default_registry()
        result = validate(graph, self.registry)
        assert result.ok, f"example graph is invalid: {result.issues}"
        self.scope = result.scope

    def typed_nodes(self):
        """(node id, spec, NodeDef) of top-level nodes with a registered (non-loop) type, in id order."""
        for nid in sorted(self.graph["nodes"]):
            defn = self.scope.nodes[nid].defn
            if defn is not None:
                yield nid, self.graph["nodes"][nid], defn

    def literal_ports(self, want: Callable[[Any], bool]):
        """(node, port, InputDef) of literal-capable ports matching ``want``; ports the graph sets come first."""
        found = []
        for nid, spec, defn in self.typed_nodes():
            for port, idef in defn.inputs.items():
                if idef.adapter is not None and want(idef):
                    given = port in spec.get("inputs", {}) and not is_link(spec["inputs"][port])
                    found.append((not given, nid, port, idef))
        return [(nid, port, idef) for _, nid, port, idef in sorted(found, key=lambda f: f[:3])]

    def copy(self) -> dict:
        return copy.deepcopy(self.graph)


def _schema(idef) -> dict:
    try:
        return idef.adapter.json_schema()
    except Exception:  # noqa: BLE001
        return {}


def _beyond_bounds(schema: dict) -> Any:
    """A value just outside the bounds a literal schema declares (None when it declares none)."""
    integer = schema.get("type") == "integer"
    step = 1 if integer else 1.0
    if "maximum" in schema:
        return schema["maximum"] + step
    if "exclusiveMaximum" in schema:
        return schema["exclusiveMaximum"]
    if "minimum" in schema:
        return schema["minimum"] - step
    if "exclusiveMinimum" in schema:
        return schema["exclusiveMinimum"]
    if schema.get("type") == "array" and "maxItems" in schema:
        return [0] * (schema["maxItems"] + 1)
    if schema.get("type") == "array" and schema.get("minItems", 0) > 0:
        return []
    if schema.get("type") == "string" and "maxLength" in schema:
        return "x" * (schema["maxLength"] + 1)
    return None


# ---------------------------------------------------------------------------------------------------------
# variants: each returns a Variant, or None when the graph offers nothing to break that way
# ---------------------------------------------------------------------------------------------------------


def unknown_type(info: Info) -> Variant | None:
    typed = [nid for nid, _, _ in info.typed_nodes()]
    nid = typed[0] if typed else sorted(info.graph["nodes"])[0]
    g = info.copy()
    g["nodes"][nid]["type"] = f"{BAD}.type"
    return Variant(g, "unknown_type", {nid}, None)


def unknown_input(info: Info) -> Variant | None:
    for nid, _, _ in info.typed_nodes():
        g = info.copy()
        g["nodes"][nid].setdefault("inputs", {})[f"{BAD}_input"] = 1
        return Variant(g, "unknown_input", {nid}, f"{BAD}_input")
    return None


def dropped_required_input(info: Info) -> Variant | None:
    for nid, spec, defn in info.typed_nodes():
        for port, idef in defn.inputs.items():
            if idef.required and port in spec.get("inputs", {}):
                g = info.copy()
                del g["nodes"][nid]["inputs"][port]
                return Variant(g, "missing_input", {nid}, port)
    return None


def _first_link(info: Info):
    for nid in sorted(info.graph["nodes"]):
        for port, value in info.graph["nodes"][nid].get("inputs", {}).items():
            if is_link(value):
                return nid, port
    return None


def dangling_link(info: Info) -> Variant | None:
    found = _first_link(info)
    if found is None:
        return None
    nid, port = found
    g = info.copy()
    g["nodes"][nid]["inputs"][port]["node"] = f"{BAD}_node"
    return Variant(g, "missing_node", {nid}, port)


def wrong_output_name(info: Info) -> Variant | None:
    found = _first_link(info)
    if found is None:
        return None
    nid, port = found
    g = info.copy()
    g["nodes"][nid]["inputs"][port]["output"] = f"{BAD}_output"
    return Variant(g, "unknown_output", {nid}, port)


def cycle(info: Info) -> Variant | None:
    """Feed a consumer's output back into one of its (typed) producers' inputs."""
    ups = upstream(info.graph)
    for src, spec, defn in info.typed_nodes():
        if not defn.inputs:
            continue
        for dst in sorted(n for n, s in ups.items() if src in s):
            outputs = info.scope.nodes[dst].output_types
            if not outputs:
                continue
            port = next((p for p in defn.inputs if p in spec.get("inputs", {})), next(iter(defn.inputs)))
            g = info.copy()
            g["nodes"][src].setdefault("inputs", {})[port] = {"node": dst, "output": next(iter(outputs))}
            on_cycle = descendants(info.graph, src) & ancestors(info.graph, dst)
            return Variant(g, "cycle", on_cycle, ...)
    return None


def mismatched_port_type(info: Info) -> Variant | None:
    """Wire into some port an existing output whose type cannot flow there (linked ports first)."""
    candidates = []
    for nid, spec, defn in info.typed_nodes():
        for port, idef in defn.inputs.items():
            linked = is_link(spec.get("inputs", {}).get(port))
            candidates.append((not linked, nid, port, idef))
    for _, nid, port, idef in sorted(candidates, key=lambda c: c[:3]):
        if idef.type.name == "Any":
            continue
        below = descendants(info.graph, nid)
        for src in sorted(info.graph["nodes"]):
            if src in below:
                continue
            for out, out_type in info.scope.nodes[src].output_types.items():
                try:
                    T.check_edge(out_type, idef.type, {})
                except T.TypeMismatch:
                    g = info.copy()
                    g["nodes"][nid].setdefault("inputs", {})[port] = {"node": src, "output": out}
                    return Variant(g, "type_mismatch", {nid}, port)
    return None


def out_of_range_literal(info: Info) -> Variant | None:
    ports = info.literal_ports(lambda d: d.type.choices is None)
    numeric = [p for p in ports if _schema(p[2]).get("type") in ("integer", "number")]
    for nid, port, idef in numeric + [p for p in ports if p not in numeric]:
        value = _beyond_bounds(_schema(idef))
        if value is not None:
            g = info.copy()
            g["nodes"][nid].setdefault("inputs", {})[port] = value
            return Variant(g, "out_of_range", {nid}, port)
    return None


_WRONG = {"Int": "not a number", "Float": "not a number", "Bool": "not a bool", "List": "not a list",
          "Dict": "not a dict", "String": 12345}


def wrong_typed_literal(info: Info) -> Variant | None:
    for nid, port, idef in info.literal_ports(lambda d: d.type.choices is None and d.type.name in _WRONG):
        g = info.copy()
        g["nodes"][nid].setdefault("inputs", {})[port] = _WRONG[idef.type.name]
        return Variant(g, "wrong_type", {nid}, port)
    return None


def not_in_enum(info: Info) -> Variant | None:
    for nid, port, idef in info.literal_ports(lambda d: d.type.choices is not None):
        g = info.copy()
        g["nodes"][nid].setdefault("inputs", {})[port] = f"{BAD}_choice"
        return Variant(g, "not_in_enum", {nid}, port)
    return None


def literal_into_link_port(info: Info) -> Variant | None:
    for nid, spec, defn in info.typed_nodes():
        for port, idef in defn.inputs.items():
            if idef.adapter is None and is_link(spec.get("inputs", {}).get(port)):
                g = info.copy()
                g["nodes"][nid]["inputs"][port] = 1.0
                return Variant(g, "needs_link", {nid}, port)
    return None


def broken_json(info: Info) -> Variant | None:
    text = json.dumps(info.graph, indent=1)
    return Variant(text[: len(text) // 2], "bad_json", {None}, None)


VARIANTS: dict[str, Callable[[Info], Variant | None]] = {
    f.__name__: f for f in (unknown_type, unknown_input, dropped_required_input, dangling_link, wrong_output_name,
                            cycle, mismatched_port_type, out_of_range_literal, wrong_typed_literal, not_in_enum,
                            literal_into_link_port, broken_json)
}
REQUIRED = ["unknown_type", "dropped_required_input", "dangling_link", "wrong_output_name", "cycle",
            "mismatched_port_type", "out_of_range_literal", "wrong_typed_literal", "broken_json"]


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def _matches(err: dict, variant: Variant) -> bool:
    return (err.get("code") == variant.code and err.get("node") in variant.nodes
            and (variant.port is ... or err.get("port") == variant.port))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_malformed_variant_exits_2_and_names_the_node(capsys, tmp_path, graph_path, name):
    variant = VARIANTS[name](Info(json.loads(graph_path.read_text())))
    if variant is None:
        pytest.skip(f"{graph_path.name} has nothing to break with {name}")
    path = tmp_path / f"{graph_path.stem}_{name}.json"
    path.write_text(variant.data if isinstance(variant.data, str) else json.dumps(variant.data))
    out_dir = tmp_path / "out"

    capsys.readouterr()
    rc = main(["run", str(path), "--json", "--out", str(out_dir), "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert rc == 2, stdout
    doc = json.loads(stdout)
    assert doc["ok"] is False
    assert all({"code", "node", "port", "message"} <= set(e) for e in doc["errors"])
    assert any(_matches(e, variant) for e in doc["errors"]), (variant.code, variant.nodes, variant.port,
                                                                doc["errors"])
    assert not out_dir.exists(), "an invalid graph must not execute or write anything"

    rc = main(["validate", str(path), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert rc == 2
    assert again["errors"] == doc["errors"]


def test_every_required_variant_applies_to_some_example():
    assert EXAMPLES, "no example graphs under graphs/"
    infos = [Info(json.loads(p.read_text())) for p in EXAMPLES]
    missing = [name for name in REQUIRED if all(VARIANTS[name](info) is None for info in infos)]
    assert missing == []
