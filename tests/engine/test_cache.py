"""The content-addressed cache: Merkle keys, the memory tier (LRU, byte budget) and the disk tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nodegraph import Engine
from nodegraph.cache import MISSING, Cache, DiskCache, MemoryCache, value_bytes
from nodegraph.serialize import unpackb

from . import exec_nodes as ex
from .exec_nodes import L, graph

ROOT = Path(__file__).resolve().parents[2]


# a -> b -> c -> f <- e <- d, plus a loop and a graph-defined node (expanded into r/lp)
KEYED = graph(
    {
        "a": {"type": "ex.num", "inputs": {"value": 1.0}},
        "b": {"type": "ex.add", "inputs": {"a": L("a"), "b": 2.0}},
        "c": {"type": "ex.add", "inputs": {"a": L("b"), "b": 3.0}},
        "d": {"type": "ex.num", "inputs": {"value": 4.0}},
        "e": {"type": "ex.add", "inputs": {"a": L("d"), "b": 5.0}},
        "f": {"type": "ex.add", "inputs": {"a": L("c"), "b": 0.0}},
        "noise": {"type": "ex.tensor", "inputs": {"shape": [2, 2], "seed": 7}},
        "lp": {"type": "loop", "inputs": {"count": 3, "x": L("noise")},
               "body": {"inputs": {"x": {"type": "Tensor", "carry": True}},
                        "nodes": {"s": {"type": "ex.scale", "inputs": {"x": {"input": "x"}, "factor": 0.5}}},
                        "outputs": {"x": L("s")}}},
        "r": {"type": "ex.repeat_shift", "inputs": {"x": L("e"), "n": 2}},
    },
    {"f": L("f"), "e": L("e"), "lp": L("lp", "x"), "r": L("r", "x")},
)


def keys(engine: Engine, g: dict, overrides: dict | None = None) -> dict[str, str]:
    plan, _ = engine.plan(g, overrides)
    return {sid: step.key for sid, step in plan.steps.items()}


# -- keys -----------------------------------------------------------------------------------------------------


def test_keys_are_hex_sha256_and_distinct(reg):
    k = keys(Engine(reg, device="cpu"), KEYED)
    assert set(k) == {"a", "b", "c", "d", "e", "f", "noise", "lp", "r/lp"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in k.values())
    assert len(set(k.values())) == len(k)


def test_keys_are_stable_across_processes(reg, tmp_path):
    here = keys(Engine(reg, device="cpu"), KEYED)
    script = (
        "import json, sys\n"
        "from nodegraph import Engine\n"
        "from tests.engine import exec_nodes as ex\n"
        "plan, _ = Engine(ex.registry(), device='cpu').plan(json.load(sys.stdin))\n"
        "print(json.dumps({sid: s.key for sid, s in plan.steps.items()}))\n"
        "assert 'nodes' not in sys.modules  # planning needs no node library\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(KEYED), capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120, check=True)
    assert json.loads(out.stdout) == here


def test_same_graph_same_keys_in_two_engines(reg):
    assert keys(Engine(reg, device="cpu"), KEYED) == keys(Engine(reg, device="cpu"), KEYED)


@pytest.mark.parametrize("override,changed", [
    ({"b.b": 2.5}, {"b", "c", "f"}),
    ({"d.value": 4.5}, {"d", "e", "r/lp"}),
    ({"noise.seed": 8}, {"noise", "lp"}),
    ({"lp.count": 4}, {"lp"}),
    ({"r.n": 3}, {"r/lp"}),
])
def test_one_literal_changes_only_that_node_and_its_descendants(reg, override, changed):
    eng = Engine(reg, device="cpu")
    before, after = keys(eng, KEYED), keys(eng, KEYED, override)
    assert {sid for sid in before if before[sid] != after[sid]} == changed


def test_a_body_literal_changes_the_loop_key(reg):
    eng = Engine(reg, device="cpu")
    other = json.loads(json.dumps(KEYED))
    other["nodes"]["lp"]["body"]["nodes"]["s"]["inputs"]["factor"] = 0.25
    before, after = keys(eng, KEYED), keys(eng, other)
    assert {sid for sid in before if before[sid] != after[sid]} == {"lp"}


def test_changing_one_literal_reexecutes_only_that_node_and_descendants(reg):
    eng = Engine(reg, device="cpu")
    first = eng.run(KEYED)
    assert sorted(first.report.executed) == sorted(first.plan.steps)
    ex.reset()
    res = eng.run(KEYED, overrides={"b.b": 2.5})
    assert sorted(res.report.executed) == ["b", "c", "f"]
    assert sorted(ex.called()) == ["b", "c", "f"]
    assert res.outputs["f"] == 1.0 + 2.5 + 3.0


def test_an_impure_node_runs_every_time_and_its_descendants_with_it(reg):
    g = graph({"a": {"type": "ex.num", "inputs": {"value": 1.0}},
               "i": {"type": "ex.impure", "inputs": {"x": L("a")}},
               "j": {"type": "ex.add", "inputs": {"a": L("i"), "b": 1.0}}},
              {"j": L("j")})
    eng = Engine(reg, device="cpu")
    k1, k2 = keys(eng, g), keys(eng, g)
    assert k1["a"] == k2["a"] and k1["i"] != k2["i"] and k1["j"] != k2["j"]
    eng.run(g)
    ex.reset()
    res = eng.run(g)
    assert sorted(res.report.executed) == ["i", "j"] and res.report.cached == ["a"]


# -- memory tier ----------------------------------------------------------------------------------------------


def t(n: int) -> dict:
    return {"out": torch.zeros(n)}  # n float32 = 4n bytes


def test_value_bytes_counts_tensors_in_containers():
    assert value_bytes({"a": torch.zeros(10), "b": [torch.zeros(5, dtype=torch.float64), 3.0]}) == 40 + 40
    assert value_bytes(t(100)) == 400


def test_memory_lru_respects_the_byte_budget():
    mem = MemoryCache(budget_bytes=1000)
    for key in ("k1", "k2", "k3", "k4"):
        mem.put(key, t(75))  # 300 bytes each
        assert mem.bytes_used <= 1000
    assert mem.evictions == 1
    assert mem.get("k1") is MISSING  # least recently used went first
    assert all(mem.get(k) is not MISSING for k in ("k2", "k3", "k4"))
    assert mem.bytes_used == 900


def test_memory_lru_order_follows_reads():
    mem = MemoryCache(budget_bytes=1000)
    mem.put("k1", t(100))
    mem.put("k2", t(100))
    assert mem.get("k1") is not MISSING  # k1 is now the most recently used
    mem.put("k3", t(100))
    assert mem.get("k2") is MISSING
    assert mem.get("k1") is not MISSING and mem.get("k3") is not MISSING
    assert mem.bytes_used == 800


def test_an_entry_larger_than_the_budget_is_not_kept():
    mem = MemoryCache(budget_bytes=100)
    mem.put("small", t(10))
    assert mem.put("huge", t(1000)) is False
    assert "huge" not in mem and "small" in mem
    assert mem.bytes_used == 40


def test_replacing_an_entry_does_not_double_count():
    mem = MemoryCache(budget_bytes=1000)
    mem.put("k", t(100))
    mem.put("k", t(50))
    assert mem.bytes_used == 200 and len(mem) == 1


def test_engine_memory_budget_evicts_during_a_run(reg):
    g = graph({f"t{i}": {"type": "ex.tensor", "inputs": {"shape": [256], "value": float(i)}} for i in range(6)},
              {f"t{i}": L(f"t{i}") for i in range(6)})
    budget = 3 * 256 * 4
    eng = Engine(reg, device="cpu", memory_budget=budget)
    res = eng.run(g)
    assert all(torch.equal(res.outputs[f"t{i}"], torch.full((256,), float(i))) for i in range(6))
    assert eng.cache.memory.evictions >= 3
    assert eng.cache.memory.bytes_used <= budget
    assert len(eng.cache.memory) == 3
    ex.reset()
    res = eng.run(g)  # the evicted half runs again, the rest is cached
    assert len(res.report.executed) == 3 and len(res.report.cached) == 3


# -- disk tier ------------------------------------------------------------------------------------------------


DISK = graph(
    {
        "t": {"type": "ex.tensor", "inputs": {"shape": [2, 3], "value": 1.5}},
        "s": {"type": "ex.scale", "inputs": {"x": L("t"), "factor": 2.0}},
        "n": {"type": "ex.num", "inputs": {"value": 3.0}},
        "m": {"type": "ex.modes", "inputs": {"x": L("t")}},
        "model": {"type": "ex.load_model", "inputs": {"seed": 1, "width": 4}},
    },
    {"s": L("s"), "n": L("n"), "inf": L("m", "inference"), "model": L("model", "model")},
)


def test_disk_tier_formats_and_no_pickle(reg, tmp_path):
    eng = Engine(reg, device="cpu", cache_dir=tmp_path)
    res = eng.run(DISK)
    k = {sid: s.key for sid, s in res.plan.steps.items()}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert f"{k['t']}.safetensors" in files and f"{k['s']}.safetensors" in files
    assert f"{k['n']}.msgpack" in files and f"{k['m']}.msgpack" in files
    assert not [f for f in files if k["model"] in f]  # a module is never written
    assert all(f.endswith((".safetensors", ".msgpack")) for f in files), files
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / f"{k['s']}.safetensors"))["out"], torch.full((2, 3), 3.0))
    raw = (tmp_path / f"{k['n']}.msgpack").read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle stream
    assert unpackb(raw) == {"out": 3.0}
    assert unpackb((tmp_path / f"{k['m']}.msgpack").read_bytes()) == {"inference": False, "grad": False}


def test_mixed_tensor_and_scalar_outputs_go_to_msgpack(tmp_path):
    disk = DiskCache(tmp_path)
    assert disk.put("mixed", {"x": torch.arange(4.0), "n": 2})
    assert (tmp_path / "mixed.msgpack").exists() and not (tmp_path / "mixed.safetensors").exists()
    back = disk.get("mixed")
    assert back["n"] == 2 and torch.equal(back["x"], torch.arange(4.0))


def test_disk_refuses_what_it_cannot_store_safely(tmp_path):
    disk = DiskCache(tmp_path)
    assert disk.put("module", {"m": torch.nn.Linear(2, 2)}) is False
    assert disk.put("obj", {"o": object()}) is False
    assert list(tmp_path.iterdir()) == []
    assert disk.get("module") is MISSING


def test_a_disk_hit_is_promoted_to_memory(tmp_path):
    Cache(cache_dir=tmp_path).put("k", {"out": torch.ones(3)})
    fresh = Cache(cache_dir=tmp_path)
    value, tier = fresh.get("k")
    assert tier == "disk" and torch.equal(value["out"], torch.ones(3))
    assert fresh.get("k")[1] == "memory"


def test_a_new_engine_with_the_same_cache_dir_executes_no_node(reg, tmp_path):
    g = graph({k: v for k, v in DISK["nodes"].items() if k != "model"},
              {k: v for k, v in DISK["outputs"].items() if k != "model"})
    first = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    ex.reset()
    events = []
    again = Engine(reg, device="cpu", cache_dir=tmp_path).run(g, on_event=events.append)
    assert again.report.executed == [] and ex.called() == []
    assert sorted((e.node, e.data["tier"]) for e in events if e.kind == "cached") == [
        ("m", "disk"), ("n", "disk"), ("s", "disk")]
    assert sorted(again.report.cached) == ["m", "n", "s"]
    assert torch.equal(again.outputs["s"], first.outputs["s"])
    assert again.outputs["n"] == 3.0 and again.outputs["inf"] is False


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\xc1not a cache entry" * 4, "truncated": data[: len(data) // 3],
                      "empty": b""}[how])


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("target", ["s", "n"])  # s -> .safetensors, n -> .msgpack
def test_a_damaged_disk_entry_is_a_miss(reg, tmp_path, target, how):
    g = graph({k: v for k, v in DISK["nodes"].items() if k in ("t", "s", "n")},
              {"s": L("s"), "n": L("n")})
    first = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    key = first.plan.steps[target].key
    [path] = [p for p in tmp_path.iterdir() if p.name.startswith(key)]
    _damage(path, how)
    ex.reset()
    res = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    assert res.report.executed == [target]
    assert res.outputs["n"] == 3.0 and torch.equal(res.outputs["s"], first.outputs["s"])


@pytest.mark.parametrize("target", ["s", "n"])
def test_a_damaged_disk_entry_is_rewritten_by_the_rerun(reg, tmp_path, target):
    g = graph({k: v for k, v in DISK["nodes"].items() if k in ("t", "s", "n")},
              {"s": L("s"), "n": L("n")})
    first = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    key = first.plan.steps[target].key
    [path] = [p for p in tmp_path.iterdir() if p.name.startswith(key)]
    _damage(path, "garbage")
    try:
        Engine(reg, device="cpu", cache_dir=tmp_path).run(g)  # re-executes the damaged node
    except Exception:  # noqa: BLE001 - a separate test covers "a damaged entry is a miss"
        pass
    third = Engine(reg, device="cpu", cache_dir=tmp_path).run(g)
    assert third.report.executed == []


def test_cli_second_process_with_same_cache_dir_executes_nothing(tmp_path, capsys, monkeypatch):
    from nodegraph.cli import main

    args = ["run", str(ROOT / "graphs" / "noisy_gradient.json"), "--json", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0  # first run here ...
    first = json.loads(capsys.readouterr().out)
    assert sorted(first["executed"]) == ["damp", "gradient", "image", "mix", "noise", "stats"]
    out = subprocess.run([sys.executable, "-m", "nodegraph.cli", *args], capture_output=True, text=True,
                         check=True, cwd=tmp_path, timeout=120)  # ... the second in a new process
    second = json.loads(out.stdout)
    assert second["executed"] == []
    assert sorted(second["cached"]) == ["image", "stats"]
    assert first["outputs"].keys() == second["outputs"].keys() == {"image", "noise_std"}
