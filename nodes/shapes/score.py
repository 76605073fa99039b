"""Score generated images against their captions: ``python -m nodes.shapes.score IMAGE.png [...] [--json]``.

The caption of each image is taken from ``--caption`` (one for all), from a ``--captions`` JSON file mapping file
names to captions, or — for PNGs written by ``nodegraph run`` — from the graph embedded in the PNG: the ``text``
input of its ``prompt`` node (after any ``--set`` overrides, which the embedded graph includes).
Prints per-image results and the per-category accuracies (GenEval-style).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import evaluate


def caption_from_png(path: Path, node: str = "prompt") -> str | None:
    with Image.open(path) as im:
        text = im.info.get("nodegraph")
    if not text:
        return None
    try:
        graph = json.loads(text)
        return graph["nodes"][node]["inputs"]["text"]
    except (ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodes.shapes.score", description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--caption", help="one caption for every image")
    ap.add_argument("--captions", type=Path, help="JSON file mapping image file names to captions")
    ap.add_argument("--prompt-node", default="prompt", help="node whose 'text' input is the caption in PNG graphs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    table = json.loads(args.captions.read_text()) if args.captions else {}
    results, missing = [], []
    for path in args.images:
        cap = args.caption or table.get(path.name) or table.get(str(path)) or caption_from_png(path, args.prompt_node)
        if cap is None:
            missing.append(str(path))
            continue
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        result = evaluate.score(arr, cap)
        result["file"] = str(path)
        results.append(result)
    summary = evaluate.aggregate(results)
    if args.json:
        print(json.dumps({"results": results, "summary": summary, "missing_caption": missing}, default=str))
    else:
        for r in results:
            print(f"{'ok ' if r.get('correct') else 'BAD'} {r['file']}: {r.get('caption')!r}")
        print(json.dumps(summary, indent=2, default=str))
        for m in missing:
            print(f"no caption for {m}", file=sys.stderr)
    return 2 if missing and not results else 0


if __name__ == "__main__":
    sys.exit(main())
