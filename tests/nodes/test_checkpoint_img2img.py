"""Image to image and inpainting with real checkpoints (graphs/checkpoint_img2img.json, checkpoint_inpaint.json),
against diffusers' img2img and inpainting pipelines.

The checkpoints are tiny random models with the real architectures (tests/nodes/sd_fixtures.py), each as a
diffusers folder and as a single file; the references are the pipelines built from the same components with
``EulerDiscreteScheduler.from_config`` of the checkpoint's scheduler config, the same seed (CPU generator), steps,
strength and guidance: float32, max abs difference <= 1e-4.

Where a pipeline would draw from its generator for something the graphs compute deterministically, the test
hands it the graph's value instead, and checks that value separately:

* img2img: the pipelines encode the image with ``latent_dist.sample(generator)``, ``vae.encode`` uses the posterior
  mean. The pipeline gets the latent (an ``image`` with 4 channels is taken as latents), so its generator's first
  draw is the noise, as ``latent.noise`` draws it; the latent is checked against the diffusers VAE's mean.
* strength: the pipelines keep ``int(steps * strength)`` steps, ``schedule.truncate`` ``round(strength * steps)``;
  the cases use a strength whose product with the steps is whole.
* inpainting: the pipeline gets ``masked_image_latents`` from the VAE's mean (it would sample them too) and
  strength 1 (the SDXL pipeline's default is 0.9999), so it starts from ``noise * init_noise_sigma``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from nodegraph import Engine  # noqa: E402
from nodegraph.errors import NodeExecutionError  # noqa: E402

from .sd_fixtures import Checkpoint, build  # noqa: E402

pytestmark = pytest.mark.xdist_group("checkpoints")
GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
PROMPT = "a red circle on a blue square, highly detailed"
STEPS, STRENGTH, SCALE, SEED = 10, 0.6, 5.0, 3  # int(10 * 0.6) == round(0.6 * 10): the same 6 steps
INPAINT_STEPS = 4
IMG2IMG = {"sigmas.steps": STEPS, "truncate.strength": STRENGTH, "guidance.scale": SCALE, "noise.seed": SEED,
           "prompt.text": PROMPT}
INPAINT = {"sigmas.steps": INPAINT_STEPS, "guidance.scale": SCALE, "noise.seed": SEED, "prompt.text": PROMPT,
           "latent.width": 64, "latent.height": 64}


class Checkpoints:
    """The tiny checkpoints, each built on first use (a test builds only what it needs)."""

    def __init__(self, root: Path):
        self.root, self._built = root, {}

    def __getitem__(self, key: str) -> Checkpoint:
        if key not in self._built:
            family, kind = (key[:-8], "inpaint") if key.endswith("-inpaint") else (key, "")
            self._built[key] = build(family, self.root, inpaint=kind == "inpaint")
        return self._built[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("img2img-models"))


@pytest.fixture(scope="session")
def engine(checkpoints) -> Engine:
    return Engine(device="cpu", model_roots=[checkpoints.root], input_root=GRAPHS)


def graph(name: str) -> dict:
    return json.loads((GRAPHS / name).read_text())


def load_image(name: str) -> torch.Tensor:
    """An asset as image.load reads it: (1, 3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(GRAPHS / "assets" / name) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def mean_latent(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """The diffusers VAE's posterior mean of an image in [-1, 1], scaled as the pipelines scale latents."""
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def euler(pipe) -> None:
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)


def img2img_reference(ck: Checkpoint, latent: torch.Tensor) -> torch.Tensor:
    import diffusers

    if ck.family == "sdxl":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**ck.pipe.components, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**ck.pipe.components, requires_safety_checker=False)
    euler(pipe)
    return pipe(PROMPT, negative_prompt="", image=latent, strength=STRENGTH, num_inference_steps=STEPS,
                guidance_scale=SCALE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images


def inpaint_reference(ck: Checkpoint, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pipe = ck.pipe
    euler(pipe)
    masked = mean_latent(pipe, (image * 2 - 1) * (mask < 0.5))
    return pipe(PROMPT, negative_prompt="", image=image, mask_image=mask, masked_image_latents=masked, height=64,
                width=64, strength=1.0, num_inference_steps=INPAINT_STEPS, guidance_scale=SCALE,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# -- img2img ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_img2img_equals_the_diffusers_pipeline_from_folder_and_file(family, checkpoints, engine):
    ck = checkpoints[family]
    image = load_image("blue_square_left.png")
    latent = mean_latent(ck.pipe, image * 2 - 1)
    ref = img2img_reference(ck, latent)
    g = graph("checkpoint_img2img.json")
    g["outputs"]["latent"] = {"node": "encode", "output": "latent"}
    images = {}
    for name in (ck.folder.name, ck.file.name):
        out = engine.run(g, {**IMG2IMG, "checkpoint.name": name}).outputs
        assert max_diff(out["latent"], latent) <= 1e-5, f"{name}: vae.encode is not the posterior mean"
        assert out["image"].shape == ref.shape == (1, 3, 64, 64)
        diff = max_diff(out["image"], ref)
        print(f"img2img {family} {name}: max abs diff {diff:.2e}")
        assert diff <= 1e-4, f"{name}: {diff:.2e}"
        images[name] = out["image"]
    folder, file = images.values()
    assert max_diff(folder, file) <= 1e-6
    assert ref.std() > 0.05  # a real image, not a constant one that any model would match
    assert max_diff(ref, image) > 1e-2  # and not the input image: the strength changed it


def test_strength_keeps_as_many_steps_as_the_pipeline_where_strength_times_steps_is_whole(checkpoints, engine):
    import diffusers

    ck = checkpoints["sd1"]
    g = graph("checkpoint_img2img.json")
    g["outputs"] = {"sigmas": {"node": "truncate", "output": "sigmas"}}
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ck.pipe.components, requires_safety_checker=False)
    euler(pipe)
    for steps, strength in ((10, 0.6), (20, 0.6), (10, 0.3), (4, 0.5), (10, 1.0)):
        sigmas = engine.run(g, {"checkpoint.name": ck.file.name, "sigmas.steps": steps,
                                "truncate.strength": strength}).outputs["sigmas"]
        pipe.scheduler.set_timesteps(steps)
        _, kept = pipe.get_timesteps(steps, strength, "cpu")
        assert len(sigmas) - 1 == kept, (steps, strength)
        assert torch.allclose(sigmas, pipe.scheduler.sigmas[pipe.scheduler.begin_index:].float(), atol=1e-5)


@pytest.mark.parametrize("family, space, dim", [("sd1", "sd15", 768), ("sdxl", "sdxl", 2048)])
def test_the_img2img_graph_validates_with_typed_ports(family, space, dim, checkpoints, engine):
    ck = checkpoints[family]
    for name in (ck.folder.name, ck.file.name):
        result = engine.validate(graph("checkpoint_img2img.json"), {"checkpoint.name": name})
        assert result.ok, result.issues
        nodes = result.scope.nodes
        model = nodes["checkpoint"].output_types["model"]
        assert model.param("space") == space and model.param("family") == family and model.param("context_dim") == dim
        latent = nodes["encode"].output_types["latent"]
        assert latent.param("space") == space and latent.param("channels") == 4


def test_an_sdxl_image_latent_into_an_sd15_sampler_is_a_validation_error(checkpoints, engine):
    g = graph("checkpoint_img2img.json")
    g["nodes"]["other"] = {"type": "checkpoint.load", "inputs": {"name": checkpoints["sdxl"].file.name}}
    g["nodes"]["encode"]["inputs"]["vae"] = {"node": "other", "output": "vae"}
    result = engine.validate(g, {"checkpoint.name": checkpoints["sd1"].file.name})
    errors = [i for i in result.issues if i.code == "type_mismatch"]
    assert errors and errors[0].node == "start", result.issues
    assert "sdxl" in errors[0].message and "sd15" in errors[0].message


# -- inpainting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_inpainting_equals_the_diffusers_pipeline_from_folder_and_file(family, checkpoints, engine):
    ck = checkpoints[f"{family}-inpaint"]
    assert ck.pipe.unet.config.in_channels == 9
    image = load_image("blue_square_left.png")
    mask = load_image("mask_right_half.png")[:, :1]
    ref = inpaint_reference(ck, image, mask)
    images = {}
    for name in (ck.folder.name, ck.file.name):
        out = engine.run(graph("checkpoint_inpaint.json"), {**INPAINT, "checkpoint.name": name}).outputs["image"]
        assert out.shape == ref.shape == (1, 3, 64, 64)
        diff = max_diff(out, ref)
        print(f"inpaint {family} {name}: max abs diff {diff:.2e}")
        assert diff <= 1e-4, f"{name}: {diff:.2e}"
        images[name] = out
    folder, file = images.values()
    assert max_diff(folder, file) <= 1e-6
    assert ref.std() > 0.05


def test_the_inpaint_conditioning_is_the_pipelines_mask_and_masked_latent(checkpoints, engine):
    ck = checkpoints["sd1-inpaint"]
    g = graph("checkpoint_inpaint.json")
    g["outputs"] = {"cond": {"node": "inpaint", "output": "cond"}, "negative": {"node": "inpaint_negative",
                                                                               "output": "cond"}}
    out = engine.run(g, {"checkpoint.name": ck.file.name, "prompt.text": PROMPT}).outputs
    image, mask = load_image("blue_square_left.png"), load_image("mask_right_half.png")[:, :1]
    small = torch.nn.functional.interpolate(mask, size=(8, 8))
    masked = mean_latent(ck.pipe, (image * 2 - 1) * (mask < 0.5))
    for cond in out.values():
        concat = cond["concat"]
        assert concat.shape == (1, 5, 8, 8)
        assert torch.equal(concat[:, :1], small)
        assert max_diff(concat[:, 1:], masked) <= 1e-5


def test_an_ordinary_checkpoint_given_inpaint_conditioning_fails_naming_the_node(checkpoints, engine):
    ck = checkpoints["sd1"]
    assert ck.pipe.unet.config.in_channels == 4
    result = engine.validate(graph("checkpoint_inpaint.json"), {"checkpoint.name": ck.file.name})
    assert result.ok, result.issues  # the ports carry the latent channels (4 for both), not the U-Net's input
    with pytest.raises(NodeExecutionError) as info:
        engine.run(graph("checkpoint_inpaint.json"), {**INPAINT, "checkpoint.name": ck.file.name})
    err = info.value
    print(f"4-channel checkpoint with inpaint.condition: {err}")
    assert "sampler" in err.node


def test_the_sdxl_refiner_takes_the_aesthetic_score_as_its_pipeline_does(checkpoints, engine):
    ck = checkpoints["sdxl-refiner"]
    image = load_image("blue_square_left.png")
    latent = mean_latent(ck.pipe, image * 2 - 1)
    pipe = ck.pipe
    euler(pipe)
    ref = pipe(PROMPT, negative_prompt="", image=latent, strength=STRENGTH, num_inference_steps=STEPS,
               guidance_scale=SCALE, aesthetic_score=6.0, negative_aesthetic_score=2.5,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt").images
    result = engine.validate(graph("checkpoint_img2img.json"), {"checkpoint.name": ck.file.name})
    assert result.ok and result.scope.nodes["checkpoint"].output_types["model"].param("family") == "sdxl-refiner"
    for name in (ck.folder.name, ck.file.name):
        out = engine.run(graph("checkpoint_img2img.json"), {**IMG2IMG, "checkpoint.name": name}).outputs["image"]
        assert max_diff(out, ref) <= 1e-4, f"{name}: {max_diff(out, ref):.2e}"
    other = engine.run(graph("checkpoint_img2img.json"),
                       {**IMG2IMG, "checkpoint.name": ck.file.name, "prompt.aesthetic_score": 3.0}).outputs["image"]
    assert max_diff(other, ref) > 1e-4  # the score reaches the U-Net
