"""Stages 4 and 5: the denoisers (DiT and U-Net) on the frozen text encoder's caption encodings, in one process or
in several data-parallel ones, and their evaluation by sampling and scoring.

The loss goes through the network-call path the engine samples with (:class:`nodes.adapters.DenoiserModel`) and the
forward process and target of :mod:`nodes.diffusion.parameterization`, so a trained network samples correctly.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodes.adapters import Controlled, DenoiserModel, Guided, schedule_of
from nodes.diffusion.math import append_zero
from nodes.diffusion.parameterization import noised, training_target
from nodes.diffusion.schedules import flow_sigmas, scheduler_sigmas, shift_sigmas, timestep_to_sigma
from nodes.diffusion.steps import euler_step
from nodes.models.text import TextEncoder
from nodes.models.vae import AutoencoderKL
from nodes.shapes import data, evaluate

from .common import EMA, Budget, CaptionTable, Log, LossLog, adamw, encode_captions, set_lr


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


def diffusion_loss(model: DenoiserModel, x0: Tensor, noise: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                   control: Callable[[Tensor], Any] | None = None) -> Tensor:
    """MSE between the network's raw output at the noised sample and the training target (velocity / v / eps /
    x0), through the same network-call path as sampling (:meth:`DenoiserModel.network_output`).

    ``control(x)``, when given, returns ControlNet residuals for the noisy sample ``x``; they are added as in
    sampling (:mod:`nodes.training.controlnet`).
    """
    x = noised(model.kind, x0, noise, sigma)
    if control is not None:
        cond = {**cond, "control": control(x)}
    return F.mse_loss(model.network_output(x, sigma, cond), training_target(model.kind, x0, noise, sigma))


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
    opt = adamw(groups, lr)
    ema, text_ema = EMA(model.net, ema_decay), EMA(text, ema_decay) if train_text else None
    losses, step, start = LossLog(name, 25, log), 0, time.perf_counter()
    while (progress := _progress(budget, step, start, world)) < 1.0:
        x0, noise, sigma, batch_captions = draw_batch(model, latents, captions, local, drop, gen, flow_shift,
                                                      high_noise)
        cond = encode_captions(text, batch_captions) if train_text else table(batch_captions)
        set_lr(opt, step, warmup, progress, decay)
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
