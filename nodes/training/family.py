"""The whole family in order (:func:`train_family`), one denoiser retrained against an existing family
(:func:`retrain_denoiser`), and the command line of ``python -m nodes.training``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from nodes.adapters import DenoiserInfo, DenoiserModel
from nodes.diffusion.schedules import PRESETS as TRAIN_PRESETS
from nodes.models.config import load_folder
from nodes.models.dit import DiT, DiTConfig
from nodes.models.text import TextConfig, TextEncoder
from nodes.models.unet import UNet, UNetConfig
from nodes.models.vae import AutoencoderKL, VAEConfig

from .common import TRAIN_P_POSITION, TRAIN_WEIGHTS, Budget, Log, make_dataset, save_model
from .denoiser import evaluate_denoiser, train_denoiser, train_denoiser_parallel
from .text import pretrain_text
from .vae import encode_means, latent_scaling, reconstruction_accuracy, train_vae


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
    record["bytes"] = save_model(model.net, out / name, dtype)
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
    record["bytes"] = save_model(vae, out / "vae", dtype)
    report["models"]["vae"] = record
    del images

    torch.manual_seed(args.seed + 1)
    text = TextEncoder(TextConfig.from_name("shapes"))
    record = pretrain_text(text, Budget(args.minutes_text, args.steps_text), lr=args.lr_text, seed=args.seed + 1,
                           weights=TRAIN_WEIGHTS, p_position=TRAIN_P_POSITION, log=log)
    record["bytes"] = save_model(text, out / "text", dtype)
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
    denoiser no longer matches it (retrain it with ``python -m nodes.training.controlnet --which <name>``).
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
    p = argparse.ArgumentParser(prog="python -m nodes.training",
                                description="Train the embedded tiny-shapes family on CPU (see nodes.training).")
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
