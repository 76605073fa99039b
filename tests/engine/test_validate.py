"""Tests for nodegraph.validate: every error code, all errors at once, typed ports, versions, overrides."""

from __future__ import annotations

import copy
import json
import re

import pytest

import nodegraph
from nodegraph import types as T
from nodegraph import validate as V
from nodegraph.errors import GraphValidationError, Issue
from tests.engine.conftest import TOY_GRAPH
from tests.engine.toy_nodes import link


def where(result) -> set[tuple[str, str | None, str | None]]:
    """The (code, node, port) triples of a validation result."""
    return {(i.code, i.node, i.port) for i in result.issues}


def codes(result) -> list[str]:
    return [i.code for i in result.issues]


def graph(nodes: dict, outputs: dict | None = None, **extra) -> dict:
    return {"version": 1, "nodes": nodes, "outputs": outputs or {}, **extra}


def loop_graph(body_nodes: dict, body_outputs: dict | None = None, **loop_inputs) -> dict:
    """A graph with ``src`` (toy.const) feeding a loop ``lp`` that carries ``x`` (Float) for 3 iterations."""
    body = {
        "inputs": {"x": {"type": "Float", "carry": True}},
        "nodes": body_nodes,
        "outputs": body_outputs if body_outputs is not None else {"x": link("step")},
    }
    inputs = {"count": 3, "x": link("src"), **loop_inputs}
    return graph({"src": {"type": "toy.const", "inputs": {"value": 1.0}},
                  "lp": {"type": "loop", "inputs": inputs, "body": body}}, {"x": link("lp", "x")})


STEP = {"step": {"type": "toy.add", "inputs": {"a": {"input": "x"}, "b": 1.0}}}


# ---------------------------------------------------------------------------------------------------------
# the baseline
# ---------------------------------------------------------------------------------------------------------


def test_toy_graph_is_valid_and_types_are_inferred(registry):
    result = V.validate(TOY_GRAPH, registry)
    assert result.ok, result.issues
    nodes = result.scope.nodes
    assert nodes["vae"].output_types["out"] == T.VAE(space="sd15")  # refined from the literal
    assert nodes["lat"].output_types["out"] == T.Latent(space="sd15", channels=4)  # default joins the refinement
    assert set(nodes["dm"].output_types) == {"quotient", "remainder"}
    assert result.scope.output_types["quotient"] == T.Int
    assert result.to_json() == {"ok": True, "errors": []}


def test_validate_accepts_dict_text_bytes_and_graph(registry):
    text = json.dumps(TOY_GRAPH)
    for form in (TOY_GRAPH, text, text.encode(), nodegraph.Graph.model_validate(TOY_GRAPH)):
        assert V.validate(form, registry).ok


# ---------------------------------------------------------------------------------------------------------
# every error code: (code, graph, overrides, expected (node, port))
# ---------------------------------------------------------------------------------------------------------


def _toy(**changes):
    """TOY_GRAPH with node inputs replaced: ``_toy(b={"a": ...})`` merges into node b's inputs."""
    g = copy.deepcopy(TOY_GRAPH)
    for nid, inputs in changes.items():
        g["nodes"][nid]["inputs"].update(inputs)
    return g


def _drop(nid: str, port: str):
    g = copy.deepcopy(TOY_GRAPH)
    del g["nodes"][nid]["inputs"][port]
    return g


def _set_node(nid: str, **fields):
    g = copy.deepcopy(TOY_GRAPH)
    g["nodes"][nid].update(fields)
    return g


def _with_output(name: str, ref: dict):
    g = copy.deepcopy(TOY_GRAPH)
    g["outputs"][name] = ref
    return g


