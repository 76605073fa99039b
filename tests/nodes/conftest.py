"""Shared fixtures for the diffusion-pack tests: tiny random-weight model folders and graph builders.

``tiny_models`` (session-scoped, seeded) saves the ``tiny-test`` presets with ``save_folder``:

* ``vae``: KL autoencoder, latent space ``"tiny-test"``, 4 latent channels, factor 2 (32x32 -> 16x16);
* ``vae_other``: the same architecture in another latent space (``"other-space"``);
* ``unet``: v-prediction U-Net, train schedule ``sd15``, ``denoiser.json`` naming space ``"tiny-test"``
  (v rather than eps: a random eps network drives latents to |x| ~ 60, where float32 rounding alone exceeds
  the 1e-5 batched-vs-sequential CFG tolerance; a random v network keeps them O(1));
* ``unet_eps``: the same weights as eps-prediction;
* ``dit``: flow-matching DiT, same space;
* ``text``: byte-level text encoder of width 16 (= the denoisers' context_dim);
* ``text_wide``: a text encoder of width 32 (does not fit the denoisers).

Every weight is random (zero-initialised output layers included), so outputs depend on every input.

Graph builders return plain dicts (the public format); ``link(node, output)`` writes a link. They all
end with the outputs ``latent`` (final latent) and ``image`` (decoded), plus the intermediate values a test
needs to replay the sampler by hand (``model``, ``cond``, ``sigmas``, ``start``). The denoiser loader node
is called ``unet`` whichever architecture (``arch``: a TinyModels field) it loads.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from nodes.adapters import DenoiserInfo
from nodes.models.config import save_folder
from nodes.models.dit import DiT, DiTConfig
from nodes.models.text import TextConfig, TextEncoder
from nodes.models.unet import UNet, UNetConfig
from nodes.models.vae import AutoencoderKL, VAEConfig

SIZE = 32  # image side; latents are 16x16 with the tiny VAE
STEPS = 8
SPACE = "tiny-test"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every weight (zero-initialised outputs included) with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.1 if p.dim() == 1 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@dataclass(frozen=True)
class TinyModels:
    """Checkpoint folders (as strings, ready for a graph's ``path`` literal)."""

    root: Path
    vae: str
    vae_other: str
    unet: str
    unet_eps: str
    dit: str
    text: str
    text_wide: str


def build_tiny_models(root: Path) -> TinyModels:
    root.mkdir(parents=True, exist_ok=True)
    vae_cfg = VAEConfig.from_name("tiny-test")
    assert vae_cfg.space == SPACE
    folders = {
        "vae": AutoencoderKL(vae_cfg),
        "vae_other": AutoencoderKL(vae_cfg.replace(space="other-space")),
        "unet": UNet(UNetConfig.from_name("tiny-test")),
        "dit": DiT(DiTConfig.from_name("tiny-test")),
        "text": TextEncoder(TextConfig.from_name("tiny-test")),
        "text_wide": TextEncoder(TextConfig.from_name("tiny-test").replace(width=32)),
    }
    paths = {}
    for seed, (name, model) in enumerate(folders.items()):
        paths[name] = str(save_folder(randomize(model, seed), root / name))
    DenoiserInfo(prediction="v", train_schedule="sd15", latent_space=SPACE).write(paths["unet"])
    paths["unet_eps"] = str(shutil.copytree(paths["unet"], root / "unet_eps"))
    DenoiserInfo(prediction="eps", train_schedule="sd15", latent_space=SPACE).write(paths["unet_eps"])
    DenoiserInfo(prediction="flow", train_schedule="sd3", latent_space=SPACE).write(paths["dit"])
    return TinyModels(root=root, **paths)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny random-weight model folders, built once per session (per xdist worker)."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def engine_factory(tmp_path: Path):
    """``make()`` -> a fresh CPU Engine (own cache) with input and output roots inside tmp_path."""
    from nodegraph import Engine
    from nodegraph.roots import ModelRoots

    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)

    def make() -> Engine:  # the fixtures' models are folders in tmp, named by absolute path (embedding API)
        return Engine(device="cpu", input_root=tmp_path / "in", output_root=tmp_path / "out",
                      model_roots=ModelRoots(allow_paths=True))

    return make


@pytest.fixture
def engine(engine_factory):
    return engine_factory()


# ---------------------------------------------------------------------------------------------------------
# graph builders
# ---------------------------------------------------------------------------------------------------------


