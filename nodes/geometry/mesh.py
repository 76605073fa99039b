"""Meshes from a field's density (marching cubes through scikit-image) and mesh files (through open3d)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .volume import query


class EmptyMeshError(ValueError):
    """The field has no surface at the requested density threshold."""


def marching_cubes(volume: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface ``volume == level`` of a ``(X, Y, Z)`` array (inside: above ``level``), by scikit-image.

    Returns vertices ``(V, 3)`` in index coordinates (x, y, z) and faces ``(F, 3)``, counter-clockwise seen from
    outside; vertices on a shared cube edge are shared, so the surface is closed wherever it does not reach the
    array's border. No surface gives empty arrays.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3 or min(vol.shape) < 2:
        raise ValueError(f"marching cubes needs a 3-d volume of at least 2^3 points; got shape {vol.shape}")
    inside = vol > level
    if inside.all() or not inside.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    try:
        from skimage import measure
    except ImportError as exc:
        raise RuntimeError(f"marching cubes needs scikit-image: pip install 'nodegraph[mesh]'. Import failed: {exc}"
                           ) from None

    # "ascent": the values rise into the surface, so the faces wind counter-clockwise seen from outside
    verts, faces, _, _ = measure.marching_cubes(vol, level, gradient_direction="ascent")
    return verts.astype(np.float64), faces.astype(np.int64)


def extract_mesh(field: Tensor, threshold: float) -> dict[str, Tensor]:
    """Marching cubes over the field's density at ``threshold``, vertex colours from the field."""
    density = F.softplus(field[0].detach().float()).permute(2, 1, 0).cpu().numpy()  # (x, y, z)
    padded = np.pad(density, 1, constant_values=min(0.0, threshold - 1.0))
    verts, faces = marching_cubes(padded, threshold)
    if not len(faces):
        raise EmptyMeshError(f"empty mesh: no surface at density threshold {threshold} (field density ranges "
                             f"{density.min():.3g} to {density.max():.3g}); lower the threshold or optimise longer")
    res = np.array(density.shape) - 1
    world = torch.from_numpy(np.clip((verts - 1) / res * 2 - 1, -1, 1)).float()
    _, colors = query(field.detach().float(), world.to(field.device))
    return {"vertices": world, "faces": torch.from_numpy(faces).long(), "colors": colors.cpu().float()}


def write_mesh(mesh: dict[str, Tensor], path: Any) -> None:
    """Write ``.ply`` or ``.obj`` with vertex colours through open3d (imported here, lazily)."""
    try:
        import open3d as o3d
    except (ImportError, OSError) as exc:
        raise RuntimeError("saving a mesh needs open3d: pip install 'nodegraph[mesh]' (open3d-cpu; on Debian "
                           f"also apt-get install libusb-1.0-0). Import failed: {exc}") from None
    out = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(mesh["vertices"].detach().cpu().double().numpy()),
        o3d.utility.Vector3iVector(mesh["faces"].cpu().numpy().astype(np.int32)))
    if mesh.get("colors") is not None:
        out.vertex_colors = o3d.utility.Vector3dVector(mesh["colors"].detach().cpu().double().clamp(0, 1).numpy())
    out.compute_vertex_normals()
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):  # OBJ: "no triangle normals"
        written = o3d.io.write_triangle_mesh(str(path), out, write_ascii=True)
    if not written:
        raise OSError(f"open3d could not write {str(path)!r}")
