"""The ``nodegraph`` CLI contract: run --json, cache reuse across processes, --set, validate, nodes, schema,
exit codes. Most tests call :func:`nodegraph.cli.main` in-process; the ones about processes use subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nodegraph import Graph, default_registry
from nodegraph.cli import main
from nodegraph.outputs import PNG_GRAPH_KEY
from tests.engine import toy_nodes
from tests.engine.toy_nodes import LOG_ENV, link

REPO = Path(__file__).resolve().parents[2]
# graphs that run as they are; those marked requires_models need a user's checkpoint (tests/nodes/test_checkpoints.py)
EXAMPLES = sorted(p for p in (REPO / "graphs").glob("*.json")
                  if not json.loads(p.read_text()).get("meta", {}).get("requires_models"))
RUN_KEYS = {"outputs", "executed", "cached", "seconds"}
MODEL_HANDLES = {"Denoiser", "VAE", "TextEncoder", "ControlNet", "Model"}

# A toy graph for the CLI (through the toy pack copied into a plugin folder). Only values the disk cache
# can hold (numbers, tensors), so a new process can take every node from the cache.
TOY_CLI_GRAPH = {
    "version": 1,
    "nodes": {
        "a": {"type": "toy.const", "inputs": {"value": 1.5}},
        "b": {"type": "toy.add", "inputs": {"a": link("a"), "b": 2}},
        "c": {"type": "toy.counter", "inputs": {"x": link("b")}},
        "n": {"type": "toy.int", "inputs": {"value": 7}},
        "dm": {"type": "toy.divmod", "inputs": {"a": link("n"), "b": 3}},
        "im": {"type": "toy.image", "inputs": {"size": 4, "value": 0.25}},
    },
    "outputs": {"sum": link("c"), "q": link("dm", "quotient"), "image": link("im", "image")},
}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def proc(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m nodegraph.cli`` in a new process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def one_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object (and nothing else)."""
    doc = json.loads(stdout)  # raises on trailing text
    assert isinstance(doc, dict)
    return doc


def upstream(graph: dict) -> dict[str, set[str]]:
    """Top-level node id -> ids of the top-level nodes its inputs link to."""
    ups = {}
    for nid, spec in graph["nodes"].items():
        ups[nid] = {v["node"] for v in spec.get("inputs", {}).values()
                    if isinstance(v, dict) and set(v) == {"node", "output"}}
    return ups


def needed(graph: dict) -> set[str]:
    ups = upstream(graph)
    todo = [ref["node"] for ref in graph.get("outputs", {}).values()]
    seen: set[str] = set()
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo.extend(ups[nid])
    return seen


def descendants(graph: dict, start: set[str]) -> set[str]:
    ups = upstream(graph)
    found = set(start)
    changed = True
    while changed:
        changed = False
        for nid, srcs in ups.items():
            if nid not in found and srcs & found:
                found.add(nid)
                changed = True
    return found


def top(step_ids) -> set[str]:
    """Step ids of expanded graph-defined nodes are 'node/inner': map them to top-level node ids."""
    return {s.split("/", 1)[0] for s in step_ids}


