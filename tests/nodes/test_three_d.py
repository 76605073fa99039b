"""The model-free 3D pieces: cameras, voxel field, volume renderer, marching cubes, mesh files, preview grid."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nodes.sds
import nodes.three_d
from nodegraph import Engine
from nodegraph.engine import default_registry
from nodegraph.errors import NodeExecutionError
from nodegraph.registry import Registry
from nodes import three_d as td
from nodes.geometry import cameras
from nodes.geometry import mesh as geomesh
from nodes.geometry import volume


def registry_3d() -> Registry:
    """The default registry, plus the 3D and SDS modules while ``nodes.MODULES`` does not list them yet."""
    reg = default_registry()
    if "sds.loss" in reg:
        return reg
    reg = reg.copy()
    reg.add_module(nodes.three_d, "builtin-3d")
    reg.add_module(nodes.sds, "builtin-sds")
    return reg


@pytest.fixture
def engine3d(tmp_path: Path) -> Engine:
    (tmp_path / "out").mkdir()
    return Engine(registry_3d(), device="cpu", input_root=tmp_path, output_root=tmp_path / "out")


def link(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


def filled(value: float, color: tuple[float, float, float] = (0.2, 0.6, 0.9), resolution: int = 8) -> torch.Tensor:
    """A field of constant raw density ``value`` and constant colour."""
    rgb = torch.tensor(color).logit().view(3, 1, 1, 1)
    return torch.cat([torch.full((1, resolution, resolution, resolution), value),
                      rgb.expand(3, resolution, resolution, resolution)])


def front_camera(distance: float = 3.0, fov: float = 40.0) -> dict[str, torch.Tensor]:
    return cameras.look_at(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([distance]), torch.tensor(fov))


# --- cameras ----------------------------------------------------------------------------------------------


def test_cameras_are_deterministic_in_seed_and_index() -> None:
    args = dict(batch=3, azimuth=[-180.0, 180.0], elevation=[-10.0, 45.0], distance=[2.5, 3.5], fov=40.0)
    a, b = td.camera_sample(seed=4, index=7, **args), td.camera_sample(seed=4, index=7, **args)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for other in (td.camera_sample(seed=4, index=8, **args), td.camera_sample(seed=5, index=7, **args)):
        assert not torch.equal(a["origin"], other["origin"])
    assert a["origin"].shape == (3, 3) and a["rotation"].shape == (3, 3, 3) and a["focal"].shape == (3,)
    assert ((a["elevation"] >= -10) & (a["elevation"] <= 45)).all()
    assert torch.allclose(a["origin"].norm(dim=-1).clamp(2.5, 3.5), a["origin"].norm(dim=-1))


def test_cameras_look_at_the_origin_with_an_upright_orthonormal_frame() -> None:
    cam = td.camera_sample(seed=1, batch=8)
    rot = cam["rotation"]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(8, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(8), atol=1e-5)
    back = rot[..., 2]  # the camera looks along -back, towards the origin
    assert torch.allclose(back, cam["origin"] / cam["origin"].norm(dim=-1, keepdim=True), atol=1e-5)
    assert torch.allclose(rot[:, 1, 0], torch.zeros(8), atol=1e-5)  # the right vector is horizontal
    assert (rot[:, 1, 1] > 0).all(), "camera up must point up"
    orbit = td.camera_orbit(views=4, elevation=0.0, distance=2.0)
    assert torch.allclose(orbit["azimuth"], torch.tensor([0.0, 90.0, 180.0, 270.0]))
    assert torch.allclose(orbit["origin"][1], torch.tensor([2.0, 0.0, 0.0]), atol=1e-5)


# --- renderer ---------------------------------------------------------------------------------------------


def test_empty_field_renders_the_background() -> None:
    image, opacity = volume.render(filled(-30.0), front_camera(), 12, 10, samples=16, background=[0.1, 0.4, 0.7])
    assert image.shape == (1, 3, 10, 12) and opacity.shape == (1, 1, 10, 12)
    assert torch.allclose(image, torch.tensor([0.1, 0.4, 0.7]).view(1, 3, 1, 1).expand_as(image), atol=1e-6)
    assert opacity.max() < 1e-6


def test_opaque_field_renders_its_colour_where_rays_hit_the_cube() -> None:
    color = (0.2, 0.6, 0.9)
    image, opacity = volume.render(filled(60.0, color), front_camera(distance=8.0), 16, 16, samples=32,
                               background=[1.0, 0.0, 0.0])
    centre, corner = image[0, :, 8, 8], image[0, :, 0, 0]
    assert torch.allclose(centre, torch.tensor(color), atol=1e-4) and opacity[0, 0, 8, 8] > 0.9999
    assert torch.allclose(corner, torch.tensor([1.0, 0.0, 0.0])) and opacity[0, 0, 0, 0] == 0  # misses the cube
    # From distance 8 with a 40 degree field of view the cube's front face spans about |x| < 0.39 of the width.
    hit = opacity[0, 0, 8] > 0.5
    assert 4 <= int(hit.sum()) <= 8


def test_render_gradients_reach_density_and_colour() -> None:
    field = volume.blob_field(8, 5.0, 0.4, [0.5, 0.5, 0.5]).requires_grad_(True)
    image, _ = volume.render(field, td.camera_sample(seed=2, batch=2), 8, 8, samples=12, jitter=cameras.generator(0, 0))
    (image[:, 0].mean() - 0.5 * image[:, 2].mean()).backward()
    assert torch.isfinite(field.grad).all()
    assert field.grad[0].abs().sum() > 0 and field.grad[1].abs().sum() > 0 and field.grad[3].abs().sum() > 0


def test_stratified_samples_are_seeded_and_average_to_the_midpoint_render() -> None:
    field, cam = volume.blob_field(8, 5.0, 0.4, [0.3, 0.5, 0.7]), front_camera()
    a = td.render_volume(field, cam, 8, 8, samples=8, seed=1, index=3)["image"]
    b = td.render_volume(field, cam, 8, 8, samples=8, seed=1, index=3)["image"]
    c = td.render_volume(field, cam, 8, 8, samples=8, seed=1, index=4)["image"]
    mid = td.render_volume(field, cam, 8, 8, samples=8, stratified=False)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - mid).abs().max() < 0.1


def test_preview_tiles_views_into_one_image() -> None:
    field = volume.blob_field(8, 10.0, 0.3, [0.9, 0.1, 0.1])
    grid = td.render_preview(field, views=8, size=8, samples=8, columns=4)
    assert grid.shape == (1, 3, 16, 32)
    assert td.render_preview(field, views=5, size=8, samples=8).shape == (1, 3, 16, 24)  # 3 x 2, one cell empty
    cams = td.camera_sample(seed=0, batch=2)
    assert td.render_preview(field, camera=cams, size=8, samples=8, columns=2).shape == (1, 3, 8, 16)


# --- marching cubes and meshes ------------------------------------------------------------------------------


def assert_closed_and_outward(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Every edge is shared by exactly two faces traversing it in opposite directions; return the signed volume."""
    undirected = Counter(tuple(sorted(e)) for f in faces for e in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])))
    directed = Counter((a, b) for f in faces for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])))
    assert set(undirected.values()) == {2}, "a hole or a non-manifold edge"
    assert max(directed.values()) == 1, "inconsistent orientation"
    tri = vertices[faces]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6)


