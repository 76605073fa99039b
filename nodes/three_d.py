"""3D nodes for text-to-3D: cameras, a voxel field, volume rendering, marching cubes, mesh files.

The maths and its conventions (world, field layout, cameras, rendering, meshes) are in :mod:`nodes.geometry`.
Allocation follows from literals for the field and the renders, which declare a ``cost``; marching cubes needs
scikit-image and ``mesh.save`` open3d (the ``mesh`` extra), which they declare in ``requires``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch

from nodegraph import Context, Field, node
from nodegraph import types as T

from .geometry.cameras import as_camera, generator, orbit_cameras, random_cameras
from .geometry.mesh import EmptyMeshError, extract_mesh, write_mesh
from .geometry.volume import blob_field, render, tile

Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Index = Annotated[int, Field(ge=0)]
Range = Annotated[list[float], Field(min_length=2, max_length=2, description="[low, high]")]
Colour = Annotated[list[float], Field(min_length=3, max_length=3, description="RGB in [0, 1]")]
Side = Annotated[int, Field(ge=4, le=1024)]
Samples = Annotated[int, Field(ge=2, le=1024, description="samples per ray")]


def _voxels(literals: dict) -> dict[str, int]:
    return {"elements": 4 * literals["resolution"] ** 3}


def _render_cost(literals: dict) -> dict[str, int]:
    """One view's pixels, and its colour samples along the rays, the largest tensor a render makes (the camera
    batch is a link, known when running)."""
    pixels = literals["width"] * literals["height"]
    return {"pixels": pixels, "elements": 3 * pixels * literals["samples"]}


def _preview_cost(literals: dict) -> dict[str, int]:
    """The tiled image of an orbit (cameras given through ``camera`` are counted when running)."""
    if literals["camera"] is not None:  # a KeyError when linked: unknown until running
        raise KeyError("camera")
    views, side = literals["views"], literals["size"]
    columns = literals["columns"] or math.ceil(math.sqrt(views))
    return {"pixels": math.ceil(views / columns) * columns * side * side,
            "elements": 3 * side * side * literals["samples"]}



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


@node("field.voxel_blob", category="3d", output="field", cost=_voxels)
def voxel_blob(resolution: Annotated[int, Field(ge=2, le=512)] = 32, density: Annotated[float, Field(gt=0)] = 10.0,
               radius: Annotated[float, Field(gt=0)] = 0.3, color: Colour = [0.5, 0.5, 0.5]) -> T.Tensor:
    """A dense voxel field (4, R, R, R) of raw density + RGB over [-1, 1]^3, initialised to a Gaussian density blob."""
    return blob_field(resolution, density, radius, color)


@node("render.volume", category="3d", cost=_render_cost)
def render_volume(field: T.Tensor, camera: T.Dict, width: Side = 64, height: Side = 64, samples: Samples = 64,
                  background: Colour = [0.0, 0.0, 0.0], stratified: bool = True, seed: Seed = 0,
                  index: Index = 0) -> {"image": T.Image, "opacity": T.Mask}:
    """Differentiable volume rendering of a voxel field from a batch of cameras (stratified with seed, index)."""
    jitter = generator(seed, index) if stratified else None
    image, opacity = render(field, camera, width, height, samples, background, jitter)
    return {"image": image, "opacity": opacity}


@node("render.preview", category="3d", output="image", cost=_preview_cost)
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


@node("mesh.marching_cubes", version="1.1.0", category="3d", output="mesh", requires=("skimage",))
def mesh_marching_cubes(field: T.Tensor, threshold: Annotated[float, Field(gt=0)] = 2.0) -> T.Mesh:
    """A closed triangle mesh of the field's density at a threshold (marching cubes, scikit-image's), coloured from the
    field."""
    return extract_mesh(field, threshold)


@node("mesh.save", category="3d", output="file", cache=False, requires=("open3d",))
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
