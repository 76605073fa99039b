"""Stage 3: the text encoder, pretrained alone to parse captions (every slot of the caption's spec predicted from
the pooled vector), then frozen for the denoisers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodes.models.text import TextEncoder
from nodes.shapes import data

from .common import Budget, Log, LossLog, adamw, set_lr

#: What the caption parser predicts from the pooled text vector: every slot of the caption's spec.
CAPTION_SLOTS: dict[str, tuple[str | None, ...]] = {
    "template": data.TEMPLATES,
    "size": (None, *data.SIZES),
    "position": (None, *data.POSITIONS),
    "color_1": data.COLORS,
    "shape_1": data.SHAPES,
    "color_2": (None, *data.COLORS),
    "shape_2": (None, *data.SHAPES),
}


def caption_labels(caption: str) -> list[int]:
    """The index of each :data:`CAPTION_SLOTS` value for a grammar caption (``ValueError`` outside it)."""
    spec = data.parse_caption(caption)
    if spec is None:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar")
    return spec_labels(spec)


def spec_labels(spec: dict[str, Any]) -> list[int]:
    """The index of each :data:`CAPTION_SLOTS` value for a caption spec (``data.sample_spec`` / ``parse_caption``)."""
    first = spec["objects"][0]
    second = spec["objects"][1] if len(spec["objects"]) > 1 else {}
    values = {"template": spec["template"], "size": first.get("size"), "position": first.get("position"),
              "color_1": first["color"], "shape_1": first["shape"],
              "color_2": second.get("color"), "shape_2": second.get("shape")}
    return [CAPTION_SLOTS[slot].index(values[slot]) for slot in CAPTION_SLOTS]


class CaptionParser(nn.Module):
    """One linear classifier per caption slot over the text encoder's pooled vector (pretraining only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, len(values)) for values in CAPTION_SLOTS.values())

    def forward(self, pooled: Tensor) -> list[Tensor]:
        return [head(pooled) for head in self.heads]  # one (B, len(slot values)) per slot


def pretrain_text(text: TextEncoder, budget: Budget, batch: int = 128, lr: float = 1e-3, seed: int = 0,
                  weights: dict[str, float] | None = None, p_position: float = data.P_SINGLE_POSITION,
                  check: int = 1000, log: Log = print) -> dict[str, Any]:
    """Pretrain ``text`` in place to parse captions: cross-entropy of every :data:`CAPTION_SLOTS` slot,
    predicted from the pooled vector, on captions drawn fresh from the grammar at every step.

    A text encoder trained only through a denoiser's loss learns the words that loss rewards first (colours
    and shapes) and barely separates "left" from "right" within the CPU budget; parsing first gives the
    denoisers token and pooled features that already encode every slot, and lets their training keep the
    encoder frozen (every caption encoded once). The record holds the exact-match parsing accuracy on
    ``check`` held-out captions.
    """
    rng = np.random.default_rng([seed, 17])
    parser = CaptionParser(text.config.width)
    text.train().requires_grad_(True)
    opt = adamw(list(text.parameters()) + list(parser.parameters()), lr)
    losses, step, start = LossLog("text", 25, log), 0, time.perf_counter()
    while not budget.done(step, start):
        specs = [data.sample_spec(rng, weights, p_position) for _ in range(batch)]
        captions = [data.caption_from_spec(spec) for spec in specs]
        labels = torch.tensor([spec_labels(spec) for spec in specs])  # (B, slots)
        set_lr(opt, step, 50)
        logits = parser(text.encode(captions)[1])
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.add(step, loss.item())
    text.eval().requires_grad_(False)
    held = np.random.default_rng([seed, 18])
    specs = [data.sample_spec(held) for _ in range(check)]
    with torch.inference_mode():
        logits = parser(text.encode([data.caption_from_spec(spec) for spec in specs])[1])
    labels = torch.tensor([spec_labels(spec) for spec in specs])
    right = torch.stack([lg.argmax(-1) == labels[:, i] for i, lg in enumerate(logits)], dim=1)  # (n, slots)
    accuracy = {"exact": round(float(right.all(dim=1).float().mean()), 4),
                **{slot: round(float(right[:, i].float().mean()), 4) for i, slot in enumerate(CAPTION_SLOTS)}}
    log(f"text parsing accuracy {accuracy}")
    return losses.record(step, batch=batch, lr=lr, objective="caption parsing", parsing_accuracy=accuracy,
                         held_out=check)
