"""Device resolution, edge transfers and the model residency manager (real ``nn.Module`` objects)."""

from __future__ import annotations

import gc

import pytest
import torch

import nodegraph
from nodegraph import Engine, GraphValidationError
from nodegraph.devices import ResidencyManager, module_bytes, module_device, move_to, resolve_device, same_device

from . import exec_nodes as ex
from .exec_nodes import L, graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")


def linear(seed: int = 0, width: int = 32) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(width, width)


MB = module_bytes(linear())  # one model's bytes


# -- resolve_device -------------------------------------------------------------------------------------------


def test_auto_resolves_to_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device(None, "cpu") == torch.device("cpu")
    assert resolve_device("  cpu ") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_a_clear_error():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device(name)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Engine(ex.registry(), device="cuda")


@needs_cuda
def test_a_missing_cuda_index_is_a_clear_error():
    n = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"only {n} CUDA device"):
        resolve_device(f"cuda:{n}")


@pytest.mark.parametrize("name", ["gpu", "cpu:x", "tpu0", "cuda:-1x"])
def test_bad_device_names_raise_naming_the_device(name):
    with pytest.raises((RuntimeError, ValueError)) as info:
        resolve_device(name)
    assert name in str(info.value)
    with pytest.raises((RuntimeError, ValueError)):
        Engine(ex.registry(), device=name)


def test_an_empty_name_falls_back_to_the_default():
    assert resolve_device("", "cpu") == torch.device("cpu")


@no_cuda
def test_a_node_pinned_to_a_missing_device_is_a_validation_error():
    g = graph({"a": {"type": "ex.num", "inputs": {"value": 1.0}, "device": "cuda:0"}}, {"a": L("a")})
    eng = Engine(ex.registry(), device="cpu")
    issues = eng.validate(g).issues
    assert [(i.code, i.node) for i in issues] == [("bad_device", "a")]
    with pytest.raises(GraphValidationError):
        eng.run(g)
    assert ex.called() == []


@no_cuda
def test_a_loop_body_node_pinned_to_a_missing_device_is_a_validation_error():
    # A bad graph must execute no node; a bad device inside a loop body is as bad as one at top level.
    g = graph({"a": {"type": "ex.num", "inputs": {"value": 1.0}},
               "lp": {"type": "loop", "inputs": {"count": 2, "x": L("a")},
                      "body": {"inputs": {"x": {"type": "Float", "carry": True}},
                               "nodes": {"s": {"type": "ex.shift", "inputs": {"x": {"input": "x"}},
                                               "device": "cuda"}},
                               "outputs": {"x": L("s")}}}},
              {"x": L("lp", "x")})
    eng = Engine(ex.registry(), device="cpu")
    with pytest.raises(GraphValidationError):
        eng.run(g)
    assert ex.called() == []


def test_nodes_get_the_engine_default_or_their_pinned_device():
    g = graph({"t": {"type": "ex.tensor", "inputs": {"shape": [2], "value": 1.0}},
               "i": {"type": "ex.identity", "inputs": {"x": L("t")}},
               "j": {"type": "ex.identity", "inputs": {"x": L("t")}, "device": "cpu"}},
              {"i": L("i"), "j": L("j")})
    Engine(ex.registry(), device="cpu").run(g)
    assert {c["node"]: c["device"] for c in ex.CALLS if c.get("kind") == "identity"} == {"i": "cpu", "j": "cpu"}


# -- move_to --------------------------------------------------------------------------------------------------


def test_move_to_returns_the_same_object_when_already_there():
    x = torch.ones(3)
    assert move_to(x, torch.device("cpu")) is x
    nested = {"a": [x, (x, 1)], "b": "text"}
    moved = move_to(nested, torch.device("cpu"))
    assert moved["a"][0] is x and moved["a"][1][0] is x and moved["a"][1][1] == 1 and moved["b"] == "text"
    model = linear()
    assert move_to(model, torch.device("meta")) is model  # models are not moved at edges
    assert module_device(model).type == "cpu"


