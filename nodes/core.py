"""General-purpose nodes: scalars, seeded tensors, elementwise tensor math, sequences, image files.

These carry no model code; the diffusion nodes live in their own modules of this pack.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

import torch

from nodegraph import Context, Field, node, types as T

Shape = Annotated[list[int], Field(min_length=1, max_length=8, description="tensor shape")]


def _shape_cost(literals: dict) -> dict[str, int]:
    """``cost`` of a node that allocates a tensor of the literal ``shape``."""
    return {"elements": math.prod(literals["shape"])}


def _image_cost(literals: dict) -> dict[str, int]:
    """``cost`` of a node that makes a ``width`` x ``height`` RGB image."""
    pixels = literals["width"] * literals["height"]
    return {"pixels": pixels, "elements": 3 * pixels}


@node("math.add", category="math", output="out")
def add(a: float, b: float = 0.0) -> float:
    """a + b for numbers."""
    return a + b


@node("math.multiply", category="math", output="out")
def multiply(a: float, b: float = 1.0) -> float:
    """a * b for numbers."""
    return a * b


@node("tensor.randn", category="tensor", output="out", cost=_shape_cost)
def randn(seed: Annotated[int, Field(ge=0, le=2**63 - 1)], shape: Shape,
          scale: float = 1.0) -> T.Tensor:
    """Standard normal noise from a seed, generated on CPU so every device gets the same numbers."""
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale


@node("tensor.full", category="tensor", output="out", cost=_shape_cost)
def full(shape: Shape, value: float = 0.0) -> T.Tensor:
    """A tensor filled with one value."""
    return torch.full(shape, float(value))


@node("tensor.affine", category="tensor", output="out")
def affine(x: T.Tensor, scale: float = 1.0, shift: float = 0.0) -> T.Tensor:
    """x * scale + shift."""
    return x * scale + shift


@node("tensor.add", category="tensor", output="out")
def tensor_add(a: T.Tensor, b: T.Tensor, alpha: float = 1.0) -> T.Tensor:
    """a + alpha * b (broadcasting)."""
    return a + alpha * b


@node("tensor.lerp", category="tensor", output="out")
def lerp(a: T.Tensor, b: T.Tensor, weight: Annotated[float, Field(ge=0, le=1)] = 0.5) -> T.Tensor:
    """(1 - weight) * a + weight * b."""
    return torch.lerp(a, b, weight)


@node("tensor.stats", category="tensor")
def stats(x: T.Tensor) -> {"mean": T.Float, "std": T.Float, "min": T.Float, "max": T.Float}:
    """Mean, standard deviation, minimum and maximum of a tensor."""
    x = x.float()
    return {"mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else 0.0,
            "min": x.min().item(), "max": x.max().item()}


@node("sequence.linspace", category="sequence", output="out")
def linspace(start: float, stop: float, count: Annotated[int, Field(ge=1, le=100000)]) -> T.Tensor:
    """count evenly spaced values from start to stop (a float32 1-d tensor)."""
    return torch.linspace(start, stop, count, dtype=torch.float32)


@node("image.gradient", category="image", output="image", cost=_image_cost)
def gradient(width: Annotated[int, Field(ge=1, le=8192)] = 64, height: Annotated[int, Field(ge=1, le=8192)] = 64,
             start: Annotated[list[float], Field(min_length=3, max_length=3)] = [0.0, 0.0, 0.0],
             end: Annotated[list[float], Field(min_length=3, max_length=3)] = [1.0, 1.0, 1.0],
             direction: Literal["horizontal", "vertical"] = "horizontal") -> T.Image:
    """A linear colour gradient image (1, 3, H, W) in [0, 1]."""
    n = width if direction == "horizontal" else height
    t = torch.linspace(0, 1, n)
    a, b = torch.tensor(start).view(3, 1), torch.tensor(end).view(3, 1)
    line = a + (b - a) * t  # (3, n)
    img = line[:, None, :].expand(3, height, width) if direction == "horizontal" else line[:, :, None].expand(3, height, width)
    return img.clamp(0, 1).unsqueeze(0).contiguous()


@node("image.blend", category="image", output="image")
def blend(a: T.Image, b: T.Image, alpha: Annotated[float, Field(ge=0, le=1)] = 0.5) -> T.Image:
    """Per-pixel mix of two images of the same size."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.lerp(a, b, alpha)


@node("image.from_tensor", category="image", output="image")
def from_tensor(x: T.Tensor, low: float = -1.0, high: float = 1.0) -> T.Image:
    """Map a (B, C, H, W) tensor from [low, high] to an image in [0, 1]."""
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if high <= low:
        raise ValueError(f"high ({high}) must be greater than low ({low})")
    return ((x - low) / (high - low)).clamp(0, 1)


IMAGE_FILE_MAX_BYTES = 256 << 20  # an image file read by image.load (PIL's decompression-bomb guard also applies)


def _file_fingerprint(literals: dict, ctx: Context) -> str:
    from nodegraph.safeio import read_bytes

    path = ctx.resolve_input(literals["path"])
    return hashlib.sha256(read_bytes(path, IMAGE_FILE_MAX_BYTES, follow_links=False)).hexdigest()


@node("image.load", category="image", output="image", fingerprint=_file_fingerprint)
def load_image(path: str, ctx: Context, mode: Literal["RGB", "RGBA", "L"] = "RGB") -> T.Image:
    """Read an image file (a regular file inside the input root, at most 256 MiB) as a (1, C, H, W) float image
    in [0, 1]."""
    import io

    from PIL import Image, UnidentifiedImageError
    import numpy as np

    from nodegraph.safeio import read_bytes

    full = ctx.resolve_input(path)  # links resolved and confined, so the last component is no link
    data = read_bytes(full, IMAGE_FILE_MAX_BYTES, follow_links=False)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"image.load: {str(full)!r} is not an image file PIL can read") from None
    with im:
        arr = np.asarray(im.convert(mode), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


@node("image.save", category="image", output="file", cache=False)
def save_image(image: T.Image, path: str, ctx: Context) -> T.File:
    """Write the first image of a batch as PNG under the output root; returns the path written."""
    from pathlib import Path

    from nodegraph.outputs import png_bytes
    from nodegraph.safeio import write_bytes

    full = ctx.resolve_output(path)
    if full.suffix.lower() != ".png":
        raise ValueError(f"image.save writes PNG files; {path!r} does not end in .png")
    root = Path(ctx.output_root).resolve()
    img = image[0] if image.dim() == 4 else image
    return str(write_bytes(root, full.relative_to(root), png_bytes(img)))  # no link below the root is followed
