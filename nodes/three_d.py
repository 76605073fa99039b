"""Model-free 3D pieces for text-to-3D: cameras, a voxel field, a volume renderer, marching cubes, mesh files.

Conventions
-----------
* **World.** The field fills the cube ``[-1, 1]^3``; ``+y`` is up. Distances (camera ``distance``) are in
  these units.
* **Field.** A tensor ``(4, R, R, R)`` of raw parameters laid out ``(channel, z, y, x)`` (what
  ``grid_sample`` reads with ``align_corners=True``, so grid node ``k`` sits at ``-1 + 2k / (R - 1)``).
  Channel 0 is density before ``softplus`` (extinction per world unit), channels 1-3 colour before
  ``sigmoid``. Being a plain tensor, it is carried through a loop and updated by ``optim.adam`` like any
  parameter.
* **Cameras** are a dict of tensors for a batch of ``B`` views: ``origin (B, 3)``, ``rotation (B, 3, 3)``
  (camera-to-world; columns right, up, back: the camera looks along ``-back``, OpenGL-style), ``focal (B,)``
  (focal length over image width, so a camera fits any resolution), ``azimuth``/``elevation (B,)`` in degrees.
  Random cameras come from ``(seed, index)`` on CPU, so every device draws the same views.
* **Rendering** is emission-absorption volume rendering (Max 1995, as in NeRF, Mildenhall et al. 2020):
  stratified samples between the ray's entry into and exit from the cube, ``w_k = T_k (1 - exp(-sigma_k d))``
  with ``T_k = exp(-sum_{j<k} sigma_j d)``, colour ``sum_k w_k c_k + (1 - sum_k w_k) * background``.
* **Meshes** are dicts ``{"vertices": (V, 3) float, "faces": (F, 3) long, "colors": (V, 3) float}`` in world
  units. Marching cubes (Lorensen & Cline 1987) uses a case table built at import from the cube's faces (each
  face's crossings are paired so inside corners are cut off, which adjacent cubes agree on), giving a closed,
  consistently oriented (outward normals, counter-clockwise) surface. The volume is padded with empty space,
  so a field touching the cube's boundary still gives a closed mesh.

open3d writes the files; it is imported only when a mesh is saved, so nothing else needs it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nodegraph import Context, Field, node
from nodegraph import types as T

Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Index = Annotated[int, Field(ge=0)]
Range = Annotated[list[float], Field(min_length=2, max_length=2, description="[low, high]")]
Colour = Annotated[list[float], Field(min_length=3, max_length=3, description="RGB in [0, 1]")]
Side = Annotated[int, Field(ge=4, le=1024)]
Samples = Annotated[int, Field(ge=2, le=1024, description="samples per ray")]


class EmptyMeshError(ValueError):
    """The field has no surface at the requested density threshold."""


# --- cameras ----------------------------------------------------------------------------------------------


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


# --- field ------------------------------------------------------------------------------------------------


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


# --- volume rendering ---------------------------------------------------------------------------------------


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


# --- marching cubes ---------------------------------------------------------------------------------------

# Corner k of a cube sits at offset (k & 1, k >> 1 & 1, k >> 2 & 1) in (x, y, z).
_CORNERS = np.array([[k & 1, k >> 1 & 1, k >> 2 & 1] for k in range(8)])
_EDGES = [(a, a | 1 << axis) for a in range(8) for axis in range(3) if not a >> axis & 1]  # 12 (low, high)
_EDGE_OF = {pair: i for i, pair in enumerate(_EDGES)}


def _faces() -> list[list[int]]:
    """The cube's six faces as corner cycles, counter-clockwise seen from outside."""
    out = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3
        for side in (0, 1):
            cycle = []
            for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):  # counter-clockwise around +axis
                bits = {axis: side, u: du, v: dv}
                cycle.append(bits[0] | bits[1] << 1 | bits[2] << 2)
            out.append(cycle if side else cycle[::-1])
    return out


