"""Schedule nodes produce the sigma sequences diffusers' schedulers use, through the engine."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from nodegraph import Engine  # noqa: E402


def run_node(node_type: str, **inputs):
    engine = Engine(device="cpu", max_workers=1)
    graph = {"version": 1, "nodes": {"s": {"type": node_type, "inputs": inputs}},
             "outputs": {"sigmas": {"node": "s", "output": "sigmas"}}}
    return engine.run(graph).outputs["sigmas"]


@pytest.mark.parametrize("betas,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                             ("cosine", 0.0001, 0.02)])
@pytest.mark.parametrize("karras", [False, True])
def test_betas_node_matches_euler_discrete(betas, start, end, karras):
    name = "squaredcos_cap_v2" if betas == "cosine" else betas
    ref = diffusers.EulerDiscreteScheduler(beta_schedule=name, beta_start=start, beta_end=end,
                                           use_karras_sigmas=karras)
    ref.set_timesteps(23)
    got = run_node("schedule.betas", betas=betas, steps=23, scheduler="euler", beta_start=start, beta_end=end,
                   spread="karras" if karras else "uniform")
    assert got.shape == ref.sigmas.shape
    torch.testing.assert_close(got, ref.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_karras_node_matches_formula_and_ends_in_zero():
    got = run_node("schedule.karras", steps=10, sigma_min=0.1, sigma_max=10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 10)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(got[:-1], expected, rtol=1e-5, atol=1e-6)
    assert got[-1] == 0


def test_truncate_keeps_the_tail_for_img2img():
    full = run_node("schedule.karras", steps=10, sigma_min=0.1, sigma_max=10.0)
    engine = Engine(device="cpu")
    graph = {"version": 1, "nodes": {
        "s": {"type": "schedule.karras", "inputs": {"steps": 10, "sigma_min": 0.1, "sigma_max": 10.0}},
        "t": {"type": "schedule.truncate", "inputs": {"sigmas": {"node": "s", "output": "sigmas"}, "strength": 0.3}}},
        "outputs": {"sigmas": {"node": "t", "output": "sigmas"}}}
    got = engine.run(graph).outputs["sigmas"]
    assert torch.equal(got, full[-4:])  # 3 of 10 steps kept, plus the final 0


def test_bad_beta_range_is_a_runtime_error_naming_the_node():
    from nodegraph import NodeExecutionError

    with pytest.raises(NodeExecutionError) as info:
        run_node("schedule.betas", betas="linear", beta_start=0.02, beta_end=0.01)
    assert info.value.node == "s" and "beta_start" in str(info.value)