def link(node: str, output: str | None = None) -> dict[str, str]:
    return {"node": node, "output": output or node_default_output(node)}


_DEFAULT_OUTPUTS = {"vae": "vae", "unet": "model", "text": "encoder", "pos": "cond", "neg": "cond",
                    "guided": "model", "sched": "sigmas", "empty": "latent", "noise": "noise", "start": "latent",
                    "sampler": "latent", "decode": "image", "encode": "latent", "image": "image", "mask": "mask",
                    "trunc": "sigmas"}


def node_default_output(node: str) -> str:
    return _DEFAULT_OUTPUTS[node]


def sampler_inputs(sampler: str, seed: int = 0, eta: float | None = None) -> dict[str, Any]:
    """The extra literal inputs of graph-defined samplers with per-step noise."""
    extra: dict[str, Any] = {}
    if sampler in ("ddpm", "euler_ancestral", "ddim"):
        extra["seed"] = seed
    if eta is not None:
        extra["eta"] = eta
    return extra


def base_nodes(models: TinyModels, arch: str = "unet", prompt: str = "a red circle", negative: str = "",
               scale: float = 3.0, mode: str = "batched", guidance: bool = True) -> dict[str, Any]:
    """Loaders, prompts and (optionally) classifier-free guidance: nodes vae, unet, text, pos, neg, guided."""
    nodes: dict[str, Any] = {
        "vae": {"type": "model.load_vae", "inputs": {"path": models.vae}},
        "unet": {"type": "model.load_denoiser", "inputs": {"path": getattr(models, arch)}},
        "text": {"type": "model.load_text_encoder", "inputs": {"path": models.text}},
        "pos": {"type": "text.encode", "inputs": {"encoder": link("text"), "text": prompt}},
    }
    if guidance:
        nodes["neg"] = {"type": "text.encode", "inputs": {"encoder": link("text"), "text": negative}}
        nodes["guided"] = {"type": "guidance.cfg", "inputs": {"model": link("unet"), "negative": link("neg"),
                                                              "scale": scale, "mode": mode}}
    return nodes


def model_ref(nodes: dict[str, Any]) -> dict[str, str]:
    return link("guided") if "guided" in nodes else link("unet")


def txt2img_graph(models: TinyModels, sampler: str = "euler", *, arch: str = "unet", steps: int = STEPS,
                  seed: int = 0, size: int = SIZE, eta: float | None = None, scale: float = 3.0,
                  mode: str = "batched", guidance: bool = True, prompt: str = "a red circle",
                  step_seed: int = 7) -> dict[str, Any]:
    """text.encode -> guidance.cfg -> schedule.scheduler -> latent.empty/noise/add_noise -> sample.* -> vae.decode."""
    nodes = base_nodes(models, arch, prompt=prompt, scale=scale, mode=mode, guidance=guidance)
    model = model_ref(nodes)
    nodes.update({
        "sched": {"type": "schedule.scheduler", "inputs": {"model": link("unet"), "steps": steps,
                                                           "scheduler": sampler}},
        "empty": {"type": "latent.empty", "inputs": {"vae": link("vae"), "width": size, "height": size}},
        "noise": {"type": "latent.noise", "inputs": {"like": link("empty"), "seed": seed}},
        "start": {"type": "latent.add_noise", "inputs": {"model": link("unet"), "latent": link("empty"),
                                                         "noise": link("noise"), "sigmas": link("sched")}},
        "sampler": {"type": f"sample.{sampler}", "inputs": {"model": model, "latent": link("start"),
                                                             "sigmas": link("sched"), "cond": link("pos"),
                                                             **sampler_inputs(sampler, step_seed, eta)}},
        "decode": {"type": "vae.decode", "inputs": {"vae": link("vae"), "latent": link("sampler")}},
    })
    return {"version": 1, "nodes": nodes, "outputs": {
        "image": link("decode"), "latent": link("sampler"), "model": model, "cond": link("pos"),
        "sigmas": link("sched"), "start": link("start"),
    }}


