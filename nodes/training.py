"""Training of the embedded ``tiny-shapes`` family on CPU: VAE, text encoder, then the DiT and the U-Net.

Run ``python -m nodes.training --out nodes/weights/tiny-shapes``; every stage is seeded, and each trainer
stops at its time budget (``--minutes-*``) or its step cap (``--steps-*``), whichever comes first. The
report ``training.json`` records the steps each model took, so a run with ``--steps-X`` set to those
counts (and generous minutes) repeats the same updates on the same data and noise.

Stages
------
1. **Data**: ``--samples`` images from ``nodes.shapes.data.batch(seed, n, TRAIN_WEIGHTS, TRAIN_P_POSITION)``:
   the grammar's captions with more stated positions and relations than its own balance; the same fixed set
   serves every stage.
2. **VAE** (64x64x3 -> 16x16x4, ``space="tiny-shapes"``): L1 + MSE reconstruction of a posterior draw
   plus a small KL term. Afterwards ``shift_factor`` / ``scaling_factor`` are set from the posterior
   means (scaled latents have mean 0 and std 1) and reconstructions are checked with the shapes
   evaluator. Every image is then encoded once (posterior mean, scaled) so no stage re-encodes.
3. **Text encoder**, pretrained alone to parse captions (:func:`pretrain_text`: every slot of the caption's
   spec predicted from the pooled vector), then frozen: each distinct caption is encoded once for the
   denoisers.
4. **DiT**, rectified flow: ``t`` drawn logit-normal(0, 1) and shifted SD3-style by ``--dit-shift`` (3: most
   updates at high noise, where the layout is decided), ``x = (1 - t) x0 + t noise``, target velocity
   ``noise - x0``. The DiT has U-ViT long skips (``--dit-long-skip``) and Mix-FFN blocks (``--dit-mix-ffn``),
   and its cross-attention sees 4 tokens mapped from the pooled caption vector instead of the byte tokens
   (``--dit-pooled-tokens``, ``--dit-text-tokens``; ``DiTConfig.pooled_tokens``); it trains at batch 32 with
   learning rate 2e-3, decaying linearly to 0 over the last 30 % of its budget (``--decay-dit``);
   docs/models.md has the pilots that chose this recipe.
5. **U-Net** (``position_embedding``: its attention layers know where each token is), ``v`` prediction on the
   ``sd15`` discrete VP schedule, continuous timesteps with density rising toward high noise
   (``--unet-high-noise``).

Both denoisers drop 10 % of captions to ``""`` (classifier-free guidance) and keep an EMA of their weights,
which is what ships. The loss goes through the same maps the engine's :class:`nodes.adapters.DenoiserModel`
uses at sampling time (``model_timestep``, ``c_in``), so a trained network samples correctly through it;
``tests/nodes/test_training.py`` checks that ``to_denoised`` of the training target is the clean latent and
that the training-time prediction equals the adapter's.

``--processes N`` trains the denoisers in N data-parallel processes of one thread each
(:func:`train_denoiser_parallel`), which can use CPU cores better than intra-op threads do. ``--only dit``
(or ``unet``) retrains one denoiser against an existing family's VAE and text encoder (``--family``) and
replaces only its folder and its record in ``training.json`` (:func:`retrain_denoiser`).

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads: with two threads on cores shared with other
processes, OpenMP's spinning barriers otherwise cost up to 3x.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from nodes.adapters import DenoiserInfo, DenoiserModel, Guided, schedule_of  # noqa: E402
from nodes.control import Controlled  # noqa: E402
from nodes.diffusion.math import append_zero, expand_sigma  # noqa: E402
from nodes.diffusion.parameterization import c_in, model_timestep  # noqa: E402
from nodes.diffusion.schedules import PRESETS as TRAIN_PRESETS  # noqa: E402
from nodes.diffusion.schedules import flow_sigmas, scheduler_sigmas, shift_sigmas, timestep_to_sigma  # noqa: E402
from nodes.diffusion.steps import euler_step  # noqa: E402
from nodes.models.config import load_folder, save_folder  # noqa: E402
from nodes.models.dit import DiT, DiTConfig  # noqa: E402
from nodes.models.text import TextConfig, TextEncoder  # noqa: E402
from nodes.models.unet import UNet, UNetConfig  # noqa: E402
from nodes.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from nodes.shapes import data, evaluate  # noqa: E402

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


def _adamw(params: Sequence[nn.Parameter] | list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay; every group keeps its own ``base_lr`` (default ``lr``) for :func:`_set_lr`."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for group in opt.param_groups:
        group.setdefault("base_lr", lr)
    return opt


def _set_lr(opt: torch.optim.Optimizer, step: int, warmup: int, progress: float = 0.0, decay: float = 0.0) -> None:
    """Linear warmup over ``warmup`` steps; with ``decay > 0``, a linear decay to 0 over the last ``decay`` of the
    budget (``progress`` is the spent fraction): warmup-stable-decay (Hu et al. 2024, "MiniCPM")."""
    factor = min(1.0, (step + 1) / warmup)
    if decay > 0:
        factor *= min(1.0, max(0.0, (1.0 - progress) / decay))
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


# --- data -------------------------------------------------------------------------------------------


#: The training set's caption balance: more of the templates the targets find hardest (stated positions and
#: relations) than the grammar's own balance (``data.TEMPLATE_WEIGHTS``), which evaluation keeps.
TRAIN_WEIGHTS = {"single": 0.35, "and": 0.15, "left_of": 0.2, "above": 0.2, "two": 0.1}
TRAIN_P_POSITION = 0.7


def make_dataset(seed: int, n: int, weights: dict[str, float] | None = None,
                 p_position: float = data.P_SINGLE_POSITION) -> tuple[np.ndarray, list[str]]:
    """``n`` shapes images (uint8 (n, 64, 64, 3)) and their captions; item ``i`` depends only on (seed, i)."""
    images, captions, _ = data.batch(seed, n, weights, p_position)
    return images, captions


def _images(images: np.ndarray, index: Tensor) -> Tensor:
    return data.to_tensor(images[index.numpy()]).contiguous(memory_format=torch.channels_last)


# --- VAE --------------------------------------------------------------------------------------------


def random_crops(images: np.ndarray, index: Tensor, size: int, step: int, gen: torch.Generator) -> Tensor:
    """``size`` x ``size`` crops of ``images[index]`` at offsets that are multiples of ``step``, (n, 3, s, s)."""
    picked = images[index.numpy()]
    offsets = torch.randint((picked.shape[1] - size) // step + 1, (len(picked), 2), generator=gen) * step
    crops = np.stack([img[y:y + size, x:x + size] for img, (y, x) in zip(picked, offsets.tolist())])
    return data.to_tensor(crops).contiguous(memory_format=torch.channels_last)


def vae_loss(vae: AutoencoderKL, x: Tensor, noise: Tensor, kl_weight: float, object_weight: float = 4.0) -> Tensor:
    """L1 + MSE reconstruction of a posterior draw, plus ``kl_weight`` times the per-element KL to N(0, 1).

    Object pixels (some channel above mid-grey; the background stays <= 40) weigh ``1 + object_weight``:
    they are ~15 % of the pixels, and without the weight the first few hundred steps only learn the background.
    """
    mean, logvar = vae.encode(x)
    recon = vae.decode(vae.sample(mean, logvar, noise))
    weight = 1.0 + object_weight * (x.amax(dim=1, keepdim=True) > 0).to(x.dtype)  # (N, 1, H, W)
    err = recon - x
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return (weight * (err.abs() + err.pow(2))).mean() / weight.mean() + kl_weight * kl


def train_vae(vae: AutoencoderKL, images: np.ndarray, budget: Budget, batch: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-5, crop: int = 32, seed: int = 0, log: Log = print) -> dict[str, Any]:
    """Train ``vae`` in place on random ``crop``-pixel crops of ``images``; returns the training record.

    The autoencoder is fully convolutional (the shapes preset has no attention), so crops teach it the
    same local mapping as whole images at a fraction of the cost (32 px crops: ~6x faster per image).
    """
    gen = torch.Generator().manual_seed(seed)
    vae.to(memory_format=torch.channels_last).train()
    opt = _adamw(vae.parameters(), lr)
    losses, step, start = LossLog("vae", 25, log), 0, time.perf_counter()
    f, c = vae.config.downsample_factor, vae.config.latent_channels
    while not budget.done(step, start):
        x = random_crops(images, torch.randint(len(images), (batch,), generator=gen), crop, f, gen)
        noise = torch.randn(batch, c, crop // f, crop // f, generator=gen)
        _set_lr(opt, step, 50)
        loss = vae_loss(vae, x, noise, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.add(step, loss.item())
    vae.eval()
    return losses.record(step, batch=batch, lr=lr, kl_weight=kl_weight, crop=crop)


@torch.inference_mode()
def encode_means(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> Tensor:
    """Posterior means (raw, unscaled) of every image, (n, C, h, w)."""
    out = [vae.encode(_images(images, torch.arange(i, min(i + batch, len(images)))))[0].contiguous()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def latent_scaling(means: Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor) that give the scaled latents mean 0 and std 1."""
    return float(means.mean()), float(1.0 / means.std())


