"""The embedding API: Engine instances, overrides, outputs, RunResult and its report."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from nodegraph import Engine, Graph, GraphValidationError, RunReport, RunResult, types

from . import exec_nodes as ex


def L(node: str, output: str = "out") -> dict:
    return {"node": node, "output": output}


G = {
    "version": 1,
    "nodes": {
        "a": {"type": "ex.num", "inputs": {"value": 2.0}},
        "b": {"type": "ex.add", "inputs": {"a": L("a"), "b": 3.0}},
        "t": {"type": "ex.tensor", "inputs": {"shape": [2], "value": 1.0}},
        "s": {"type": "ex.scale", "inputs": {"x": L("t"), "factor": 4.0}},
        "model": {"type": "ex.load_model", "inputs": {"seed": 1, "width": 8}},
    },
    "outputs": {"b": L("b"), "s": L("s"), "model": L("model", "model")},
    "meta": {"title": "api test"},
}


# -- isolation ------------------------------------------------------------------------------------------------


def test_two_engines_share_no_hidden_state(reg):
    e1, e2 = Engine(reg, device="cpu"), Engine(reg, device="cpu")
    assert e1.cache is not e2.cache and e1.residency is not e2.residency and e1.bus is not e2.bus
    seen1, seen2 = [], []
    e1.subscribe(seen1.append)
    e2.subscribe(seen2.append)
    r1 = e1.run(G)
    assert sorted(r1.report.executed) == ["a", "b", "model", "s", "t"]
    assert seen1 and not seen2  # events stay with their engine
    ex.reset()
    r2 = e2.run(G)
    assert sorted(r2.report.executed) == ["a", "b", "model", "s", "t"]  # nothing came from e1's cache
    assert r2.report.cached == []
    assert r2.outputs["model"] is not r1.outputs["model"]
    assert e1.residency.resident("cpu") == [r1.outputs["model"]]
    assert e2.residency.resident("cpu") == [r2.outputs["model"]]
    # and e1 still has its own cache
    assert e1.run(G).report.executed == []


def test_engines_share_only_the_registry(reg):
    e1, e2 = Engine(reg, device="cpu"), Engine(reg, device="cpu")
    assert e1.registry is e2.registry is reg
    e1.cache.memory.clear()
    e1.run(G, outputs=["b"])
    assert len(e1.cache.memory) == 2 and len(e2.cache.memory) == 0


def test_one_engine_from_several_threads(reg):
    eng = Engine(reg, device="cpu")
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = eng.run(G, overrides={"a.value": float(i)}, outputs=["b"]).outputs["b"]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert errors == []
    assert results == {i: i + 3.0 for i in range(8)}


# -- overrides and outputs ------------------------------------------------------------------------------------


def test_overrides_change_the_result_and_rerun_only_what_they_touch(reg):
    eng = Engine(reg, device="cpu")
    assert eng.run(G).outputs["b"] == 5.0
    res = eng.run(G, overrides={"a.value": 10.0, "s.factor": -1.0})
    assert res.outputs["b"] == 13.0
    assert torch.equal(res.outputs["s"], torch.full((2,), -1.0))
    assert sorted(res.report.executed) == ["a", "b", "s"]
    assert res.graph.nodes["a"].inputs["value"] == 10.0  # the result carries the graph that ran


def test_a_tensor_override_on_a_link_only_port(reg):
    eng = Engine(reg, device="cpu")
    res = eng.run(G, overrides={"s.x": torch.arange(3.0)}, outputs=["s"])
    assert torch.equal(res.outputs["s"], torch.arange(3.0) * 4)
    res2 = eng.run(G, overrides={"s.x": torch.arange(3.0) + 1}, outputs=["s"])
    assert torch.equal(res2.outputs["s"], (torch.arange(3.0) + 1) * 4)
    assert res2.report.executed == ["s"]


@pytest.mark.parametrize("overrides,code", [
    ({"nope.value": 1.0}, "bad_override"),
    ({"a.nope": 1.0}, "bad_override"),
    ({"a.value": "text"}, "wrong_type"),
])
def test_bad_overrides_are_validation_errors_and_run_nothing(reg, overrides, code):
    with pytest.raises(GraphValidationError) as info:
        Engine(reg, device="cpu").run(G, overrides=overrides)
    assert code in [i.code for i in info.value.issues]
    assert ex.called() == []


def test_outputs_argument_selects_and_prunes(reg):
    res = Engine(reg, device="cpu").run(G, outputs=["s"])
    assert set(res.outputs) == {"s"}
    assert sorted(res.report.executed) == ["s", "t"]
    assert res.output_types == {"s": types.Tensor}


def test_unknown_output_is_a_validation_error(reg):
    with pytest.raises(GraphValidationError) as info:
        Engine(reg, device="cpu").run(G, outputs=["s", "missing"])
    assert [(i.code, i.port) for i in info.value.issues] == [("bad_output", "missing")]
    assert ex.called() == []


def test_graph_sources(reg, tmp_path):
    eng = Engine(reg, device="cpu")
    path = tmp_path / "g.json"
    path.write_text(json.dumps(G))
    msgpack_path = tmp_path / "g.msgpack"
    msgpack_path.write_bytes(Graph.model_validate(G).to_msgpack())
    for source in (G, json.dumps(G), json.dumps(G).encode(), str(path), path, msgpack_path, Graph.model_validate(G)):
        assert eng.run(source, outputs=["b"]).outputs == {"b": 5.0}, source
    with pytest.raises(GraphValidationError) as info:
        eng.run(tmp_path / "missing.json")
    assert info.value.issues[0].code == "bad_json"


# -- the run result -------------------------------------------------------------------------------------------


def test_run_result_and_report(reg):
    eng = Engine(reg, device="cpu")
    res = eng.run(G)
    assert isinstance(res, RunResult) and isinstance(res.report, RunReport)
    assert set(res.outputs) == {"b", "s", "model"}
    assert res.outputs["b"] == 5.0 and isinstance(res.outputs["model"], torch.nn.Linear)
    assert isinstance(res.graph, Graph) and res.graph.meta == {"title": "api test"}
    assert set(res.plan.steps) == {"a", "b", "t", "s", "model"}
    assert res.output_types["b"] == types.Float and res.output_types["model"] == types.Model
    report = res.report
    assert sorted(report.executed) == ["a", "b", "model", "s", "t"] and report.cached == []
    assert set(report.seconds) == set(report.executed)
    assert all(v >= 0 for v in report.seconds.values())
    assert report.total_seconds >= max(report.seconds.values())
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"executed", "cached", "seconds"}  # "warnings" joins only when there are some
    assert report.warnings == [] and len(report.run_id) == 32
    assert set(data["seconds"]) == {"total", "nodes"}
    assert set(data["seconds"]["nodes"]) == set(report.executed)

    again = eng.run(G).report
    assert again.executed == [] and sorted(again.cached) == ["b", "model", "s"]
    assert again.seconds == {}


def test_validate_does_not_execute(reg):
    eng = Engine(reg, device="cpu")
    result = eng.validate(G)
    assert result.ok and result.issues == []
    bad = json.loads(json.dumps(G))
    bad["nodes"]["b"]["inputs"]["a"] = L("nowhere")
    result = eng.validate(bad)
    assert not result.ok and [i.node for i in result.issues] == ["b"]
    assert ex.called() == []
