"""Engine overhead benchmark: prints a table.

1. Executor dispatch overhead per node on no-op nodes (a chain and a wide fan-out; synchronous and threaded).
2. Loop overhead: N iterations of a small torch step through the loop construct vs a plain Python ``for``.
3. Partial re-execution: after changing one downstream literal, which nodes execute.

Run: ``python benchmarks/engine_overhead.py [--iterations 1000] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _table import print_table

from nodegraph import Engine, Registry, node
from nodegraph import types as T


@node("bench.noop", output="out")
def noop(x: T.Any = None) -> T.Any:
    """Return the input unchanged."""
    return x


@node("bench.step", output="out")
def step(x: T.Tensor, weight: T.Tensor, rate: float = 0.05) -> T.Tensor:
    """One small torch step: x <- x - rate * tanh(conv3x3(x))."""
    return x - rate * torch.tanh(torch.nn.functional.conv2d(x, weight, padding=1))


@node("bench.add", output="out")
def add(x: float, k: int = 0) -> float:
    """x + k."""
    return x + k


@node("bench.tensor", output="out")
def make(seed: int = 0, channels: int = 4, size: int = 32) -> T.Tensor:
    """Seeded input tensor (1, C, S, S)."""
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


@node("bench.weight", output="out")
def weight(seed: int = 1, channels: int = 4) -> T.Tensor:
    """Seeded 3x3 conv weight."""
    return torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.1


def registry() -> Registry:
    reg = Registry()
    reg.add([fn.__node_def__ for fn in (noop, add, step, make, weight)], "bench")
    return reg


def chain_graph(n: int) -> dict:
    nodes = {"n0": {"type": "bench.noop", "inputs": {"x": 0}}}
    for i in range(1, n):
        nodes[f"n{i}"] = {"type": "bench.noop", "inputs": {"x": {"node": f"n{i - 1}", "output": "out"}}}
    return {"version": 1, "nodes": nodes, "outputs": {"out": {"node": f"n{n - 1}", "output": "out"}}}


def wide_graph(n: int) -> dict:
    nodes = {f"n{i}": {"type": "bench.noop", "inputs": {"x": i}} for i in range(n)}
    return {"version": 1, "nodes": nodes, "outputs": {f"o{i}": {"node": f"n{i}", "output": "out"} for i in range(n)}}


def loop_graph(iterations: int, channels: int, size: int) -> dict:
    return {
        "version": 1,
        "nodes": {
            "x": {"type": "bench.tensor", "inputs": {"channels": channels, "size": size}},
            "w": {"type": "bench.weight", "inputs": {"channels": channels}},
            "loop": {
                "type": "loop",
                "inputs": {"count": iterations, "x": {"node": "x", "output": "out"}, "w": {"node": "w", "output": "out"}},
                "body": {
                    "inputs": {"x": {"type": "Tensor", "carry": True}, "w": {"type": "Tensor"}},
                    "nodes": {"s": {"type": "bench.step", "inputs": {"x": {"input": "x"}, "weight": {"input": "w"}}}},
                    "outputs": {"x": {"node": "s", "output": "out"}},
                },
            },
        },
        "outputs": {"x": {"node": "loop", "output": "x"}},
    }


def timed_run(engine: Engine, graph: dict, **kw) -> float:
    engine.cache.memory.clear()
    t0 = time.perf_counter()
    engine.run(graph, **kw)
    return time.perf_counter() - t0


def timed_exec(engine: Engine, plan) -> float:
    """Execution alone: the plan is made once, the memory cache cleared before each run."""
    engine.cache.memory.clear()
    t0 = time.perf_counter()
    engine.executor.run(plan, list(plan.outputs))
    return time.perf_counter() - t0


def bench_dispatch(reg: Registry, n: int, repeats: int) -> list[tuple[str, str]]:
    rows = []
    for label, graph in (("chain", chain_graph(n)), ("wide", wide_graph(n))):
        for workers in (1, 4):
            engine = Engine(reg, device="cpu", max_workers=workers)
            plan, _ = engine.plan(graph)  # also warms up imports / pydantic
            timed_exec(engine, plan)
            # Planning (validation + keys) and execution timed separately, each the minimum of the repeats
            # (the least disturbed run: on a shared machine the median still carries other processes' noise).
            plan_t = min(_time(lambda: engine.plan(graph)) for _ in range(repeats))
            exec_t = min(timed_exec(engine, plan) for _ in range(repeats))
            rows.append((f"dispatch {label} x{n}, workers={workers}",
                         f"{exec_t / n * 1e6:.1f} us/node exec, {plan_t / n * 1e6:.1f} us/node plan"))
    return rows


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_loop(reg: Registry, iterations: int, repeats: int, channels: int, size: int) -> tuple[str, str]:
    engine = Engine(reg, device="cpu", max_workers=1)
    graph = loop_graph(iterations, channels, size)
    x0 = make(0, channels, size)
    w = weight(1, channels)

    def plain() -> torch.Tensor:
        with torch.inference_mode():
            x = x0
            for _ in range(iterations):
                x = step(x, w)
            return x

    ref = plain()
    got = engine.run(graph).outputs["x"]
    assert torch.equal(ref, got), "graph loop and plain loop disagree"
    # Interleave the two so that machine noise hits both alike; time only the loop node, not its inputs.
    plain_times, graph_times = [], []
    for _ in range(repeats):
        plain_times.append(_time(plain))
        engine.cache.memory.clear()
        result = engine.run(graph)
        graph_times.append(result.report.seconds["loop"])
    p, g = statistics.median(plain_times), statistics.median(graph_times)
    label = f"loop {iterations} it, conv3x3 on (1,{channels},{size},{size})"
    return label, f"plain {p / iterations * 1e6:.1f} us/it, graph {g / iterations * 1e6:.1f} us/it, ratio {g / p:.3f}x"


def bench_partial(reg: Registry, n: int = 10, change_at: int = 6) -> tuple[str, str]:
    """A chain n0 -> ... -> n9 where every node adds its own literal; change the literal of one node."""
    nodes = {"n0": {"type": "bench.add", "inputs": {"x": 0, "k": 0}}}
    for i in range(1, n):
        nodes[f"n{i}"] = {"type": "bench.add", "inputs": {"x": {"node": f"n{i - 1}", "output": "out"}, "k": i}}
    nodes["side"] = {"type": "bench.add", "inputs": {"x": {"node": "n2", "output": "out"}, "k": 100}}
    graph = {"version": 1, "nodes": nodes, "outputs": {"end": {"node": f"n{n - 1}", "output": "out"},
                                                       "side": {"node": "side", "output": "out"}}}
    engine = Engine(reg, device="cpu")
    first = engine.run(graph)
    again = engine.run(graph, overrides={f"n{change_at}.k": 42})
    expected = [f"n{i}" for i in range(change_at, n)]
    ok = sorted(again.report.executed) == sorted(expected)
    return (f"partial re-exec: chain of {n} + side branch, change n{change_at}.k",
            f"first run {len(first.report.executed)} executed; after change executed {again.report.executed} "
            f"({'only the node and its descendants' if ok else 'UNEXPECTED'})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reg = registry()
    rows = bench_dispatch(reg, args.nodes, args.repeats)
    for channels, size in ((4, 16), (4, 32), (8, 64)):
        rows.append(bench_loop(reg, args.iterations, args.repeats, channels, size))
    rows.append(bench_partial(reg))
    print_table(rows, f"torch {torch.__version__}, threads={torch.get_num_threads()}, python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