def img2img_nodes(models: TinyModels, image_node: dict[str, Any], *, strength: float = 0.6, steps: int = STEPS,
                  seed: int = 0, arch: str = "unet", scale: float = 3.0) -> dict[str, Any]:
    """Nodes shared by img2img and inpainting: image, encode, sched, trunc, noise, start (+ loaders)."""
    nodes = base_nodes(models, arch, scale=scale)
    sampler = "flow_euler" if arch == "dit" else "euler"
    nodes.update({
        "image": image_node,
        "encode": {"type": "vae.encode", "inputs": {"vae": link("vae"), "image": link("image")}},
        "sched": {"type": "schedule.scheduler", "inputs": {"model": link("unet"), "steps": steps,
                                                           "scheduler": sampler}},
        "trunc": {"type": "schedule.truncate", "inputs": {"sigmas": link("sched"), "strength": strength}},
        "noise": {"type": "latent.noise", "inputs": {"like": link("encode"), "seed": seed}},
        "start": {"type": "latent.add_noise", "inputs": {"model": link("unet"), "latent": link("encode"),
                                                         "noise": link("noise"), "sigmas": link("trunc")}},
    })
    return nodes


def gradient_image(start: list[float] = (0.9, 0.2, 0.1), end: list[float] = (0.1, 0.3, 0.8),
                   size: int = SIZE) -> dict[str, Any]:
    return {"type": "image.gradient", "inputs": {"width": size, "height": size, "start": list(start),
                                                 "end": list(end)}}


def img2img_graph(models: TinyModels, image_node: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """vae.encode(image) -> schedule.truncate(strength) -> add_noise -> sample.euler / flow_euler -> vae.decode."""
    nodes = img2img_nodes(models, image_node or gradient_image(), **kw)
    sampler = "flow_euler" if kw.get("arch") == "dit" else "euler"
    nodes["sampler"] = {"type": f"sample.{sampler}", "inputs": {"model": model_ref(nodes), "latent": link("start"),
                                                                "sigmas": link("trunc"), "cond": link("pos")}}
    nodes["decode"] = {"type": "vae.decode", "inputs": {"vae": link("vae"), "latent": link("sampler")}}
    return {"version": 1, "nodes": nodes, "outputs": {
        "image": link("decode"), "latent": link("sampler"), "original": link("encode"), "sigmas": link("trunc"),
        "start": link("start"), "noise": link("noise"), "model": model_ref(nodes), "cond": link("pos"),
    }}


def inpaint_graph(models: TinyModels, mask_image: dict[str, Any], image_node: dict[str, Any] | None = None,
                  **kw: Any) -> dict[str, Any]:
    """img2img with an explicit sampler loop whose body blends the known region back (``latent.inpaint_blend``).

    The mask comes from ``mask.from_image`` (1 = generate, 0 = keep); ``mask_image`` is an image node.
    """
    nodes = img2img_nodes(models, image_node or gradient_image(), **kw)
    step = "step.flow_euler" if kw.get("arch") == "dit" else "step.euler"
    nodes["mask_src"] = mask_image
    nodes["mask"] = {"type": "mask.from_image", "inputs": {"image": link("mask_src", "image")}}
    body = {
        "inputs": {"x": {"type": "Latent", "carry": True}, "model": {"type": "Denoiser"},
                   "cond": {"type": "Conditioning", "optional": True}, "original": {"type": "Latent"},
                   "mask": {"type": "Mask"}, "noise": {"type": "Noise"}},
        "nodes": {
            "denoise": {"type": "denoise", "inputs": {"model": {"input": "model"}, "x": {"input": "x"},
                                                      "sigma": {"input": "item"}, "cond": {"input": "cond"}}},
            "step": {"type": step, "inputs": {"x": {"input": "x"}, "denoised": {"node": "denoise", "output": "denoised"},
                                              "sigma": {"input": "item"}, "sigma_next": {"input": "next_item"}}},
            "blend": {"type": "latent.inpaint_blend", "inputs": {
                "model": {"input": "model"}, "x": {"node": "step", "output": "x"}, "original": {"input": "original"},
                "mask": {"input": "mask"}, "noise": {"input": "noise"}, "sigma_next": {"input": "next_item"}}},
        },
        "outputs": {"x": {"node": "blend", "output": "x"}},
    }
    nodes["sampler"] = {"type": "loop", "inputs": {
        "over": link("trunc"), "pairs": True, "x": link("start"), "model": model_ref(nodes), "cond": link("pos"),
        "original": link("encode"), "mask": link("mask"), "noise": link("noise")}, "body": body}
    nodes["decode"] = {"type": "vae.decode", "inputs": {"vae": link("vae"), "latent": {"node": "sampler",
                                                                                        "output": "x"}}}
    return {"version": 1, "nodes": nodes, "outputs": {
        "image": link("decode"), "latent": {"node": "sampler", "output": "x"}, "original": link("encode"),
        "mask": link("mask"),
    }}
