"""Hostile graph files: each one gets exit code 2 and a structured JSON error from the CLI, and nothing runs.

One section per kind of attack: output names, graph sources, cycles, nesting, limits, device pins, missing
dependencies. The CLI tests go through :func:`nodegraph.cli.main` (a subprocess with a timeout where the risk
is a hang), use ``run --json`` on a graph that also holds a counting node, and check the exit code, the
``{"ok": false, "errors": [{code, node, port, message}]}`` contract, the expected code and that no node ran
(the count log is empty and the output folder was never made). The API tests next to them pin the edges:
what is just accepted and what is just refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nodegraph
from nodegraph import serialize
from nodegraph import validate as V
from nodegraph.cli import main
from nodegraph.limits import Limits
from nodegraph.node import Context, define
from tests.engine.toy_nodes import link

LOG_ENV = "NODEGRAPH_HOSTILE_LOG"

# A node pack for these tests, written into a plugin folder so that the CLI loads it like any pack.
PACK = f'''
import os
from typing import Any

from nodegraph import node, types as T


def _ran(type_id):
    log = os.environ.get({LOG_ENV!r})
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(type_id + "\\n")


@node("hostile.count", category="hostile", output="out")
def count(x: float = 0.0) -> T.Float:
    """Returns x; logs that it ran."""
    _ran("hostile.count")
    return x


@node("hostile.echo", category="hostile", output="out")
def echo(value: Any = None) -> T.Any:
    """Returns any JSON value as it is."""
    _ran("hostile.echo")
    return value


def _image_cost(literals):
    return {{"pixels": literals["width"] * literals["height"], "elements": 3 * literals["width"] * literals["height"]}}


@node("hostile.image", category="hostile", output="out", cost=_image_cost)
def image(width: int = 8, height: int = 8) -> T.Float:
    """Pretends to allocate a width x height image (its cost hook says so)."""
    _ran("hostile.image")
    return float(width * height)


@node("hostile.needs", category="hostile", output="out", requires=("nodegraph_no_such_module_xyz",))
def needs(x: float = 0.0) -> T.Float:
    """Needs a module that is not installed."""
    _ran("hostile.needs")
    return x


def _level(k):
    inner = "hostile.count" if k == 0 else f"hostile.pack{{k - 1}}"
    return {{"type": f"hostile.pack{{k}}", "inputs": {{"x": {{"type": "Float"}}}},
            "nodes": {{"a": {{"type": inner, "inputs": {{"x": {{"input": "x"}}}}}},
                      "b": {{"type": inner, "inputs": {{"x": {{"node": "a", "output": "out"}}}}}}}},
            "outputs": {{"out": {{"node": "b", "output": "out"}}}}, "output_types": {{"out": "Float"}}}}


# hostile.packK uses hostile.pack(K-1) twice: pack30 expands to 2**31 nodes.
GRAPH_NODES = [_level(k) for k in range(31)]
'''

COUNT = {"type": "hostile.count", "inputs": {"x": 1.0}}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """The plugin folder holding the pack; the count log is set up and must stay empty."""
    folder = tmp_path / "pack"
    folder.mkdir()
    (folder / "hostile_pack.py").write_text(PACK, encoding="utf-8")
    log = tmp_path / "ran.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    return folder


def graph(nodes: dict, outputs: dict | None = None) -> dict:
    """A graph holding a counting node next to the given ones (so that a wrong acceptance would run it)."""
    return {"version": 1, "nodes": {"probe": COUNT, **nodes}, "outputs": outputs or {"probe": link("probe")}}


def write(tmp_path: Path, data, name: str = "g.json") -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def refused(capsys, path: Path, pack: Path, *extra: str) -> list[dict]:
    """``nodegraph run PATH --json``: exit 2, one JSON object of the contract, nothing ran; returns the errors."""
    log = Path(os.environ[LOG_ENV])
    out = log.parent / "out"
    capsys.readouterr()
    rc = main(["run", str(path), "--json", "--device", "cpu", "--out", str(out), "--plugins", str(pack), *extra])
    stdout = capsys.readouterr().out
    assert rc == 2, stdout
    doc = json.loads(stdout)
    assert doc["ok"] is False and doc["errors"], doc
    for err in doc["errors"]:
        assert {"code", "node", "port", "message"} <= set(err) and err["message"], err
    assert not out.exists(), "a refused graph must not write outputs"
    assert not log.exists() or not log.read_text(), f"nodes ran: {log.read_text()}"
    return doc["errors"]


def has(errors: list[dict], code: str, node=..., port=...) -> dict:
    """The first error with this code (and node / port, when given)."""
    for err in errors:
        if err["code"] == code and node in (..., err["node"]) and port in (..., err["port"]):
            return err
    raise AssertionError(f"no {code} error at {node}.{port} in {errors}")


def deep(levels: int, leaf=0):
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def engine(hostile: Path, **kwargs) -> nodegraph.Engine:
    return nodegraph.Engine(device="cpu", plugin_dirs=[hostile], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# 1. output names that would be paths
# ---------------------------------------------------------------------------------------------------------

BAD_NAMES = ["../../x", "/abs/x", "a/b", "a\\b", "", ".", "..", "a\x00b", "tab\there", "bell\x07", "\x7f",
             "x" * 256, "C:x", "\ud800"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_output_names_that_are_paths_are_refused(capsys, tmp_path, hostile, name):
    errors = refused(capsys, write(tmp_path, graph({}, {name: link("probe")})), hostile)
    has(errors, "bad_output_name", None, name)


@pytest.mark.parametrize("name", ["image", "x.y", "a-b_c", "é" * 127, "x" * 255])
def test_ordinary_output_names_are_accepted(name):
    assert V.output_name_problem(name) is None


# ---------------------------------------------------------------------------------------------------------
# 2. graph sources: files, text, JSON and msgpack documents
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_as_the_graph_path_does_not_hang(tmp_path):
    fifo = tmp_path / "g.json"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "validate", str(fifo), "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    [err] = json.loads(done.stdout)["errors"]
    assert err["code"] == "bad_json" and "FIFO" in err["message"] and "not a regular file" in err["message"]


@pytest.mark.parametrize("where", ["dir", "/dev/null", "/dev/zero"])
def test_directories_and_devices_are_not_read(capsys, tmp_path, hostile, where):
    if where == "dir":
        path = tmp_path / "folder.json"
        path.mkdir()
    else:
        path = Path(where)
        if not path.exists():
            pytest.skip(f"no {where} here")
    errors = refused(capsys, path, hostile, "--input-root", str(tmp_path))
    assert "not a regular file" in has(errors, "bad_json")["message"]


def test_a_file_over_max_graph_bytes_is_refused_before_it_is_read(capsys, tmp_path, hostile):
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:  # sparse: costs no disk and no time, and its size says it is too big
        fh.truncate(Limits().max_graph_bytes + 1)
    err = has(refused(capsys, path, hostile), "too_large")
    assert "max_graph_bytes" in err["message"]


def test_graph_text_and_files_are_bounded_by_the_engine_limits(tmp_path, hostile):
    small = engine(hostile, limits=Limits(max_graph_bytes=100))
    text = json.dumps(graph({"pad": {"type": "hostile.count", "inputs": {"x": 2.0}}}))
    assert len(text) > 100
    for source in (text, text.encode(), write(tmp_path, text)):
        assert [i.code for i in small.validate(source).issues] == ["too_large"], source
    assert engine(hostile).validate(text).ok


def test_json_ten_to_the_fifth_deep_is_too_deep(capsys, tmp_path, hostile):
    text = '{"version": 1, "nodes": {"a": {"type": "hostile.count", "inputs": {"x": ' + "[" * 10**5 + "]" * 10**5
    errors = refused(capsys, write(tmp_path, text + "}}}}"), hostile)
    has(errors, "too_deep", "a", "x")


def test_a_literal_nested_deeper_than_max_nesting_is_too_deep_naming_node_and_port(capsys, tmp_path, hostile):
    g = graph({"e": {"type": "hostile.count", "inputs": {"x": deep(129)}}})
    err = has(refused(capsys, write(tmp_path, g), hostile), "too_deep", "e", "x")
    assert "max_nesting" in err["message"] or "cache keys" in err["message"]
    meta = graph({})
    meta["nodes"]["probe"] = {**COUNT, "meta": {"m": deep(200)}}
    has(refused(capsys, write(tmp_path, meta), hostile), "too_deep", "probe")


def test_an_integer_over_4300_digits_is_too_large(capsys, tmp_path, hostile):
    text = json.dumps(graph({"e": {"type": "hostile.count", "inputs": {"x": 0}}}))
    text = text.replace('"x": 0', '"x": ' + "9" * 5000)
    assert "4,300 digits" in has(refused(capsys, write(tmp_path, text), hostile), "too_large", "e", "x")["message"]
    api = engine(hostile).validate(graph({"e": {"type": "hostile.count", "inputs": {"x": 10**5000}}}))
    assert [(i.code, i.node, i.port) for i in api.issues] == [("too_large", "e", "x")]


def test_duplicate_keys_are_refused_with_their_path(capsys, tmp_path, hostile):
    text = ('{"version": 1, "nodes": {"probe": {"type": "hostile.count", "inputs": {"x": 1.0, "x": 2.0}}},'
            ' "outputs": {}, "outputs": {"probe": {"node": "probe", "output": "out"}}}')
    errors = refused(capsys, write(tmp_path, text), hostile)
    assert "nodes.probe.inputs" in has(errors, "duplicate_key", "probe", "x")["message"]
    has(errors, "duplicate_key", None)  # the top-level "outputs"


def test_version_true_is_not_version_one(capsys, tmp_path, hostile):
    for version in (True, 1.0, "1"):
        g = {**graph({}), "version": version}
        has(refused(capsys, write(tmp_path, g), hostile), "bad_version")


@pytest.mark.parametrize("value", [torch.zeros(2), np.zeros(2), b"\x00\x01", (1, 2)],
                         ids=["tensor", "ndarray", "bytes", "tuple"])
def test_a_msgpack_graph_holding_a_non_json_value_is_bad_graph(capsys, tmp_path, hostile, value):
    data = serialize.packb({"version": 1, "outputs": {"probe": link("probe")},
                            "nodes": {"probe": COUNT, "e": {"type": "hostile.count", "inputs": {"x": value}}}})
    err = has(refused(capsys, write(tmp_path, data, "g.msgpack"), hostile), "bad_graph", "e", "x")
    assert "JSON data" in err["message"]


def test_msgpack_graphs_refuse_duplicate_keys_and_still_load(capsys, tmp_path, hostile):
    import msgpack

    good = graph({})
    assert engine(hostile).validate(write(tmp_path, serialize.packb(good), "ok.msgpack")).ok
    dup = msgpack.packb({"version": 1, "nodes": {}, "outputs": {}}).replace(b"\x83", b"\x84", 1) + msgpack.packb(
        "nodes") + msgpack.packb({})
    has(refused(capsys, write(tmp_path, dup, "dup.msgpack"), hostile), "duplicate_key")


# ---------------------------------------------------------------------------------------------------------
# 3. interlocking cycles
# ---------------------------------------------------------------------------------------------------------


def rings(n: int, count: int = 2) -> dict:
    """``count`` rings of ``n`` math.add nodes, each node also linked to the same position on the next ring."""
    nodes = {}
    for r in range(count):
        for i in range(n):
            nodes[f"r{r}n{i}"] = {"type": "math.add", "inputs": {"a": link(f"r{r}n{(i + 1) % n}"),
                                                                  "b": link(f"r{(r + 1) % count}n{i}")}}
    return nodes


def test_two_interlocking_rings_are_cycle_issues(capsys, tmp_path, hostile):
    errors = refused(capsys, write(tmp_path, graph(rings(16))), hostile)
    cycles = [e for e in errors if e["code"] == "cycle"]
    assert len(cycles) == 1 and cycles[0]["node"] == "r0n0"  # one set of interlocked cycles, one issue
    assert "the graph has a cycle: r0n0 -> " in cycles[0]["message"]


def test_many_separate_cycles_are_reported_in_a_bounded_count(hostile):
    nodes = {}
    for k in range(80):
        nodes[f"c{k:02}a"] = {"type": "math.add", "inputs": {"a": link(f"c{k:02}b")}}
        nodes[f"c{k:02}b"] = {"type": "math.add", "inputs": {"a": link(f"c{k:02}a")}}
    issues = engine(hostile).validate(graph({**nodes, **rings(5, 4)})).issues
    cycles = [i for i in issues if i.code == "cycle"]
    assert len(cycles) == 51 and "more separate cycle" in cycles[-1].message
    assert {i.code for i in issues} == {"cycle"}


# ---------------------------------------------------------------------------------------------------------
# 4. nesting: loops in loops, graph-defined nodes in graph-defined nodes
# ---------------------------------------------------------------------------------------------------------


def nested_loops(levels: int, count: int = 1) -> dict:
    """``levels`` loops, each the body of the one around it; the innermost adds 1 to a carried x."""
    body = {"inputs": {"x": {"type": "Float", "carry": True}},
            "nodes": {"s": {"type": "math.add", "inputs": {"a": {"input": "x"}, "b": 1.0}}},
            "outputs": {"x": link("s")}}
    for _ in range(levels - 1):
        body = {"inputs": {"x": {"type": "Float", "carry": True}},
                "nodes": {"l": {"type": "loop", "inputs": {"count": count, "x": {"input": "x"}}, "body": body}},
                "outputs": {"x": link("l", "x")}}
    return {"top": {"type": "loop", "inputs": {"count": count, "x": link("probe")}, "body": body}}


@pytest.mark.parametrize("levels", [V.MAX_LOOP_NESTING + 1, 45, 150, 200])
def test_loops_nested_too_deep_are_too_deep(capsys, tmp_path, hostile, levels):
    errors = refused(capsys, write(tmp_path, graph(nested_loops(levels), {"x": link("top", "x")})), hostile)
    assert {e["code"] for e in errors} == {"too_deep"}, errors
    assert errors[0]["node"].startswith("top/l")


def test_loops_nested_as_deep_as_allowed_validate_plan_and_run(hostile):
    g = graph(nested_loops(V.MAX_LOOP_NESTING), {"x": link("top", "x")})
    result = engine(hostile).run(g)
    assert result.outputs["x"] == 2.0  # probe gives 1.0, the innermost body adds 1 once


def test_graph_defined_nodes_nested_deeper_than_max_nesting_are_too_deep(hostile):
    reg = nodegraph.Registry()
    reg.add(define(lambda x=0.0: x, "t.leaf"), "t")
    for k in range(1, 140):  # t.k wraps t.(k-1)
        inner = "t.leaf" if k == 1 else f"t.{k - 1}"
        reg.add_graph_node({"type": f"t.{k}", "inputs": {"x": {"type": "Float"}},
                            "nodes": {"n": {"type": inner, "inputs": {"x": {"input": "x"}}}},
                            "outputs": {"out": link("n")}}, "t")
    ok = V.validate({"version": 1, "nodes": {"g": {"type": "t.127", "inputs": {"x": 1.0}}}}, reg)
    assert ok.ok, ok.issues
    deep_result = V.validate({"version": 1, "nodes": {"g": {"type": "t.139", "inputs": {"x": 1.0}}}}, reg)
    assert [(i.code, i.node.split("/")[0]) for i in deep_result.issues] == [("too_deep", "g")]
    assert "max_nesting" in deep_result.issues[0].message


@pytest.mark.parametrize("levels,depth,ok", [(0, 125, True), (0, 126, False), (0, 129, False),
                                             (V.MAX_LOOP_NESTING, 2, True), (V.MAX_LOOP_NESTING, 3, False)])
def test_literal_depth_limits_match_what_cache_keys_hold(hostile, levels, depth, ok):
    """What validation accepts must plan: cache keys are encoded with at most 128 levels (3 per loop)."""
    echo = {"type": "hostile.echo", "inputs": {"value": deep(depth)}}
    if levels == 0:
        g = graph({"e": echo}, {"e": link("e")})
    else:
        g = graph(nested_loops(levels), {"x": link("top", "x")})
        innermost = g["nodes"]["top"]
        for _ in range(levels - 1):
            innermost = innermost["body"]["nodes"]["l"]
        innermost["body"]["nodes"]["e"] = echo
        innermost["body"]["outputs"]["e"] = link("e")
    eng = engine(hostile)
    codes = [i.code for i in eng.validate(g).issues]
    if ok:
        assert codes == []
        assert eng.plan(g)[0].steps  # no SerializationError from the cache keys
    else:
        assert codes == ["too_deep"]


# ---------------------------------------------------------------------------------------------------------
# 5. limits visible at validation
# ---------------------------------------------------------------------------------------------------------


def test_a_loop_count_of_ten_to_the_thirty_is_too_large(capsys, tmp_path, hostile):
    g = graph({"lp": {"type": "loop", "inputs": {"count": 10**30}, "body": {"nodes": {"c": COUNT}, "outputs": {}}}})
    err = has(refused(capsys, write(tmp_path, g), hostile), "too_large", "lp", "count")
    assert "max_loop_iterations" in err["message"] and "1,000,000,000,000,000,000,000,000,000,000" in err["message"]


def test_loop_limits_follow_the_engine_limits(hostile):
    small = engine(hostile, limits=Limits(max_loop_iterations=3))
    body = {"nodes": {"c": COUNT}, "outputs": {}}
    assert small.validate(graph({"lp": {"type": "loop", "inputs": {"count": 3}, "body": body}})).ok
    for inputs in ({"count": 4}, {"over": [1, 2, 3, 4]}):
        issues = small.validate(graph({"lp": {"type": "loop", "inputs": inputs, "body": body}})).issues
        assert [(i.code, i.node, i.port) for i in issues] == [("too_large", "lp", next(iter(inputs)))]


def test_an_exponential_graph_defined_pack_is_refused_at_once(capsys, tmp_path, hostile):
    g = graph({"boom": {"type": "hostile.pack30", "inputs": {"x": 1.0}}})
    eng = engine(hostile)
    start = time.perf_counter()
    issues = eng.validate(g).issues
    assert time.perf_counter() - start < 0.5
    assert [(i.code, i.node) for i in issues] == [("too_large", "boom")]
    assert "max_expanded_nodes" in issues[0].message
    has(refused(capsys, write(tmp_path, g), hostile), "too_large", "boom")
    assert eng.validate(graph({"fine": {"type": "hostile.pack10", "inputs": {"x": 1.0}}})).ok


def test_cost_hooks_are_held_to_the_limits(capsys, tmp_path, hostile):
    g = graph({"img": {"type": "hostile.image", "inputs": {"width": 8192, "height": 8192}}})
    err = has(refused(capsys, write(tmp_path, g), hostile), "too_large", "img")
    assert "max_pixels" in err["message"] and "67,108,864" in err["message"]
    assert engine(hostile).validate(graph({"img": {"type": "hostile.image", "inputs": {"width": 2048,
                                                                                       "height": 2048}}})).ok
    elements = engine(hostile, limits=Limits(max_tensor_elements=100)).validate(
        graph({"img": {"type": "hostile.image", "inputs": {"width": 8, "height": 8}}})).issues
    assert [(i.code, i.node) for i in elements] == [("too_large", "img")]
    assert "max_tensor_elements=100" in elements[0].message


def _cost_registry(cost) -> nodegraph.Registry:
    reg = nodegraph.Registry()

    def sized(width: int = 1, height: int = 1) -> float:
        return float(width * height)

    def three() -> int:
        return 3

    reg.add([define(sized, "c.sized", cost=cost), define(three, "c.int")], "c")
    reg.add_graph_node({"type": "c.wrap", "inputs": {"w": {"type": "Int"}},
                        "nodes": {"s": {"type": "c.sized", "inputs": {"width": {"input": "w"}, "height": 10**6}}},
                        "outputs": {"out": link("s")}}, "c")
    return reg


def test_a_cost_hook_sees_literals_given_to_the_graph_defined_node_around_it():
    reg = _cost_registry(lambda lit: {"pixels": lit["width"] * lit["height"]})
    issues = V.validate({"version": 1, "nodes": {"g": {"type": "c.wrap", "inputs": {"w": 10**6}}}}, reg).issues
    assert [(i.code, i.node) for i in issues] == [("too_large", "g/s")]
    assert V.validate({"version": 1, "nodes": {"g": {"type": "c.wrap", "inputs": {"w": 2}}}}, reg).ok


def test_a_cost_hook_needing_a_linked_input_is_skipped_and_a_broken_one_is_an_issue():
    reg = _cost_registry(lambda lit: {"pixels": lit["width"] * lit["height"]})
    linked = {"version": 1, "nodes": {"w": {"type": "c.int"},
                                      "s": {"type": "c.sized", "inputs": {"width": link("w"), "height": 10**9}}}}
    assert V.validate(linked, reg).ok  # the cost hook raised KeyError('width'): only running can tell
    broken = _cost_registry(lambda lit: 1 / 0)
    issues = V.validate({"version": 1, "nodes": {"s": {"type": "c.sized", "inputs": {}}}}, broken).issues
    assert [(i.code, i.node) for i in issues] == [("bad_value", "s")] and "ZeroDivisionError" in issues[0].message


def test_validate_takes_its_limits_from_the_context():
    reg = _cost_registry(lambda lit: {"pixels": lit["width"] * lit["height"]})
    g = {"version": 1, "nodes": {"s": {"type": "c.sized", "inputs": {"width": 100, "height": 100}}}}
    assert V.validate(g, reg).ok
    assert V.validate(g, reg, ctx=Context("v", None)).ok  # ctx without limits: the defaults
    tight = V.validate(g, reg, ctx=Context("v", None, limits=Limits(max_pixels=9999))).issues
    assert [i.code for i in tight] == ["too_large"] and "max_pixels=9,999" in tight[0].message


# ---------------------------------------------------------------------------------------------------------
# 6. device pins
# ---------------------------------------------------------------------------------------------------------

BAD_DEVICES = ["meta", "xla", "cpu:abc", "", "   ", "cpu:1", "gpu", "cuda:-1"]
if not torch.backends.mps.is_available():
    BAD_DEVICES.append("mps")
if not torch.cuda.is_available():
    BAD_DEVICES += ["cuda", "cuda:0"]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_device_pins_this_machine_cannot_honour_are_bad_device(capsys, tmp_path, hostile, device):
    g = graph({"pinned": {**COUNT, "device": device}})
    has(refused(capsys, write(tmp_path, g), hostile), "bad_device", "pinned")
    body = {"nodes": {"inner": {**COUNT, "device": device}}, "outputs": {}}
    looped = graph({"lp": {"type": "loop", "inputs": {"count": 1}, "body": body}})
    has(refused(capsys, write(tmp_path, looped), hostile), "bad_device", "lp/inner")


def test_good_device_pins_validate(hostile):
    for device in ("cpu", "cpu:0", " cpu ", "auto"):
        assert engine(hostile).validate(graph({"pinned": {**COUNT, "device": device}})).ok, device


# ---------------------------------------------------------------------------------------------------------
# 7. missing dependencies
# ---------------------------------------------------------------------------------------------------------


def test_a_node_type_requiring_a_missing_module_is_missing_dependency(capsys, tmp_path, hostile):
    g = graph({"n": {"type": "hostile.needs", "inputs": {"x": 1.0}}})
    err = has(refused(capsys, write(tmp_path, g), hostile), "missing_dependency", "n")
    assert "nodegraph_no_such_module_xyz" in err["message"] and "hint" in err


def test_dependency_lookups_are_cached_and_present_modules_pass():
    V.importable.cache_clear()
    assert V.importable("json") and V.importable("os.path")
    assert not V.importable("nodegraph_no_such_module_xyz") and not V.importable("no_such_parent.child")
    assert not V.importable("")  # a malformed name is simply not importable
    assert V.importable.cache_info().hits == 0
    assert V.importable("json")
    assert V.importable.cache_info().hits == 1
