"""Property tests: malformed graphs never crash validation and never run a node; valid graphs round-trip.

* Random JSON values, random graph-shaped documents and random mutations of valid graphs: ``validate`` and
  ``Engine.validate`` return issues (with documented codes) instead of raising; when the graph is invalid,
  ``Engine.run`` raises :class:`GraphValidationError` and no toy node executes.
* Random valid graphs built from the toy pack (literals, links, multi-output nodes, type variables, loops,
  graph-defined nodes, escaped literals, meta): they validate, and round-trip losslessly through JSON and
  msgpack (equal models, equal dumps).
* Hostile graphs (see also ``test_hostile_graphs.py``): deep nesting as text and as objects, huge integers,
  interlocking cycles, nested loops, odd output names and device strings, duplicate keys. Validation never
  raises and gives the expected code; an invalid one runs nothing; one that validates also plans.

Examples per property: 60 by default (fast, for CI); ``NODEGRAPH_HYPOTHESIS_PROFILE=thorough`` runs 10,000.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodegraph
from nodegraph import Graph
from nodegraph import validate as V
from nodegraph.devices import resolve_device
from nodegraph.limits import DEFAULT_LIMITS
from nodegraph.errors import GraphValidationError, NodeExecutionError
from tests.engine import toy_nodes
from tests.engine.conftest import TOY_GRAPH, make_registry
from tests.engine.toy_nodes import link

REGISTRY = make_registry()
ENGINE = nodegraph.Engine(REGISTRY, device="cpu", max_workers=1)
CODES = set(re.findall(r"^``(\w+)``\s", V.__doc__, flags=re.M))
PROFILE_ENV = "NODEGRAPH_HYPOTHESIS_PROFILE"
settings.register_profile("nodegraph-default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nodegraph-thorough", settings.get_profile("nodegraph-default"), max_examples=10_000)
SETTINGS = settings.get_profile(f"nodegraph-{os.environ.get(PROFILE_ENV, 'default')}")  # this module only

TYPE_IDS = REGISTRY.type_ids()
PORTS = sorted({p for t in TYPE_IDS for p in REGISTRY.get(t).inputs} | set(V.LOOP_OPTIONS))
OUTPUTS = sorted({o for t in TYPE_IDS for o in REGISTRY.get(t).outputs})
WORDS = ["version", "nodes", "outputs", "meta", "type", "inputs", "node", "output", "input", "literal", "body",
         "device", "carry", "optional", "default", "loop", "cpu", "a", "b", "x"]

# ---------------------------------------------------------------------------------------------------------
# strategies: anything, and things shaped like graphs
# ---------------------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=4), max_leaves=16)
words = st.sampled_from(WORDS + TYPE_IDS + PORTS + OUTPUTS) | st.text(max_size=6)
node_ids = st.sampled_from(["a", "b", "c", "lp", "n/1", "x.y"]) | st.text(min_size=1, max_size=4)
links = st.fixed_dictionaries({"node": node_ids, "output": st.sampled_from(OUTPUTS) | st.text(max_size=4)})
input_values = (json_values | links | st.fixed_dictionaries({"input": words})
                | st.fixed_dictionaries({"literal": json_values}) | st.dictionaries(words, json_values, max_size=3))


def node_specs(depth: int):
    fields = {
        "type": st.sampled_from([*TYPE_IDS, "loop"]) | st.text(max_size=8) | json_values,
        "inputs": st.dictionaries(st.sampled_from(PORTS) | st.text(max_size=4), input_values, max_size=4)
        | json_values,
        "version": st.sampled_from(["1.0.0", "2.0.0", "1", "x"]) | json_values,
        "device": st.sampled_from(["cpu", "cuda:99", "tpu"]) | json_values,
        "meta": json_values,
        "colour": json_values,
    }
    if depth > 0:
        fields["body"] = subgraphs(depth - 1) | json_values
    return st.fixed_dictionaries({"type": fields["type"]},
                                 optional={k: v for k, v in fields.items() if k != "type"})


def subgraphs(depth: int):
    port_types = st.sampled_from(["Float", "Int", "Latent", "Nope"]) | st.fixed_dictionaries(
        {"name": st.sampled_from(["Latent", "VAE", "Float", "Nope"]) | json_values},
        optional={"params": st.dictionaries(st.sampled_from(["space", "channels", "bogus"]) | st.text(max_size=3),
                                            json_values, max_size=2) | json_values})
    decl = st.fixed_dictionaries({}, optional={"type": port_types | json_values,
                                               "carry": st.booleans() | json_values,
                                               "optional": st.booleans(), "default": json_values})
    return st.fixed_dictionaries({}, optional={
        "inputs": st.dictionaries(words, decl | json_values, max_size=3),
        "nodes": st.dictionaries(node_ids, node_specs(depth), max_size=3),
        "outputs": st.dictionaries(words, links | st.fixed_dictionaries({"input": words}) | json_values,
                                   max_size=3),
    })


graphish = st.fixed_dictionaries({}, optional={
    "version": st.just(1) | json_values,
    "nodes": st.dictionaries(node_ids, node_specs(1), max_size=5) | json_values,
    "outputs": st.dictionaries(words, links | json_values, max_size=3) | json_values,
    "meta": json_values,
    "extra": json_values,
})

# ---------------------------------------------------------------------------------------------------------
# random valid graphs from the toy pack
# ---------------------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
number = finite | st.integers(-(2**70), 2**70)


def _escape(value):
    """Write a literal so that it is not read back as a link / input reference / escape."""
    if isinstance(value, dict) and set(value) in ({"node", "output"}, {"input"}, {"literal"}):
        return {"literal": value}
    return value


@st.composite
def valid_graphs(draw):
    nodes: dict = {}
    made: dict[str, list[tuple[str, str]]] = {}  # kind -> [(node id, output)]

    def pick(kind):
        return draw(st.sampled_from(made[kind])) if made.get(kind) else None

    def number_in(port_kinds=("Float", "Int")):
        """A link to a Float/Int output or a numeric literal."""
        srcs = [s for k in port_kinds for s in made.get(k, [])]
        if srcs and draw(st.booleans()):
            return link(*draw(st.sampled_from(srcs)))
        return draw(number)

    count = draw(st.integers(1, 9))
    for i in range(count):
        nid = draw(st.text(min_size=1, max_size=6))
        nid = nid if nid not in nodes else f"{nid}~{i}"
        kind = draw(st.sampled_from(["const", "int", "flag", "add", "repeat", "choose", "divmod", "vae", "latent",
                                     "decode", "echo", "loop", "add_twice"]))
        spec: dict = {}
        if kind == "const":
            spec = {"type": "toy.const", "inputs": draw(st.fixed_dictionaries({}, optional={"value": number}))}
            made.setdefault("Float", []).append((nid, "out"))
        elif kind == "int":
            spec = {"type": "toy.int", "inputs": {"value": draw(st.integers(-(2**80), 2**80))}}
            made.setdefault("Int", []).append((nid, "out"))
        elif kind == "flag":
            spec = {"type": "toy.flag", "inputs": {"value": draw(st.booleans())}}
            made.setdefault("Bool", []).append((nid, "out"))
        elif kind == "add":
            inputs = {"a": number_in()}
            if draw(st.booleans()):
                inputs["b"] = number_in()
            spec = {"type": "toy.add", "inputs": inputs}
            made.setdefault("Float", []).append((nid, "out"))
        elif kind == "repeat":
            text = link(*pick("String")) if made.get("String") and draw(st.booleans()) else draw(st.text(max_size=8))
            spec = {"type": "toy.repeat", "inputs": {"text": text, "times": draw(st.integers(0, 10))}}
            made.setdefault("String", []).append((nid, "out"))
        elif kind == "choose":
            spec = {"type": "toy.choose", "inputs": {"mode": draw(st.sampled_from(["a", "b", "c"]))}}
            made.setdefault("String", []).append((nid, "out"))
        elif kind == "divmod":
            a = link(*pick("Int")) if made.get("Int") and draw(st.booleans()) else draw(st.integers())
            spec = {"type": "toy.divmod", "inputs": {"a": a, "b": draw(st.integers(1, 2**40))}}
            made.setdefault("Int", []).extend([(nid, "quotient"), (nid, "remainder")])
        elif kind == "vae":
            space = draw(st.sampled_from(["sd15", "sdxl"]))
            spec = {"type": "toy.load_vae", "inputs": {"space": space}}
            made.setdefault(f"VAE:{space}", []).append((nid, "out"))
        elif kind == "latent":
            space = draw(st.sampled_from(["sd15", "sdxl"]))
            spec = {"type": "toy.latent", "inputs": {"space": space, "channels": draw(st.integers(1, 16))}}
            made.setdefault(f"Latent:{space}", []).append((nid, "out"))
        elif kind == "decode":
            spaces = [s for s in ("sd15", "sdxl") if made.get(f"VAE:{s}") and made.get(f"Latent:{s}")]
            if not spaces:
                continue
            space = draw(st.sampled_from(spaces))
            spec = {"type": "toy.vae_decode",
                    "inputs": {"vae": link(*pick(f"VAE:{space}")), "latent": link(*pick(f"Latent:{space}"))}}
        elif kind == "echo":
            spec = {"type": "toy.echo", "inputs": {"value": _escape(draw(json_values.filter(_no_nan)))}}
            if draw(st.booleans()):
                spec["inputs"]["value"] = {"literal": draw(json_values.filter(_no_nan))}
        elif kind == "loop":
            spec = {"type": "loop", "inputs": {"count": draw(st.integers(0, 5)), "x": number_in()},
                    "body": {"inputs": {"x": {"type": "Float", "carry": True}},
                             "nodes": {"step": {"type": "toy.add", "inputs": {"a": {"input": "x"}, "b": draw(number)}}},
                             "outputs": {"x": link("step")}}}
            made.setdefault("Float", []).append((nid, "x"))
        elif kind == "add_twice":
            inputs = {"x": number_in()}
            if draw(st.booleans()):
                inputs["y"] = draw(number)
            spec = {"type": "toy.add_twice", "inputs": inputs}
            made.setdefault("Float", []).append((nid, "out"))
        if spec["type"] != "loop" and draw(st.booleans()):
            spec["version"] = draw(st.sampled_from(["1.0.0", "1", "1.3", "1.2.3"]))
        if draw(st.booleans()):
            spec["device"] = "cpu"
        if draw(st.booleans()):
            spec["meta"] = draw(st.dictionaries(st.text(max_size=4), json_values.filter(_no_nan), max_size=2))
        nodes[nid] = spec
    producers = [s for srcs in made.values() for s in srcs]
    outputs = {}
    if producers:
        names = draw(st.lists(st.text(max_size=6).filter(lambda n: V.output_name_problem(n) is None), max_size=4,
                              unique=True))
        outputs = {name: link(*draw(st.sampled_from(producers))) for name in names}
    graph = {"version": 1, "nodes": nodes, "outputs": outputs}
    if draw(st.booleans()):
        graph["meta"] = draw(st.dictionaries(st.text(max_size=6), json_values.filter(_no_nan), max_size=3))
    return graph


def _no_nan(value) -> bool:
    """NaN is never equal to itself, so models holding one cannot compare equal after a round trip."""
    return "NaN" not in json.dumps(value) and "Infinity" not in json.dumps(value)


# ---------------------------------------------------------------------------------------------------------
# mutations of valid graphs
# ---------------------------------------------------------------------------------------------------------


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _parent(obj, path):
    for key in path[:-1]:
        obj = obj[key]
    return obj


@st.composite
def mutated(draw, base):
    graph = copy.deepcopy(draw(base))
    ids = sorted(graph.get("nodes", {})) or ["a"]
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(graph) if p]
        op = draw(st.sampled_from(["delete", "replace", "relink", "retype", "add"]))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(graph, path)
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = draw(json_values | words)
        elif op == "relink":
            parent[path[-1]] = {"node": draw(st.sampled_from(ids) | node_ids),
                                "output": draw(st.sampled_from(OUTPUTS) | st.text(max_size=3))}
        elif op == "retype":
            nid = draw(st.sampled_from(ids))
            if isinstance(graph.get("nodes"), dict) and isinstance(graph["nodes"].get(nid), dict):
                graph["nodes"][nid]["type"] = draw(st.sampled_from([*TYPE_IDS, "loop"]))
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[draw(words)] = draw(input_values)
    return graph


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------


def _check_result(result) -> None:
    assert isinstance(result.ok, bool)
    assert result.ok == (not result.issues)
    for issue in result.issues:
        assert issue.code in CODES, issue
        assert issue.node is None or isinstance(issue.node, str)
        assert issue.port is None or isinstance(issue.port, str)
        assert isinstance(issue.message, str) and issue.message
    json.dumps(result.to_json())  # errors are plain data


def _assert_runs_nothing_when_invalid(data) -> None:
    result = V.validate(data, REGISTRY)
    _check_result(result)
    if result.ok:
        return
    toy_nodes.CALLS.clear()
    with pytest.raises(GraphValidationError) as info:
        ENGINE.run(data)
    assert info.value.issues
    assert sum(toy_nodes.CALLS.values()) == 0, dict(toy_nodes.CALLS)


@SETTINGS
@given(json_values | graphish)
def test_validate_never_raises_on_anything(data):
    _check_result(V.validate(data, REGISTRY))
    text = json.dumps(data)
    _check_result(V.validate(text, REGISTRY))
    _check_result(V.validate(text.encode(), REGISTRY))


@SETTINGS
@given(json_values | graphish | st.binary(max_size=40))
def test_engine_validate_never_raises_on_anything(data):
    _check_result_engine(ENGINE.validate(data))


@pytest.mark.parametrize("data", [None, 5, 2.5, [1, 2], ["nodes"], "a\x00b", b"\x00"],
                         ids=["None", "int", "float", "list", "list-of-str", "str-with-NUL", "bytes-NUL"])
def test_engine_validate_odd_inputs_are_issues(data):
    """Engine.validate reports bad_json / bad_graph for things that are not graphs or paths, never raises."""
    result = ENGINE.validate(data)
    assert not result.ok
    assert {i.code for i in result.issues} <= {"bad_json", "bad_graph"}


def _check_result_engine(result) -> None:
    assert isinstance(result.ok, bool)
    for issue in result.issues:
        assert isinstance(issue.code, str) and isinstance(issue.message, str)


@SETTINGS
@given(graphish)
def test_random_graph_documents_run_nothing_when_invalid(data):
    _assert_runs_nothing_when_invalid(data)
    _assert_runs_nothing_when_invalid(json.dumps(data))


@SETTINGS
@given(mutated(st.just(TOY_GRAPH) | valid_graphs()))
def test_mutated_valid_graphs_run_nothing_when_invalid(data):
    _assert_runs_nothing_when_invalid(data)


@SETTINGS
@given(mutated(st.just(TOY_GRAPH)))
def test_mutated_toy_graph_that_validates_runs_or_fails_cleanly(data):
    """Validation is the only gate: a graph it accepts must plan and run (a node may still raise)."""
    result = V.validate(data, REGISTRY)
    _check_result(result)
    if not result.ok:
        return
    try:
        ENGINE.run(data)
    except NodeExecutionError:
        pass


@SETTINGS
@given(valid_graphs())
def test_random_valid_graphs_validate(data):
    result = V.validate(data, REGISTRY)
    assert result.ok, result.issues


@SETTINGS
@given(valid_graphs())
def test_random_valid_graphs_round_trip_json_and_msgpack(data):
    g = Graph.model_validate(data)
    dumped = g.model_dump_json()
    via_json = Graph.model_validate_json(dumped)
    assert via_json == g
    assert via_json.model_dump_json() == dumped
    assert via_json.model_dump() == g.model_dump()

    via_msgpack = Graph.from_msgpack(g.to_msgpack())
    assert via_msgpack == g
    assert via_msgpack.model_dump_json() == dumped
    assert via_msgpack.to_msgpack() == g.to_msgpack()

    via_text = Graph.model_validate(json.loads(g.to_json()))
    assert via_text == g and via_text.model_dump_json() == dumped
    assert V.validate(via_json, REGISTRY).ok


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_literal_is_rejected_or_round_trips(value):
    """A graph that validates must survive model_dump_json -> model_validate_json with its value intact."""
    data = {"version": 1, "nodes": {"a": {"type": "toy.const", "inputs": {"value": value}}},
            "outputs": {"o": link("a")}}
    if not V.validate(data, REGISTRY).ok:
        return  # refusing non-finite literals is a fine policy too
    g = Graph.model_validate(data)
    back = Graph.model_validate_json(g.model_dump_json()).nodes["a"].inputs["value"]
    assert isinstance(back, float), f"{value!r} came back as {back!r}"
    assert math.isnan(back) if math.isnan(value) else back == value


# ---------------------------------------------------------------------------------------------------------
# hostile graphs: what each one must give, and that nothing runs
# ---------------------------------------------------------------------------------------------------------


def _expect(data, codes: set[str] | None, engine: bool = False):
    """Validate (through the Engine when ``engine``); ``codes`` is the exact set of codes, None when valid.
    An invalid graph runs nothing; a valid one plans (cache keys included)."""
    result = ENGINE.validate(data) if engine else V.validate(data, REGISTRY)
    _check_result(result)
    assert ({i.code for i in result.issues} or None) == codes, result.issues
    if result.ok:
        ENGINE.plan(data)
        return result
    toy_nodes.CALLS.clear()
    with pytest.raises(GraphValidationError):
        ENGINE.run(data)
    assert sum(toy_nodes.CALLS.values()) == 0, dict(toy_nodes.CALLS)
    return result


def _probe_graph(value_text: str, meta: bool = False) -> str:
    """A graph holding a counter and an echo of ``value_text`` (as its input, or in its meta)."""
    held = f'"meta": {{"m": {value_text}}}' if meta else f'"inputs": {{"value": {value_text}}}'
    return ('{"version": 1, "nodes": {"c": {"type": "toy.counter", "inputs": {"x": 1.0}}, '
            f'"e": {{"type": "toy.echo", {held}}}}}, "outputs": {{"o": {{"node": "c", "output": "out"}}}}}}')


@SETTINGS
@given(st.lists(st.sampled_from(["[", "{"]), min_size=1, max_size=3000), st.booleans(), st.booleans())
def test_deep_nesting_is_too_deep_past_the_limit_and_fine_below(openers, meta, as_text):
    text = "".join("[" if o == "[" else '{"k": ' for o in openers) + "0"
    text += "".join("]" if o == "[" else "}" for o in reversed(openers))
    depth = len(openers) + (1 if meta else 0)  # the meta object is one level too
    limit = DEFAULT_LIMITS.max_nesting if meta else V.KEY_DEPTH - 3  # literals: what cache keys hold
    data = _probe_graph(text, meta)
    if not as_text:
        if len(openers) > 700:
            return  # json.loads itself cannot build it; the text form covers it
        data = json.loads(data)
    _expect(data, {"too_deep"} if depth > limit else None)


@SETTINGS
@given(st.integers(1, 6000), st.booleans(), st.booleans())
def test_huge_integers_are_too_large_past_4300_digits(digits, negative, as_text):
    literal = ("-" if negative else "") + "9" * digits
    data = _probe_graph(literal) if as_text else json.loads(_probe_graph("0"))
    if not as_text:
        data["nodes"]["e"]["inputs"]["value"] = (-1 if negative else 1) * (10**digits - 1)
    _expect(data, {"too_large"} if digits > 4300 else None)


@st.composite
def wired(draw):
    """toy.add nodes whose inputs link to random others (so: any number of interlocking cycles, or none)."""
    n = draw(st.integers(1, 25))
    ids = [f"n{i}" for i in range(n)]
    nodes = {}
    for nid in ids:
        inputs = {port: link(draw(st.sampled_from(ids))) if draw(st.booleans()) else 1.0 for port in ("a", "b")}
        nodes[nid] = {"type": "toy.add", "inputs": inputs}
    nodes["probe"] = {"type": "toy.counter", "inputs": {"x": 1.0}}
    return {"version": 1, "nodes": nodes, "outputs": {"o": link("probe")}}


@SETTINGS
@given(wired())
def test_interlocking_cycles_are_cycle_issues_in_a_bounded_count(data):
    dag = nx.DiGraph([(v["node"], nid) for nid, spec in data["nodes"].items() for v in spec["inputs"].values()
                      if isinstance(v, dict)])
    cyclic = dag.number_of_nodes() and not nx.is_directed_acyclic_graph(dag)
    result = _expect(data, {"cycle"} if cyclic else None)
    on_cycles = {n for c in nx.strongly_connected_components(dag) for n in c if len(c) > 1 or dag.has_edge(n, n)}
    assert len(result.issues) <= 51
    assert {i.node for i in result.issues} <= on_cycles


@SETTINGS
@given(st.integers(1, 60), st.lists(st.sampled_from([0, 1]), min_size=60, max_size=60))
def test_nested_loops_validate_plan_and_run_or_are_too_deep(levels, counts):
    body = {"inputs": {"x": {"type": "Float", "carry": True}},
            "nodes": {"s": {"type": "toy.add", "inputs": {"a": {"input": "x"}, "b": 1.0}}},
            "outputs": {"x": link("s")}}
    for k in range(levels - 1):
        body = {"inputs": {"x": {"type": "Float", "carry": True}},
                "nodes": {"l": {"type": "loop", "inputs": {"count": counts[k], "x": {"input": "x"}}, "body": body}},
                "outputs": {"x": link("l", "x")}}
    data = {"version": 1, "nodes": {"src": {"type": "toy.const", "inputs": {"value": 1.0}},
                                    "top": {"type": "loop", "inputs": {"count": counts[-1], "x": link("src")},
                                            "body": body}},
            "outputs": {"x": link("top", "x")}}
    result = _expect(data, {"too_deep"} if levels > V.MAX_LOOP_NESTING else None)
    if result.ok:
        ran = all(counts[k] for k in range(levels - 1)) and counts[-1]
        assert ENGINE.run(data).outputs["x"] == 1.0 + ran


@SETTINGS
@given(st.text(max_size=300) | st.sampled_from(["..", ".", "", "/x", "a/b", "a\\b", "C:x", "x" * 255, "x" * 256,
                                                 "é" * 128, "\x00", "\ud800"]))
def test_output_names_are_refused_unless_they_name_a_file_in_the_folder(tmp_path_factory, name):
    data = {"version": 1, "nodes": {"c": {"type": "toy.counter"}}, "outputs": {name: link("c")}}
    result = _expect(data, None if V.output_name_problem(name) is None else {"bad_output_name"})
    if result.ok:  # the name is one file, created in the folder itself
        folder = tmp_path_factory.mktemp("names")
        (folder / name).write_text("x")
        assert os.listdir(folder) == [name]


@SETTINGS
@given(st.text(max_size=12) | st.sampled_from(["cpu", "cpu:0", " cpu ", "cuda", "cuda:0", "cuda:7", "mps", "meta",
                                                "xla", "", "auto", "cpu:1", "cpu:abc", "hpu", "vulkan"]))
def test_device_pins_are_honoured_or_bad_device(pin):
    data = {"version": 1, "nodes": {"c": {"type": "toy.counter", "device": pin}}, "outputs": {"o": link("c")}}
    result = ENGINE.validate(data)
    assert {i.code for i in result.issues} <= {"bad_device"}
    if result.ok:
        assert resolve_device(pin).type in ("cpu", "cuda", "mps")
    else:
        toy_nodes.CALLS.clear()
        with pytest.raises(GraphValidationError):
            ENGINE.run(data)
        assert sum(toy_nodes.CALLS.values()) == 0


def _dumps_repeating(value, target: int, counter: list[int]) -> str:
    """JSON text of ``value`` in which the ``target``-th non-empty object repeats its first key."""
    if isinstance(value, dict):
        pairs = [f"{json.dumps(k)}: {_dumps_repeating(v, target, counter)}" for k, v in value.items()]
        if value:
            counter[0] += 1
            if counter[0] - 1 == target:
                pairs.append(pairs[0])
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dumps_repeating(v, target, counter) for v in value) + "]"
    return json.dumps(value)


@SETTINGS
@given(valid_graphs() | st.just(TOY_GRAPH), st.integers(0, 200))
def test_a_repeated_key_anywhere_is_duplicate_key(data, pick):
    counter = [0]
    _dumps_repeating(data, -1, counter)  # counts the non-empty objects
    objects = counter[0]
    text = _dumps_repeating(data, pick % objects, [0])
    _expect(text, {"duplicate_key"})

