"""The loop construct: sequences, counts, pairs, carried state, stacked outputs, nesting, graph-defined nodes,
planning once, agreement with a plain Python loop, and gradient loops."""

from __future__ import annotations

import pytest
import torch

import nodegraph
import nodegraph.loop
from nodegraph import Engine, NodeExecutionError

from . import exec_nodes as ex


def L(node: str, output: str = "out") -> dict:
    return {"node": node, "output": output}


def I(name: str) -> dict:  # noqa: E743 - a body-input reference
    return {"input": name}


def graph(nodes: dict, outputs: dict) -> dict:
    return {"version": 1, "nodes": nodes, "outputs": outputs}


def loop(inputs: dict, body_inputs: dict, body_nodes: dict, body_outputs: dict) -> dict:
    return {"type": "loop", "inputs": inputs,
            "body": {"inputs": body_inputs, "nodes": body_nodes, "outputs": body_outputs}}


@pytest.fixture
def eng() -> Engine:
    return Engine(ex.registry(), device="cpu")


SHIFT_BODY = {"s": {"type": "ex.shift", "inputs": {"x": I("x"), "k": I("index")}}}


# -- iteration sources ----------------------------------------------------------------------------------------


def test_over_a_literal_sequence_with_optional_carry_starting_as_none(eng):
    g = graph(
        {"lp": loop({"over": [1.5, 2.5, 3.5]},
                    {"acc": {"type": "Any", "carry": True, "optional": True}},
                    {"ap": {"type": "ex.append", "inputs": {"value": I("item"), "acc": I("acc")}}},
                    {"acc": L("ap")})},
        {"acc": L("lp", "acc")},
    )
    res = eng.run(g)
    assert res.outputs["acc"] == [1.5, 2.5, 3.5]
    assert [c["acc_was_none"] for c in ex.CALLS if c.get("kind") == "append"] == [True, False, False]


def test_over_a_linked_tensor_yields_its_rows(eng):
    g = graph(
        {"seq": {"type": "ex.tensor", "inputs": {"shape": [5, 2], "seed": 4}},
         "lp": loop({"over": L("seq"), "n": 0.0},
                    {"n": {"type": "Float", "carry": True}},
                    {"s": {"type": "ex.shift", "inputs": {"x": I("n"), "k": 1.0}}},
                    {"n": L("s"), "rows": I("item"), "idx": I("index"), "tot": I("total")})},
        {"seq": L("seq"), "n": L("lp", "n"), "rows": L("lp", "rows"), "idx": L("lp", "idx"), "tot": L("lp", "tot")},
    )
    res = eng.run(g)
    assert res.outputs["n"] == 5.0
    assert torch.equal(res.outputs["rows"], res.outputs["seq"])  # stacked back to (5, 2)
    assert res.outputs["idx"] == [0, 1, 2, 3, 4]
    assert res.outputs["tot"] == [5] * 5


def test_over_a_count(eng):
    g = graph({"lp": loop({"count": 5, "x": 0.0}, {"x": {"type": "Float", "carry": True}}, SHIFT_BODY,
                          {"x": L("s")})},
              {"x": L("lp", "x")})
    assert eng.run(g).outputs["x"] == 0 + 1 + 2 + 3 + 4


def test_count_from_a_link(eng):
    g = graph({"n": {"type": "ex.num", "inputs": {"value": 1.0}},
               "c": {"type": "ex.add", "inputs": {"a": L("n"), "b": 3.0}},
               "lp": loop({"count": 4, "x": L("n")}, {"x": {"type": "Float", "carry": True}},
                          {"s": {"type": "ex.shift", "inputs": {"x": I("x"), "k": 10.0}}}, {"x": L("s")})},
              {"x": L("lp", "x")})
    assert eng.run(g).outputs["x"] == 41.0


def test_zero_iterations_return_the_initial_carry(eng):
    g = graph({"lp": loop({"count": 0, "x": 7.0}, {"x": {"type": "Float", "carry": True}}, SHIFT_BODY,
                          {"x": L("s")})},
              {"x": L("lp", "x")})
    assert eng.run(g).outputs["x"] == 7.0


