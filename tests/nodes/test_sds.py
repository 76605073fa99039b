"""Score distillation and the functional optimiser: the maths, the no-autograd traps, and the whole
DreamFusion loop through the Engine (tiny random models, and an exact denoiser of red-circle images)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph import Engine, define
from nodegraph import types as T
from nodegraph.errors import NodeExecutionError
from nodegraph.outputs import write_outputs
from nodegraph.roots import ModelRoots
from nodes import sds
from nodes import three_d as td
from nodes.geometry import volume
from nodes.adapters import DenoiserInfo, schedule_of
from nodes.diffusion.parameterization import Denoiser, c_in
from nodes.shapes import data, evaluate
from tests.nodes.test_three_d import link, registry_3d

GRAPH = Path(__file__).resolve().parents[2] / "graphs" / "text_to_3d.json"


@pytest.fixture
def engine3d(tmp_path: Path) -> Engine:
    (tmp_path / "out").mkdir()
    return Engine(registry_3d(), device="cpu", input_root=tmp_path, output_root=tmp_path / "out",
                  model_roots=ModelRoots(allow_paths=True))  # tiny_models are named by absolute path


# --- Adam -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch_optim_adam(weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(3, 4, generator=gen), "b": [torch.randn(5, generator=gen)]}
    ref = [start["a"].clone().requires_grad_(True), start["b"][0].clone().requires_grad_(True)]
    opt = torch.optim.Adam(ref, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    params, state = start, None
    for _ in range(6):
        grads = {"a": torch.randn(3, 4, generator=gen), "b": [torch.randn(5, generator=gen)]}
        ref[0].grad, ref[1].grad = grads["a"].clone(), grads["b"][0].clone()
        opt.step()
        out = sds.adam(params, grads, state, lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=weight_decay)
        params, state = out["params"], out["state"]
    assert state["step"] == 6
    assert torch.allclose(params["a"], ref[0].detach(), atol=1e-6, rtol=1e-6)
    assert torch.allclose(params["b"][0], ref[1].detach(), atol=1e-6, rtol=1e-6)
    assert not params["a"].requires_grad and torch.equal(start["a"], start["a"])  # inputs untouched


def test_grad_node_follows_the_parameter_tree_and_zero_fills_unused_leaves() -> None:
    params = sds.watch({"a": torch.ones(2), "b": [torch.zeros(3)]})
    grads = sds.grad_of((params["a"] ** 2).sum(), params)
    assert torch.equal(grads["a"], torch.full((2,), 2.0)) and torch.equal(grads["b"][0], torch.zeros(3))
    with pytest.raises(RuntimeError, match="optim.watch"):
        sds.grad_of(torch.ones(()), {"a": torch.ones(2)})


# --- SDS maths --------------------------------------------------------------------------------------------


class Raw:
    """A fake network: a fixed random tensor plus a term depending on its input."""

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        fixed = torch.randn(x_in.shape, generator=torch.Generator().manual_seed(3))
        self.last_x_in, self.out = x_in, fixed + 0.3 * x_in
        return self.out


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "flow"])
def test_sds_residual_is_the_noise_residual_of_every_parameterisation(kind: str) -> None:
    raw = Raw()
    sigmas = schedule_of(DenoiserInfo()).train_sigmas().float()
    model = Denoiser(raw, kind, None if kind == "flow" else sigmas)
    gen = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    sigma = torch.tensor(0.4 if kind == "flow" else 1.7)
    g = sds.sds_gradient(model, x, None, sigma, noise, "uniform")
    # The noise the network implies, from its raw output, in its own coordinates:
    if kind == "eps":
        eps_hat = raw.out
    elif kind == "v":  # z = a x0 + s eps, v = a eps - s x0  =>  eps = s z + a v
        a, s = c_in("v", sigma), sigma * c_in("v", sigma)
        eps_hat = s * raw.last_x_in + a * raw.out
    elif kind == "x0":
        eps_hat = (x + sigma * noise - raw.out) / sigma
    else:  # x_t = (1 - t) x0 + t eps, velocity eps - x0  =>  eps = x_t + (1 - t) v
        eps_hat = raw.last_x_in + (1 - sigma) * raw.out
    assert torch.allclose(g, eps_hat - noise, atol=1e-4)
    a, s = sds.coefficients(kind, sigma)
    assert torch.allclose(sds.sds_gradient(model, x, None, sigma, noise, "dreamfusion"), s**2 * g, atol=1e-5)
    assert torch.allclose(sds.sds_gradient(model, x, None, sigma, noise, "x0"), (s / a) * g, atol=1e-5)


def test_sds_loss_gradient_is_the_weighted_residual_over_the_batch() -> None:
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    g = torch.randn(3, 4, 2, 2)
    (dx,) = torch.autograd.grad(sds.sds_loss(x, g), x)
    assert torch.allclose(dx, g / 3)


def test_noise_levels_span_the_schedule_fractions() -> None:
    base = Denoiser(Raw(), "v", schedule_of(DenoiserInfo()).train_sigmas().float())
    sigmas = base.train_sigmas
    assert sds.sds_sigma(base, 0.0).item() == pytest.approx(sigmas[0].item(), rel=1e-5)
    assert sds.sds_sigma(base, 1.0).item() == pytest.approx(sigmas[-1].item(), rel=1e-5)
    assert sigmas[400] < sds.sds_sigma(base, 0.5) < sigmas[600]
    assert sds.sds_sigma(Denoiser(Raw(), "flow"), 0.3).item() == pytest.approx(0.3)


def test_nodes_refuse_to_run_without_autograd() -> None:
    field = volume.blob_field(4, 5.0, 0.3, [0.5] * 3)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="without autograd"):
            sds.watch(field)
        with pytest.raises(RuntimeError, match="without autograd"):
            sds.grad_of(field.sum(), field)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="without autograd"):
            sds.watch(field)


# --- through the Engine -------------------------------------------------------------------------------------


def sds_graph(models: Any, *, arch: str = "unet", count: int = 2, watch: bool = True,
              model_node: dict[str, Any] | None = None, latent: bool = True, size: int = 16,
              resolution: int = 8, lr: float = 0.05, weighting: str = "dreamfusion",
              target: str = "latent") -> dict[str, Any]:
    """A DreamFusion loop: camera -> watch -> render -> sds.loss -> grad -> adam, carrying field and state."""
    nodes: dict[str, Any] = {"field": {"type": "field.voxel_blob", "inputs": {"resolution": resolution}}}
    if model_node is None:
        nodes.update({
            "vae": {"type": "model.load_vae", "inputs": {"path": models.vae}},
            "unet": {"type": "model.load_denoiser", "inputs": {"path": getattr(models, arch)}},
            "text": {"type": "model.load_text_encoder", "inputs": {"path": models.text}},
            "pos": {"type": "text.encode", "inputs": {"encoder": link("text", "encoder"), "text": "a red circle"}},
            "neg": {"type": "text.encode", "inputs": {"encoder": link("text", "encoder"), "text": ""}},
            "guided": {"type": "guidance.cfg", "inputs": {"model": link("unet", "model"),
                                                          "negative": link("neg", "cond"), "scale": 7.5}},
        })
    else:
        nodes["guided"] = model_node
    params = {"node": "params", "output": "params"} if watch else {"input": "field"}
    sds_inputs = {"model": {"input": "model"}, "image": {"node": "render", "output": "image"}, "seed": 2,
                  "index": {"input": "index"}, "weighting": weighting, "size": 32 if latent else 0, "target": target}
    body_inputs: dict[str, Any] = {"field": {"type": "Tensor", "carry": True},
                                   "state": {"type": "Any", "carry": True, "optional": True},
                                   "model": {"type": "Denoiser"}}
    loop_inputs: dict[str, Any] = {"count": count, "field": link("field", "field"), "model": link("guided", "model")}
    if model_node is None:
        body_inputs.update(cond={"type": "Conditioning"}, vae={"type": "VAE"})
        loop_inputs.update(cond=link("pos", "cond"), vae=link("vae", "vae"))
        sds_inputs["cond"] = {"input": "cond"}
        if latent:
            sds_inputs["vae"] = {"input": "vae"}
    nodes["optimize"] = {"type": "loop", "inputs": loop_inputs, "body": {
        "inputs": body_inputs,
        "nodes": {
            "camera": {"type": "camera.sample", "inputs": {"seed": 0, "index": {"input": "index"},
                                                           "elevation": [0.0, 30.0], "distance": [3.2, 3.2]}},
            "params": {"type": "optim.watch", "inputs": {"params": {"input": "field"}}},
            "render": {"type": "render.volume", "inputs": {"field": params, "camera": {"node": "camera",
                                                                                      "output": "camera"},
                                                           "width": size, "height": size, "samples": size,
                                                           "background": [0.05, 0.05, 0.05],
                                                           "index": {"input": "index"}}},
            "sds": {"type": "sds.loss", "inputs": sds_inputs},
            "grads": {"type": "optim.grad", "inputs": {"loss": {"node": "sds", "output": "loss"}, "params": params}},
            "adam": {"type": "optim.adam", "inputs": {"params": {"input": "field"}, "state": {"input": "state"},
                                                      "grads": {"node": "grads", "output": "grads"}, "lr": lr}},
        },
        "outputs": {"field": {"node": "adam", "output": "params"}, "state": {"node": "adam", "output": "state"},
                    "grads": {"node": "grads", "output": "grads"}, "sigma": {"node": "sds", "output": "sigma"}},
    }}
    outputs = {"field": link("optimize", "field"), "grads": link("optimize", "grads"),
               "sigma": link("optimize", "sigma"), "state": link("optimize", "state"), "start": link("field", "field")}
    if model_node is None:
        outputs["vae"] = link("vae", "vae")
    return {"version": 1, "nodes": nodes, "outputs": outputs}


@pytest.mark.parametrize("arch, target", [("unet", "latent"), ("dit", "latent"), ("unet", "image")])
def test_sds_gradient_reaches_the_field_through_the_engine_loop(engine3d, tiny_models, arch, target) -> None:
    """Latent SDS differentiates through the VAE encoder; the image target through the renderer only. Pixel-space
    SDS is the exact-denoiser test below; a VAE made under inference_mode, the test after this one."""
    out = engine3d.run(sds_graph(tiny_models, arch=arch, target=target)).outputs
    grads = out["grads"]
    assert grads.shape == (2, 4, 8, 8, 8) and torch.isfinite(grads).all()
    for step in grads:
        assert step[0].abs().sum() > 0, "no gradient reached the density"
        assert step[1:].abs().sum() > 0, "no gradient reached the colour"
    assert not torch.equal(out["field"], out["start"]) and torch.isfinite(out["field"]).all()
    assert out["state"]["step"] == 2 and out["sigma"].shape == (2,) and (out["sigma"] > 0).all()


def test_latent_sds_differentiates_through_a_vae_made_under_inference_mode() -> None:
    """Weights made under inference_mode cannot enter autograd: ``encode`` uses a frozen ordinary copy."""
    from nodes.models.vae import AutoencoderKL, VAEConfig

    with torch.inference_mode():
        vae = AutoencoderKL(VAEConfig.from_name("tiny-test")).eval()
    assert all(p.is_inference() for p in vae.parameters())
    pixels = torch.rand(1, 3, 16, 16).requires_grad_(True)
    sds.encode(vae, pixels * 2 - 1).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert sds.autograd_ready(vae) is sds.autograd_ready(vae)  # one copy, kept while the original lives


def test_loss_not_built_from_watched_params_is_a_clear_error(engine3d, tiny_models) -> None:
    with pytest.raises(NodeExecutionError, match="optim.watch") as info:
        engine3d.run(sds_graph(tiny_models, watch=False, count=1))
    assert info.value.node.endswith("grads")


class RedCircles:
    """The exact posterior-mean denoiser of a small set of 'a red circle' images (pixel space, eps schedule)."""

    kind = "eps"

    def __init__(self, size: int, count: int = 16) -> None:
        images = torch.stack([torch.from_numpy(data.render("a red circle", seed=i)).permute(2, 0, 1).float() / 255
                              for i in range(count)])
        self.images = torch.nn.functional.interpolate(images, size=size, mode="area") * 2 - 1
        self.train_sigmas = schedule_of(DenoiserInfo()).train_sigmas().float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        d2 = ((x[:, None] - self.images[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        weights = torch.softmax(-d2 / (2 * float(sigma) ** 2), dim=1)
        return torch.einsum("bk,kchw->bchw", weights, self.images)


def red_circles(size: int = 16) -> T.Denoiser:
    """Exact red-circle denoiser."""
    return RedCircles(size)


def test_pixel_space_sds_with_an_exact_denoiser_makes_red_round_renders(tiny_models, tmp_path) -> None:
    reg = registry_3d().copy()
    reg.add([define(red_circles, "test.red_circles", output="model")], "test")
    engine = Engine(reg, device="cpu", output_root=tmp_path)
    graph = sds_graph(None, model_node={"type": "test.red_circles", "inputs": {"size": 16}}, latent=False,
                      count=60, resolution=16, size=16)
    field = engine.run(graph, outputs=["field"]).outputs["field"]
    views = td.render_preview(field, views=8, elevation=15.0, distance=3.2, size=64, samples=32, columns=8)
    views = views[0].unflatten(2, (8, 64)).permute(2, 0, 1, 3)  # (8, 3, 64, 64)
    correct = 0
    for view in views:
        found = evaluate.score((view.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "a red circle")
        correct += bool(found["correct"])
    assert correct >= 6, f"only {correct} of 8 views show a red circle"


def shrink(graph: dict[str, Any], models: Any, count: int = 2) -> dict[str, Any]:
    """The shipped text_to_3d graph on the tiny random models, small enough for the test suite."""
    g = copy.deepcopy(graph)
    n = g["nodes"]
    for name in ("unet", "vae", "text"):
        n[name]["inputs"]["path"] = getattr(models, name)
    n["optimize"]["inputs"]["count"] = count
    n["field"]["inputs"]["resolution"] = 12
    body = n["optimize"]["body"]["nodes"]
    body["render"]["inputs"].update(width=16, height=16, samples=16)
    body["sds"]["inputs"]["size"] = 32  # the tiny-test VAE's factor is 2
    n["preview"]["inputs"].update(size=16, samples=16)
    return g


def test_text_to_3d_graph_runs_end_to_end(engine3d, tiny_models, tmp_path) -> None:
    shipped = json.loads(GRAPH.read_text())
    assert shipped["nodes"]["prompt"]["inputs"]["text"] == "a red circle"
    assert {shipped["nodes"][k]["inputs"]["path"] for k in ("unet", "vae", "text")} == {
        "tiny-shapes/unet", "tiny-shapes/vae", "tiny-shapes/text"}
    result = engine3d.run(shrink(shipped, tiny_models))
    out = result.outputs
    root = tmp_path / "out"
    assert Path(out["mesh_ply"]) == root / "text_to_3d" / "mesh.ply" and Path(out["mesh_ply"]).stat().st_size > 0
    assert Path(out["mesh_obj"]) == root / "text_to_3d" / "mesh.obj" and Path(out["mesh_obj"]).stat().st_size > 0
    preview = out["preview"]
    assert preview.shape == (1, 3, 32, 64) and torch.isfinite(preview).all()  # 8 views of 16 px, 4 columns
    files = write_outputs(out, result.output_types, tmp_path / "cli")
    assert files["preview"] == [str(tmp_path / "cli" / "preview.png")] and files["mesh_ply"] == [out["mesh_ply"]]