@torch.inference_mode()
def reconstruction_accuracy(vae: AutoencoderKL, images: np.ndarray, captions: list[str]) -> dict[str, Any]:
    """Shapes-evaluator accuracy of reconstructions (through the posterior mean) against their captions."""
    x = _images(images, torch.arange(len(images)))
    recon = data.from_tensor(vae.decode(vae.encode(x)[0]))
    results = [evaluate.score(img, cap) for img, cap in zip(recon, captions)]
    err = np.abs(recon.astype(np.int16) - images.astype(np.int16))
    return {"accuracy": evaluate.aggregate(results)["overall"]["accuracy"], "n": len(images),
            "mean_abs_error_uint8": round(float(err.mean()), 3)}


# --- text encoder pretraining -----------------------------------------------------------------------

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
    opt = _adamw(list(text.parameters()) + list(parser.parameters()), lr)
    losses, step, start = LossLog("text", 25, log), 0, time.perf_counter()
    while not budget.done(step, start):
        specs = [data.sample_spec(rng, weights, p_position) for _ in range(batch)]
        captions = [data.caption_from_spec(spec) for spec in specs]
        labels = torch.tensor([spec_labels(spec) for spec in specs])  # (B, slots)
        _set_lr(opt, step, 50)
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


# --- denoiser training ------------------------------------------------------------------------------


