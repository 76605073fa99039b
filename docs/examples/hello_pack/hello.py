"""hello: a small example node pack (see docs/node-packs.md).

Load it with ``nodegraph run docs/examples/hello.json --plugins docs/examples/hello_pack``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from nodegraph import Context, Field, node, types as T

# Graph-defined node types shipped with this module. They live in a subfolder: a *.json file directly in a
# plugin folder is registered on its own, and registering it here as well would be a duplicate type id.
GRAPH_NODES = ["graph_nodes/brighten.json"]


@node("hello.greet", version="1.0.0", category="hello", output="text")
def greet(name: Annotated[str, Field(min_length=1, max_length=40, description="who to greet")],
          punctuation: Literal["!", "?", "."] = "!",
          times: Annotated[int, Field(ge=1, le=5)] = 1) -> str:
    """A greeting, repeated `times` times."""
    return " ".join([f"Hello, {name}{punctuation}"] * times)


@node("hello.format", version="1.0.0", category="hello", output="text")
def format_text(template: str, values: dict = {}) -> str:
    """str.format(template, **values)."""
    return template.format(**values)


@node("hello.checker", version="1.1.0", category="hello", output="image")
def checker(ctx: Context,
            size: Annotated[int, Field(ge=2, le=4096, description="side in pixels")] = 64,
            cells: Annotated[int, Field(ge=1, le=64)] = 8,
            seed: Annotated[int, Field(ge=0)] = 0,
            jitter: Annotated[float, Field(ge=0, le=1)] = 0.0) -> T.Image:
    """A grey checkerboard (1, 3, size, size) in [0, 1], with optional seeded noise."""
    idx = torch.arange(size) * cells // size
    board = ((idx[:, None] + idx[None, :]) % 2).float()
    ctx.progress(1, 2, "board")
    # Randomness only from the explicit seed, drawn on CPU: the same numbers on every device.
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.rand(size, size, generator=gen) - 0.5
    ctx.progress(2, 2, "noise")
    img = (board + jitter * noise).clamp(0, 1)
    return img.expand(3, size, size).unsqueeze(0).contiguous().to(ctx.device)


@node("hello.moments", version="1.0.0", category="hello")
def moments(x: T.Tensor) -> {"mean": T.Float, "energy": T.Float}:
    """Mean and mean square of a tensor."""
    x = x.float()
    return {"mean": x.mean().item(), "energy": (x * x).mean().item()}
