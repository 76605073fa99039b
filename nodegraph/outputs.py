"""Writing graph outputs to files (the CLI's ``--out``; also usable from the API).

Policy, by the output's port type and value:

* ``Image`` (float tensor ``(B, C, H, W)`` or ``(C, H, W)`` in [0, 1], C = 1, 3 or 4): one PNG per batch item,
  ``<name>.png`` or ``<name>_<i>.png``; the graph's JSON is embedded as the PNG text chunk ``nodegraph``
  so an image carries the recipe that made it.
* ``File``: the node already wrote the file (inside the output root); its path is reported as it is.
* other tensors: ``<name>.safetensors``; JSON-able values: ``<name>.json``.
* anything else (models, opaque objects): not written; reported with an empty file list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

PNG_GRAPH_KEY = "nodegraph"


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float [0, 1] -> (H, W, C) uint8, rounding to nearest."""
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image must be (C, H, W) with C in 1, 3, 4; got {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_png(image: torch.Tensor, path: Path, graph_json: str | None = None) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if graph_json is not None:
        info.add_text(PNG_GRAPH_KEY, graph_json)
    Image.fromarray(image_to_uint8(image)).save(path, pnginfo=info)
    return path


def write_output(name: str, value: Any, type_name: str | None, out_dir: Path, graph_json: str | None) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if type_name == "File":
        items = value if isinstance(value, (list, tuple)) else [value]
        return [str(v) for v in items]
    if isinstance(value, torch.Tensor) and (type_name == "Image"):
        batch = value if value.dim() == 4 else value.unsqueeze(0)
        if len(batch) == 1:
            return [str(save_png(batch[0], out_dir / f"{name}.png", graph_json))]
        return [str(save_png(img, out_dir / f"{name}_{i}.png", graph_json)) for i, img in enumerate(batch)]
    if isinstance(value, torch.Tensor):
        from safetensors.torch import save_file

        path = out_dir / f"{name}.safetensors"
        save_file({name: value.detach().cpu().contiguous()}, str(path))
        return [str(path)]
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return []
    path = out_dir / f"{name}.json"
    path.write_text(text)
    return [str(path)]


def write_outputs(values: dict[str, Any], types: dict[str, Any], out_dir: str | Path,
                  graph_json: str | None = None) -> dict[str, list[str]]:
    """Write every output; return ``{name: [file paths]}``."""
    out_dir = Path(out_dir)
    return {name: write_output(name, v, getattr(types.get(name), "name", None), out_dir, graph_json)
            for name, v in values.items()}
