"""Writing graph outputs to files (the CLI's ``--out``; also usable from the API).

Policy, by the output's port type and value:

* ``Image`` (float tensor ``(B, C, H, W)`` or ``(C, H, W)`` in [0, 1], C = 1, 3 or 4): one PNG per batch item,
  ``<name>.png`` or ``<name>_<i>.png``; the graph's JSON is embedded as the PNG text chunk ``nodegraph``
  so an image carries the recipe that made it.
* ``File``: the node already wrote the file (inside the output root); its path is reported as it is.
* other tensors: ``<name>.safetensors``; JSON-able values: ``<name>.json``.
* anything else (models, opaque objects): not written; reported with an empty file list.

Confinement: an output name must be a plain file name (no ``/``, ``\\``, ``..``; ValueError before anything is
written), and every file is produced in memory and written with :func:`nodegraph.safeio.write_bytes`: atomically,
inside the output folder, replacing (never writing through) a link planted at its name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .safeio import plain_name, write_bytes

PNG_GRAPH_KEY = "nodegraph"


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float [0, 1] -> (H, W, C) uint8, rounding to nearest."""
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image must be (C, H, W) with C in 1, 3, 4; got {tuple(image.shape)}")
    arr = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def png_bytes(image: torch.Tensor, graph_json: str | None = None) -> bytes:
    """A (C, H, W) image encoded as PNG, with the graph's JSON as the text chunk ``nodegraph`` when given."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if graph_json is not None:
        info.add_text(PNG_GRAPH_KEY, graph_json)
    buf = io.BytesIO()
    Image.fromarray(image_to_uint8(image)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: torch.Tensor, path: Path, graph_json: str | None = None) -> Path:
    """Write a PNG at ``path`` (its folder is the confinement root, see :func:`nodegraph.safeio.write_bytes`)."""
    path = Path(path)
    return write_bytes(path.parent, path.name, png_bytes(image, graph_json))


def _encode(name: str, value: Any, type_name: str | None, graph_json: str | None) -> list[tuple[str, bytes]] | None:
    """The files one output becomes, as ``(file name, bytes)``; None when it is not written at all."""
    if isinstance(value, torch.Tensor) and type_name == "Image":
        batch = value if value.dim() == 4 else value.unsqueeze(0)
        if len(batch) == 1:
            return [(f"{name}.png", png_bytes(batch[0], graph_json))]
        return [(f"{name}_{i}.png", png_bytes(img, graph_json)) for i, img in enumerate(batch)]
    if isinstance(value, torch.Tensor):
        from safetensors.torch import save

        return [(f"{name}.safetensors", save({name: value.detach().cpu().contiguous()}))]
    try:
        return [(f"{name}.json", json.dumps(value).encode())]
    except (TypeError, ValueError):
        return None


def write_output(name: str, value: Any, type_name: str | None, out_dir: Path, graph_json: str | None) -> list[str]:
    """Write one output under ``out_dir``; return the paths written (a ``File`` output's own paths)."""
    plain_name(name)
    if type_name == "File":
        items = value if isinstance(value, (list, tuple)) else [value]
        return [str(v) for v in items]
    files = _encode(name, value, type_name, graph_json)
    if files is None:
        return []
    return [str(write_bytes(out_dir, file_name, data)) for file_name, data in files]


def write_outputs(values: dict[str, Any], types: dict[str, Any], out_dir: str | Path,
                  graph_json: str | None = None) -> dict[str, list[str]]:
    """Write every output; return ``{name: [file paths]}``. A name that is not a plain file name is a ValueError
    raised before any file is written."""
    out_dir = Path(out_dir)
    for name in values:
        plain_name(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: write_output(name, v, getattr(types.get(name), "name", None), out_dir, graph_json)
            for name, v in values.items()}
