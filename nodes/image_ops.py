"""Image and mask nodes: resize, crop, masks from an image's colour or alpha, and the control-image preprocessors.

Images are float tensors (B, C, H, W) in [0, 1]; masks are (B, 1, H, W) in [0, 1] where 1 marks the region to
generate (inpainting) or the object (control).

Preprocessors (type ids ``control.*``, category ``control``) make ControlNet control images from pictures:
``control.edges`` (Sobel magnitude, or Canny edges through ``kornia.filters.canny``) and ``control.object_mask``
(pixels clearly brighter than a near-black background, or of a colour).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from nodegraph import Field, node
from nodegraph import types as T

Size = Annotated[int, Field(ge=1, le=16384)]


def _pixels(literals: dict) -> dict[str, int]:
    """``cost`` of a node whose output is ``width`` x ``height`` (batch unknown until it runs)."""
    return {"pixels": literals["width"] * literals["height"]}


def _check_image(image: torch.Tensor, what: str = "image") -> None:
    if image.dim() != 4:
        raise ValueError(f"{what} must be (B, C, H, W); got shape {tuple(image.shape)}")


@node("image.resize", category="image", output="image", cost=_pixels)
def resize(image: T.Image, width: Size, height: Size,
           mode: Literal["nearest", "bilinear", "bicubic", "area"] = "bilinear") -> T.Image:
    """Resize an image to width x height."""
    _check_image(image)
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(image, size=(height, width), mode=mode, **kwargs).clamp(0, 1)


@node("image.crop", category="image", output="image", cost=_pixels)
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


# -- control-image preprocessors -----------------------------------------------------------------------------


@node("control.edges", version="1.1.0", category="control", output="image")
def edges(image: T.Image, method: Literal["canny", "sobel"] = "canny",
          low: Annotated[float, Field(ge=0, le=1, description="hysteresis: weak edge threshold")] = 0.1,
          high: Annotated[float, Field(ge=0, le=1, description="hysteresis: strong edge threshold")] = 0.2,
          blur: Annotated[float, Field(ge=0, le=8, description="Gaussian sigma before the gradient")] = 0.0) -> T.Image:
    """Edge map (B, 3, H, W): Sobel gradient magnitude, or binary Canny edges (Canny 1986; kornia's implementation).

    Gradients are Sobel's, scaled so a 0 -> 1 step gives 1; thresholds are on that scale. The Sobel magnitude of a
    pixel is that of its colour channel with the largest one. Canny runs on the value channel (the max of R, G, B)
    rather than on luma grey, so a saturated blue edge on black is as strong as a white one (in grey it is 0.11);
    a boundary between two colours of the same value gives no Canny edge (``sobel`` shows it).
    """
    import kornia  # here, not at the top: importing it takes about half a second, which every registry load would pay

    _check_image(image)
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    rgb = image[:, :3].float() if image.shape[1] >= 3 else image[:, :1].float()
    kernel = 2 * math.ceil(3 * blur) + 1 if blur > 0 else 1  # kornia skips the blur for a 1-pixel kernel
    sigma = (blur, blur) if blur > 0 else (1.0, 1.0)
    if method == "sobel":
        if blur > 0:
            rgb = kornia.filters.gaussian_blur2d(rgb, kernel, sigma, border_type="replicate")
        grad = kornia.filters.spatial_gradient(rgb, normalized=False)  # (B, C, 2, H, W), border replicated
        out = (grad.pow(2).sum(2).sqrt() / 4.0).amax(dim=1, keepdim=True).clamp(0, 1)
    else:
        weak = max(4.0 * low, 1e-6)  # kornia's magnitude is 4 for a unit step; its thresholds are strict, positive
        _, out = kornia.filters.canny(rgb.amax(dim=1, keepdim=True), weak, max(4.0 * high, weak), kernel, sigma)
    return out.expand(-1, 3, -1, -1).contiguous()


@node("control.object_mask", category="control")
def object_mask(image: T.Image, method: Literal["brightness", "color"] = "brightness",
                threshold: Annotated[float, Field(ge=0, le=1, description="brightness: min of the max channel")] = 0.3,
                color: Annotated[list[float], Field(min_length=3, max_length=3)] = [1.0, 0.0, 0.0],
                tolerance: Annotated[float, Field(ge=0, le=1, description="color: max per-channel distance")] = 0.15,
                ) -> {"image": T.Image, "mask": T.Mask}:
    """Object mask: pixels clearly brighter than a near-black background, or within ``tolerance`` of ``color``.

    ``image`` is the mask as a grey (B, 3, H, W) control image, ``mask`` the same as (B, 1, H, W).
    """
    if image.dim() != 4 or image.shape[1] not in (1, 3, 4):
        raise ValueError(f"image must be (B, C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
    rgb = image[:, :3].float() if image.shape[1] >= 3 else image.float().expand(-1, 3, -1, -1)
    if method == "brightness":
        mask = rgb.amax(dim=1, keepdim=True) > threshold
    else:
        ref = torch.tensor(color, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        mask = (rgb - ref).abs().amax(dim=1, keepdim=True) <= tolerance
    mask = mask.float()
    return {"image": mask.expand(-1, 3, -1, -1).contiguous(), "mask": mask}
