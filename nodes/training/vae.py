"""Stage 2: the VAE, trained on random crops, then its latent scaling and a reconstruction check."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nodes.models.vae import AutoencoderKL
from nodes.shapes import data, evaluate

from .common import Budget, Log, LossLog, adamw, image_batch, set_lr


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
    opt = adamw(vae.parameters(), lr)
    losses, step, start = LossLog("vae", 25, log), 0, time.perf_counter()
    f, c = vae.config.downsample_factor, vae.config.latent_channels
    while not budget.done(step, start):
        x = random_crops(images, torch.randint(len(images), (batch,), generator=gen), crop, f, gen)
        noise = torch.randn(batch, c, crop // f, crop // f, generator=gen)
        set_lr(opt, step, 50)
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
    out = [vae.encode(image_batch(images, torch.arange(i, min(i + batch, len(images)))))[0].contiguous()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def latent_scaling(means: Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor) that give the scaled latents mean 0 and std 1."""
    return float(means.mean()), float(1.0 / means.std())


@torch.inference_mode()
def reconstruction_accuracy(vae: AutoencoderKL, images: np.ndarray, captions: list[str]) -> dict[str, Any]:
    """Shapes-evaluator accuracy of reconstructions (through the posterior mean) against their captions."""
    x = image_batch(images, torch.arange(len(images)))
    recon = data.from_tensor(vae.decode(vae.encode(x)[0]))
    results = [evaluate.score(img, cap) for img, cap in zip(recon, captions)]
    err = np.abs(recon.astype(np.int16) - images.astype(np.int16))
    return {"accuracy": evaluate.aggregate(results)["overall"]["accuracy"], "n": len(images),
            "mean_abs_error_uint8": round(float(err.mean()), 3)}