def sample_sigmas(model: DenoiserModel, n: int, gen: torch.Generator, flow_shift: float = 1.0,
                  high_noise: bool = False) -> Tensor:
    """Training noise levels in sampler space.

    Flow: ``t`` logit-normal(0, 1) (Esser et al. 2024), then shifted by ``flow_shift`` (SD3 uses 3; a shift
    above 1 moves weight to high noise, where the layout is decided). VP: continuous timesteps uniform in
    ``[0, T - 1]`` mapped through the training sigmas; with ``high_noise`` their density rises linearly
    (``t = (T - 1) sqrt(u)``, mean ``2 T / 3``), so more updates go where the layout is decided.
    """
    if model.kind == "flow":
        return shift_sigmas(torch.sigmoid(torch.randn(n, generator=gen)), flow_shift)
    u = torch.rand(n, generator=gen)
    t = (u.sqrt() if high_noise else u) * (model.num_train_timesteps - 1)
    return timestep_to_sigma(t, model.train_sigmas, model.info.interpolation).float()


def noised(kind: str, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The sampler-space noisy sample at ``sigma``: ``(1 - t) x0 + t noise`` for flow, ``x0 + sigma noise`` else."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * noise if kind == "flow" else x0 + s * noise


def training_target(kind: str, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """What the network should output at ``noised(kind, x0, noise, sigma)``."""
    s = expand_sigma(sigma, x0)
    if kind == "flow":
        return noise - x0
    if kind == "eps":
        return noise
    if kind == "v":  # sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0
        return (noise - s * x0) / (1 + s**2) ** 0.5
    return x0


def raw_output(model: DenoiserModel, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """The network's raw output for the sampler-space ``x`` at ``sigma``, with the adapter's input maps."""
    train_sigmas = model.train_sigmas if model.train_sigmas.numel() else None
    t = model_timestep(model.kind, sigma, train_sigmas, model.info.interpolation, model.num_train_timesteps)
    kwargs = {"context": cond["tokens"], "context_mask": cond["mask"]}
    if model.uses_pooled:
        kwargs["pooled"] = cond["pooled"]
    if cond.get("control") is not None:  # ControlNet residuals (nodes.training_controlnet)
        kwargs["control"] = cond["control"]
    return model.net(x * expand_sigma(c_in(model.kind, sigma), x), t, **kwargs)


def diffusion_loss(model: DenoiserModel, x0: Tensor, noise: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                   control: Callable[[Tensor], Any] | None = None) -> Tensor:
    """MSE between the raw output and the training target (velocity / v / eps / x0).

    ``control(x)``, when given, returns ControlNet residuals for the noisy sample ``x``; they are added as in
    sampling (``nodes.training_controlnet``).
    """
    target = training_target(model.kind, x0, noise, sigma)
    x = noised(model.kind, x0, noise, sigma)
    if control is not None:
        cond = {**cond, "control": control(x)}
    return F.mse_loss(raw_output(model, x, sigma, cond), target)


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


def draw_batch(model: DenoiserModel, latents: Tensor, captions: Sequence[str], n: int, drop: float,
               gen: torch.Generator, flow_shift: float = 1.0,
               high_noise: bool = False) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """One training batch from ``gen``: clean latents, noise, noise levels, and captions (``drop`` of them ``""``)."""
    idx = torch.randint(len(latents), (n,), generator=gen)
    keep = torch.rand(n, generator=gen) >= drop
    batch_captions = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    return x0, noise, sample_sigmas(model, n, gen, flow_shift, high_noise), batch_captions


def train_denoiser(model: DenoiserModel, text: TextEncoder, latents: Tensor, captions: Sequence[str],
                   budget: Budget, train_text: bool, batch: int = 64, lr: float = 1e-3, text_lr: float = 3e-4,
                   drop: float = 0.1, ema_decay: float = 0.999, warmup: int = 100, flow_shift: float = 1.0,
                   high_noise: bool = False, seed: int = 0, name: str = "denoiser", log: Log = print,
                   decay: float = 0.0, rank: int = 0, world: int = 1) -> tuple[dict[str, Any], EMA, EMA | None]:
    """Train ``model.net`` (and ``text`` when ``train_text``) on (scaled latent, caption) pairs.

    Returns the record and the EMAs of the network and (when trained) the text encoder. ``decay`` is the final
    fraction of the budget over which the learning rate falls linearly to 0 (0: constant after warmup).

    With ``world > 1`` this is one of ``world`` data-parallel processes of an initialised ``torch.distributed``
    group (see :func:`train_denoiser_parallel`): each draws ``batch / world`` samples from its own random stream
    (rank 0's is the single-process stream), the gradients and the logged loss are averaged over the group
    before every update, and rank 0 decides when the budget is spent. ``batch`` is the global batch.
    """
    if batch % world:
        raise ValueError(f"batch {batch} is not divisible by {world} processes")
    if train_text and world > 1:
        raise ValueError("data-parallel training keeps the text encoder frozen (train_text=False)")
    local = batch // world
    gen = torch.Generator().manual_seed(seed + 7919 * rank)
    model.net.train()
    groups = [{"params": list(model.net.parameters()), "base_lr": lr}]
    if train_text:
        text.train().requires_grad_(True)
        groups.append({"params": list(text.parameters()), "base_lr": text_lr})
        table = None
    else:
        text.eval().requires_grad_(False)
        table = CaptionTable(text, captions)
    params = [p for g in groups for p in g["params"]]
    if world > 1:  # start from rank 0's weights whatever each process built
        for param in params:
            torch.distributed.broadcast(param.data, 0)
    opt = _adamw(groups, lr)
    ema, text_ema = EMA(model.net, ema_decay), EMA(text, ema_decay) if train_text else None
    losses, step, start = LossLog(name, 25, log), 0, time.perf_counter()
    while (progress := _progress(budget, step, start, world)) < 1.0:
        x0, noise, sigma, batch_captions = draw_batch(model, latents, captions, local, drop, gen, flow_shift,
                                                      high_noise)
        cond = encode_captions(text, batch_captions) if train_text else table(batch_captions)
        _set_lr(opt, step, warmup, progress, decay)
        loss = diffusion_loss(model, x0, noise, sigma, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        value = _average_gradients(params, loss.detach()) if world > 1 else loss.item()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model.net)
        if text_ema is not None:
            text_ema.update(text)
        step += 1
        losses.add(step, value)
    model.net.eval()
    text.eval()
    record = losses.record(step, batch=batch, lr=lr, text_lr=text_lr if train_text else None, caption_drop=drop,
                           ema_decay=ema_decay, prediction=model.kind, train_schedule=model.info.train_schedule,
                           flow_shift=flow_shift if model.kind == "flow" else None, lr_decay=decay)
    if world > 1:
        record["processes"] = world
    return record, ema, text_ema


def _progress(budget: Budget, step: int, start: float, world: int) -> float:
    """The spent fraction of the budget; in a process group, rank 0's clock decides for every process (so all
    stop at the same step and use the same learning rate)."""
    progress = budget.progress(step, start)
    if world == 1:
        return progress
    value = torch.tensor([progress], dtype=torch.float64)
    torch.distributed.broadcast(value, 0)
    return float(value.item())


def _average_gradients(params: Sequence[nn.Parameter], loss: Tensor) -> float:
    """Average every parameter's gradient and the loss over the process group (one all-reduce); returns the
    group's mean loss."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad)
        offset += grad.numel()
    return float(flat[-1])


def train_denoiser_parallel(model: DenoiserModel, text: TextEncoder, latents: Tensor, captions: Sequence[str],
                            budget: Budget, processes: int, verbose: bool = True,
                            **options: Any) -> tuple[dict[str, Any], EMA]:
    """:func:`train_denoiser` (text frozen) in ``processes`` data-parallel CPU processes of one thread each.

    A model this small keeps more cores busy as processes that each run a share of the batch than as intra-op
    threads of one process; the processes average gradients through ``torch.distributed`` (gloo) once per step.
    On this project's 2-core machine, two processes ran the shapes DiT's steps 9 % (batch 32) to 14 % (batch 64)
    faster than one process with two threads. The processes are spawned, so ``options`` must be picklable;
    rank 0 prints the loss log when ``verbose``. ``model.net`` is updated in place with the trained weights;
    returns the record and the EMA, as ``train_denoiser`` does.
    """
    import tempfile

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="nodegraph-train-") as tmp:
        mp.start_processes(_parallel_worker, args=(processes, tmp, model, text, latents, list(captions), budget,
                                                   verbose, options), nprocs=processes, start_method="spawn")
        result = json.loads((Path(tmp) / "record.json").read_text())
        model.net.load_state_dict(load_file(str(Path(tmp) / "net.safetensors")))
        ema = EMA(model.net, options.get("ema_decay", 0.999))
        ema.model.load_state_dict(load_file(str(Path(tmp) / "ema.safetensors")))
        ema.updates = result["steps"]
    model.net.eval()
    return result, ema


def _parallel_worker(rank: int, world: int, tmp: str, model: DenoiserModel, text: TextEncoder, latents: Tensor,
                     captions: list[str], budget: Budget, verbose: bool, options: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                                         world_size=world)
    try:
        model = copy.deepcopy(model)  # the spawned copy shares memory with the parent and the other processes
        log = (lambda msg: print(msg, flush=True)) if rank == 0 and verbose else (lambda msg: None)
        record, ema, _ = train_denoiser(model, text, latents, captions, budget, train_text=False, log=log,
                                        rank=rank, world=world, **options)
        if rank == 0:
            for module, file in ((model.net, "net"), (ema.model, "ema")):
                state = {k: v.contiguous() for k, v in module.state_dict().items()}
                save_file(state, str(Path(tmp) / f"{file}.safetensors"))
            (Path(tmp) / "record.json").write_text(json.dumps(record))
    finally:
        torch.distributed.destroy_process_group()


# --- evaluation -------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model: DenoiserModel, text: TextEncoder, vae: AutoencoderKL, captions: Sequence[str], scale: float,
             steps: int = 20, seed: int = 0, batch: int = 50,
             control: tuple[nn.Module, Tensor, float] | None = None) -> np.ndarray:
    """Images (uint8) for ``captions`` with CFG ``scale`` and ``steps`` Euler steps, as the engine's graphs do.

    ``control`` = (ControlNet, control images (n, C, H, W), strength) applies a ControlNet to each image, as
    ``control.apply`` does in a graph.
    """
    if model.kind == "flow":
        sigmas = append_zero(flow_sigmas(steps))
    else:
        sigmas = scheduler_sigmas("euler", steps, schedule_of(model.info))
    negative = encode_captions(text, [""])
    f, c = vae.config.downsample_factor, vae.config.latent_channels
    out = []
    for i in range(0, len(captions), batch):
        chunk = list(captions[i:i + batch])
        noise = torch.cat([torch.randn(1, c, 64 // f, 64 // f, generator=torch.Generator().manual_seed(seed + i + j))
                           for j in range(len(chunk))])
        x = noise * sigmas[0]  # flow: (1 - 1) * 0 + 1 * noise; VP: 0 + sigma_max * noise
        inner = model if control is None else Controlled(model, control[0], control[1][i:i + batch],
                                                          strength=control[2])
        guided = Guided(inner, negative, scale)
        cond = encode_captions(text, chunk)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = euler_step(x, guided(x, s, cond), s, s_next)
        out.append(data.from_tensor(vae.decode(vae.unscale_latent(x))))
    return np.concatenate(out)


def evaluate_denoiser(model: DenoiserModel, text: TextEncoder, vae: AutoencoderKL, n: int = 100,
                      scales: Sequence[float] = (3.0,), seed: int = 1234) -> dict[str, Any]:
    """Per-category accuracy (``nodes.shapes.evaluate``) of ``n`` grammar captions at each guidance scale."""
    rng = np.random.default_rng(seed)
    captions = [data.sample_caption(rng) for _ in range(n)]
    report = {}
    for scale in scales:
        images = generate(model, text, vae, captions, scale, seed=seed)
        agg = evaluate.aggregate(evaluate.score(img, cap) for img, cap in zip(images, captions))
        cats = agg["categories"]
        report[str(scale)] = {
            "overall": agg["overall"]["accuracy"], "mean_category": agg["mean_category_accuracy"],
            "single_color_shape": cats["single"]["checks"]["color_shape"]["accuracy"],
            "single_position": cats["single"]["checks"].get("position", {}).get("accuracy"),
            **{cat: cats[cat]["accuracy"] for cat in ("single", "two", "relation", "count") if cat in cats},
            "n": {cat: cats[cat]["n"] for cat in cats},
        }
    return report


# --- the family -------------------------------------------------------------------------------------


def _save(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    save_folder(copy.deepcopy(model).to(dtype), folder)
    return (folder / "model.safetensors").stat().st_size


def _train_stage(report: dict[str, Any], out: Path, dtype: torch.dtype, name: str, build: Callable[[], nn.Module],
                 info: DenoiserInfo, seed: int, text: TextEncoder, latents: Tensor, captions: Sequence[str],
                 budget: Budget, log: Log, processes: int = 1, **options: Any) -> DenoiserModel:
    """Build (seeded) and train one denoiser on the frozen text encoder, in ``processes`` data-parallel processes
    when more than one; save its EMA weights to ``out/name``."""
    torch.manual_seed(seed)
    model = DenoiserModel(build(), info)
    if processes > 1:
        record, ema = train_denoiser_parallel(model, text, latents, captions, budget, processes, seed=seed,
                                              name=name, **options)
    else:
        record, ema, _ = train_denoiser(model, text, latents, captions, budget, train_text=False, seed=seed,
                                        name=name, log=log, **options)
    model.net = ema.model
    record["bytes"] = _save(model.net, out / name, dtype)
    model.info.write(out / name)
    report["models"][name] = record
    return model


def _denoiser_stages(args: argparse.Namespace) -> dict[str, tuple[Callable[[], nn.Module], DenoiserInfo, int, Budget,
                                                                  dict[str, Any]]]:
    """Each denoiser stage's (build, sampler info, seed, budget, training options), from the command line."""
    dit_config = DiTConfig.from_name("shapes").replace(long_skip=args.dit_long_skip, mix_ffn=args.dit_mix_ffn,
                                                        pooled_tokens=args.dit_pooled_tokens,
                                                        text_tokens=args.dit_text_tokens or not args.dit_pooled_tokens)
    return {
        "dit": (lambda: DiT(dit_config), DenoiserInfo("flow", "sd3", "tiny-shapes"), args.seed + 3,
                Budget(args.minutes_dit, args.steps_dit),
                {"lr": args.lr_dit, "flow_shift": args.dit_shift, "batch": args.batch_dit, "decay": args.decay_dit,
                 "processes": args.processes}),
        "unet": (lambda: UNet(UNetConfig.from_name("shapes")), DenoiserInfo("v", args.unet_schedule, "tiny-shapes"),
                 args.seed + 2, Budget(args.minutes_unet, args.steps_unet),
                 {"lr": args.lr_unet, "high_noise": args.unet_high_noise, "batch": args.batch_unet,
                  "decay": args.decay_unet, "processes": args.processes}),
    }


def _data(args: argparse.Namespace) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The training images and captions, and their record."""
    t = time.perf_counter()
    images, captions = make_dataset(args.seed, args.samples, TRAIN_WEIGHTS, TRAIN_P_POSITION)
    record = {"samples": args.samples, "seed": args.seed, "template_weights": TRAIN_WEIGHTS,
              "p_position": TRAIN_P_POSITION, "held_out": args.check, "held_out_seed": args.seed + 1,
              "wall_s": round(time.perf_counter() - t, 1)}
    return images, captions, record


def _evaluate(report: dict[str, Any], models: dict[str, DenoiserModel], text: TextEncoder, vae: AutoencoderKL,
              args: argparse.Namespace, log: Log) -> None:
    report["evaluation"] = {"captions": args.eval, "steps": 20, "sampler": "euler"}
    for name, model in models.items():
        report["evaluation"][name] = evaluate_denoiser(model, text, vae, args.eval, args.scales)
        log(f"{name} evaluation {json.dumps(report['evaluation'][name])}")


def train_family(args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
    """All stages in order; writes the four model folders and ``training.json`` under ``args.out``."""
    out, dtype = Path(args.out), getattr(torch, args.dtype)
    start = time.perf_counter()
    report: dict[str, Any] = {"command": "python -m nodes.training " + " ".join(args.argv), "seed": args.seed,
                              "torch_threads": torch.get_num_threads(), "models": {}}

    images, captions, report["data"] = _data(args)
    held_images, held_captions = make_dataset(args.seed + 1, args.check)

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(VAEConfig.from_name("shapes"))
    record = train_vae(vae, images, Budget(args.minutes_vae, args.steps_vae), batch=args.batch_vae,
                       lr=args.lr_vae, seed=args.seed, log=log)
    t = time.perf_counter()
    shift, scale = latent_scaling(encode_means(vae, images[: args.check]))
    vae.config = vae.config.replace(shift_factor=shift, scaling_factor=scale)
    record["shift_factor"], record["scaling_factor"] = shift, scale
    record["reconstruction"] = reconstruction_accuracy(vae, held_images, held_captions)
    log(f"vae reconstruction {record['reconstruction']}")
    latents = vae.scale_latent(encode_means(vae, images))
    record["encode_wall_s"] = round(time.perf_counter() - t, 1)
    record["latent_std"] = round(float(latents.std()), 4)
    record["bytes"] = _save(vae, out / "vae", dtype)
    report["models"]["vae"] = record
    del images

    torch.manual_seed(args.seed + 1)
    text = TextEncoder(TextConfig.from_name("shapes"))
    record = pretrain_text(text, Budget(args.minutes_text, args.steps_text), lr=args.lr_text, seed=args.seed + 1,
                           weights=TRAIN_WEIGHTS, p_position=TRAIN_P_POSITION, log=log)
    record["bytes"] = _save(text, out / "text", dtype)
    report["models"]["text"] = record

    models = {}
    for name, (build, info, seed, budget, options) in _denoiser_stages(args).items():
        models[name] = _train_stage(report, out, dtype, name, build, info, seed, text, latents, captions, budget,
                                    log, **options)

    report["train_wall_s"] = round(time.perf_counter() - start, 1)
    report["weights_bytes"] = sum(m["bytes"] for m in report["models"].values())
    if args.eval:
        _evaluate(report, models, text, vae, args, log)
    report["total_wall_s"] = round(time.perf_counter() - start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def retrain_denoiser(args: argparse.Namespace, log: Log = print) -> dict[str, Any]:
    """Retrain one denoiser (``args.only``) against an existing family's VAE and text encoder.

    The family's ``vae/`` and ``text/`` are loaded from ``args.family`` (float32), the training images are
    drawn and encoded exactly as :func:`train_family` does, and the denoiser stage runs with the same seed and
    options. Its weights go to ``args.out/<name>``; ``args.out/training.json`` (read from the family's when
    ``out`` has none) gets the new record under ``models.<name>``, with the command in the record, and keeps
    the other models' records. The family's other files are not touched, so a ControlNet trained for the old
    denoiser no longer matches it (retrain it with ``nodes.training_controlnet --which <name>``).
    """
    family, out, dtype = Path(args.family or args.out), Path(args.out), getattr(torch, args.dtype)
    start = time.perf_counter()
    vae = load_folder(family / "vae", dtype="float32").requires_grad_(False)
    text = load_folder(family / "text", dtype="float32").requires_grad_(False)
    old = out / "training.json" if (out / "training.json").exists() else family / "training.json"
    report = json.loads(old.read_text()) if old.exists() else {"models": {}}
    images, captions, data_record = _data(args)
    latents = vae.scale_latent(encode_means(vae, images))
    del images
    log(f"data and latents ready ({time.perf_counter() - start:.0f}s)")
    build, info, seed, budget, options = _denoiser_stages(args)[args.only]
    stage = {"models": {}}
    model = _train_stage(stage, out, dtype, args.only, build, info, seed, text, latents, captions, budget, log,
                         **options)
    record = stage["models"][args.only]
    record.update({"command": "python -m nodes.training " + " ".join(args.argv), "family": str(family),
                   "data": data_record, "torch_threads": torch.get_num_threads(),
                   "total_wall_s": round(time.perf_counter() - start, 1)})
    if args.eval:
        _evaluate(record, {args.only: model}, text, vae, args, log)
    report["models"][args.only] = record
    report["weights_bytes"] = sum(m.get("bytes", 0) for m in report["models"].values())
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nodes.training", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="nodes/weights/tiny-shapes", help="folder for vae/ text/ dit/ unet/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=32000, help="training images (and latents)")
    p.add_argument("--check", type=int, default=500, help="held-out images for the reconstruction check")
    for name, minutes, steps in (("vae", 7.0, 2000), ("text", 1.5, 500), ("dit", 25.0, 8000), ("unet", 22.0, 4000)):
        p.add_argument(f"--minutes-{name}", type=float, default=minutes, help=f"{name} time budget")
        p.add_argument(f"--steps-{name}", type=int, default=steps, help=f"{name} step cap")
    p.add_argument("--batch-vae", type=int, default=32)
    p.add_argument("--batch-dit", type=int, default=32, help="DiT batch size")
    p.add_argument("--batch-unet", type=int, default=64, help="U-Net batch size")
    p.add_argument("--processes", type=int, default=1,
                   help="data-parallel processes (one thread each) for the denoiser stages; 1: one process")
    p.add_argument("--lr-vae", type=float, default=2e-3)
    p.add_argument("--lr-dit", type=float, default=2e-3)
    p.add_argument("--lr-text", type=float, default=1e-3)
    p.add_argument("--lr-unet", type=float, default=1e-3)
    for name in ("dit", "unet"):
        p.add_argument(f"--decay-{name}", type=float, default=0.3 if name == "dit" else 0.0,
                       help=f"final fraction of the {name} budget with the learning rate decaying linearly to 0")
    p.add_argument("--dit-shift", type=float, default=3.0, help="SD3-style shift of the DiT's logit-normal t")
    p.add_argument("--dit-long-skip", action=argparse.BooleanOptionalAction, default=True,
                   help="U-ViT long skips between the DiT's first and second half of blocks")
    p.add_argument("--dit-mix-ffn", action=argparse.BooleanOptionalAction, default=True,
                   help="Mix-FFN: a depthwise 3x3 convolution over the token grid in each DiT block's MLP")
    p.add_argument("--dit-pooled-tokens", type=int, default=4,
                   help="cross-attention tokens the DiT maps from the pooled text vector (0: none)")
    p.add_argument("--dit-text-tokens", action=argparse.BooleanOptionalAction, default=False,
                   help="the DiT also cross-attends to the text encoder's per-byte tokens (always with "
                   "--dit-pooled-tokens 0)")
    p.add_argument("--unet-schedule", default="sd15", choices=sorted(k for k, v in TRAIN_PRESETS.items()
                   if v.kind != "flow"), help="the U-Net's VP training schedule")
    p.add_argument("--unet-high-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="U-Net timesteps with density rising linearly toward high noise (else uniform)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="stored weight dtype")
    p.add_argument("--eval", type=int, default=100, help="captions to sample and score at the end (0: skip)")
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0, 5.0], help="guidance scales to evaluate")
    p.add_argument("--only", choices=("dit", "unet"), help="retrain only this denoiser against --family's VAE and "
                   "text encoder (see retrain_denoiser)")
    p.add_argument("--family", help="with --only: the family folder holding vae/ and text/ (default: --out)")
    args = p.parse_args(argv)
    if args.family and not args.only:
        p.error("--family only applies with --only")
    args.argv = list(argv) if argv is not None else []
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    torch.set_num_threads(2)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.only:
        record = retrain_denoiser(args, log=log)
        print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}, indent=1))
        return
    report = train_family(args, log=log)
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))


if __name__ == "__main__":
    main()