@pytest.fixture
def toy_plugins(tmp_path) -> Path:
    """A plugin folder holding a copy of the toy pack (loaded by the CLI as pack 'toy')."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(toy_nodes.__file__, folder / "toy.py")
    return folder


@pytest.fixture
def toy_log(tmp_path, monkeypatch) -> Path:
    """A file every toy node appends its type id to when it runs (in this process or a subprocess)."""
    log = tmp_path / "toy_calls.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    return log


def logged(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def write_graph(path: Path, graph: dict) -> Path:
    path.write_text(json.dumps(graph))
    return path


# ---------------------------------------------------------------------------------------------------------
# run --json
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_run_json_contract(capsys, tmp_path, graph_path):
    graph = json.loads(graph_path.read_text())
    out_dir = tmp_path / "out"
    rc, out, _ = cli(capsys, "run", graph_path, "--json", "--out", out_dir, "--device", "cpu")
    assert rc == 0
    doc = one_json(out)
    assert set(doc) == RUN_KEYS
    assert set(doc["outputs"]) == set(graph["outputs"])
    for name, paths in doc["outputs"].items():
        assert isinstance(paths, list)
        for p in paths:
            assert Path(p).is_file(), (name, p)
            assert Path(p).resolve().is_relative_to(out_dir.resolve())
    assert top(doc["executed"]) == needed(graph)  # a fresh engine runs exactly what the outputs need
    assert doc["cached"] == []
    for sid in doc["executed"]:
        assert doc["seconds"]["nodes"][sid] >= 0
    assert doc["seconds"]["total"] >= 0


@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_png_outputs_carry_the_graph(capsys, tmp_path, graph_path):
    rc, out, _ = cli(capsys, "run", graph_path, "--json", "--out", tmp_path / "out", "--device", "cpu")
    assert rc == 0
    pngs = [p for paths in one_json(out)["outputs"].values() for p in paths if p.endswith(".png")]
    if not pngs:
        pytest.skip(f"{graph_path.name} writes no PNG")
    expected = Graph.model_validate_json(graph_path.read_text())
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG"
            text = im.text[PNG_GRAPH_KEY]
        assert Graph.model_validate_json(text) == expected


def test_png_carries_the_overridden_graph(capsys, tmp_path, toy_plugins):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", tmp_path / "out", "--plugins", toy_plugins,
                     "--set", "im.value=0.75")
    assert rc == 0
    [png] = one_json(out)["outputs"]["image"]
    with Image.open(png) as im:
        carried = Graph.model_validate_json(im.text[PNG_GRAPH_KEY])
        pixels = im.convert("RGB").getpixel((0, 0))
    assert carried.nodes["im"].inputs["value"] == 0.75
    assert carried.nodes["a"] == Graph.model_validate(TOY_CLI_GRAPH).nodes["a"]
    assert pixels == (round(0.75 * 255),) * 3


def test_non_file_outputs_are_written_as_json(capsys, tmp_path, toy_plugins):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", tmp_path / "out", "--plugins", toy_plugins)
    assert rc == 0
    outputs = one_json(out)["outputs"]
    [q] = outputs["q"]
    [s] = outputs["sum"]
    assert json.loads(Path(q).read_text()) == 7 // 3
    assert json.loads(Path(s).read_text()) == 1.5 + 2


# ---------------------------------------------------------------------------------------------------------
# cache across processes and --set
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_second_run_in_a_new_process_executes_nothing(tmp_path, graph_path):
    cache = tmp_path / "cache"
    first = proc("run", graph_path, "--json", "--cache-dir", cache, "--out", tmp_path / "o1", "--device", "cpu",
                 cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = proc("run", graph_path, "--json", "--cache-dir", cache, "--out", tmp_path / "o2", "--device", "cpu",
                  cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    a, b = one_json(first.stdout), one_json(second.stdout)
    graph, reg = json.loads(Path(graph_path).read_text()), default_registry()
    impure = {n for n, spec in graph["nodes"].items()
              if (d := reg.get(spec["type"])) is not None and not d.cache and d.fingerprint is None}
    assert a["executed"]
    assert top(b["executed"]) <= descendants(graph, impure)  # only file-writing (impure) nodes run again
    assert b["cached"]
    assert set(b["outputs"]) == set(a["outputs"])
    for name in a["outputs"]:
        assert len(a["outputs"][name]) == len(b["outputs"][name])
        for p1, p2 in zip(a["outputs"][name], b["outputs"][name]):
            assert Path(p1).read_bytes() == Path(p2).read_bytes(), name  # same values from the cache


def test_toy_graph_across_processes(tmp_path, toy_plugins):
    """Real processes: an invalid graph exits 2 and runs no node; a valid one runs every node once; the same
    graph in a new process with the same --cache-dir runs none."""
    log = tmp_path / "calls.log"
    env = {LOG_ENV: str(log)}
    invalid = write_graph(tmp_path / "invalid.json", {**TOY_CLI_GRAPH, "version": 7})
    bad = proc("run", invalid, "--json", "--out", tmp_path / "bad_out", "--plugins", toy_plugins, cwd=tmp_path,
               env=env)
    assert bad.returncode == 2, bad.stderr
    assert one_json(bad.stdout)["errors"][0]["code"] == "bad_version"
    assert logged(log) == [] and not (tmp_path / "bad_out").exists()

    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    args = ("run", g, "--json", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--plugins",
            toy_plugins)
    first = proc(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    ran_first = logged(log)
    assert sorted(ran_first) == sorted(f"toy.{t}" for t in ("const", "add", "counter", "int", "divmod", "image"))
    second = proc(*args, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert logged(log) == ran_first  # nothing appended by the second process
    assert one_json(second.stdout)["executed"] == []


def _literal_candidates(graph: dict):
    """(node, input, new value) for numeric literals, floats first, then by how much stays cached."""
    reg = default_registry()
    need = needed(graph)
    found = []
    for nid, spec in graph["nodes"].items():
        if nid not in need or spec["type"] == "loop" or reg.get(spec["type"]) is None:
            continue
        for port, value in spec.get("inputs", {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            new = value + 1 if isinstance(value, int) else value * 0.5 + 0.125
            kept = len(need - descendants(graph, {nid}))
            found.append((isinstance(value, int), -kept, nid, port, new))
    return [(nid, port, new) for *_, nid, port, new in sorted(found)]


@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_set_reexecutes_only_that_node_and_descendants(capsys, tmp_path, graph_path):
    graph = json.loads(graph_path.read_text())
    reg = default_registry()
    cache = tmp_path / "cache"
    rc, out, _ = cli(capsys, "run", graph_path, "--json", "--cache-dir", cache, "--out", tmp_path / "o0",
                     "--device", "cpu")
    assert rc == 0
    tried = 0
    for nid, port, new in _literal_candidates(graph)[:4]:
        rc, out, _ = cli(capsys, "run", graph_path, "--json", "--cache-dir", cache, "--out", tmp_path / f"o{tried}",
                         "--device", "cpu", "--set", f"{nid}.{port}={json.dumps(new)}")
        tried += 1
        if rc != 0:
            continue  # that value is not usable for this graph (invalid or fails at run time): try another
        doc = one_json(out)
        impure = {n for n, s in graph["nodes"].items()
                  if (d := reg.get(s["type"])) is not None and not d.cache and d.fingerprint is None}
        # Model handles live only in memory (their weights are already on disk as safetensors), so in a new
        # process a loader runs again when a re-executed node needs its model.
        loaders = {n for n, s in graph["nodes"].items()
                   if (d := reg.get(s["type"])) is not None and any(t.name in MODEL_HANDLES for t in d.outputs.values())}
        allowed = descendants(graph, {nid} | impure | loaders) & needed(graph)
        must = descendants(graph, {nid} | impure) & needed(graph)
        executed = top(doc["executed"])
        assert nid in executed
        assert executed <= allowed, executed - allowed
        for d in must:
            if graph["nodes"][d]["type"] == "loop" or getattr(reg.get(graph["nodes"][d]["type"]), "kind", "") == "python":
                assert d in executed, d
        assert not (top(doc["cached"]) & {nid})
        return
    pytest.skip(f"no numeric literal of {graph_path.name} could be changed")


def test_set_on_toy_graph_reruns_exactly_the_descendants(capsys, tmp_path, toy_plugins, toy_log):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    base = ("run", g, "--json", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", "--plugins",
            toy_plugins)
    rc, out, _ = cli(capsys, *base)
    assert rc == 0
    before = len(logged(toy_log))
    rc, out, _ = cli(capsys, *base, "--set", "a.value=3")
    assert rc == 0
    doc = one_json(out)
    assert sorted(doc["executed"]) == ["a", "b", "c"]
    assert set(doc["cached"]) >= {"dm", "im"}
    assert sorted(logged(toy_log)[before:]) == ["toy.add", "toy.const", "toy.counter"]
    assert json.loads(Path(doc["outputs"]["sum"][0]).read_text()) == 3 + 2


# ---------------------------------------------------------------------------------------------------------
# validate, nodes, schema
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_validate_json_ok(capsys, graph_path):
    rc, out, _ = cli(capsys, "validate", graph_path, "--json")
    assert rc == 0
    assert one_json(out) == {"ok": True, "errors": []}


def test_validate_json_reports_every_error(capsys, tmp_path, toy_plugins):
    bad = json.loads(json.dumps(TOY_CLI_GRAPH))
    bad["nodes"]["a"]["inputs"]["value"] = "high"
    bad["nodes"]["dm"]["inputs"]["b"] = 0
    bad["nodes"]["c"]["inputs"]["x"] = link("nobody")
    g = write_graph(tmp_path / "bad.json", bad)
    rc, out, _ = cli(capsys, "validate", g, "--json", "--plugins", toy_plugins, "--set", "zz.value=1")
    assert rc == 2
    doc = one_json(out)
    assert doc["ok"] is False
    for err in doc["errors"]:
        assert {"code", "node", "port", "message"} <= set(err)
    got = {(e["code"], e["node"], e["port"]) for e in doc["errors"]}
    assert got == {("wrong_type", "a", "value"), ("out_of_range", "dm", "b"), ("missing_node", "c", "x"),
                   ("bad_override", "zz", "value")}


def test_validate_without_json_exit_codes(capsys, tmp_path, toy_plugins):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    rc, out, _ = cli(capsys, "validate", g, "--plugins", toy_plugins)
    assert rc == 0
    rc, out, err = cli(capsys, "validate", g, "--plugins", toy_plugins, "--set", "dm.b=0")
    assert rc == 2
    assert "out_of_range" in err and "dm" in err


def test_nodes_json(capsys, tmp_path, toy_plugins):
    (toy_plugins / "broken.py").write_text("raise ImportError('this pack is broken on purpose')\n")
    rc, out, _ = cli(capsys, "nodes", "--json", "--plugins", toy_plugins)
    assert rc == 0
    doc = one_json(out)
    by_type = {n["type"]: n for n in doc["nodes"]}
    for n in doc["nodes"]:
        assert {"type", "version", "inputs", "outputs", "pack"} <= set(n)
    # every type the example graphs use is listed
    for path in EXAMPLES:
        for spec in json.loads(path.read_text())["nodes"].values():
            assert spec["type"] == "loop" or spec["type"] in by_type, spec["type"]
    assert set(by_type["toy.divmod"]["outputs"]) == {"quotient", "remainder"}
    times = by_type["toy.repeat"]["inputs"]["times"]
    assert times["required"] is False and times["default"] == 1
    assert times["schema"]["minimum"] == 0 and times["schema"]["maximum"] == 10
    assert by_type["toy.add"]["inputs"]["a"]["required"] is True
    assert by_type["toy.choose"]["inputs"]["mode"]["type"]["choices"] == ["a", "b", "c"]
    assert by_type["toy.vae_decode"]["inputs"]["latent"]["type"]["name"] == "Latent"
    assert by_type["toy.add"]["pack"] == "toy"
    [failure] = [f for f in doc["failures"] if f["pack"] == "broken"]
    assert "broken on purpose" in failure["error"]


def test_nodes_text_lists_types_and_failures(capsys, toy_plugins):
    (toy_plugins / "broken.py").write_text("raise ImportError('nope')\n")
    rc, out, _ = cli(capsys, "nodes", "--plugins", toy_plugins)
    assert rc == 0
    assert "toy.divmod" in out and "FAILED pack broken" in out


def _jsonschema_check(schema: dict, docs: list[dict]) -> list[bool]:
    """Validate docs against a JSON Schema: in-process if jsonschema imports, else with a system Python that
    has it; skip when neither can. Returns one bool per doc."""
    code = ("import json,sys,jsonschema;s,docs=json.load(sys.stdin);"
            "v=jsonschema.validators.validator_for(s);v.check_schema(s);"
            "print(json.dumps([v(s).is_valid(d) for d in docs]))")
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        for exe in ("python3", "python"):
            path = shutil.which(exe)
            if path and Path(path).resolve() != Path(sys.executable).resolve():
                res = subprocess.run([path, "-c", code], input=json.dumps([schema, docs]), capture_output=True,
                                     text=True, timeout=120)
                if res.returncode == 0:
                    return json.loads(res.stdout)
        pytest.skip("jsonschema is not importable")
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [cls(schema).is_valid(d) for d in docs]


def test_schema(capsys):
    rc, out, _ = cli(capsys, "schema")
    assert rc == 0
    schema = one_json(out)
    assert "$schema" in schema
    assert {"version", "nodes", "outputs"} <= set(schema["properties"])
    examples = [json.loads(p.read_text()) for p in EXAMPLES]
    no_type = {"version": 1, "nodes": {"x": {"inputs": {}}}, "outputs": {}}
    extra_key = {"version": 1, "nodes": {}, "outputs": {}, "colour": "red"}
    bad_link = {"version": 1, "nodes": {}, "outputs": {"o": {"node": "x"}}}
    verdicts = _jsonschema_check(schema, [*examples, no_type, extra_key, bad_link])
    assert verdicts[: len(examples)] == [True] * len(examples)
    assert verdicts[len(examples):] == [False, False, False]


# ---------------------------------------------------------------------------------------------------------
# exit codes
# ---------------------------------------------------------------------------------------------------------


def test_exit_1_on_node_failure_names_the_node(capsys, tmp_path, toy_plugins, toy_log):
    graph = {"version": 1, "nodes": {
        "a": {"type": "toy.const", "inputs": {"value": 1.0}},
        "boom": {"type": "toy.fail", "inputs": {"x": link("a"), "message": "kaput"}},
    }, "outputs": {"o": link("boom")}}
    g = write_graph(tmp_path / "g.json", graph)
    rc, out, err = cli(capsys, "run", g, "--json", "--out", tmp_path / "out", "--plugins", toy_plugins)
    assert rc == 1
    doc = one_json(out)
    assert doc["ok"] is False
    error = doc["error"]
    assert error["node"] == "boom" and error["type"] == "toy.fail"
    assert error["exception"] == "RuntimeError" and "kaput" in error["message"]
    assert "x" in error["inputs"]
    assert "boom" in err
    assert logged(toy_log) == ["toy.const", "toy.fail"]


def test_exit_2_invalid_graph_runs_nothing(capsys, tmp_path, toy_plugins, toy_log):
    bad = json.loads(json.dumps(TOY_CLI_GRAPH))
    bad["nodes"]["dm"]["inputs"]["b"] = -1  # one bad literal; every other node is fine
    g = write_graph(tmp_path / "g.json", bad)
    out_dir = tmp_path / "out"
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", out_dir, "--plugins", toy_plugins)
    assert rc == 2
    doc = one_json(out)
    assert doc["ok"] is False
    assert [(e["code"], e["node"], e["port"]) for e in doc["errors"]] == [("out_of_range", "dm", "b")]
    assert logged(toy_log) == []
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("sets,code,node", [
    (["a.value"], "bad_override", None),
    (["ghost.value=1"], "bad_override", "ghost"),
    (["a.colour=1"], "bad_override", "a"),
    (["dm.b=0"], "out_of_range", "dm"),
    (["a.value=1", "garbage"], "bad_override", None),
])
def test_exit_2_bad_set_runs_nothing(capsys, tmp_path, toy_plugins, toy_log, sets, code, node):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    out_dir = tmp_path / "out"
    args = [a for s in sets for a in ("--set", s)]
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", out_dir, "--plugins", toy_plugins, *args)
    assert rc == 2
    doc = one_json(out)
    assert (code, node) in {(e["code"], e["node"]) for e in doc["errors"]}
    assert logged(toy_log) == []
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_exit_2_link_shaped_set_with_bad_fields(capsys, tmp_path, toy_plugins, toy_log):
    g = write_graph(tmp_path / "g.json", TOY_CLI_GRAPH)
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", tmp_path / "out", "--plugins", toy_plugins,
                     "--set", 'a.value={"node": 1, "output": "out"}')
    assert rc == 2
    assert one_json(out)["ok"] is False
    assert logged(toy_log) == []


@pytest.mark.parametrize("content", ['{"version": 1, "nodes": {', "", "not json at all", "[1, 2", '{"a": 1,}'])
def test_exit_2_broken_json(capsys, tmp_path, content):
    g = tmp_path / "broken.json"
    g.write_text(content)
    out_dir = tmp_path / "out"
    rc, out, _ = cli(capsys, "run", g, "--json", "--out", out_dir)
    assert rc == 2
    doc = one_json(out)
    assert doc["ok"] is False and doc["errors"][0]["code"] == "bad_json"
    assert not out_dir.exists()
    rc, out, _ = cli(capsys, "validate", g, "--json")
    assert rc == 2 and one_json(out)["errors"][0]["code"] == "bad_json"


def test_exit_2_missing_file(capsys, tmp_path):
    rc, out, _ = cli(capsys, "run", tmp_path / "nope.json", "--json", "--out", tmp_path / "out")
    assert rc == 2
    assert one_json(out)["errors"][0]["code"] == "bad_json"