@pytest.fixture
def skimage():
    return pytest.importorskip("skimage", reason="marching cubes is the mesh extra's scikit-image")


def test_marching_cubes_is_scikit_images_with_outward_faces(skimage) -> None:
    """The library's Lewiner marching cubes, with each face's winding reversed ("ascent"): counter-clockwise from
    outside for our inside-above-the-level convention, where the library's default assumes the opposite."""
    volume = np.pad(np.random.default_rng(1).normal(size=(9, 9, 9)), 1, constant_values=-1.0)
    verts, faces = geomesh.marching_cubes(volume, 0.0)
    ref_verts, ref_faces, _, _ = skimage.measure.marching_cubes(volume, 0.0)
    np.testing.assert_allclose(verts, ref_verts)
    assert np.array_equal(faces, ref_faces[:, ::-1])
    assert assert_closed_and_outward(verts, faces) > 0
    empty = geomesh.marching_cubes(np.zeros((4, 4, 4)), 0.5)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


def test_marching_cubes_on_a_sphere_is_closed_with_the_right_radius(skimage) -> None:
    n, radius = 33, 0.6
    axis = np.linspace(-1, 1, n)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    verts, faces = geomesh.marching_cubes(radius - np.sqrt(x**2 + y**2 + z**2), 0.0)
    world = verts / (n - 1) * 2 - 1
    r = np.linalg.norm(world, axis=1)
    assert len(faces) > 1000 and abs(r.mean() - radius) < 0.01 and r.std() < 0.01
    volume = assert_closed_and_outward(world, faces)
    assert volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)  # positive: normals point out


def test_marching_cubes_stays_closed_on_ambiguous_random_volumes(skimage) -> None:
    rng = np.random.default_rng(0)
    volume = np.pad(rng.normal(size=(10, 10, 10)), 1, constant_values=-1.0)
    verts, faces = geomesh.marching_cubes(volume, 0.0)
    assert len(faces) > 100 and assert_closed_and_outward(verts, faces) > 0


def test_extract_mesh_colours_vertices_from_the_field_and_closes_at_the_border(skimage) -> None:
    mesh = td.mesh_marching_cubes(volume.blob_field(12, 10.0, 0.3, [0.9, 0.1, 0.2]), threshold=2.0)
    assert mesh["vertices"].abs().max() <= 1 and mesh["faces"].dtype == torch.long
    assert torch.allclose(mesh["colors"], torch.tensor([0.9, 0.1, 0.2]).expand_as(mesh["colors"]), atol=1e-4)
    # radius where 10 exp(-r^2 / 0.18) = 2
    r = mesh["vertices"].norm(dim=1)
    assert abs(r.mean().item() - math.sqrt(0.18 * math.log(5))) < 0.05
    full = td.mesh_marching_cubes(filled(5.0), threshold=1.0)  # dense everywhere: closed by the padding
    assert assert_closed_and_outward(full["vertices"].numpy(), full["faces"].numpy()) > 7


