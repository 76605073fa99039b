"""Training of the ``tiny-shapes`` ControlNets (object-mask control) for the U-Net and the DiT, on CPU.

Run ``python -m nodes.training.controlnet --family nodes/weights/tiny-shapes`` (``python -m
nodes.training_controlnet`` is an alias): it loads the family's VAE, text encoder and denoisers, generates
``--samples`` fresh shapes images (seed ``--seed``), encodes them once, and trains one ControlNet per denoiser
(``--which unet dit``) for ``--minutes`` or ``--steps``, whichever comes first. The folders ``controlnet_unet``
and ``controlnet_dit`` and ``controlnet_training.json`` are written next to the family.

The control image is the object mask of the training image (:func:`mask_of`, the same rule as the
``control.object_mask`` node's default: max channel above 0.3), as a grey 3-channel image. The base
denoiser and the text encoder stay frozen; only the ControlNet learns, through the base denoiser's own
loss with the ControlNet's residuals added (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"). Half of the captions are replaced by ``""`` during training, as in that paper, so the
ControlNet learns to read the layout from the mask rather than from the prompt.

Evaluation (:func:`evaluate_controlnet`, also ``benchmarks/controlnet_iou.py``): grammar captions are rendered
by the data generator, their object masks become control images, and the generated image's object mask is
compared with the control mask (IoU); colour/shape adherence is scored by ``nodes.shapes.evaluate`` with and
without the ControlNet on the same captions and seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nodes.adapters import Controlled, DenoiserInfo, DenoiserModel
from nodes.models.config import load_folder
from nodes.models.controlnet import ControlNetDiT, ControlNetUNet
from nodes.models.dit import DiT
from nodes.models.text import TextEncoder
from nodes.models.vae import AutoencoderKL
from nodes.shapes import data, evaluate

from .common import EMA, Budget, CaptionTable, Log, LossLog, adamw, make_dataset, save_model, set_lr
from .denoiser import diffusion_loss, generate, sample_sigmas
from .vae import encode_means

#: ``control.object_mask``'s default brightness threshold (max channel, in [0, 1])
MASK_THRESHOLD = 0.3


def mask_of(images: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Object masks of uint8 images (n, H, W, 3) -> bool (n, H, W): max channel above ``threshold``."""
    return images.max(axis=-1) > round(threshold * 255)


def hint_images(masks: np.ndarray) -> Tensor:
    """bool masks (n, H, W) -> grey control images (n, 3, H, W) in {0, 1}, as ``control.object_mask`` gives."""
    return torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None].expand(-1, 3, -1, -1).contiguous()


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample intersection over union of bool masks (n, H, W); 1.0 where both are empty."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def new_controlnet(base: DenoiserModel, space: str) -> nn.Module:
    """A ControlNet initialised from ``base``'s network: the U-Net's encoder or the DiT's first half."""
    if isinstance(base.net, DiT):
        return ControlNetDiT.from_dit(base.net, control_depth=base.net.config.depth // 2,
                                      hint_widths=(16, 32, 64), space=space)
    return ControlNetUNet.from_unet(base.net, hint_widths=(16, 32, 64), space=space)


def controlnet_loss(base: DenoiserModel, controlnet: nn.Module, x0: Tensor, noise: Tensor, sigma: Tensor,
                    cond: dict[str, Tensor], hint: Tensor) -> Tensor:
    """The base denoiser's training loss with ``controlnet``'s residuals for the control images ``hint``."""
    controlled = Controlled(base, controlnet, hint)
    return diffusion_loss(base, x0, noise, sigma, cond, control=lambda x: controlled.residuals(x, sigma, cond))


