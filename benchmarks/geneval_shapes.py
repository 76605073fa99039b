"""GenEval-style evaluation of the embedded tiny-shapes family: prints a table.

Draws ``--n`` captions from the shapes grammar (seeded), generates one image per caption with each txt2img graph
(``graphs/txt2img.json`` = DiT, ``graphs/txt2img_unet.json`` = U-Net) through the Engine, exactly as the CLI
would (overrides ``prompt.text`` and ``noise.seed``), and scores every image with :mod:`nodes.shapes.evaluate`.

Reported per denoiser: one object colour+shape and stated position; two objects both present; relation
(left of / above); ``two <color> <shape>s`` count; overall; seconds per image.

Run: ``python benchmarks/geneval_shapes.py [--n 200] [--seed 0] [--graphs graphs/txt2img.json ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _table import print_table

from nodegraph import Engine
from nodes.shapes import data, evaluate
from nodes.shapes_nodes import image_to_uint8

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = [ROOT / "graphs" / "txt2img.json", ROOT / "graphs" / "txt2img_unet.json"]


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [data.sample_caption(rng) for _ in range(n)]


def run_graph(path: Path, caps: list[str], seed: int) -> tuple[list[dict], float, dict]:
    engine = Engine(device="cpu")
    graph = json.loads(path.read_text())
    results = []
    t0 = time.perf_counter()
    for i, cap in enumerate(caps):
        out = engine.run(graph, overrides={"prompt.text": cap, "noise.seed": seed + i}, outputs=["image"])
        image = image_to_uint8(out.outputs["image"])[0]
        results.append(evaluate.score(image, cap))
    seconds = (time.perf_counter() - t0) / len(caps)
    meta = {n: graph["nodes"][n]["inputs"] for n in ("guidance", "sigmas") if n in graph["nodes"]}
    return results, seconds, meta


def rows_for(name: str, results: list[dict], seconds: float) -> list[tuple[str, str]]:
    def acc(category: str, check: str) -> str:
        vals = [r[check] for r in results if r.get("category") == category and r.get(check) is not None]
        return f"{100 * sum(vals) / len(vals):.1f}% (n={len(vals)})" if vals else "n/a"

    return [
        (f"{name}: one object, colour+shape", acc("single", "color_shape")),
        (f"{name}: one object, stated position", acc("single", "position")),
        (f"{name}: two objects, both present", acc("two", "both_present") + " | relation captions: "
         + acc("relation", "both_present")),
        (f"{name}: relation (left of / above)", acc("relation", "relation")),
        (f"{name}: two <color> <shape>s, count", acc("count", "count")),
        (f"{name}: overall correct", f"{100 * evaluate.aggregate(results)['overall']['accuracy']:.1f}%"),
        (f"{name}: seconds per image (CPU)", f"{seconds:.3f}"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graphs", nargs="*", type=Path, default=GRAPHS)
    ap.add_argument("--json", type=Path, help="also write all per-image results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    caps = captions(args.n, args.seed)
    rows, dump = [], {}
    for path in args.graphs:
        results, seconds, meta = run_graph(path, caps, args.seed)
        rows.extend(rows_for(path.stem, results, seconds))
        dump[path.stem] = {"meta": meta, "results": results}
    print_table(rows, f"{args.n} captions drawn with seed {args.seed}; image i uses noise seed {args.seed} + i")
    if args.json:
        args.json.write_text(json.dumps(dump, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