def test_move_to_moves_when_devices_differ():
    x = torch.ones(3)
    y = move_to(x, torch.device("meta"))
    assert y is not x and y.device.type == "meta" and x.device.type == "cpu"
    out = move_to([x, {"k": x}], torch.device("meta"))
    assert out[0].device.type == "meta" and out[1]["k"].device.type == "meta"


def test_same_device():
    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))


def test_an_edge_between_nodes_on_the_same_device_passes_the_tensor_itself():
    g = graph({"t": {"type": "ex.tensor", "inputs": {"shape": [4], "value": 2.0}},
               "i": {"type": "ex.identity", "inputs": {"x": L("t")}}},
              {"t": L("t"), "i": L("i")})
    res = Engine(ex.registry(), device="cpu").run(g)
    assert res.outputs["i"] is res.outputs["t"]


# -- residency manager on CPU ---------------------------------------------------------------------------------


def test_cpu_budget_drops_the_least_recently_used_model():
    budget = int(2.5 * MB)
    rm = ResidencyManager({"cpu": budget})
    dropped: list[str] = []
    models = {name: linear(i) for i, name in enumerate(("m1", "m2", "m3"))}
    for name, m in models.items():
        rm.register(m, on_drop=lambda n=name: dropped.append(n))
        rm.acquire(m, "cpu")
        assert rm.used("cpu") <= budget
    assert dropped == ["m1"] and rm.drops == 1
    assert rm.used("cpu") == 2 * MB <= budget
    assert rm.resident("cpu") == [models["m2"], models["m3"]]


def test_lru_order_follows_acquire():
    rm = ResidencyManager({"cpu": int(2.5 * MB)})
    dropped: list[str] = []
    m1, m2, m3 = linear(1), linear(2), linear(3)
    rm.register(m1, on_drop=lambda: dropped.append("m1"))
    rm.register(m2, on_drop=lambda: dropped.append("m2"))
    rm.acquire(m1, "cpu")  # m1 is now the most recently used
    rm.register(m3, on_drop=lambda: dropped.append("m3"))
    assert dropped == ["m2"]
    assert set(map(id, rm.resident("cpu"))) == {id(m1), id(m3)}


def test_pinned_models_are_never_dropped():
    rm = ResidencyManager({"cpu": int(1.5 * MB)})
    dropped: list[str] = []
    m1, m2, m3 = linear(1), linear(2), linear(3)
    rm.register(m1, on_drop=lambda: dropped.append("m1"))
    rm.pin(m1)
    rm.register(m2, on_drop=lambda: dropped.append("m2"))
    rm.pin(m2)
    rm.register(m3, on_drop=lambda: dropped.append("m3"))
    assert dropped == []  # everything else is pinned, and a newcomer is not dropped on arrival
    rm.acquire(m1, "cpu")  # LRU order is now m2, m3, m1
    assert dropped == []
    rm.unpin(m1)  # enforcement resumes: m2 is still pinned, so m3 then m1 go
    assert dropped == ["m3", "m1"]
    assert rm.used("cpu") == MB <= int(1.5 * MB)
    rm.unpin(m2)
    assert dropped == ["m3", "m1"]  # m2 was never dropped
    assert rm.resident("cpu") == [m2]


def test_a_pinned_model_survives_while_others_come_and_go():
    rm = ResidencyManager({"cpu": int(2.5 * MB)})
    dropped: list[int] = []
    keep = linear(0)
    rm.register(keep, on_drop=lambda: dropped.append(0))
    rm.pin(keep)
    others = [linear(i) for i in range(1, 6)]
    for i, m in enumerate(others, start=1):
        rm.register(m, on_drop=lambda i=i: dropped.append(i))
        rm.acquire(m, "cpu")
        assert rm.used("cpu") <= int(2.5 * MB)
    assert 0 not in dropped and dropped == [1, 2, 3, 4]
    assert keep in rm.resident("cpu")