def test_pairs_gives_item_and_next_item_for_len_minus_one_iterations(eng):
    g = graph(
        {"lp": loop({"over": [10.0, 20.0, 30.0, 40.0], "pairs": True, "n": 0.0},
                    {"n": {"type": "Float", "carry": True}},
                    {"s": {"type": "ex.shift", "inputs": {"x": I("n"), "k": 1.0}}},
                    {"n": L("s"), "a": I("item"), "b": I("next_item"), "tot": I("total")})},
        {"n": L("lp", "n"), "a": L("lp", "a"), "b": L("lp", "b"), "tot": L("lp", "tot")},
    )
    res = eng.run(g)
    assert res.outputs["n"] == 3.0
    assert res.outputs["a"] == [10.0, 20.0, 30.0]
    assert res.outputs["b"] == [20.0, 30.0, 40.0]
    assert res.outputs["tot"] == [3, 3, 3]


def test_pairs_over_a_tensor(eng):
    g = graph(
        {"sig": {"type": "ex.linspace", "inputs": {"start": 1.0, "stop": 0.0, "count": 6}},
         "lp": loop({"over": L("sig"), "pairs": True, "n": 0.0}, {"n": {"type": "Float", "carry": True}},
                    {"s": {"type": "ex.shift", "inputs": {"x": I("n"), "k": 1.0}}},
                    {"n": L("s"), "a": I("item"), "b": I("next_item")})},
        {"sig": L("sig"), "a": L("lp", "a"), "b": L("lp", "b")},
    )
    res = eng.run(g)
    sig = res.outputs["sig"]
    assert torch.equal(res.outputs["a"], sig[:-1])
    assert torch.equal(res.outputs["b"], sig[1:])


# -- carried state and stacked outputs ------------------------------------------------------------------------


def _stacked(with_consumer: bool) -> dict:
    nodes = {
        "x0": {"type": "ex.tensor", "inputs": {"shape": [3], "value": 1.0}},
        "lp": loop({"count": 4, "x": L("x0")}, {"x": {"type": "Tensor", "carry": True}},
                   {"s": {"type": "ex.scale", "inputs": {"x": I("x"), "factor": 0.5}},
                    "p": {"type": "ex.probe", "inputs": {"x": L("s")}}},
                   {"x": L("s"), "trace": L("p")}),
    }
    outputs = {"x": L("lp", "x"), "trace": L("lp", "trace")}
    if with_consumer:
        nodes["use_trace"] = {"type": "ex.scale", "inputs": {"x": L("lp", "trace"), "factor": 2.0}}
        outputs["doubled"] = L("use_trace")
    return graph(nodes, outputs)


def test_stacked_outputs_are_not_collected_when_nothing_consumes_them(eng):
    res = eng.run(_stacked(False), outputs=["x"])
    assert torch.equal(res.outputs["x"], torch.full((3,), 1 / 16))
    assert ex.called("probe") == []  # the body node only the trace needs was pruned
    value, _ = eng.cache.get(res.plan.steps["lp"].key)
    assert set(value) == {"x"}


def test_stacked_outputs_are_not_collected_for_a_consumer_this_run_prunes(eng):
    # 'use_trace' consumes the trace, but only output 'x' is requested, so 'use_trace' does not run and
    # nothing in this run consumes the trace: its body node should be pruned as well.
    res = eng.run(_stacked(True), outputs=["x"])
    assert "use_trace" not in res.report.executed
    assert ex.called("probe") == []


def test_stacked_outputs_when_consumed(eng):
    g = _stacked(True)
    eng.run(_stacked(False), outputs=["x"])
    ex.reset()
    res = eng.run(g, outputs=["trace"])  # the cached entry lacks 'trace': the loop runs again
    assert res.report.executed == ["lp"]
    assert len(ex.called("probe")) == 4
    torch.testing.assert_close(res.outputs["trace"], torch.tensor([1.5, 0.75, 0.375, 0.1875]))
    ex.reset()
    res = eng.run(g, outputs=["doubled"])  # consumed by a downstream node
    torch.testing.assert_close(res.outputs["doubled"], torch.tensor([3.0, 1.5, 0.75, 0.375]))


