"""The registry and plugin discovery: folders, the env var, failures, duplicates, the built-in entry point."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import nodegraph
from nodegraph import Engine, PluginError, Registry
from nodegraph.registry import ENTRY_POINT_GROUP, PLUGIN_PATH_ENV

ROOT = Path(__file__).resolve().parents[2]

GOOD_PACK = '''
from nodegraph import node

@node("plug.double", category="plug", output="out")
def double(x: float) -> float:
    """2x"""
    return 2 * x
'''

QUAD_NODE = {
    "type": "plug.quad",
    "version": "1.2.0",
    "description": "4x, as a graph",
    "inputs": {"x": {"type": "Float"}},
    "nodes": {"a": {"type": "plug.double", "inputs": {"x": {"input": "x"}}},
              "b": {"type": "plug.double", "inputs": {"x": {"node": "a", "output": "out"}}}},
    "outputs": {"y": {"node": "b", "output": "out"}},
}

QUAD_GRAPH = {"version": 1, "nodes": {"q": {"type": "plug.quad", "inputs": {"x": 1.5}}},
              "outputs": {"y": {"node": "q", "output": "y"}}}


def make_folder(path: Path, broken: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "goodpack.py").write_text(GOOD_PACK)
    (path / "quad.json").write_text(json.dumps(QUAD_NODE))
    if broken is not None:
        (path / "brokenpack.py").write_text(broken)
    return path


# -- plugin folders -------------------------------------------------------------------------------------------


def test_plugin_folder_with_a_python_pack_and_a_graph_node(tmp_path):
    folder = make_folder(tmp_path / "myplugins")
    reg = Registry.discover([folder], entry_points=False)
    assert reg.failures == []
    assert reg.type_ids() == ["plug.double", "plug.quad"]
    assert reg.packs == {"goodpack": ["plug.double"], "myplugins/quad": ["plug.quad"]}
    quad = reg.get("plug.quad")
    assert quad.kind == "graph" and quad.version == "1.2.0" and quad.pack == "myplugins/quad"
    assert reg.get("plug.double").pack == "goodpack"
    res = Engine(reg, device="cpu").run(QUAD_GRAPH)
    assert res.outputs == {"y": 6.0}


def test_plugin_dirs_api_argument_adds_to_the_default_registry(tmp_path):
    folder = make_folder(tmp_path / "extra")
    eng = Engine(device="cpu", plugin_dirs=[folder])
    assert "plug.quad" in eng.registry and "math.add" in eng.registry
    assert "plug.quad" not in nodegraph.default_registry()  # the shared default registry is not modified
    assert eng.run(QUAD_GRAPH).outputs == {"y": 6.0}


def test_plugin_path_environment_variable(tmp_path, monkeypatch):
    one = make_folder(tmp_path / "one")
    two = tmp_path / "two"
    two.mkdir()
    (two / "third.py").write_text(GOOD_PACK.replace("plug.double", "plug.triple").replace("2 * x", "3 * x"))
    monkeypatch.setenv(PLUGIN_PATH_ENV, os.pathsep.join([str(one), str(two)]))
    reg = Registry.discover(entry_points=False)
    assert set(reg.type_ids()) == {"plug.double", "plug.quad", "plug.triple"}
    assert reg.failures == []


def test_a_missing_plugin_folder_is_recorded(tmp_path):
    reg = Registry.discover([tmp_path / "nope"], entry_points=False)
    assert [f.pack for f in reg.failures] == ["nope"]
    assert "does not exist" in reg.failures[0].error


@pytest.mark.parametrize("broken,needle", [
    ("import not_a_real_module_xyz\n", "not_a_real_module_xyz"),
    ("raise RuntimeError('pack exploded on import')\n", "pack exploded on import"),
    ("def oops(:\n", "SyntaxError"),
])
def test_a_pack_that_fails_to_import_is_recorded_and_others_load(tmp_path, broken, needle):
    folder = make_folder(tmp_path / "plugins", broken=broken)
    reg = Registry.discover([folder], entry_points=False)
    assert [f.pack for f in reg.failures] == ["brokenpack"]
    failure = reg.failures[0]
    assert needle in failure.error
    assert failure.source.endswith("brokenpack.py")
    assert failure.to_json() == {"pack": "brokenpack", "source": failure.source, "error": failure.error}
    assert reg.type_ids() == ["plug.double", "plug.quad"]
    assert "nodegraph_plugins.brokenpack" not in sys.modules


def test_a_pack_is_added_all_or_nothing(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "aaa.py").write_text(GOOD_PACK)
    # bbb defines a new type and one that clashes with aaa: the whole of bbb is refused
    (folder / "bbb.py").write_text(GOOD_PACK + '\n\n@node("plug.fresh")\ndef fresh(x: float) -> float:\n    return x\n')
    reg = Registry.discover([folder], entry_points=False)
    assert [f.pack for f in reg.failures] == ["bbb"]
    assert "plug.fresh" not in reg  # nothing of the failed pack was registered


def test_nodes_cli_shows_failures(tmp_path, capsys):
    folder = make_folder(tmp_path / "plugins", broken="raise ImportError('no such dependency: frobnicate')\n")
    cmd = [sys.executable, "-m", "nodegraph.cli", "nodes", "--plugins", str(folder)]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path)
    assert "FAILED pack brokenpack" in text.stdout
    assert "no such dependency: frobnicate" in text.stdout
    assert "plug.double" in text.stdout and "plug.quad" in text.stdout
    assert "math.add" in text.stdout  # the built-in pack still loads
    # the same listing as JSON (in this process: the CLI's main is the same code path)
    from nodegraph.cli import main

    assert main(["nodes", "--json", "--plugins", str(folder)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [f["pack"] for f in data["failures"]] == ["brokenpack"]
    assert "frobnicate" in data["failures"][0]["error"]
    types = {n["type"]: n for n in data["nodes"]}
    assert types["plug.quad"]["pack"] == "plugins/quad" and types["plug.double"]["pack"] == "goodpack"
    assert types["math.add"]["pack"] == "builtin"


# -- duplicates -----------------------------------------------------------------------------------------------


def test_duplicate_type_id_names_both_packs(tmp_path):
    folder = tmp_path / "dups"
    folder.mkdir()
    (folder / "first_pack.py").write_text(GOOD_PACK)
    (folder / "second_pack.py").write_text(GOOD_PACK)
    reg = Registry.discover([folder], entry_points=False)
    assert reg.get("plug.double").pack == "first_pack"
    [failure] = reg.failures
    assert failure.pack == "second_pack"
    assert "plug.double" in failure.error and "first_pack" in failure.error and "second_pack" in failure.error


def test_duplicate_through_the_api_raises_plugin_error():
    from . import exec_nodes

    reg = Registry()
    reg.add_module(exec_nodes, "pack_one")
    with pytest.raises(PluginError) as info:
        reg.add_module(exec_nodes, "pack_two")
    assert "pack_one" in str(info.value) and "pack_two" in str(info.value)
    assert set(reg.packs) == {"pack_one"}


def test_duplicate_within_one_batch_raises():
    from nodegraph.node import define

    d1 = define(lambda x: x, "dup.same")
    d2 = define(lambda x: x, "dup.same")
    reg = Registry()
    with pytest.raises(PluginError, match="dup.same"):
        reg.add([d1, d2], "batch")
    assert len(reg) == 0


# -- the built-in pack ----------------------------------------------------------------------------------------


def test_builtin_pack_is_registered_through_the_entry_point():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("builtin") == "nodes:register"
    reg = Registry.discover()
    assert "builtin" in reg.packs and "math.add" in reg.packs["builtin"]
    assert reg.get("math.add").pack == "builtin"
    assert reg.failures == []
    bare = Registry.discover(entry_points=False)
    assert "math.add" not in bare


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names.extend(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names.append(n.module)
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in (
                "import_module", "__import__") and n.args and isinstance(n.args[0], ast.Constant):
            names.append(str(n.args[0].value))
    return names


def test_nothing_in_the_engine_imports_the_node_library():
    sources = sorted((ROOT / "nodegraph").rglob("*.py"))
    assert len(sources) >= 10
    offenders = {str(p.relative_to(ROOT)): name for p in sources for name in _imports(p)
                 if name == "nodes" or name.startswith("nodes.")}
    assert offenders == {}


def test_graph_node_definition_errors_are_recorded(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "nameless.json").write_text(json.dumps({"inputs": {}, "nodes": {}, "outputs": {}}))
    (folder / "badjson.json").write_text("{not json")
    (folder / "ok.json").write_text(json.dumps(QUAD_NODE))
    reg = Registry.discover([folder], entry_points=False)
    assert sorted(f.pack for f in reg.failures) == ["bad/badjson", "bad/nameless"]
    assert "plug.quad" in reg
