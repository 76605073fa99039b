"""What every training stage shares: budgets, the weight EMA, the loss log, the optimiser and its learning-rate
schedule, the training set, caption encodings and saving a model folder."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nodes.models.config import save_folder
from nodes.models.text import TextEncoder
from nodes.shapes import data

Log = Callable[[str], None]


# --- budgets, EMA, logging --------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Stop after ``minutes`` of wall time or ``max_steps`` updates, whichever comes first."""

    minutes: float
    max_steps: int

    def done(self, step: int, start: float) -> bool:
        return self.progress(step, start) >= 1.0

    def progress(self, step: int, start: float) -> float:
        """The spent fraction of the budget: steps or wall time, whichever is further along (1: done)."""
        return max(step / self.max_steps, (time.perf_counter() - start) / (60.0 * self.minutes))


class EMA:
    """Exponential moving average of a module's weights, decay ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            ema.lerp_(new, 1 - d) if ema.is_floating_point() else ema.copy_(new)


class LossLog:
    """Running loss curve: the mean of every ``every`` steps, with the wall time at that point."""

    def __init__(self, name: str, every: int, log: Log) -> None:
        self.name, self.every, self.log = name, every, log
        self.start, self.curve, self.pending = time.perf_counter(), [], []

    def add(self, step: int, loss: float) -> None:
        self.pending.append(loss)
        if len(self.pending) == self.every:
            mean, wall = sum(self.pending) / self.every, time.perf_counter() - self.start
            self.curve.append([step, round(wall, 1), round(mean, 5)])
            self.pending = []
            self.log(f"{self.name} step {step} loss {mean:.4f} ({wall:.0f}s)")

    def record(self, steps: int, **extra: Any) -> dict[str, Any]:
        tail = self.pending if len(self.pending) >= self.every // 2 or not self.curve else [self.curve[-1][2]]
        tail = tail or [float("nan")]
        return {"steps": steps, "wall_s": round(time.perf_counter() - self.start, 1),
                "final_loss": round(sum(tail) / len(tail), 5), **extra, "loss_curve": self.curve}


def adamw(params: Sequence[nn.Parameter] | list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay; every group keeps its own ``base_lr`` (default ``lr``) for :func:`set_lr`."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for group in opt.param_groups:
        group.setdefault("base_lr", lr)
    return opt


def set_lr(opt: torch.optim.Optimizer, step: int, warmup: int, progress: float = 0.0, decay: float = 0.0) -> None:
    """Linear warmup over ``warmup`` steps; with ``decay > 0``, a linear decay to 0 over the last ``decay`` of the
    budget (``progress`` is the spent fraction): warmup-stable-decay (Hu et al. 2024, "MiniCPM")."""
    factor = min(1.0, (step + 1) / warmup)
    if decay > 0:
        factor *= min(1.0, max(0.0, (1.0 - progress) / decay))
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


# --- data and captions -------------------------------------------------------------------------------------------


#: The training set's caption balance: more of the templates the targets find hardest (stated positions and
#: relations) than the grammar's own balance (``data.TEMPLATE_WEIGHTS``), which evaluation keeps.
TRAIN_WEIGHTS = {"single": 0.35, "and": 0.15, "left_of": 0.2, "above": 0.2, "two": 0.1}
TRAIN_P_POSITION = 0.7


def make_dataset(seed: int, n: int, weights: dict[str, float] | None = None,
                 p_position: float = data.P_SINGLE_POSITION) -> tuple[np.ndarray, list[str]]:
    """``n`` shapes images (uint8 (n, 64, 64, 3)) and their captions; item ``i`` depends only on (seed, i)."""
    images, captions, _ = data.batch(seed, n, weights, p_position)
    return images, captions


def image_batch(images: np.ndarray, index: Tensor) -> Tensor:
    """``images[index]`` as a float batch in [-1, 1], channels-last."""
    return data.to_tensor(images[index.numpy()]).contiguous(memory_format=torch.channels_last)


class CaptionTable:
    """Encodings of every distinct caption (and ``""``) under a frozen text encoder, gathered by index."""

    def __init__(self, text: TextEncoder, captions: Sequence[str]) -> None:
        self.index = {c: i for i, c in enumerate(dict.fromkeys(["", *captions]))}
        with torch.inference_mode():
            tokens, pooled, mask = text.encode(list(self.index), pad_to_max_length=True)
        self.tokens, self.pooled, self.mask = tokens.clone(), pooled.clone(), mask.clone()

    def __call__(self, captions: Sequence[str]) -> dict[str, Tensor]:
        idx = torch.tensor([self.index[c] for c in captions])
        return {"tokens": self.tokens[idx], "pooled": self.pooled[idx], "mask": self.mask[idx]}


def encode_captions(text: TextEncoder, captions: Sequence[str]) -> dict[str, Tensor]:
    tokens, pooled, mask = text.encode(list(captions), pad_to_max_length=True)
    return {"tokens": tokens, "pooled": pooled, "mask": mask}


def save_model(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Write a copy of ``model`` in ``dtype`` as a checkpoint folder; returns the weights file's size in bytes."""
    save_folder(copy.deepcopy(model).to(dtype), folder)
    return (folder / "model.safetensors").stat().st_size
