"""Node metadata for the engine's validation hooks: ``cost`` (what running would allocate, from literals) and
``requires`` (optional modules), on the built-in nodes that declare them."""

from __future__ import annotations

import math

import pytest

from nodegraph import Engine
from nodegraph.engine import default_registry


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def cost(registry, type_id: str, **literals) -> dict[str, int]:
    defn = registry.get(type_id)
    defaults = {name: port.default for name, port in defn.inputs.items() if not port.required}
    return dict(defn.cost({**defaults, **literals}))


def test_allocation_that_follows_from_literals_is_declared(registry) -> None:
    assert cost(registry, "tensor.randn", seed=0, shape=[2, 4, 64, 64]) == {"elements": 2 * 4 * 64 * 64}
    assert cost(registry, "tensor.full", shape=[3, 5]) == {"elements": 15}
    assert cost(registry, "image.gradient", width=640, height=480) == {"pixels": 640 * 480, "elements": 3 * 640 * 480}
    assert cost(registry, "image.resize", width=512, height=256) == {"pixels": 512 * 256}
    assert cost(registry, "image.crop", x=0, y=0, width=16, height=8) == {"pixels": 128}
    assert cost(registry, "field.voxel_blob", resolution=32) == {"elements": 4 * 32**3}
    assert cost(registry, "render.volume", width=64, height=32, samples=16) == {"pixels": 2048,
                                                                                  "elements": 3 * 2048 * 16}
    assert cost(registry, "render.preview", views=8, size=32, samples=16) == {"pixels": 9 * 32 * 32,
                                                                                "elements": 3 * 32 * 32 * 16}
    assert cost(registry, "shapes.generate", count=10) == {"pixels": 64 * 64, "elements": 10 * 3 * 64 * 64}


def test_a_linked_literal_makes_the_cost_unknown(registry) -> None:
    """The validator treats a KeyError as "unknown until running"."""
    with pytest.raises(KeyError):
        registry.get("tensor.randn").cost({"seed": 0})
    with pytest.raises(KeyError):  # render.preview's cameras linked: the view count is unknown
        registry.get("render.preview").cost({"views": 8, "size": 32, "samples": 16, "columns": 0})


def test_optional_modules_are_declared(registry) -> None:
    assert registry.get("mesh.save").requires == ("open3d",)
    assert registry.get("mesh.marching_cubes").requires == ("skimage",)
    assert registry.get("checkpoint.load").requires == ("diffusers", "transformers", "tokenizers")
    unexpected = {d.type_id: d.requires for d in registry if d.pack == "builtin" and d.requires
                  and d.type_id not in ("mesh.save", "mesh.marching_cubes") and not d.type_id.startswith("checkpoint.")}
    checkpoint = {d.type_id: d.requires for d in registry if d.type_id.startswith("checkpoint.")}
    assert checkpoint and all(set(r) <= {"diffusers", "transformers", "tokenizers"} and r for r in checkpoint.values())
    assert not unexpected


def test_validation_refuses_a_graph_whose_literals_ask_for_too_much() -> None:
    engine = Engine(device="cpu")
    side = 8192  # 67 M pixels, over the default max_pixels
    big = {"version": 1, "nodes": {"g": {"type": "image.gradient", "inputs": {"width": side, "height": side}}},
           "outputs": {"image": {"node": "g", "output": "image"}}}
    issues = engine.validate(big).issues
    assert [i.code for i in issues] == ["too_large"] and issues[0].node == "g"
    fine = {**big, "nodes": {"g": {"type": "image.gradient", "inputs": {"width": 64, "height": 64}}}}
    assert engine.validate(fine).ok
    elements = engine.limits.max_tensor_elements if hasattr(engine, "limits") else 1 << 28
    side = math.isqrt(elements) + 1
    noise = {"version": 1, "nodes": {"n": {"type": "tensor.randn", "inputs": {"seed": 0, "shape": [side, side]}}},
             "outputs": {"x": {"node": "n", "output": "out"}}}
    assert [i.code for i in engine.validate(noise).issues] == ["too_large"]