CASES = [
    ("bad_json", '{"version": 1, "nodes": {', None, None, None),
    ("bad_json", b"\xff\xfe not utf-8", None, None, None),
    ("bad_graph", graph({"a": {"type": "toy.const", "inputs": {}, "colour": "red"}}), None, "a", None),
    ("bad_graph", graph({"a": {"type": "toy.const", "inputs": 5}}), None, "a", None),
    ("bad_graph", graph([]), None, None, None),
    ("bad_graph", [1, 2, 3], None, None, None),
    ("bad_graph", _set_node("a", body={"nodes": {}}), None, "a", None),
    ("bad_version", {**TOY_GRAPH, "version": 99}, None, None, None),
    ("unknown_type", _set_node("a", type="toy.nonexistent"), None, "a", None),
    ("node_version", _set_node("a", version="2.0.0"), None, "a", None),
    ("node_version", _set_node("a", version="0.9.0"), None, "a", None),
    ("node_version", _set_node("a", version="one"), None, "a", None),
    ("unknown_input", _toy(a={"colour": 3}), None, "a", "colour"),
    ("missing_input", _drop("b", "a"), None, "b", "a"),
    ("missing_node", _toy(b={"a": link("ghost")}), None, "b", "a"),
    ("unknown_output", _toy(b={"a": link("a", "nope")}), None, "b", "a"),
    ("bad_reference", _toy(b={"a": {"input": "x"}}), None, "b", "a"),
    ("type_mismatch", _toy(dm={"a": link("a")}), None, "dm", "a"),
    ("wrong_type", _toy(a={"value": "one"}), None, "a", "value"),
    ("out_of_range", _toy(dm={"b": 0}), None, "dm", "b"),
    ("not_in_enum", _toy(lat={"space": "sd3"}), None, "lat", "space"),
    ("needs_link", _toy(img={"vae": "sd15"}), None, "img", "vae"),
    ("cycle", _toy(a={"value": link("count")}), None, frozenset({"a", "b", "count"}), None),  # any node on it
    ("bad_output", _with_output("extra", link("ghost")), None, None, "extra"),
    ("bad_output", _with_output("extra", link("a", "nope")), None, None, "extra"),
    ("bad_override", TOY_GRAPH, {"ghost.value": 1}, "ghost", "value"),
    ("bad_override", TOY_GRAPH, {"a.colour": 1}, "a", "colour"),
    ("bad_override", TOY_GRAPH, {"novalue": 1}, None, None),
    ("bad_loop", graph({"lp": {"type": "loop", "inputs": {"count": 2}}}), None, "lp", None),
    ("bad_loop", loop_graph(STEP, over=[1, 2]), None, "lp", "count"),
    ("bad_loop", loop_graph(STEP, body_outputs={}), None, "lp", "x"),
    ("bad_graph", _toy(a={"value": (1.0, 2.0)}), None, "a", "value"),  # a tuple is not JSON data
    ("bad_graph", graph({"t": {"type": "toy.add_twice", "inputs": {"x": 1.0}}, "t/first": {"type": "toy.const"}}),
     None, "t/first", None),  # the same step as node "first" inside graph-defined node "t"
    ("bad_version", {**TOY_GRAPH, "version": True}, None, None, None),
    ("duplicate_key", '{"version": 1, "nodes": {"a": {"type": "toy.const", "type": "toy.int"}}}', None, "a", None),
    ("bad_output_name", _with_output("../up", link("a")), None, None, "../up"),
    ("too_large", loop_graph(STEP, count=10**30), None, "lp", "count"),
    ("too_large", '{"version": 1, "nodes": {"a": {"type": "toy.int", "inputs": {"value": 1' + "0" * 4300 + '}}}}',
     None, "a", "value"),
    ("too_deep", _toy(a={"value": json.loads("[" * 129 + "]" * 129)}), None, "a", "value"),
    ("too_deep", '{"version": 1, "nodes": {"a": {"inputs": {"v": ' + "[" * 3000 + "]" * 3000 + '}}}}', None, "a", "v"),
]


