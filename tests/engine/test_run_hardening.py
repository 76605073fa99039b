"""Running hostile nodes: exits and interrupts, in-place mutation, loop-body cache keys, bad outputs, limits,
run-scoped events, deadlines. Each case ends as a structured error or a correct result, never a traceback, a hang
or a wrong cached value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph import Context, Engine, Registry, node
from nodegraph import types as T
from nodegraph.errors import Cancelled, NodeExecutionError
from nodegraph.limits import Limits

CALLS: list[str] = []


def L(node_id: str, output: str = "out") -> dict:
    return {"node": node_id, "output": output}


def G(nodes: dict, outputs: dict) -> dict:
    return {"version": 1, "nodes": nodes, "outputs": outputs}


@node("h.ones", output="out")
def ones(n: int = 4, value: float = 1.0) -> T.Tensor:
    CALLS.append("ones")
    return torch.full((n,), value)


@node("h.add_inplace", output="out")
def add_inplace(x: T.Tensor, k: float = 100.0) -> T.Tensor:
    return x.add_(k)


@node("h.append_inplace", output="out")
def append_inplace(items: list) -> int:
    items.append("x")
    return len(items)


@node("h.cond_inplace", output="out")
def cond_inplace(cond: T.Dict) -> T.Tensor:
    cond["t"].mul_(0)  # the tensor inside a dict is shared: changing it must be caught too
    return cond["t"]


@node("h.pack", output="out")
def pack(x: T.Tensor) -> T.Dict:
    return {"t": x}


@node("h.double", output="out")
def double(x: T.Tensor) -> T.Tensor:
    return x * 2


@node("h.exit", output="out")
def do_exit(x: float = 0.0) -> float:
    sys.exit(3)


@node("h.interrupt", output="out")
def interrupt(x: float = 0.0) -> float:
    raise KeyboardInterrupt


@node("h.bad_type", output="out")
def bad_type(x: float = 0.0) -> T.Tensor:
    return [1, 2, 3]  # declared Tensor


@node("h.cyclic", output="out")
def cyclic(x: float = 0.0) -> list:
    a: list = []
    a.append(a)
    return a


@node("h.deep", output="out")
def deep(depth: int = 5000) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


@node("h.big_string", output="out")
def big_string(n: int = 10) -> str:
    return "x" * n


@node("h.nan", output="image")
def nan_image(x: float = 0.0) -> T.Image:
    img = torch.zeros(1, 3, 4, 4)
    img[0, 0, 0, 0] = float("nan")
    return img


@node("h.sleep", output="out")
def sleep(ctx: Context, seconds: float = 0.05, x: Any = None) -> float:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctx.progress(0, 1)  # a cancellation point
        time.sleep(0.01)
    return seconds


@node("h.progress", output="out")
def progress(ctx: Context, tag: str, n: int = 5) -> str:
    for i in range(n):
        ctx.progress(i + 1, n, tag)
        time.sleep(0.005)
    return tag


@node("h.seq", output="out")
def seq(n: int) -> list:
    return list(range(n))


@node("h.noop", output="out")
def noop(x: Any = None) -> Any:
    return x


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.add([fn.__node_def__ for fn in (ones, add_inplace, append_inplace, cond_inplace, pack, double, do_exit,
                                      interrupt, bad_type, cyclic, deep, big_string, nan_image, sleep, progress,
                                      seq, noop)], "hostile")
    CALLS.clear()
    return r


# -- BaseException in a node ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
def test_sys_exit_in_a_node_is_that_nodes_failure(reg, workers):
    eng = Engine(reg, device="cpu", max_workers=workers)
    g = G({"e": {"type": "h.exit", "inputs": {}}, "ok": {"type": "h.ones", "inputs": {}}},
          {"e": L("e"), "ok": L("ok")})
    with pytest.raises(NodeExecutionError) as info:
        eng.run(g)
    assert info.value.node == "e" and "sys.exit(3)" in str(info.value)
    # the engine still works afterwards (no stuck pool, no escaped SystemExit)
    assert torch.equal(eng.run(G({"ok": {"type": "h.ones", "inputs": {}}}, {"ok": L("ok")})).outputs["ok"],
                       torch.ones(4))


@pytest.mark.parametrize("workers", [1, 4])
def test_keyboard_interrupt_in_a_node_cancels_the_run(reg, workers):
    eng = Engine(reg, device="cpu", max_workers=workers)
    with pytest.raises(Cancelled) as info:
        eng.run(G({"i": {"type": "h.interrupt", "inputs": {}}}, {"i": L("i")}))
    assert info.value.code == "interrupted"


def run_pack_node(tmp_path: Path, source: str, type_id: str, *extra: str) -> subprocess.CompletedProcess:
    """``nodegraph run --json`` of a one-node graph whose node type comes from a plugin file with ``source``."""
    pack = tmp_path / "packs"
    pack.mkdir()
    (pack / "pack.py").write_text(source)
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(G({"p": {"type": type_id, "inputs": {}}}, {"p": L("p")})))
    return subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(graph), "--plugins", str(pack),
                           "--json", "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True,
                          timeout=120)


def test_cli_exit_and_interrupt_nodes_give_json_and_exit_1(tmp_path):
    proc = run_pack_node(tmp_path, "import sys\nfrom nodegraph import node\n\n@node('bad.exit')\n"
                                   "def f(x: float = 0.0) -> float:\n    sys.exit(0)\n", "bad.exit")
    assert proc.returncode == 1, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] is False and payload["error"]["node"] == "p" and payload["error"]["code"] == "node_failed"


def test_a_pack_calling_sys_exit_at_import_is_a_recorded_failure(tmp_path):
    (tmp_path / "exiter.py").write_text("import sys\nsys.exit(5)\n")
    reg = Registry()
    reg.load_folder(tmp_path)
    assert [f.pack for f in reg.failures] == ["exiter"] and "sys.exit(5)" in reg.failures[0].error
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "nodes", "--json", "--plugins", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert [f["pack"] for f in json.loads(proc.stdout)["failures"]] == ["exiter"]


# -- in-place mutation -------------------------------------------------------------------------------------------


def _mutating_graph() -> dict:
    return G({"src": {"type": "h.ones", "inputs": {}},
              "bad": {"type": "h.add_inplace", "inputs": {"x": L("src")}}},
             {"src": L("src"), "bad": L("bad")})


@pytest.mark.parametrize("workers", [1, 4])
def test_a_node_changing_its_input_in_place_fails_and_leaves_the_cache_clean(reg, tmp_path, workers):
    eng = Engine(reg, device="cpu", cache_dir=tmp_path / "cache", max_workers=workers)
    for _ in range(3):  # identical runs give identical answers
        with pytest.raises(NodeExecutionError) as info:
            eng.run(_mutating_graph())
        assert info.value.node == "bad" and "'x' (from src.out) in place" in str(info.value)
    # An unrelated later graph in the same Engine gets the clean value (memory tier) ...
    clean = eng.run(G({"src": {"type": "h.ones", "inputs": {}}}, {"src": L("src")}))
    assert torch.equal(clean.outputs["src"], torch.ones(4))
    # ... and so does a fresh Engine on the same disk cache.
    fresh = Engine(reg, device="cpu", cache_dir=tmp_path / "cache")
    again = fresh.run(G({"src": {"type": "h.ones", "inputs": {}}}, {"src": L("src")}))
    assert torch.equal(again.outputs["src"], torch.ones(4))


def test_a_change_to_a_tensor_inside_a_dict_input_is_caught(reg):
    eng = Engine(reg, device="cpu")
    g = G({"src": {"type": "h.ones", "inputs": {}}, "p": {"type": "h.pack", "inputs": {"x": L("src")}},
           "bad": {"type": "h.cond_inplace", "inputs": {"cond": L("p")}}}, {"bad": L("bad")})
    with pytest.raises(NodeExecutionError, match="'cond'"):
        eng.run(g)
    out = eng.run(G({"src": {"type": "h.ones", "inputs": {}}, "p": {"type": "h.pack", "inputs": {"x": L("src")}}},
                    {"p": L("p")})).outputs["p"]
    assert torch.equal(out["t"], torch.ones(4))


def test_containers_are_copies_so_appending_changes_nothing_upstream(reg):
    eng = Engine(reg, device="cpu")
    g = G({"s": {"type": "h.seq", "inputs": {"n": 3}}, "a": {"type": "h.append_inplace", "inputs": {"items": L("s")}}},
          {"s": L("s"), "a": L("a")})
    for _ in range(3):
        res = eng.run(g)
        assert res.outputs["a"] == 4 and res.outputs["s"] == [0, 1, 2]


def test_an_in_place_change_inside_a_loop_body_is_caught(reg):
    eng = Engine(reg, device="cpu", max_workers=1)
    g = G({"src": {"type": "h.ones", "inputs": {}},
           "lp": {"type": "loop", "inputs": {"count": 2, "x": L("src")},
                  "body": {"inputs": {"x": {"type": "Tensor"}},
                           "nodes": {"b": {"type": "h.add_inplace", "inputs": {"x": {"input": "x"}}}},
                           "outputs": {"y": L("b")}}}},
          {"y": L("lp", "y")})
    with pytest.raises(NodeExecutionError, match="in place"):
        eng.run(g)
    assert torch.equal(eng.run(G({"src": {"type": "h.ones", "inputs": {}}}, {"s": L("src")})).outputs["s"],
                       torch.ones(4))


def test_pure_nodes_are_not_slowed_into_copies(reg):
    # The guard copies containers, never tensors: a consumer sees the producer's very tensor.
    eng = Engine(reg, device="cpu")
    g = G({"src": {"type": "h.ones", "inputs": {}}, "n": {"type": "h.noop", "inputs": {"x": L("src")}}},
          {"src": L("src"), "n": L("n")})
    res = eng.run(g)
    assert res.outputs["n"] is res.outputs["src"]


# -- loop bodies follow the top-level cache rules ----------------------------------------------------------------


def _image(path: Path, value: int) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def test_image_load_in_a_loop_body_sees_a_changed_file(tmp_path):
    _image(tmp_path / "in.png", 10)
    eng = Engine(device="cpu", input_root=tmp_path, output_root=tmp_path / "out")
    g = G({"lp": {"type": "loop", "inputs": {"count": 1},
                  "body": {"nodes": {"ld": {"type": "image.load", "inputs": {"path": "in.png"}}},
                           "outputs": {"img": L("ld", "image")}}}},
          {"img": L("lp", "img")})
    first = eng.run(g).outputs["img"]
    assert abs(first.mean().item() - 10 / 255) < 1e-6
    assert eng.run(g).report.cached == ["lp"]  # unchanged file: the loop is a cache hit
    _image(tmp_path / "in.png", 200)
    second = eng.run(g)
    assert second.report.executed == ["lp"] and abs(second.outputs["img"].mean().item() - 200 / 255) < 1e-6


def test_image_save_in_a_loop_body_runs_again_into_an_empty_out(tmp_path):
    out = tmp_path / "out"
    eng = Engine(device="cpu", input_root=tmp_path, output_root=out)
    g = G({"img": {"type": "image.gradient", "inputs": {"width": 4, "height": 4}},
           "lp": {"type": "loop", "inputs": {"count": 1, "image": L("img", "image")},
                  "body": {"inputs": {"image": {"type": "Image"}},
                           "nodes": {"sv": {"type": "image.save", "inputs": {"image": {"input": "image"},
                                                                              "path": "x.png"}}},
                           "outputs": {"file": L("sv", "file")}}}},
          {"file": L("lp", "file")})
    eng.run(g)
    assert (out / "x.png").is_file()
    (out / "x.png").unlink()
    again = eng.run(g)
    assert again.report.executed == ["lp"] and (out / "x.png").is_file()


# -- outputs are checked against their declared type and the limits; the producer is blamed -------------------


@pytest.mark.parametrize("kind,params,words", [
    ("h.bad_type", {}, "declared Tensor"),
    ("h.cyclic", {}, "refers to itself"),
    ("h.deep", {"depth": 5000}, "nested deeper than 128"),
    ("h.big_string", {"n": 5000}, "max_value_bytes"),
])
def test_bad_outputs_fail_their_producer(reg, tmp_path, kind, params, words):
    eng = Engine(reg, device="cpu", cache_dir=tmp_path / "c", limits=Limits(max_value_bytes=1000))
    g = G({"p": {"type": kind, "inputs": params}, "c": {"type": "h.noop", "inputs": {"x": L("p")}}}, {"c": L("c")})
    with pytest.raises(NodeExecutionError) as info:
        eng.run(g)
    assert info.value.node == "p" and words in str(info.value)


def test_cli_bad_output_is_exit_1_with_json(tmp_path):
    proc = run_pack_node(tmp_path, "from nodegraph import node\n\n@node('cyc.list')\ndef f(x: float = 0.0) -> list:\n"
                                   "    a = []\n    a.append(a)\n    return a\n", "cyc.list",
                         "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["error"]["node"] == "p"


def test_a_disk_cache_hit_of_the_wrong_type_is_a_miss(reg, tmp_path):
    from nodegraph.serialize import packb

    eng = Engine(reg, device="cpu", cache_dir=tmp_path)
    g = G({"src": {"type": "h.ones", "inputs": {}}}, {"src": L("src")})
    key = eng.plan(g)[0].steps["src"].key
    (tmp_path / f"{key}.msgpack").write_bytes(packb({"out": "not a tensor"}))
    res = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    assert res.report.executed == ["src"] and torch.equal(res.outputs["src"], torch.ones(4))


def test_nan_images_are_reported(reg, tmp_path):
    res = Engine(reg, device="cpu").run(G({"n": {"type": "h.nan", "inputs": {}}}, {"image": L("n", "image")}))
    assert len(res.report.warnings) == 1 and "non-finite" in res.report.warnings[0]
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(G({"t": {"type": "tensor.full", "inputs": {"shape": [2], "value": 1.0}}},
                                  {"t": L("t")})))
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(graph), "--json", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert "warnings" not in json.loads(proc.stdout)  # a clean run keeps the plain --json contract


# -- limits while running ----------------------------------------------------------------------------------------


def test_a_loop_over_a_linked_sequence_longer_than_the_limit_fails_before_running(reg):
    eng = Engine(reg, device="cpu", limits=Limits(max_loop_iterations=10))
    g = G({"s": {"type": "h.seq", "inputs": {"n": 50}},
           "lp": {"type": "loop", "inputs": {"over": L("s")},
                  "body": {"nodes": {"o": {"type": "h.ones", "inputs": {}}}, "outputs": {"o": L("o")}}}},
          {"o": L("lp", "o")})
    with pytest.raises(NodeExecutionError, match="max_loop_iterations"):
        eng.run(g)
    assert CALLS == []


def test_the_deadline_cancels_a_run(reg):
    eng = Engine(reg, device="cpu", max_workers=1, limits=Limits(deadline_s=0.2))
    g = G({"lp": {"type": "loop", "inputs": {"count": 1000},
                  "body": {"nodes": {"s": {"type": "h.sleep", "inputs": {"seconds": 0.02}}}, "outputs": {"s": L("s")}}}},
          {"s": L("lp", "s")})
    t0 = time.monotonic()
    with pytest.raises(Cancelled) as info:
        eng.run(g)
    assert info.value.code == "deadline" and time.monotonic() - t0 < 5


def test_cli_timeout_flag(tmp_path):
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(G({"lp": {"type": "loop", "inputs": {"count": 100000},
                                          "body": {"nodes": {"r": {"type": "tensor.randn",
                                                                   "inputs": {"seed": 1, "shape": [64, 64]}}},
                                                   "outputs": {"r": L("r")}}}}, {"r": L("lp", "r")})))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nodegraph.cli", "run", str(graph), "--json", "--timeout", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "deadline"
    assert time.monotonic() - t0 < 60


# -- events belong to a run ----------------------------------------------------------------------------------------


def test_two_threads_sharing_an_engine_see_only_their_own_events(reg):
    eng = Engine(reg, device="cpu")
    seen: dict[str, list] = {"a": [], "b": []}
    everything: list = []
    eng.subscribe(everything.append)

    def run(tag: str) -> None:
        g = G({"p": {"type": "h.progress", "inputs": {"tag": tag, "n": 20}}}, {"p": L("p")})
        eng.run(g, on_event=seen[tag].append, run_id=f"run-{tag}")

    threads = [threading.Thread(target=run, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag in "ab":
        assert {e.run_id for e in seen[tag]} == {f"run-{tag}"}
        messages = [e.data["message"] for e in seen[tag] if e.kind == "progress"]
        assert messages == [tag] * 20
    assert {e.run_id for e in everything} == {"run-a", "run-b"}  # an unscoped subscriber sees every run
