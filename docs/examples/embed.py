"""Embedding example (docs/embedding.md). Run from the repository root:

    .venv/bin/python docs/examples/embed.py
"""

import tempfile
from collections import Counter

from nodegraph import CancelToken, Cancelled, Engine, GraphValidationError, NodeExecutionError

GRAPH = "graphs/noisy_gradient.json"

with tempfile.TemporaryDirectory() as tmp:
    engine = Engine(device="cpu", cache_dir=f"{tmp}/cache", output_root=f"{tmp}/out",
                    plugin_dirs=["docs/examples/hello_pack"], max_workers=2)

    # 1. Validate without running anything.
    check = engine.validate(GRAPH, overrides={"noise.seed": -3, "nois.scale": 1.0})
    print("ok:", check.ok)
    for issue in check.issues:
        print(" ", issue)

    # 2. Run, watching events.
    kinds = Counter()
    unsubscribe = engine.subscribe(lambda ev: kinds.update([ev.kind]))
    result = engine.run(GRAPH, overrides={"noise.seed": 3}, outputs=["noise_std"])
    print("noise_std =", round(result.outputs["noise_std"], 4), "type", result.output_types["noise_std"])
    print("executed", result.report.executed, "cached", result.report.cached)
    print("events", dict(sorted(kinds.items())))
    unsubscribe()

    # 3. Same graph again, asking for both outputs: what was computed before comes from the cache.
    result = engine.run(GRAPH, overrides={"noise.seed": 3})
    print("image", tuple(result.outputs["image"].shape), "executed", result.report.executed,
          "cached", result.report.cached)
    print("memory cache:", len(engine.cache.memory), "entries,", engine.cache.memory.bytes_used, "bytes")

    # 4. Errors are data.
    try:
        engine.run(GRAPH, overrides={"damp.count": "eight"})
    except GraphValidationError as exc:
        print("invalid:", [(i.code, i.node, i.port) for i in exc.issues])
    try:
        engine.run(GRAPH, overrides={"noise.shape": [1, 3, -1, 64]})
    except NodeExecutionError as exc:
        print("failed:", exc.node, exc.node_type, type(exc.error).__name__, exc.inputs["shape"])

    # 5. Cancel from another thread (here: from an event subscriber) while the loop runs.
    token = CancelToken()

    def stop_early(ev):
        if ev.kind == "progress" and ev.node == "damp" and ev.data["done"] == 3:
            token.cancel()

    try:
        engine.run(GRAPH, overrides={"noise.seed": 4}, cancel=token, on_event=stop_early)
    except Cancelled as exc:
        print("cancelled:", exc)

    # 6. Graph-defined node from the plugin folder, from a dict instead of a file.
    graph = {
        "nodes": {
            "board": {"type": "hello.checker", "inputs": {"size": 16, "cells": 2}},
            "bright": {"type": "hello.brighten", "inputs": {"image": {"node": "board", "output": "image"}}},
            "m": {"type": "hello.moments", "inputs": {"x": {"node": "bright", "output": "image"}}},
        },
        "outputs": {"energy": {"node": "m", "output": "energy"}},
    }
    plan, _ = engine.plan(graph)
    print("steps", list(plan.steps), "key", plan.steps["m"].key[:16])
    print("energy", round(engine.run(graph).outputs["energy"], 4))
