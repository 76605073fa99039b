"""The voxel field and its emission-absorption volume renderer (conventions in :mod:`nodes.geometry`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .cameras import as_camera


def inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def blob_field(resolution: int, density: float, radius: float, color: list[float]) -> Tensor:
    """Raw field whose density is a Gaussian blob ``density * exp(-|p|^2 / (2 radius^2))`` (DreamFusion's
    initial density bias) and whose colour is constant."""
    axis = torch.linspace(-1, 1, resolution)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    sigma = density * torch.exp(-(x**2 + y**2 + z**2) / (2 * radius**2))
    rgb = torch.tensor(color).clamp(1e-3, 1 - 1e-3).logit().view(3, 1, 1, 1).expand(3, *x.shape)
    return torch.cat([inverse_softplus(sigma.clamp_min(1e-4))[None], rgb]).contiguous()


def query(field: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Trilinear density ``(...)`` and colour ``(..., 3)`` at world points ``(..., 3)`` (x, y, z)."""
    if field.dim() != 4 or field.shape[0] != 4:
        raise ValueError(f"a field must be (4, D, H, W) (density + RGB); got shape {tuple(field.shape)}")
    grid = points.reshape(1, -1, 1, 1, 3).to(field)
    raw = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    raw = raw.reshape(4, *points.shape[:-1])  # (4, ...)
    return F.softplus(raw[0]), torch.sigmoid(raw[1:]).movedim(0, -1)


def camera_rays(camera: dict[str, Tensor], width: int, height: int) -> tuple[Tensor, Tensor]:
    """World-space ray origins and unit directions, each ``(B, H, W, 3)``, through pixel centres."""
    focal = camera["focal"].view(-1, 1, 1) * width
    cols = torch.arange(width, dtype=torch.float32, device=focal.device) + 0.5 - width / 2
    rows = torch.arange(height, dtype=torch.float32, device=focal.device) + 0.5 - height / 2
    x, y = (cols[None, None, :] / focal).expand(-1, height, -1), (-rows[None, :, None] / focal).expand(-1, -1, width)
    local = torch.stack([x, y, -torch.ones_like(x)], -1)  # (B, H, W, 3) in camera space
    dirs = F.normalize(torch.einsum("bij,bhwj->bhwi", camera["rotation"], local), dim=-1)
    return camera["origin"][:, None, None, :].expand_as(dirs), dirs


def box_interval(origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
    """Where each ray enters and leaves ``[-1, 1]^3`` (slab test); ``far <= near`` for rays that miss."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-1 - origins) * inv, (1 - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, torch.maximum(far, near)


def render(field: Tensor, camera: dict[str, Any], width: int, height: int, samples: int = 64,
           background: list[float] | Tensor = (0.0, 0.0, 0.0), jitter: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor]:
    """Volume-render ``field`` from each camera: image ``(B, 3, H, W)`` in [0, 1] and opacity ``(B, 1, H, W)``.

    ``jitter`` (a CPU generator) gives stratified samples, one uniform offset per bin; None gives bin centres.
    """
    cam = {k: v.to(field.device) for k, v in as_camera(camera).items()}
    origins, dirs = camera_rays(cam, width, height)
    near, far = box_interval(origins, dirs)  # (B, H, W)
    shape = (*near.shape, samples)
    offset = torch.full(shape, 0.5) if jitter is None else torch.rand(shape, generator=jitter)
    step = (far - near)[..., None] / samples
    t = near[..., None] + step * (torch.arange(samples, device=near.device) + offset.to(near))  # (B, H, W, S)
    density, rgb = query(field, origins[..., None, :] + t[..., None] * dirs[..., None, :])
    tau = density * step.to(density)  # optical depth of each segment
    transmittance = torch.exp(-(torch.cumsum(tau, -1) - tau))
    weights = transmittance * -torch.expm1(-tau)  # (B, H, W, S)
    opacity = weights.sum(-1)
    bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
    color = (weights[..., None] * rgb).sum(-2) + (1 - opacity)[..., None] * bg
    return color.permute(0, 3, 1, 2).clamp(0, 1), opacity[:, None]


def tile(images: Tensor, columns: int) -> Tensor:
    """``(N, C, H, W)`` -> one ``(1, C, rows*H, columns*W)`` grid, row by row (empty cells black)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    padded = torch.cat([images, images.new_zeros(rows * columns - n, c, h, w)])
    return padded.view(rows, columns, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, rows * h, columns * w)