def test_carried_state_with_a_non_carried_constant_input(eng):
    g = graph(
        {"k": {"type": "ex.num", "inputs": {"value": 0.25}},
         "lp": loop({"count": 8, "x": 0.0, "k": L("k")},
                    {"x": {"type": "Float", "carry": True}, "k": {"type": "Float"}},
                    {"s": {"type": "ex.shift", "inputs": {"x": I("x"), "k": I("k")}}}, {"x": L("s")})},
        {"x": L("lp", "x")},
    )
    assert eng.run(g).outputs["x"] == 2.0


def test_nested_loops(eng):
    inner = loop({"count": 4, "x": I("x"), "k": I("index")},
                 {"x": {"type": "Float", "carry": True}, "k": {"type": "Int"}},
                 {"s1": {"type": "ex.shift", "inputs": {"x": I("x"), "k": I("k")}},
                  "s2": {"type": "ex.shift", "inputs": {"x": L("s1"), "k": I("index")}}},
                 {"x": L("s2")})
    g = graph({"outer": loop({"count": 3, "x": 0.0}, {"x": {"type": "Float", "carry": True}},
                             {"inner": inner}, {"x": L("inner", "x")})},
              {"x": L("outer", "x")})
    # sum over outer i < 3 and inner j < 4 of (i + j)
    assert eng.run(g).outputs["x"] == sum(i + j for i in range(3) for j in range(4))


# -- graph-defined node types ---------------------------------------------------------------------------------


def test_graph_defined_node_type_containing_a_loop(eng):
    assert eng.registry.get("ex.repeat_shift").kind == "graph"
    g = graph({"a": {"type": "ex.num", "inputs": {"value": 1.0}},
               "r": {"type": "ex.repeat_shift", "inputs": {"x": L("a"), "n": 4}},
               "r_default": {"type": "ex.repeat_shift", "inputs": {"x": L("a")}},
               "r_k": {"type": "ex.repeat_shift", "inputs": {"x": L("r", "x"), "n": 2, "k": -0.5}}},
              {"r": L("r", "x"), "r_default": L("r_default", "x"), "r_k": L("r_k", "x")})
    res = eng.run(g)
    assert res.outputs == {"r": 9.0, "r_default": 7.0, "r_k": 8.0}
    assert {"r/lp", "r_default/lp", "r_k/lp"} <= set(res.plan.steps)


def test_graph_defined_node_added_through_the_api():
    reg = ex.registry()
    reg.add_graph_node({
        "type": "ex.twice_scaled",
        "inputs": {"x": {"type": "Tensor"}, "f": {"type": "Float", "default": 3.0}},
        "nodes": {"a": {"type": "ex.scale", "inputs": {"x": I("x"), "factor": I("f")}},
                  "b": {"type": "ex.scale", "inputs": {"x": L("a"), "factor": I("f")}}},
        "outputs": {"y": L("b")},
    }, pack="test")
    g = graph({"t": {"type": "ex.tensor", "inputs": {"shape": [2], "value": 1.0}},
               "w": {"type": "ex.twice_scaled", "inputs": {"x": L("t")}}},
              {"y": L("w", "y")})
    res = Engine(reg, device="cpu").run(g)
    assert torch.equal(res.outputs["y"], torch.full((2,), 9.0))


# -- planned once ---------------------------------------------------------------------------------------------


def test_body_is_planned_once_for_a_hundred_iterations(eng, monkeypatch):
    calls = []
    real = nodegraph.loop.compile_body

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nodegraph.loop, "compile_body", spy)
    g = graph({"lp": loop({"count": 100, "x": 0.0}, {"x": {"type": "Float", "carry": True}},
                          {"s": {"type": "ex.shift", "inputs": {"x": I("x"), "k": 1.0}}}, {"x": L("s")})},
              {"x": L("lp", "x")})
    assert eng.run(g).outputs["x"] == 100.0
    assert len(calls) == 1


# -- agreement with plain Python ------------------------------------------------------------------------------


