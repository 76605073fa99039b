"""Cameras: a dict of tensors for a batch of views looking at the origin (conventions in :mod:`nodes.geometry`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for the ``index``-th draw of a seeded run (the same scheme as ``noise.step``)."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + index) % (2**63))


def look_at(azimuth: Tensor, elevation: Tensor, distance: Tensor, fov: Tensor) -> dict[str, Tensor]:
    """Cameras on a sphere around the origin looking at it; angles in degrees, ``fov`` horizontal."""
    az, el = torch.deg2rad(azimuth.double()), torch.deg2rad(elevation.double())
    origin = distance.double()[:, None] * torch.stack([el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], -1)
    back = F.normalize(origin, dim=-1)
    right = F.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(back),
                                           back, dim=-1), dim=-1)
    up = torch.linalg.cross(back, right, dim=-1)
    focal = 0.5 / torch.tan(torch.deg2rad(fov.double()) / 2)
    return {"origin": origin.float(), "rotation": torch.stack([right, up, back], -1).float(),
            "focal": focal.float().expand(len(origin)).clone(), "azimuth": azimuth.float(),
            "elevation": elevation.float()}


def random_cameras(seed: int, index: int, batch: int, azimuth: list[float], elevation: list[float],
                   distance: list[float], fov: float) -> dict[str, Tensor]:
    """``batch`` views drawn uniformly from the ranges; deterministic in ``(seed, index)``."""
    u = torch.rand(batch, 3, generator=generator(seed, index), dtype=torch.float64)
    pick = lambda r, k: r[0] + (r[1] - r[0]) * u[:, k]  # noqa: E731
    return look_at(pick(azimuth, 0), pick(elevation, 1), pick(distance, 2), torch.tensor(float(fov)))


def orbit_cameras(views: int, elevation: float, distance: float, fov: float) -> dict[str, Tensor]:
    """``views`` cameras evenly spaced in azimuth at one elevation."""
    az = torch.arange(views, dtype=torch.float64) * (360.0 / views)
    return look_at(az, torch.full_like(az, elevation), torch.full_like(az, distance), torch.tensor(float(fov)))


def as_camera(camera: dict[str, Any]) -> dict[str, Tensor]:
    """Check a camera dict (literal lists are accepted) and return float tensors with a batch dimension."""
    missing = {"origin", "rotation", "focal"} - set(camera)
    if missing:
        raise ValueError(f"a camera needs origin, rotation and focal; missing {sorted(missing)}")
    origin = torch.as_tensor(camera["origin"], dtype=torch.float32).reshape(-1, 3)
    rotation = torch.as_tensor(camera["rotation"], dtype=torch.float32).reshape(-1, 3, 3)
    focal = torch.as_tensor(camera["focal"], dtype=torch.float32).reshape(-1).expand(len(origin))
    if len(rotation) != len(origin):
        raise ValueError(f"camera batch mismatch: {len(origin)} origins, {len(rotation)} rotations")
    return {"origin": origin, "rotation": rotation, "focal": focal}