def _case_table() -> np.ndarray:
    """Triangles (as edge indices, -1 padded) for each of the 256 inside/outside corner patterns."""
    faces, cases = _faces(), []
    for case in range(256):
        inside = [bool(case >> k & 1) for k in range(8)]
        nxt = {}
        for cycle in faces:
            crossings = [(_EDGE_OF[tuple(sorted((a, b)))], inside[b])
                         for a, b in zip(cycle, cycle[1:] + cycle[:1]) if inside[a] != inside[b]]
            for i, (edge, entering) in enumerate(crossings):
                if entering:  # pair each entry with the next exit: cuts the inside corners off
                    nxt[edge] = crossings[(i + 1) % len(crossings)][0]
        tris = []
        while nxt:
            loop = [next(iter(nxt))]
            while nxt[loop[-1]] != loop[0]:
                loop.append(nxt[loop[-1]])
            for e in loop:
                del nxt[e]
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
        cases.append([e for tri in tris for e in tri])
    table = np.full((256, max(map(len, cases))), -1, dtype=np.int64)
    for case, edges in enumerate(cases):
        table[case, :len(edges)] = edges
    return table


_TABLE = _case_table()


def marching_cubes(volume: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface ``volume == level`` of a ``(X, Y, Z)`` array (inside: above ``level``).

    Returns vertices ``(V, 3)`` in index coordinates (x, y, z) and faces ``(F, 3)``; vertices on a shared cube
    edge are shared, so the surface is closed wherever it does not reach the array's border.
    """
    vol = np.asarray(volume, dtype=np.float64)
    n = np.array(vol.shape)
    if vol.ndim != 3 or (n < 2).any():
        raise ValueError(f"marching cubes needs a 3-d volume of at least 2^3 points; got shape {vol.shape}")
    inside = vol > level
    c = n - 1
    case = np.zeros(tuple(c), dtype=np.int64)
    for k, (dx, dy, dz) in enumerate(_CORNERS):
        case |= inside[dx:dx + c[0], dy:dy + c[1], dz:dz + c[2]].astype(np.int64) << k
    cubes = np.nonzero((case > 0) & (case < 255))
    if not len(cubes[0]):
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    base = np.stack(cubes, -1)  # (M, 3) lowest corner of each active cube
    local = _TABLE[case[cubes]]  # (M, K) edge indices, -1 padded
    low = np.array([_CORNERS[a] for a, _ in _EDGES])  # (12, 3)
    axis = np.array([int(np.log2(b - a)) for a, b in _EDGES])  # (12,)
    start = base[:, None, :] + low[None]  # (M, 12, 3)
    gid = axis[None] * n.prod() + np.ravel_multi_index(tuple(start.transpose(2, 0, 1)), tuple(n))  # (M, 12)
    valid = local >= 0
    edges = np.take_along_axis(gid, np.where(valid, local, 0), 1)[valid].reshape(-1, 3)
    unique, faces = np.unique(edges, return_inverse=True)
    ax, flat = unique // n.prod(), unique % n.prod()
    p0 = np.stack(np.unravel_index(flat, tuple(n)), -1)
    p1 = p0 + np.eye(3, dtype=np.int64)[ax]
    v0, v1 = vol[tuple(p0.T)], vol[tuple(p1.T)]
    frac = np.clip((level - v0) / np.where(v1 == v0, 1e-12, v1 - v0), 0.0, 1.0)
    return p0 + frac[:, None] * (p1 - p0), faces.reshape(-1, 3)


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


# --- nodes -----------------------------------------------------------------------------------------------


@node("camera.sample", category="3d", output="camera")
def camera_sample(seed: Seed = 0, index: Index = 0, batch: Annotated[int, Field(ge=1, le=64)] = 1,
                  azimuth: Range = [-180.0, 180.0], elevation: Range = [-10.0, 45.0],
                  distance: Range = [3.0, 3.0], fov: Annotated[float, Field(gt=0, lt=180)] = 40.0) -> T.Dict:
    """Random cameras looking at the origin, uniform in azimuth/elevation (degrees) and distance, from (seed, index)."""
    if not -90 < elevation[0] <= elevation[1] < 90:
        raise ValueError(f"elevation must be an increasing range inside (-90, 90); got {elevation}")
    if not 0 < distance[0] <= distance[1] or azimuth[0] > azimuth[1]:
        raise ValueError(f"ranges must be [low, high] with positive distance; got {azimuth}, {distance}")
    return random_cameras(seed, index, batch, azimuth, elevation, distance, fov)


@node("camera.orbit", category="3d", output="camera")
def camera_orbit(views: Annotated[int, Field(ge=1, le=64)] = 8,
                 elevation: Annotated[float, Field(gt=-90, lt=90)] = 15.0,
                 distance: Annotated[float, Field(gt=0)] = 3.0,
                 fov: Annotated[float, Field(gt=0, lt=180)] = 40.0) -> T.Dict:
    """Cameras evenly spaced in azimuth around the origin at one elevation (for previews and turntables)."""
    return orbit_cameras(views, elevation, distance, fov)


@node("field.voxel_blob", category="3d", output="field")
def voxel_blob(resolution: Annotated[int, Field(ge=2, le=512)] = 32, density: Annotated[float, Field(gt=0)] = 10.0,
               radius: Annotated[float, Field(gt=0)] = 0.3, color: Colour = [0.5, 0.5, 0.5]) -> T.Tensor:
    """A dense voxel field (4, R, R, R) of raw density + RGB over [-1, 1]^3, initialised to a Gaussian density blob."""
    return blob_field(resolution, density, radius, color)


@node("render.volume", category="3d")
def render_volume(field: T.Tensor, camera: T.Dict, width: Side = 64, height: Side = 64, samples: Samples = 64,
                  background: Colour = [0.0, 0.0, 0.0], stratified: bool = True, seed: Seed = 0,
                  index: Index = 0) -> {"image": T.Image, "opacity": T.Mask}:
    """Differentiable volume rendering of a voxel field from a batch of cameras (stratified with seed, index)."""
    jitter = generator(seed, index) if stratified else None
    image, opacity = render(field, camera, width, height, samples, background, jitter)
    return {"image": image, "opacity": opacity}


@node("render.preview", category="3d", output="image")
def render_preview(field: T.Tensor, camera: T.Dict = None, views: Annotated[int, Field(ge=1, le=64)] = 8,
                   elevation: Annotated[float, Field(gt=-90, lt=90)] = 15.0,
                   distance: Annotated[float, Field(gt=0)] = 3.0, fov: Annotated[float, Field(gt=0, lt=180)] = 40.0,
                   size: Side = 64, samples: Samples = 64, background: Colour = [0.0, 0.0, 0.0],
                   columns: Annotated[int, Field(ge=0, le=64, description="0 = ceil(sqrt(views))")] = 0) -> T.Image:
    """Renders of a field from several views tiled into one image (an orbit, or the given cameras)."""
    cams = as_camera(camera) if camera is not None else orbit_cameras(views, elevation, distance, fov)
    images = torch.cat([render(field, {k: v[i:i + 1] for k, v in cams.items()}, size, size, samples, background)[0]
                        for i in range(len(cams["origin"]))])
    return tile(images, columns or math.ceil(math.sqrt(len(images))))


@node("mesh.marching_cubes", category="3d", output="mesh")
def mesh_marching_cubes(field: T.Tensor, threshold: Annotated[float, Field(gt=0)] = 2.0) -> T.Mesh:
    """A closed triangle mesh of the field's density at a threshold (marching cubes), coloured from the field."""
    return extract_mesh(field, threshold)


@node("mesh.save", category="3d", output="file", cache=False)
def mesh_save(mesh: T.Mesh, path: str, ctx: Context) -> T.File:
    """Write a mesh with vertex colours as .ply or .obj (by suffix) under the output root, through open3d."""
    full = ctx.resolve_output(path)
    if full.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"mesh.save writes .ply or .obj files; {path!r} has neither suffix")
    if not len(mesh["faces"]):
        raise EmptyMeshError("empty mesh: nothing to save")
    full.parent.mkdir(parents=True, exist_ok=True)
    write_mesh(mesh, full)
    return str(full)
