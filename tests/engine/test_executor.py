"""The local executor: pruning, concurrency, grad modes, structured errors, resumption, cancellation, events."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import nodegraph
from nodegraph import CancelToken, Cancelled, Engine, NodeExecutionError

from . import exec_nodes as ex
from .exec_nodes import L, graph


def make_engine(reg, **kw) -> Engine:
    kw.setdefault("device", "cpu")
    return Engine(reg, **kw)


# -- pruning --------------------------------------------------------------------------------------------------


TWO_BRANCHES = graph(
    {
        "a": {"type": "ex.num", "inputs": {"value": 1.0}},
        "b": {"type": "ex.add", "inputs": {"a": L("a"), "b": 1.0}},
        "c": {"type": "ex.num", "inputs": {"value": 5.0}},
        "d": {"type": "ex.add", "inputs": {"a": L("c"), "b": 1.0}},
        "unused": {"type": "ex.num", "inputs": {"value": 9.0}},
    },
    {"b": L("b"), "d": L("d")},
)


def test_only_what_requested_outputs_need_runs(reg):
    eng = make_engine(reg)
    res = eng.run(TWO_BRANCHES, outputs=["b"])
    assert res.outputs == {"b": 2.0}
    assert sorted(ex.called()) == ["a", "b"]
    assert sorted(res.report.executed) == ["a", "b"]
    assert res.plan.needed(["b"]) == ["a", "b"]


def test_node_feeding_no_output_never_runs(reg):
    res = make_engine(reg).run(TWO_BRANCHES)
    assert res.outputs == {"b": 2.0, "d": 6.0}
    assert "unused" not in ex.called()
    assert sorted(res.report.executed) == ["a", "b", "c", "d"]


def test_second_output_later_runs_only_its_branch(reg):
    eng = make_engine(reg)
    eng.run(TWO_BRANCHES, outputs=["b"])
    ex.reset()
    res = eng.run(TWO_BRANCHES)
    assert sorted(ex.called()) == ["c", "d"]
    assert res.report.cached == ["b"]  # a cached step's ancestors are not even looked up


# -- concurrency ----------------------------------------------------------------------------------------------


def test_independent_branches_overlap_with_threads(reg):
    # Each node sets its own event, then waits for the other's: both see True only if they ran at the same time.
    g = graph(
        {
            "left": {"type": "ex.rendezvous", "inputs": {"me": "L", "other": "R"}},
            "right": {"type": "ex.rendezvous", "inputs": {"me": "R", "other": "L"}},
        },
        {"left": L("left"), "right": L("right")},
    )
    res = make_engine(reg, max_workers=2).run(g)
    assert res.outputs == {"left": True, "right": True}
    threads = {c["thread"] for c in ex.CALLS}
    assert len(threads) == 2 and all(t.startswith("nodegraph") for t in threads)


def test_overlap_downstream_of_a_shared_parent(reg):
    g = graph(
        {
            "root": {"type": "ex.num", "inputs": {"value": 1.0}},
            "left": {"type": "ex.rendezvous", "inputs": {"me": "L", "other": "R", "after": L("root")}},
            "right": {"type": "ex.rendezvous", "inputs": {"me": "R", "other": "L", "after": L("root")}},
        },
        {"left": L("left"), "right": L("right")},
    )
    res = make_engine(reg, max_workers=4).run(g)
    assert res.outputs == {"left": True, "right": True}


MIXED = graph(
    {
        "n1": {"type": "ex.tensor", "inputs": {"shape": [2, 5], "seed": 1}},
        "n2": {"type": "ex.tensor", "inputs": {"shape": [2, 5], "seed": 2}},
        "s1": {"type": "ex.scale", "inputs": {"x": L("n1"), "factor": 0.3}},
        "s2": {"type": "ex.scale", "inputs": {"x": L("n2"), "factor": -1.7}},
        "sum": {"type": "ex.tadd", "inputs": {"a": L("s1"), "b": L("s2")}},
        "lp": {
            "type": "loop",
            "inputs": {"count": 6, "x": L("sum")},
            "body": {
                "inputs": {"x": {"type": "Tensor", "carry": True}},
                "nodes": {"s": {"type": "ex.step", "inputs": {"x": {"input": "x"}, "sigma": 1.0,
                                                                "sigma_next": 0.5}}},
                "outputs": {"x": L("s")},
            },
        },
        "p": {"type": "ex.probe", "inputs": {"x": L("lp", "x")}},
    },
    {"x": L("lp", "x"), "sum": L("sum"), "p": L("p")},
)


def test_synchronous_and_threaded_give_identical_results(reg):
    sync = make_engine(reg, max_workers=1).run(MIXED)
    sync_threads = {c["thread"] for c in ex.CALLS}
    ex.reset()
    threaded = make_engine(reg, max_workers=4).run(MIXED)
    assert sync.outputs.keys() == threaded.outputs.keys()
    for name in sync.outputs:
        assert torch.equal(sync.outputs[name], threaded.outputs[name]), name
    assert sorted(sync.report.executed) == sorted(threaded.report.executed)
    # max_workers=1 really is synchronous: every node ran on the calling thread.
    assert sync_threads == {threading.current_thread().name}


# -- gradient modes -------------------------------------------------------------------------------------------


def test_nodes_run_without_autograd_and_outputs_keep_version_counters(reg):
    # no_grad rather than inference_mode: cached tensors keep their version counters (the mutation guard).
    g = graph(
        {"t": {"type": "ex.tensor", "inputs": {"shape": [3], "value": 1.0}},
         "m": {"type": "ex.modes", "inputs": {"x": L("t")}}},
        {"t": L("t"), "inference": L("m", "inference"), "grad": L("m", "grad")},
    )
    res = make_engine(reg).run(g)
    assert res.outputs["inference"] is False
    assert res.outputs["grad"] is False
    assert not res.outputs["t"].is_inference() and not res.outputs["t"].requires_grad
    assert ex.CALLS[0]["inference"] is False


def test_grad_node_backprops_through_an_upstream_inference_tensor(reg):
    g = graph(
        {"t": {"type": "ex.tensor", "inputs": {"shape": [4], "seed": 3}},
         "g": {"type": "ex.grad_sq", "inputs": {"x": L("t")}},
         "after": {"type": "ex.modes", "inputs": {"x": L("g", "grad")}}},
        {"t": L("t"), "grad": L("g", "grad"), "after_inference": L("after", "inference")},
    )
    with torch.inference_mode():  # an API caller hands in an inference tensor made outside the engine
        given = torch.randn(4, generator=torch.Generator().manual_seed(3))
    res = make_engine(reg).run(g, overrides={"g.x": given})
    t, grad = given, res.outputs["grad"]
    assert t.is_inference()
    torch.testing.assert_close(grad, 2 * t)
    call = next(c for c in ex.CALLS if c["node"] == "g")
    assert call["inference"] is False and call["grad_enabled"] is True
    assert call["input_is_inference"] is False  # the executor cloned the inference tensor first
    # the node after it is back to running without autograd
    assert res.outputs["after_inference"] is False and not res.outputs["grad"].requires_grad


# -- structured errors and resumption -------------------------------------------------------------------------


def test_runtime_error_is_structured(reg):
    ex.STATE["broken"] = True
    g = graph(
        {"t": {"type": "ex.tensor", "inputs": {"shape": [2, 3], "value": 1.0}},
         "f": {"type": "ex.fragile", "inputs": {"x": L("t"), "y": 42.0}}},
        {"f": L("f")},
    )
    with pytest.raises(NodeExecutionError) as info:
        make_engine(reg).run(g)
    err = info.value
    assert err.node == "f"
    assert err.node_type == "ex.fragile"
    assert isinstance(err.error, ValueError) and "boom 42.0" in str(err.error)
    assert err.__cause__ is err.error
    assert err.inputs == {"x": "Tensor(float32, [2, 3], cpu)", "y": "42.0"}
    text = str(err)
    assert "'f'" in text and "ex.fragile" in text and "ValueError" in text and "[2, 3]" in text
    payload = json.loads(json.dumps(err.to_json()))
    assert payload["code"] == "node_failed" and payload["node"] == "f" and payload["exception"] == "ValueError"


def test_error_inside_a_loop_body_names_the_body_node(reg):
    ex.STATE["broken"] = True
    g = graph(
        {"lp": {
            "type": "loop",
            "inputs": {"count": 3, "x": 1.0},
            "body": {"inputs": {"x": {"type": "Float", "carry": True}},
                     "nodes": {"f": {"type": "ex.fragile", "inputs": {"x": {"input": "x"}, "y": 7.0}}},
                     "outputs": {"x": L("f")}}}},
        {"x": L("lp", "x")},
    )
    with pytest.raises(NodeExecutionError) as info:
        make_engine(reg).run(g)
    assert info.value.node == "lp/f"
    assert info.value.node_type == "ex.fragile"
    assert info.value.inputs == {"x": "1.0", "y": "7.0"}


RESUME = graph(
    {
        "a": {"type": "ex.num", "inputs": {"value": 1.0}},
        "a_side": {"type": "ex.num", "inputs": {"value": 2.0}},
        "b_fail": {"type": "ex.fragile", "inputs": {"x": L("a"), "y": 1.0}},
        "c": {"type": "ex.add", "inputs": {"a": L("b_fail"), "b": 10.0}},
    },
    {"c": L("c"), "side": L("a_side")},
)


@pytest.mark.parametrize("workers", [1, 4])
def test_rerun_after_a_failure_runs_only_the_failed_node_and_descendants(reg, workers):
    eng = make_engine(reg, max_workers=workers)
    ex.STATE["broken"] = True
    with pytest.raises(NodeExecutionError) as info:
        eng.run(RESUME)
    assert info.value.node == "b_fail"
    assert "c" not in ex.called()
    assert {"a", "a_side"} <= set(ex.called())
    ex.reset()  # "fix the bug"
    res = eng.run(RESUME)
    assert res.outputs == {"c": 12.0, "side": 2.0}
    assert sorted(ex.called()) == ["b_fail", "c"]
    assert sorted(res.report.executed) == ["b_fail", "c"]
    assert sorted(res.report.cached) == ["a", "a_side"]


# -- cancellation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
def test_cancel_between_nodes(reg, workers):
    token = CancelToken()
    ex.STATE["token"] = token
    g = graph(
        {"c": {"type": "ex.cancel", "inputs": {"x": 1.0}},
         "d": {"type": "ex.add", "inputs": {"a": L("c"), "b": 1.0}},
         "e": {"type": "ex.add", "inputs": {"a": L("d"), "b": 1.0}}},
        {"e": L("e")},
    )
    eng = make_engine(reg, max_workers=workers)
    kinds = []
    with pytest.raises(Cancelled):
        eng.run(g, cancel=token, on_event=lambda e: kinds.append(e.kind))
    assert ex.called() == ["c"]
    assert "cancelled" in kinds
    # what finished before the cancel is kept: the rerun resumes after 'c'
    ex.reset()
    res = eng.run(g, cancel=CancelToken())
    assert res.outputs == {"e": 3.0}
    assert sorted(res.report.executed) == ["d", "e"]


def test_cancel_between_loop_iterations(reg):
    token = CancelToken()
    ex.STATE["token"] = token
    g = graph(
        {"lp": {
            "type": "loop",
            "inputs": {"count": 10, "x": 0.0},
            "body": {"inputs": {"x": {"type": "Float", "carry": True}},
                     "nodes": {"s": {"type": "ex.cancel_at", "inputs": {"x": {"input": "x"}, "index": {"input": "index"},
                                                                         "at": 3}}},
                     "outputs": {"x": L("s")}}},
         "after": {"type": "ex.add", "inputs": {"a": L("lp", "x"), "b": 1.0}}},
        {"after": L("after")},
    )
    with pytest.raises(Cancelled):
        make_engine(reg).run(g, cancel=token)
    assert [c["index"] for c in ex.CALLS if c.get("kind") == "iteration"] == [0, 1, 2, 3]
    assert "after" not in ex.called()


def test_an_uncancelled_token_changes_nothing(reg):
    res = make_engine(reg).run(TWO_BRANCHES, cancel=CancelToken())
    assert res.outputs == {"b": 2.0, "d": 6.0}


# -- events ---------------------------------------------------------------------------------------------------


EVENTFUL = graph(
    {
        "a": {"type": "ex.num", "inputs": {"value": 1.0}},
        "lp": {"type": "loop", "inputs": {"count": 3, "x": L("a")},
               "body": {"inputs": {"x": {"type": "Float", "carry": True}},
                        "nodes": {"s": {"type": "ex.shift", "inputs": {"x": {"input": "x"}}}},
                        "outputs": {"x": L("s")}}},
        "out": {"type": "ex.add", "inputs": {"a": L("lp", "x"), "b": 0.5}},
    },
    {"out": L("out")},
)


def test_events_reach_subscribers_and_a_raising_subscriber_is_harmless(reg):
    eng = make_engine(reg)
    raised = []

    def broken(event):
        raised.append(event.kind)
        raise RuntimeError("subscriber bug")

    eng.subscribe(broken)
    events = []
    res = eng.run(EVENTFUL, on_event=events.append)
    assert res.outputs == {"out": 4.5}
    assert raised  # the broken subscriber was called, and raised, on every event
    kinds = [e.kind for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert events[-1].data["ok"] is True
    started = [e.node for e in events if e.kind == "started"]
    finished = [e.node for e in events if e.kind == "finished"]
    assert sorted(started) == sorted(finished) == ["a", "lp", "out"]
    position = {(e.kind, e.node): i for i, e in enumerate(events)}
    for node in started:
        assert position[("started", node)] < position[("finished", node)]
    assert position[("finished", "a")] < position[("started", "lp")] < position[("finished", "lp")]
    progress = [(e.node, e.data["done"], e.data["total"]) for e in events if e.kind == "progress"]
    assert progress == [("lp", 1, 3), ("lp", 2, 3), ("lp", 3, 3)]
    assert all("seconds" in e.data for e in events if e.kind == "finished")
    assert len(raised) == len(events)

    events.clear()
    eng.run(EVENTFUL, on_event=events.append)
    cached = [(e.node, e.data["tier"]) for e in events if e.kind == "cached"]
    assert cached == [("out", "memory")]
    assert not [e for e in events if e.kind == "started"]


def test_failed_event_names_the_node(reg):
    ex.STATE["broken"] = True
    events = []
    with pytest.raises(NodeExecutionError):
        make_engine(reg).run(RESUME, on_event=events.append)
    failed = [e for e in events if e.kind == "failed"]
    assert [e.node for e in failed] == ["b_fail"]
    assert "boom" in failed[0].data["error"]
    assert events[-1].kind == "run_finished" and events[-1].data["ok"] is False


def test_on_event_subscriber_is_removed_after_the_run(reg):
    eng = make_engine(reg)
    events = []
    eng.run(TWO_BRANCHES, on_event=events.append)
    n = len(events)
    assert n > 0
    eng.run(TWO_BRANCHES)
    assert len(events) == n


def test_unsubscribe(reg):
    eng = make_engine(reg)
    events = []
    unsubscribe = eng.subscribe(events.append)
    eng.run(TWO_BRANCHES, outputs=["b"])
    n = len(events)
    assert n > 0
    unsubscribe()
    eng.run(TWO_BRANCHES)
    assert len(events) == n
