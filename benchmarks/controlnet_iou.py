"""ControlNet layout benchmark for the embedded tiny-shapes ControlNets: prints a table.

For ``--n`` cases, a caption is drawn from the shapes grammar and rendered by the data generator (seeded); the
rendered image is written as the control image and run through the ControlNet graph (``graphs/controlnet.json``
= U-Net, ``graphs/controlnet_dit.json`` = DiT) through the Engine, exactly as the CLI would (overrides
``prompt.text``, ``noise.seed`` and ``control_image.path``). The graph's own ``control.object_mask`` turns it
into the control mask. The same caption and seed also go through the plain txt2img graph of that denoiser.

Reported per denoiser: mean (and median) IoU between the generated image's object mask and the control mask;
the same IoU without control (what the layout alone would give by chance); colour/shape adherence (all objects
of the caption present with the right colours and shapes, :mod:`nodes.shapes.evaluate`) with and without
control; seconds per image.

Run: ``python benchmarks/controlnet_iou.py [--n 100] [--seed 4321]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _table import print_table
from PIL import Image

from nodegraph import Engine
from nodes.shapes import data
from nodes.shapes_nodes import image_to_uint8
from nodes.training.controlnet import adherence, iou, mask_of

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"unet": ("controlnet.json", "txt2img_unet.json"), "dit": ("controlnet_dit.json", "txt2img.json")}


def run(engine: Engine, graph: dict, overrides: dict) -> np.ndarray:
    return image_to_uint8(engine.run(graph, overrides=overrides, outputs=["image"]).outputs["image"])[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--which", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    ap.add_argument("--json", type=Path, help="also write the per-case figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    images, captions, _ = data.batch(args.seed, args.n)
    masks = mask_of(images)
    rows, dump = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
            Image.fromarray(image).save(Path(tmp) / f"case_{i}.png")
        engine = Engine(device="cpu", input_root=tmp, output_root=tmp)
        for name in args.which:
            control_graph, plain_graph = (json.loads((ROOT / "graphs" / g).read_text()) for g in PAIRS[name])
            controlled, plain, t0 = [], [], time.perf_counter()
            for i, caption in enumerate(captions):
                overrides = {"prompt.text": caption, "noise.seed": args.seed + i}
                controlled.append(run(engine, control_graph, {**overrides, "control_image.path": f"case_{i}.png"}))
            seconds = (time.perf_counter() - t0) / args.n
            for i, caption in enumerate(captions):
                plain.append(run(engine, plain_graph, {"prompt.text": caption, "noise.seed": args.seed + i}))
            with_iou, without_iou = iou(mask_of(np.stack(controlled)), masks), iou(mask_of(np.stack(plain)), masks)
            adh = {"with": adherence(controlled, captions), "without": adherence(plain, captions)}
            rows += [
                (f"{name}: mean IoU with the control mask", f"{with_iou.mean():.3f} (median {np.median(with_iou):.3f}, "
                 f"n={args.n})"),
                (f"{name}: mean IoU without control", f"{without_iou.mean():.3f}"),
                (f"{name}: colour/shape adherence with control", f"{100 * np.mean(adh['with']):.1f}%"),
                (f"{name}: colour/shape adherence without control", f"{100 * np.mean(adh['without']):.1f}%"),
                (f"{name}: seconds per controlled image (CPU)", f"{seconds:.3f}"),
            ]
            dump[name] = {"captions": captions, "iou": with_iou.tolist(), "iou_without": without_iou.tolist(),
                          "adherence": adh}
    print_table(rows, f"{args.n} cases rendered with data.batch(seed={args.seed}); case i uses noise seed "
                      f"{args.seed} + i; guidance and steps as in each graph")
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