def test_a_collected_model_stops_counting():
    rm = ResidencyManager()
    m = linear()
    rm.register(m)
    assert rm.used("cpu") == MB
    del m
    gc.collect()
    assert rm.used("cpu") == 0


def test_offload_to_cpu_when_the_accelerator_budget_is_full():
    # "meta" stands in for an accelerator on a CPU-only machine; offloading materialises the module on CPU.
    def mover(module: torch.nn.Module, device: torch.device) -> None:
        if module_device(module).type == "meta":
            module.to_empty(device=device)
        else:
            module.to(device)

    rm = ResidencyManager({"meta": int(1.5 * MB)}, mover=mover)
    m1, m2 = linear(1), linear(2)
    rm.acquire(m1, "meta")
    assert module_device(m1).type == "meta" and rm.used("meta") == MB
    rm.acquire(m2, "meta")
    assert module_device(m2).type == "meta" and module_device(m1).type == "cpu"
    assert rm.used("meta") == MB and rm.used("cpu") == MB
    # m1 in; m1 offloaded to make room; m2 in
    assert rm.moves == [("Linear", "cpu", "meta"), ("Linear", "meta", "cpu"), ("Linear", "cpu", "meta")]
    assert rm.drops == 0  # offloaded, not dropped


@pytest.mark.parametrize("key", ["cuda:0", "cuda"])
def test_a_budget_keyed_cuda_applies_to_the_default_cuda_device(monkeypatch, key):
    # Users write "cuda" (as for Engine(device="cuda")); the budget must apply to the device "cuda" means.
    # Bookkeeping only: the mover is a no-op, and the current device is faked to 0 on CPU-only machines.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    rm = ResidencyManager({key: int(1.5 * MB)}, mover=lambda m, d: None)
    m1, m2 = linear(1), linear(2)
    rm.acquire(m1, "cuda")
    rm.acquire(m2, "cuda")
    assert rm.used("cuda") <= int(1.5 * MB)
    assert rm.used("cuda:0") == MB and rm.used("cpu") == MB
    assert rm.moves[-2:] == [("Linear", "cuda:0", "cpu"), ("Linear", "cpu", "cuda:0")]


# -- end to end through the Engine ----------------------------------------------------------------------------


def _chain(n: int = 3) -> dict:
    """load_0 -> use_0 -> load_1 -> use_1 -> ...: each model is loaded after the previous one was used."""
    nodes: dict = {"x": {"type": "ex.tensor", "inputs": {"shape": [1, 32], "value": 1.0}}}
    prev = "x"
    for i in range(n):
        load = {"type": "ex.load_model", "inputs": {"seed": i + 1, **({"after": L(prev)} if i else {})}}
        use = {"type": "ex.apply_model", "inputs": {"model": L(f"load_{i}", "model"), "x": L(prev)}}
        nodes[f"load_{i}"], nodes[f"use_{i}"] = load, use
        prev = f"use_{i}"
    outputs = {"y": L(prev), **{f"m{i}": L(f"load_{i}", "model") for i in range(n)}}
    return graph(nodes, outputs)


@pytest.mark.parametrize("workers", [1, 4])
def test_engine_cpu_model_budget_end_to_end(workers):
    budget = int(2.5 * MB)
    eng = Engine(ex.registry(), device="cpu", model_budgets={"cpu": budget}, max_workers=workers)
    g = _chain(3)
    first = eng.run(g, outputs=["y"])
    assert ex.called("load") == ["load_0", "load_1", "load_2"]
    assert eng.residency.drops >= 1
    assert eng.residency.used("cpu") <= budget
    assert len(eng.residency.resident("cpu")) == 2
    # the dropped model's loader lost its cache entry; the others kept theirs
    assert eng.cache.get(first.plan.steps["load_0"].key)[0] is nodegraph.cache.MISSING
    ex.reset()
    res = eng.run(g, outputs=["m0", "m1", "m2"])
    assert res.report.executed == ["load_0"]  # loaded again, on demand
    assert ex.called("load") == ["load_0"]
    assert sorted(res.report.cached) == ["load_1", "load_2"]
    assert all(isinstance(m, torch.nn.Linear) for m in res.outputs.values())
    assert eng.residency.used("cpu") <= budget


