"""Image and mask nodes: resize, crop, masks from an image's colour or alpha.

Images are float tensors (B, C, H, W) in [0, 1]; masks are (B, 1, H, W) in [0, 1] where 1 marks the region to
generate (inpainting) or the object (control).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from nodegraph import Field, node
from nodegraph import types as T

Size = Annotated[int, Field(ge=1, le=16384)]


def _check_image(image: torch.Tensor, what: str = "image") -> None:
    if image.dim() != 4:
        raise ValueError(f"{what} must be (B, C, H, W); got shape {tuple(image.shape)}")


@node("image.resize", category="image", output="image")
def resize(image: T.Image, width: Size, height: Size,
           mode: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear") -> T.Image:
    """Resize an image to width x height."""
    _check_image(image)
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(image, size=(height, width), mode=mode, **kwargs).clamp(0, 1)


@node("image.crop", category="image", output="image")
def crop(image: T.Image, x: Annotated[int, Field(ge=0)], y: Annotated[int, Field(ge=0)], width: Size,
         height: Size) -> T.Image:
    """Crop the rectangle (x, y, width, height), which must lie inside the image."""
    _check_image(image)
    h, w = image.shape[-2:]
    if x + width > w or y + height > h:
        raise ValueError(f"crop ({x}, {y}, {width}x{height}) does not fit in the {w}x{h} image")
    return image[..., y:y + height, x:x + width].contiguous()


@node("mask.from_image", category="mask", output="mask")
def mask_from_image(image: T.Image, channel: Literal["luminance", "red", "green", "blue", "alpha"] = "luminance",
                    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5, invert: bool = False) -> T.Mask:
    """A binary mask: 1 where the chosen channel is above the threshold."""
    _check_image(image)
    if channel == "alpha":
        if image.shape[1] != 4:
            raise ValueError(f"the image has {image.shape[1]} channels and no alpha; load it with mode RGBA")
        value = image[:, 3:4]
    elif channel == "luminance":
        rgb = image[:, :3] if image.shape[1] >= 3 else image[:, :1].expand(-1, 3, -1, -1)
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        value = (rgb * weights).sum(1, keepdim=True)
    else:
        index = {"red": 0, "green": 1, "blue": 2}[channel]
        if image.shape[1] <= index:
            raise ValueError(f"the image has no {channel} channel")
        value = image[:, index:index + 1]
    mask = (value > threshold).to(image.dtype)
    return 1 - mask if invert else mask


@node("mask.from_alpha", category="mask", output="mask")
def mask_from_alpha(image: T.Image, invert: bool = True) -> T.Mask:
    """The alpha channel as a mask; by default transparent pixels (alpha 0) become 1, i.e. the region to fill."""
    _check_image(image)
    if image.shape[1] != 4:
        raise ValueError(f"the image has {image.shape[1]} channels and no alpha; load it with mode RGBA")
    alpha = image[:, 3:4]
    return 1 - alpha if invert else alpha


@node("mask.to_image", category="mask", output="image")
def mask_to_image(mask: T.Mask) -> T.Image:
    """Show a mask as a grey image (for previews and control inputs)."""
    _check_image(mask, "mask")
    return mask[:, :1].expand(-1, 3, -1, -1).clamp(0, 1).contiguous()
