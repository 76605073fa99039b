"""Nodes for the procedural shapes data and its GenEval-style evaluation (see :mod:`nodes.shapes`).

``shapes.generate`` makes deterministic training or evaluation batches inside a graph; ``shapes.caption`` draws
one caption from the grammar; ``eval.shapes`` scores images against their captions (object presence, colour,
shape, position, count, relation) with the detector in :mod:`nodes.shapes.evaluate`.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch

from nodegraph import Field, node
from nodegraph import types as T

from .shapes import data, evaluate


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float [0, 1] -> (B, H, W, 3) uint8."""
    if image.dim() != 4 or image.shape[1] not in (3, 4):
        raise ValueError(f"expected an RGB(A) image batch (B, C, H, W); got {tuple(image.shape)}")
    arr = image[:, :3].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def _batch_cost(literals: dict) -> dict[str, int]:
    side = data.CANVAS
    return {"pixels": side * side, "elements": literals["count"] * 3 * side * side}


@node("shapes.generate", category="data", cost=_batch_cost)
def generate(seed: Annotated[int, Field(ge=0)] = 0,
             count: Annotated[int, Field(ge=1, le=4096)] = 8) -> {"images": T.Image, "captions": T.List}:
    """A deterministic batch of 64x64 shape images with their captions (item i depends only on seed and i)."""
    images, captions, _ = data.batch(seed, count)
    return {"images": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, "captions": captions}


@node("shapes.caption", category="data", output="text")
def caption(seed: Annotated[int, Field(ge=0)] = 0) -> T.String:
    """One caption drawn from the shapes grammar, deterministic per seed."""
    return data.sample_caption(np.random.default_rng(seed))


@node("eval.shapes", category="evaluation")
def score_images(images: T.Image, captions: T.Any) -> {"scores": T.List, "summary": T.Dict}:
    """Score each image against its caption (a string or a list of strings, one per image); also aggregate."""
    arr = image_to_uint8(images)
    caps = [captions] * len(arr) if isinstance(captions, str) else list(captions)
    if len(caps) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(caps)} captions")
    results = [_plain(evaluate.score(img, cap)) for img, cap in zip(arr, caps)]
    return {"scores": results, "summary": _plain(evaluate.aggregate(results))}


def _plain(value):
    """Results as JSON-ready Python values (numpy scalars become Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