def test_a_dropped_model_is_released_by_every_cache_entry_that_holds_it():
    # 'pass_a' hands the loader's model on unchanged (the same object), so two cache entries hold it. When the
    # budget drops the model, neither entry may keep it alive: otherwise it stays in memory, uncounted, and a
    # later run reuses a model the residency manager has forgotten.
    budget = int(1.5 * MB)
    g = graph({
        "x": {"type": "ex.tensor", "inputs": {"shape": [1, 32], "value": 1.0}},
        "load_a": {"type": "ex.load_model", "inputs": {"seed": 1}},
        "pass_a": {"type": "ex.identity", "inputs": {"x": L("load_a", "model")}},
        "use_a": {"type": "ex.apply_model", "inputs": {"model": L("pass_a"), "x": L("x")}},
        "load_b": {"type": "ex.load_model", "inputs": {"seed": 2, "after": L("use_a")}},
        "use_b": {"type": "ex.apply_model", "inputs": {"model": L("load_b", "model"), "x": L("use_a")}},
    }, {"y": L("use_b"), "ma": L("load_a", "model")})
    eng = Engine(ex.registry(), device="cpu", model_budgets={"cpu": budget}, max_workers=1)
    res = eng.run(g, outputs=["y"])
    assert eng.residency.drops == 1 and eng.residency.used("cpu") <= budget
    for sid in ("load_a", "pass_a"):
        assert eng.cache.get(res.plan.steps[sid].key)[0] is nodegraph.cache.MISSING, sid
    ex.reset()
    eng.run(g, outputs=["ma"])
    assert ex.called("load") == ["load_a"]  # loaded again on demand


def test_without_a_budget_nothing_is_dropped():
    eng = Engine(ex.registry(), device="cpu")
    eng.run(_chain(3), outputs=["y"])
    assert eng.residency.drops == 0
    assert eng.residency.used("cpu") == 3 * MB


# -- real CUDA (runs where a GPU is present) ------------------------------------------------------------------


@needs_cuda
def test_cuda_budget_offloads_real_models_to_cpu():
    rm = ResidencyManager({"cuda:0": int(1.5 * MB)})
    m1, m2 = linear(1), linear(2)
    rm.acquire(m1, "cuda:0")
    assert module_device(m1).type == "cuda"
    rm.acquire(m2, "cuda:0")
    assert module_device(m2).type == "cuda" and module_device(m1).type == "cpu"
    assert rm.used("cuda:0") == MB <= int(1.5 * MB)
    rm.acquire(m1, "cuda:0")
    assert module_device(m1).type == "cuda" and module_device(m2).type == "cpu"
    x = torch.ones(1, 32, device="cuda")
    assert m1(x).device.type == "cuda"


@needs_cuda
@pytest.mark.parametrize("key", ["cuda:0", "cuda"])
def test_engine_moves_models_between_cuda_and_cpu_under_a_budget(key):
    budget = int(1.5 * MB)
    eng = Engine(ex.registry(), device="cuda", model_budgets={key: budget})
    res = eng.run(_chain(3), outputs=["y", "m0", "m1", "m2"])
    applies = [c for c in ex.CALLS if c.get("kind") == "apply"]
    assert [c["device"] for c in applies] == ["cuda:0"] * 3  # each model was on the GPU when used
    assert eng.residency.used("cuda:0") <= budget
    on_gpu = [m for m in (res.outputs[f"m{i}"] for i in range(3)) if module_device(m).type == "cuda"]
    assert len(on_gpu) == 1
    assert ("Linear", "cuda:0", "cpu") in eng.residency.moves
    # numerics match a CPU run
    cpu = Engine(ex.registry(), device="cpu").run(_chain(3), outputs=["y"]).outputs["y"]
    torch.testing.assert_close(res.outputs["y"].cpu(), cpu, rtol=1e-4, atol=1e-5)