def train_controlnet(base: DenoiserModel, controlnet: nn.Module, text: TextEncoder, latents: Tensor,
                     masks: np.ndarray, captions: Sequence[str], budget: Budget, batch: int = 32,
                     lr: float = 5e-4, drop: float = 0.5, ema_decay: float = 0.995, seed: int = 0,
                     name: str = "controlnet", log: Log = print) -> tuple[dict[str, Any], EMA]:
    """Train ``controlnet`` on (latent, mask, caption) triples with ``base`` and ``text`` frozen."""
    gen = torch.Generator().manual_seed(seed)
    base.net.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    controlnet.train().requires_grad_(True)
    table = CaptionTable(text, captions)
    opt = adamw(list(controlnet.parameters()), lr)
    ema = EMA(controlnet, ema_decay)
    losses, step, start = LossLog(name, 25, log), 0, time.perf_counter()
    while not budget.done(step, start):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        keep = torch.rand(batch, generator=gen) >= drop
        cond = table([captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist())])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(base, batch, gen)
        set_lr(opt, step, 50)
        loss = controlnet_loss(base, controlnet, x0, noise, sigma, cond, hint_images(masks[idx.numpy()]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        ema.update(controlnet)
        step += 1
        losses.add(step, loss.item())
    controlnet.eval().requires_grad_(False)
    return losses.record(step, batch=batch, lr=lr, caption_drop=drop, ema_decay=ema_decay), ema


# --- evaluation -------------------------------------------------------------------------------------


def evaluation_cases(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` grammar captions with their rendered images' object masks (bool (n, 64, 64))."""
    images, captions, _ = data.batch(seed, n)
    return captions, mask_of(images)


def adherence(images: Sequence[np.ndarray], captions: Sequence[str]) -> list[bool]:
    """Per image: do its objects have the caption's colours and shapes (``color_shape`` of the scorer)?"""
    return [bool(evaluate.score(img, cap)["color_shape"]) for img, cap in zip(images, captions)]


def evaluate_controlnet(base: DenoiserModel, controlnet: nn.Module, text: TextEncoder, vae: AutoencoderKL,
                        n: int = 100, scale: float = 4.0, seed: int = 4321, steps: int = 20,
                        strength: float = 1.0) -> dict[str, Any]:
    """Mean IoU of generated vs control masks, and colour/shape adherence with and without the ControlNet."""
    captions, masks = evaluation_cases(n, seed)
    hints = hint_images(masks)
    controlled = generate(base, text, vae, captions, scale, steps=steps, seed=seed,
                            control=(controlnet, hints, strength))
    plain = generate(base, text, vae, captions, scale, steps=steps, seed=seed)
    ious = iou(mask_of(controlled), masks)
    return {"cases": n, "scale": scale, "steps": steps, "strength": strength,
            "mean_iou": round(float(ious.mean()), 4), "median_iou": round(float(np.median(ious)), 4),
            "mean_iou_without_control": round(float(iou(mask_of(plain), masks).mean()), 4),
            "adherence_with_control": round(float(np.mean(adherence(controlled, captions))), 4),
            "adherence_without_control": round(float(np.mean(adherence(plain, captions))), 4)}


# --- command ----------------------------------------------------------------------------------------


def load_family(folder: Path) -> tuple[AutoencoderKL, TextEncoder, dict[str, DenoiserModel]]:
    vae = load_folder(folder / "vae", dtype="float32").requires_grad_(False)
    text = load_folder(folder / "text", dtype="float32").requires_grad_(False)
    denoisers = {name: DenoiserModel(load_folder(folder / name, dtype="float32"), DenoiserInfo.read(folder / name))
                 for name in ("unet", "dit")}
    return vae, text, denoisers


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    p = argparse.ArgumentParser(prog="python -m nodes.training.controlnet", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="nodes/weights/tiny-shapes", help="the trained family's folder")
    p.add_argument("--which", nargs="+", choices=("unet", "dit"), default=["unet", "dit"])
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--samples", type=int, default=16000)
    p.add_argument("--minutes", type=float, default=15.0, help="time budget per ControlNet")
    p.add_argument("--steps", type=int, default=3000, help="step cap per ControlNet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="stored weight dtype")
    p.add_argument("--eval", type=int, default=100, help="cases for the IoU evaluation (0: skip)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(2)
    folder = Path(args.family)
    report_path = folder / "controlnet_training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    vae, text, denoisers = load_family(folder)
    t = time.perf_counter()
    images, captions = make_dataset(args.seed, args.samples)
    latents, masks = vae.scale_latent(encode_means(vae, images)), mask_of(images)
    del images
    report["data"] = {"samples": args.samples, "seed": args.seed, "wall_s": round(time.perf_counter() - t, 1)}
    for i, name in enumerate(args.which):
        torch.manual_seed(args.seed + i)
        base = denoisers[name]
        controlnet = new_controlnet(base, vae.config.space)
        record, ema = train_controlnet(base, controlnet, text, latents, masks, captions,
                                       Budget(args.minutes, args.steps), batch=args.batch, lr=args.lr,
                                       seed=args.seed + i, name=f"controlnet_{name}",
                                       log=lambda m: print(m, flush=True))
        record["command"] = "python -m nodes.training.controlnet " + " ".join(sys.argv[1:] if argv is None else argv)
        record["bytes"] = save_model(ema.model, folder / f"controlnet_{name}", getattr(torch, args.dtype))
        if args.eval:
            record["evaluation"] = evaluate_controlnet(base, ema.model, text, vae, args.eval)
            print(f"controlnet_{name} evaluation {json.dumps(record['evaluation'])}", flush=True)
        report[name] = record
        report_path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