def test_mesh_and_renderer_agree_on_the_axes(skimage) -> None:
    axis = torch.linspace(-1, 1, 16)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")  # the field is laid out (z, y, x)
    density = 10 * torch.exp(-((x - 0.5) ** 2 + (y - 0.2) ** 2 + (z + 0.3) ** 2) / (2 * 0.15**2))
    field = torch.cat([volume.inverse_softplus(density.clamp_min(1e-4))[None], torch.zeros(3, 16, 16, 16)])
    centre = geomesh.extract_mesh(field, 2.0)["vertices"].mean(0)
    assert torch.allclose(centre, torch.tensor([0.5, 0.2, -0.3]), atol=0.02)
    _, opacity = volume.render(field, front_camera(), 32, 32, samples=32)  # camera on +z, up +y, right +x
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    weight = opacity[0, 0] / opacity.sum()
    assert (weight * cols).sum() > 20 and (weight * rows).sum() < 14  # right of and above the image centre


def test_empty_field_is_an_empty_mesh_error(skimage) -> None:
    with pytest.raises(geomesh.EmptyMeshError, match="empty mesh"):
        td.mesh_marching_cubes(filled(-30.0), threshold=1.0)
    with pytest.raises(geomesh.EmptyMeshError, match="density ranges"):
        td.mesh_marching_cubes(volume.blob_field(8, 1.0, 0.3, [0.5] * 3), threshold=2.0)


def mesh_graph(path: str, density: float = 10.0, threshold: float = 2.0) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "field": {"type": "field.voxel_blob",
                  "inputs": {"resolution": 12, "density": density, "color": [0.9, 0.1, 0.2]}},
        "mesh": {"type": "mesh.marching_cubes", "inputs": {"field": link("field", "field"), "threshold": threshold}},
        "save": {"type": "mesh.save", "inputs": {"mesh": link("mesh", "mesh"), "path": path}},
    }, "outputs": {"file": link("save", "file"), "mesh": link("mesh", "mesh")}}


@pytest.mark.parametrize("suffix", ["ply", "obj"])
def test_mesh_files_round_trip_through_open3d(engine3d: Engine, tmp_path: Path, suffix: str, skimage) -> None:
    o3d = pytest.importorskip("open3d")
    out = engine3d.run(mesh_graph(f"meshes/blob.{suffix}")).outputs
    path = Path(out["file"])
    assert path == tmp_path / "out" / "meshes" / f"blob.{suffix}" and path.is_file()
    back = o3d.io.read_triangle_mesh(str(path))
    mesh = out["mesh"]
    verts, colors = np.asarray(back.vertices), np.asarray(back.vertex_colors)
    assert len(verts) == len(mesh["vertices"]) and len(back.triangles) == len(mesh["faces"])
    order = np.lexsort(verts.T), np.lexsort(mesh["vertices"].numpy().T)  # OBJ reading may reorder vertices
    assert np.allclose(verts[order[0]], mesh["vertices"].numpy()[order[1]], atol=1e-5)
    assert np.allclose(colors, [0.9, 0.1, 0.2], atol=1 / 255)
    assert back.is_watertight()


def test_missing_open3d_is_a_clear_error(tmp_path: Path, monkeypatch, skimage) -> None:
    monkeypatch.setitem(__import__("sys").modules, "open3d", None)  # makes `import open3d` raise ImportError
    mesh = td.mesh_marching_cubes(volume.blob_field(8, 10.0, 0.3, [0.5] * 3))
    with pytest.raises(RuntimeError, match=r"needs open3d: pip install 'nodegraph\[mesh\]'"):
        geomesh.write_mesh(mesh, tmp_path / "m.ply")
    assert not (tmp_path / "m.ply").exists()


def test_mesh_path_outside_the_output_root_is_refused_and_nothing_written(engine3d: Engine, tmp_path: Path,
                                                                           skimage) -> None:
    pytest.importorskip("open3d")  # mesh.save requires it: without it the graph is refused before running
    before = sorted(p for p in tmp_path.rglob("*"))
    for bad in ("../escape.ply", str(tmp_path / "escape.obj"), "/tmp/escape-nodegraph.ply"):
        with pytest.raises(NodeExecutionError) as info:
            engine3d.run(mesh_graph(bad))
        assert isinstance(info.value.error, PermissionError) and "outside the output root" in str(info.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/escape-nodegraph.ply").exists()
    with pytest.raises(NodeExecutionError, match=r"\.ply or \.obj"):
        engine3d.run(mesh_graph("mesh.stl"))


def test_empty_field_through_the_engine_is_a_clear_error(engine3d: Engine, tmp_path: Path, skimage) -> None:
    pytest.importorskip("open3d")
    with pytest.raises(NodeExecutionError, match="empty mesh") as info:
        engine3d.run(mesh_graph("empty.ply", density=0.5))
    assert info.value.node == "mesh" and isinstance(info.value.error, geomesh.EmptyMeshError)
    assert not (tmp_path / "out" / "empty.ply").exists()