@pytest.mark.parametrize("code,data,overrides,node,port", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_error_code(registry, code, data, overrides, node, port):
    result = V.validate(data, registry, overrides)
    assert not result.ok
    nodes = node if isinstance(node, frozenset) else {node}
    found = [i for i in result.issues if i.code == code and i.node in nodes and i.port == port]
    assert found, result.issues
    issue = found[0]
    assert issue.message.strip()
    assert set(issue.to_json()) >= {"code", "node", "port", "message"}


# Codes whose trigger needs its own registry or fixture; each is exercised by the named test in this file.
EXERCISED_ELSEWHERE = {"recursive_type": "test_self_recursive_graph_defined_node_is_an_issue_not_a_crash",
                       "missing_dependency": "test_missing_dependency_and_a_failing_cost_hook",
                       "bad_value": "test_missing_dependency_and_a_failing_cost_hook",
                       "bad_device": "test_engine_adds_bad_device_for_pins_anywhere"}


def test_every_documented_code_is_exercised():
    table = re.findall(r"^``(\w+)``\s", V.__doc__, flags=re.M)
    assert len(table) >= 15, "the error-code table in validate.py's docstring was not found"
    covered = {c[0] for c in CASES} | set(EXERCISED_ELSEWHERE)
    assert set(table) <= covered, set(table) - covered
    assert all(name in globals() for name in EXERCISED_ELSEWHERE.values())


def test_missing_dependency_and_a_failing_cost_hook(registry):
    def probe(x: float = 0.0) -> float:
        return x

    registry.add([nodegraph.define(probe, "v.needs", requires=("json", "nodegraph_absent_module")),
                  nodegraph.define(probe, "v.costly", cost=lambda literals: {"pixels": literals["x"] / 0})], "v")
    result = V.validate(graph({"n": {"type": "v.needs"}, "c": {"type": "v.costly", "inputs": {"x": 1.0}}}), registry)
    assert where(result) == {("missing_dependency", "n", None), ("bad_value", "c", None)}
    [missing] = [i for i in result.issues if i.code == "missing_dependency"]
    assert "nodegraph_absent_module" in missing.message and "json" not in missing.message and missing.hint


def test_engine_adds_bad_device_for_pins_anywhere(registry):
    eng = nodegraph.Engine(registry, device="cpu")
    body = {"nodes": {"s": {"type": "toy.const", "device": "meta"}}, "outputs": {}}
    g = graph({"a": {"type": "toy.const", "device": "xla"},
               "lp": {"type": "loop", "inputs": {"count": 1}, "body": body},
               "b": {"type": "toy.add", "inputs": {}}})  # another problem: devices are still reported
    assert where(eng.validate(g)) == {("bad_device", "a", None), ("bad_device", "lp/s", None),
                                      ("missing_input", "b", "a")}


def test_interlocked_cycles_are_one_issue_and_separate_cycles_one_each(registry):
    ring = {f"r{i}": {"type": "toy.add", "inputs": {"a": link(f"r{(i + 1) % 6}"), "b": link(f"r{(i + 2) % 6}")}}
            for i in range(6)}
    pair = {"p": {"type": "toy.add", "inputs": {"a": link("q")}}, "q": {"type": "toy.add", "inputs": {"a": link("p")}}}
    result = V.validate(graph({**ring, **pair}), registry)
    assert where(result) == {("cycle", "p", None), ("cycle", "r0", None)}


def test_limits_come_from_the_context(registry):
    from nodegraph.limits import Limits
    from nodegraph.node import Context

    g = loop_graph(STEP, count=50)
    assert V.validate(g, registry).ok and V.validate(g, registry, ctx=Context("x", None)).ok
    tight = V.validate(g, registry, ctx=Context("x", None, limits=Limits(max_loop_iterations=49)))
    assert where(tight) == {("too_large", "lp", "count")} and "max_loop_iterations=49" in tight.issues[0].message
    shallow = Context("x", None, limits=Limits(max_nesting=1))
    assert V.validate(graph({"e": {"type": "toy.echo", "inputs": {"value": [1]}}}), registry, ctx=shallow).ok
    deep = V.validate(graph({"e": {"type": "toy.echo", "inputs": {"value": [[1]]}}}), registry, ctx=shallow)
    assert where(deep) == {("too_deep", "e", "value")} and "max_nesting=1" in deep.issues[0].message
    assert V.validate(g, registry, ctx=shallow).ok  # the body is one level down
    two = loop_graph({"inner": {"type": "loop", "inputs": {"count": 1}, "body": {"nodes": {}, "outputs": {}}}, **STEP})
    assert where(V.validate(two, registry, ctx=shallow)) == {("too_deep", "lp/inner", None)}

    result = V.validate(_toy(a={"value": link("count")}), registry)
    [cycle] = [i for i in result.issues if i.code == "cycle"]
    for nid in ("a", "b", "count"):
        assert re.search(rf"\b{nid}\b", cycle.message), cycle.message
    assert "dm" not in cycle.message


_CYCLE_SCRIPT = """
import copy, json, sys
sys.path.insert(0, sys.argv[1])
from tests.engine.conftest import TOY_GRAPH, make_registry
from nodegraph.validate import validate
g = copy.deepcopy(TOY_GRAPH)
g["nodes"]["a"]["inputs"]["value"] = {"node": "count", "output": "out"}
print(json.dumps(validate(g, make_registry()).to_json()))
"""


def test_cycle_report_does_not_depend_on_the_hash_seed(tmp_path):
    """The same invalid graph gives the same errors in every process (string hashing is randomised)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", _CYCLE_SCRIPT, repo], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 3)]
    reports = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    docs = [json.loads(r) for r in reports]
    assert all(d["errors"] and d["errors"][0]["code"] == "cycle" for d in docs)
    assert all(d == docs[0] for d in docs), [d["errors"][0]["node"] for d in docs]


def test_self_loop_is_one_cycle_error_and_no_phantom_output_error(registry):
    # toy.const does have an output 'out'; the only problem is the cycle a -> a.
    result = V.validate(_toy(a={"value": link("a")}), registry)
    assert codes(result) == ["cycle"], result.issues


def test_out_of_range_on_each_bound(registry):
    for value, ok in ((-1, False), (0, True), (10, True), (11, False)):
        g = graph({"r": {"type": "toy.repeat", "inputs": {"times": value}}})
        result = V.validate(g, registry)
        assert result.ok is ok, (value, result.issues)
        if not ok:
            assert where(result) == {("out_of_range", "r", "times")}


def test_literal_escape_is_a_literal_not_a_link(registry):
    g = graph({"r": {"type": "toy.repeat", "inputs": {"text": {"literal": {"node": "x", "output": "y"}}}}})
    assert where(V.validate(g, registry)) == {("wrong_type", "r", "text")}  # a dict, not a missing_node link


# ---------------------------------------------------------------------------------------------------------
# all errors at once; errors are data; an invalid graph runs nothing
# ---------------------------------------------------------------------------------------------------------


def _many_problems() -> tuple[dict, set]:
    g = copy.deepcopy(TOY_GRAPH)
    g["nodes"]["a"]["type"] = "toy.missing"
    del g["nodes"]["b"]["inputs"]["b"]
    del g["nodes"]["b"]["inputs"]["a"]
    g["nodes"]["dm"]["inputs"]["b"] = 0
    g["nodes"]["lat"]["inputs"]["space"] = "sdxl"
    g["nodes"]["count"]["inputs"]["x"] = link("nowhere")
    g["nodes"]["n"]["inputs"]["value"] = 1.5
    g["outputs"]["gone"] = link("vanished")
    expected = {
        ("unknown_type", "a", None),
        ("missing_input", "b", "a"),
        ("out_of_range", "dm", "b"),
        ("type_mismatch", "img", "latent"),
        ("missing_node", "count", "x"),
        ("wrong_type", "n", "value"),
        ("bad_output", None, "gone"),
    }
    return g, expected


def test_all_errors_reported_at_once(registry):
    g, expected = _many_problems()
    result = V.validate(g, registry)
    assert where(result) == expected


def test_invalid_graph_runs_nothing_and_lists_every_issue(engine, calls):
    g, expected = _many_problems()
    with pytest.raises(GraphValidationError) as info:
        engine.run(g)
    assert {(i.code, i.node, i.port) for i in info.value.issues} == expected
    assert sum(calls.values()) == 0


def test_issue_json_shape(registry):
    g, expected = _many_problems()
    doc = V.validate(g, registry).to_json()
    assert doc["ok"] is False
    assert len(doc["errors"]) == len(expected)
    for err in doc["errors"]:
        assert {"code", "node", "port", "message"} <= set(err)
        assert isinstance(err["message"], str) and err["message"]
    # hints travel only when there is one
    unknown = next(e for e in doc["errors"] if e["code"] == "unknown_type")
    assert "hint" not in unknown or isinstance(unknown["hint"], str)
    assert "hint" not in Issue("x", "m").to_json()


# ---------------------------------------------------------------------------------------------------------
# typed ports: mismatches, type variables, scalar coercions
# ---------------------------------------------------------------------------------------------------------


def test_type_mismatch_names_both_types(registry):
    result = V.validate(_toy(dm={"a": link("a")}), registry)  # Float -> Int
    [issue] = result.issues
    assert "Float" in issue.message and "Int" in issue.message


def _decode_graph(vae_space: str, latent_space: str) -> dict:
    return graph({
        "vae": {"type": "toy.load_vae", "inputs": {"space": vae_space}},
        "lat": {"type": "toy.latent", "inputs": {"space": latent_space}},
        "img": {"type": "toy.vae_decode", "inputs": {"vae": link("vae"), "latent": link("lat")}},
    }, {"image": link("img", "image")})


@pytest.mark.parametrize("vae_space,latent_space", [("sd15", "sd15"), ("sdxl", "sdxl"), ("sd15", "sdxl"),
                                                     ("sdxl", "sd15")])
def test_type_variables_unify_along_edges(registry, vae_space, latent_space):
    result = V.validate(_decode_graph(vae_space, latent_space), registry)
    if vae_space == latent_space:
        assert result.ok, result.issues
        return
    [issue] = result.issues
    assert (issue.code, issue.node) == ("type_mismatch", "img")
    assert issue.port in ("vae", "latent")
    assert vae_space in issue.message and latent_space in issue.message
    assert "Latent" in issue.message


def test_type_variable_flows_to_output_type(registry):
    g = graph({
        "enc_vae": {"type": "toy.load_vae", "inputs": {"space": "sd15"}},
        "dec_vae": {"type": "toy.load_vae", "inputs": {"space": "sdxl"}},
        "im": {"type": "toy.image"},
        "enc": {"type": "toy.vae_encode", "inputs": {"vae": link("enc_vae"), "image": link("im", "image")}},
        "dec": {"type": "toy.vae_decode", "inputs": {"vae": link("dec_vae"), "latent": link("enc")}},
    })
    result = V.validate(g, registry)
    assert result.scope.nodes["enc"].output_types["out"].param("space") == "sd15"
    assert where(result) == {("type_mismatch", "dec", "latent")}
    ok = copy.deepcopy(g)
    ok["nodes"]["dec_vae"]["inputs"]["space"] = "sd15"
    assert V.validate(ok, registry).ok


def test_type_variable_bindings_are_per_node(registry):
    g = graph({
        "v1": {"type": "toy.load_vae", "inputs": {"space": "sd15"}},
        "l1": {"type": "toy.latent", "inputs": {"space": "sd15"}},
        "v2": {"type": "toy.load_vae", "inputs": {"space": "sdxl"}},
        "l2": {"type": "toy.latent", "inputs": {"space": "sdxl"}},
        "d1": {"type": "toy.vae_decode", "inputs": {"vae": link("v1"), "latent": link("l1")}},
        "d2": {"type": "toy.vae_decode", "inputs": {"vae": link("v2"), "latent": link("l2")}},
    })
    assert V.validate(g, registry).ok


@pytest.mark.parametrize("source,target,port,ok", [
    ("toy.int", "toy.add", "a", True),        # Int -> Float widens
    ("toy.const", "toy.add", "a", True),      # Float -> Float
    ("toy.const", "toy.divmod", "a", False),  # Float -> Int narrows: refused
    ("toy.flag", "toy.divmod", "a", False),   # Bool is not an Int
    ("toy.flag", "toy.add", "a", False),      # Bool is not a Float
    ("toy.int", "toy.repeat", "text", False),  # Int is not a String
    ("toy.image", "toy.tensor_sum", "x", True),  # tensor-like -> Tensor
    ("toy.const", "toy.tensor_sum", "x", False),  # a scalar is not a Tensor
])
def test_scalar_coercions_on_links(registry, source, target, port, ok):
    out = "image" if source == "toy.image" else "out"
    g = graph({"s": {"type": source}, "t": {"type": target, "inputs": {port: link("s", out)}}})
    result = V.validate(g, registry)
    if ok:
        assert result.ok, result.issues
    else:
        assert where(result) == {("type_mismatch", "t", port)}


@pytest.mark.parametrize("node_type,port,value,code", [
    ("toy.const", "value", 3, None),            # int literal into a Float port
    ("toy.const", "value", 2.5, None),
    ("toy.const", "value", True, "wrong_type"),  # bool is not a number
    ("toy.const", "value", "2.5", "wrong_type"),
    ("toy.int", "value", 2.0, "wrong_type"),     # float literal into an Int port: refused
    ("toy.int", "value", True, "wrong_type"),
    ("toy.int", "value", "2", "wrong_type"),
    ("toy.flag", "value", 1, "wrong_type"),      # 1 is not a bool
    ("toy.flag", "value", False, None),
    ("toy.repeat", "text", 5, "wrong_type"),
    ("toy.repeat", "times", 2.0, "wrong_type"),
    ("toy.choose", "mode", "d", "not_in_enum"),
    ("toy.choose", "mode", "b", None),
])
def test_scalar_coercions_on_literals(registry, node_type, port, value, code):
    result = V.validate(graph({"n": {"type": node_type, "inputs": {port: value}}}), registry)
    if code is None:
        assert result.ok, result.issues
    else:
        assert where(result) == {(code, "n", port)}


def test_int_literal_for_float_port_is_coerced(registry):
    result = V.validate(graph({"n": {"type": "toy.const", "inputs": {"value": 3}}}), registry)
    value = result.scope.nodes["n"].literals["value"]
    assert value == 3 and isinstance(value, float)


# ---------------------------------------------------------------------------------------------------------
# node version pinning
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pin,ok", [("1.0.0", True), ("1.4.2", True), ("1", True), ("1.9", True),
                                    ("2.0.0", False), ("0.1.0", False), ("banana", False), ("1.0.0-rc1", False)])
def test_node_version_pinning(registry, pin, ok):
    result = V.validate(_set_node("a", version=pin), registry)
    if ok:
        assert result.ok, result.issues
    else:
        assert where(result) == {("node_version", "a", None)}
        if pin[0].isdigit() and pin.count(".") == 2 and "-" not in pin:
            assert pin in result.issues[0].message and "1.0.0" in result.issues[0].message


# ---------------------------------------------------------------------------------------------------------
# loops and graph-defined nodes: problems are named outer/inner
# ---------------------------------------------------------------------------------------------------------


def test_valid_loop(registry):
    assert V.validate(loop_graph(STEP), registry).ok


def test_loop_body_problems_are_named_outer_inner(registry):
    body = {
        **STEP,
        "bad": {"type": "toy.repeat", "inputs": {"times": 99, "colour": 1, "text": {"input": "nope"}}},
        "mm": {"type": "toy.divmod", "inputs": {"a": link("step")}},
        "gh": {"type": "toy.ghost"},
    }
    result = V.validate(loop_graph(body), registry)
    assert where(result) == {
        ("out_of_range", "lp/bad", "times"),
        ("unknown_input", "lp/bad", "colour"),
        ("bad_reference", "lp/bad", "text"),
        ("type_mismatch", "lp/mm", "a"),
        ("unknown_type", "lp/gh", None),
    }


def test_nested_loop_problems_carry_the_full_path(registry):
    inner = {"type": "loop", "inputs": {"count": 2},
             "body": {"nodes": {"deep": {"type": "toy.add"}}, "outputs": {}}}
    g = graph({"outer": {"type": "loop", "inputs": {"count": 2},
                         "body": {"nodes": {"inner": inner}, "outputs": {}}}})
    assert where(V.validate(g, registry)) == {("missing_input", "outer/inner/deep", "a")}


def test_loop_options_are_checked(registry):
    result = V.validate(loop_graph(STEP, count=-1), registry)
    assert where(result) == {("out_of_range", "lp", "count")}
    result = V.validate(loop_graph(STEP, count=2.5), registry)
    assert where(result) == {("wrong_type", "lp", "count")}
    result = V.validate(loop_graph(STEP, colour=1), registry)
    assert where(result) == {("unknown_input", "lp", "colour")}


def test_loop_carry_type_is_checked(registry):
    body = {"step": {"type": "toy.choose"}}  # a String comes back for the Float carry
    result = V.validate(loop_graph(body), registry)
    assert ("type_mismatch", "lp", "x") in where(result)


@pytest.mark.parametrize("decl_type", ["Nope", {"name": "Latent", "params": {"bogus": 1}},
                                       {"name": "Latent", "params": [1]}, {"name": 5}])
def test_loop_body_input_with_a_bad_type_is_bad_loop(registry, decl_type):
    g = loop_graph(STEP)
    g["nodes"]["lp"]["body"]["inputs"]["x"]["type"] = decl_type
    result = V.validate(g, registry)
    assert ("bad_loop", "lp", "x") in where(result), result.issues


def test_self_recursive_graph_defined_node_is_an_issue_not_a_crash(registry):
    registry.add_graph_node({
        "type": "toy.forever", "inputs": {"x": {"type": "Float"}},
        "nodes": {"again": {"type": "toy.forever", "inputs": {"x": {"input": "x"}}}},
        "outputs": {"out": link("again")},
    })
    result = V.validate(graph({"r": {"type": "toy.forever", "inputs": {"x": 1.0}}}), registry)
    assert not result.ok
    assert any(i.node is not None and i.node.split("/")[0] == "r" for i in result.issues), result.issues
    assert any(i.code == "recursive_type" for i in result.issues), result.issues


def test_graph_defined_node_problems_are_named_outer_inner(registry):
    registry.add_graph_node({
        "type": "toy.broken", "inputs": {"x": {"type": "Float"}},
        "nodes": {"inner": {"type": "toy.repeat", "inputs": {"times": {"input": "x"}}},
                  "other": {"type": "toy.nope"}},
        "outputs": {"out": link("inner")},
    })
    g = graph({"c": {"type": "toy.const"}, "user": {"type": "toy.broken", "inputs": {"x": link("c")}}},
              {"o": link("user")})
    assert where(V.validate(g, registry)) == {("type_mismatch", "user/inner", "times"),
                                              ("unknown_type", "user/other", None)}


def test_graph_defined_node_inputs_and_output_types(registry):
    g = graph({"c": {"type": "toy.const"}, "t": {"type": "toy.add_twice", "inputs": {"x": link("c")}},
               "use": {"type": "toy.divmod", "inputs": {"a": link("t")}}})
    assert where(V.validate(g, registry)) == {("type_mismatch", "use", "a")}  # declared Float -> Int
    g = graph({"t": {"type": "toy.add_twice"}})
    assert where(V.validate(g, registry)) == {("missing_input", "t", "x")}
    g = graph({"t": {"type": "toy.add_twice", "inputs": {"x": 1, "z": 2}}})
    assert where(V.validate(g, registry)) == {("unknown_input", "t", "z")}


def test_graph_defined_node_output_types_flow_from_the_subgraph(registry):
    registry.add_graph_node({
        "type": "toy.int_box", "inputs": {"v": {"type": "Int"}},
        "nodes": {"i": {"type": "toy.int", "inputs": {"value": {"input": "v"}}}},
        "outputs": {"out": link("i")},
    })
    ok = graph({"b": {"type": "toy.int_box", "inputs": {"v": 3}},
                "use": {"type": "toy.add", "inputs": {"a": link("b")}}})  # Int -> Float
    assert V.validate(ok, registry).ok
    bad = graph({"b": {"type": "toy.int_box", "inputs": {"v": 3}},
                 "use": {"type": "toy.repeat", "inputs": {"text": link("b")}}})
    [issue] = V.validate(bad, registry).issues
    assert (issue.code, issue.node, issue.port) == ("type_mismatch", "use", "text")
    assert "Int" in issue.message and "String" in issue.message


# ---------------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------------


def test_apply_overrides_replaces_literals_without_touching_the_original(registry):
    original = nodegraph.Graph.model_validate(TOY_GRAPH)
    new, issues = V.apply_overrides(original, {"a.value": 4.0, "dm.b": 2}, registry)
    assert issues == []
    assert new.nodes["a"].inputs["value"] == 4.0 and new.nodes["dm"].inputs["b"] == 2
    assert original.nodes["a"].inputs["value"] == 1.5 and original.nodes["dm"].inputs["b"] == 3
    assert new.nodes["b"] == original.nodes["b"]


def test_apply_overrides_reports_bad_targets_with_hints(registry):
    g = nodegraph.Graph.model_validate(TOY_GRAPH)
    new, issues = V.apply_overrides(g, {"cont.x": 1, "count.y": 2, "nodot": 3, "a.value": 9.0}, registry)
    got = {(i.code, i.node, i.port) for i in issues}
    assert got == {("bad_override", "cont", "x"), ("bad_override", "count", "y"), ("bad_override", None, None)}
    hint = next(i.hint for i in issues if i.node == "cont")
    assert hint and "count" in hint
    assert new.nodes["a"].inputs["value"] == 9.0  # good overrides still apply


def test_override_values_are_validated_like_literals(registry):
    assert where(V.validate(TOY_GRAPH, registry, {"dm.b": 0})) == {("out_of_range", "dm", "b")}
    assert where(V.validate(TOY_GRAPH, registry, {"lat.space": "sd2"})) == {("not_in_enum", "lat", "space")}
    assert where(V.validate(TOY_GRAPH, registry, {"n.value": 1.5})) == {("wrong_type", "n", "value")}
    # an override may repair a graph and may change inferred types
    broken = _toy(dm={"b": 0})
    assert V.validate(broken, registry, {"dm.b": 2}).ok
    result = V.validate(TOY_GRAPH, registry, {"lat.space": "sdxl"})
    assert where(result) == {("type_mismatch", "img", "latent")}


def test_override_loop_option(registry):
    assert V.validate(loop_graph(STEP), registry, {"lp.count": 5}).ok
    assert where(V.validate(loop_graph(STEP), registry, {"lp.count": -5})) == {("out_of_range", "lp", "count")}
    assert where(V.validate(loop_graph(STEP), registry, {"lp.bogus": 1})) == {("bad_override", "lp", "bogus")}


@pytest.mark.parametrize("value", [{"node": 1, "output": "out"}, {"node": "a", "output": None}, {"input": 5}])
def test_link_shaped_override_with_bad_fields_is_an_issue_not_a_crash(registry, value):
    result = V.validate(TOY_GRAPH, registry, {"a.value": value})
    assert not result.ok
    assert any(i.node == "a" for i in result.issues), result.issues


@pytest.mark.parametrize("expr,expected", [
    ("a.b=1", ("a", "b", 1)),
    ("a.b=1.5", ("a", "b", 1.5)),
    ("a.b=-3", ("a", "b", -3)),
    ("a.b=true", ("a", "b", True)),
    ("a.b=null", ("a", "b", None)),
    ("a.b=hello", ("a", "b", "hello")),
    ('a.b="1"', ("a", "b", "1")),
    ("a.b=[1, 2]", ("a", "b", [1, 2])),
    ('a.b={"k": 1}', ("a", "b", {"k": 1})),
    ("a.b=", ("a", "b", "")),
    ("a.b=x=y", ("a", "b", "x=y")),
    ("my.node.input=2", ("my.node", "input", 2)),
])
def test_parse_set(expr, expected):
    node, name, value = V.parse_set(expr)
    assert (node, name, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize("expr", ["novalue", "nodot=1", ".b=1", "a.=1", "=1", "", "a.b=" + "[" * 5000 + "]" * 5000,
                                  "a.b=" + "9" * 5000, 'a.b={"k": 1, "k": 2}'])
def test_parse_set_rejects(expr):
    with pytest.raises(ValueError):
        V.parse_set(expr)