def test_graph_loop_is_bit_identical_to_a_python_for_loop(eng):
    g = graph(
        {"noise": {"type": "ex.tensor", "inputs": {"shape": [2, 4, 8, 8], "seed": 11}},
         "sigmas": {"type": "ex.linspace", "inputs": {"start": 14.6, "stop": 0.0, "count": 25}},
         "sample": loop({"over": L("sigmas"), "pairs": True, "x": L("noise")},
                        {"x": {"type": "Tensor", "carry": True}},
                        {"step": {"type": "ex.step", "inputs": {"x": I("x"), "sigma": I("item"),
                                                                "sigma_next": I("next_item")}}},
                        {"x": L("step")})},
        {"x": L("sample", "x")},
    )
    out = eng.run(g).outputs["x"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(11))
    sigmas = torch.linspace(14.6, 0.0, 25)
    for i in range(len(sigmas) - 1):
        x = ex.reference_step(x, sigmas[i], sigmas[i + 1])
    assert torch.equal(out, x)
    assert not torch.equal(out, torch.randn(2, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(11)))


def _gd_graph(node_type: str, grad_option: bool | None, over: object = None) -> dict:
    opts: dict = {"count": 5} if over is None else {"over": over}
    if grad_option is not None:
        opts["grad"] = grad_option
    step_inputs = {"p": I("p"), "target": I("target"), "lr": 0.1}
    if over is not None:
        step_inputs["weight"] = I("item")
    return graph(
        {"p0": {"type": "ex.tensor", "inputs": {"shape": [3], "seed": 5}},
         "target": {"type": "ex.tensor", "inputs": {"shape": [3], "value": 2.0}},
         "w": {"type": "ex.linspace", "inputs": {"start": 1.0, "stop": 0.5, "count": 5}},
         "fit": loop({**opts, "p": L("p0"), "target": L("target")},
                     {"p": {"type": "Tensor", "carry": True}, "target": {"type": "Tensor"}},
                     {"s": {"type": node_type, "inputs": step_inputs}},
                     {"p": L("s")})},
        {"p": L("fit", "p")},
    )


def _gd_reference(weights=None) -> torch.Tensor:
    p = torch.randn(3, generator=torch.Generator("cpu").manual_seed(5))
    target = torch.full((3,), 2.0)
    for w in (weights if weights is not None else [1.0] * 5):
        p = ex.gd_step(p, target, 0.1, w)
    return p


@pytest.mark.parametrize("node_type,grad_option", [("ex.gd_step", True), ("ex.gd_step_grad", None)])
def test_gradient_descent_inside_a_grad_loop_matches_python(eng, node_type, grad_option):
    out = eng.run(_gd_graph(node_type, grad_option)).outputs["p"]
    ref = _gd_reference()
    assert torch.equal(out, ref)
    # and it really moved towards the target
    p0 = torch.randn(3, generator=torch.Generator("cpu").manual_seed(5))
    assert (out - 2.0).abs().sum() < (p0 - 2.0).abs().sum()


def test_grad_loop_over_an_upstream_inference_tensor(eng):
    out = eng.run(_gd_graph("ex.gd_step", True, over=L("w"))).outputs["p"]
    assert torch.equal(out, _gd_reference(torch.linspace(1.0, 0.5, 5)))


def test_without_grad_the_same_loop_fails_under_inference_mode(eng):
    with pytest.raises(NodeExecutionError) as info:
        eng.run(_gd_graph("ex.gd_step", None))
    assert info.value.node == "fit/s"


def test_loop_grad_mode_is_visible_to_body_nodes(eng):
    def g(grad: bool) -> dict:
        return graph({"lp": loop({"count": 1, "grad": grad, "x": 0.0}, {"x": {"type": "Float", "carry": True}},
                                 {"s": {"type": "ex.shift", "inputs": {"x": I("x")}},
                                  "m": {"type": "ex.modes", "inputs": {"x": L("s")}}},
                                 {"x": L("s"), "inference": L("m", "inference"), "grad": L("m", "grad")})},
                     {"inference": L("lp", "inference"), "grad": L("lp", "grad")})

    assert eng.run(g(True)).outputs == {"inference": [False], "grad": [True]}
    assert eng.run(g(False)).outputs == {"inference": [True], "grad": [False]}  # bodies run under inference_mode
