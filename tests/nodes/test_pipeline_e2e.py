"""End to end through the Engine with tiny random-weight models saved to safetensors and loaded by the
model-load nodes: txt2img (U-Net and DiT), seeds, batched vs sequential CFG, img2img, inpainting with a
blend node inside an explicit sampler loop, and ``nodegraph run`` writing a PNG that carries its graph."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph import Engine
from nodegraph.cli import main
from nodegraph.outputs import PNG_GRAPH_KEY
from nodes.diffusion import reference
from tests.nodes.conftest import SIZE, STEPS, gradient_image, img2img_graph, inpaint_graph, txt2img_graph

LATENT = (1, 4, SIZE // 2, SIZE // 2)


def run(engine, graph: dict[str, Any], *outputs: str) -> dict[str, Any]:
    return engine.run(graph, outputs=list(outputs) or None).outputs


def assert_image(image: torch.Tensor) -> None:
    assert image.shape == (1, 3, SIZE, SIZE)
    assert image.dtype == torch.float32
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    assert image.std() > 0, "a constant image: the decoder saw nothing"


# ---------------------------------------------------------------------------------------------------------
# txt2img
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, sampler", [("unet", "euler"), ("unet", "dpmpp_2m"), ("dit", "flow_euler")])
def test_txt2img_gives_a_finite_image_in_unit_range(engine, tiny_models, arch, sampler) -> None:
    out = run(engine, txt2img_graph(tiny_models, sampler, arch=arch), "image", "latent", "sigmas")
    assert_image(out["image"])
    assert out["latent"].shape == LATENT and torch.isfinite(out["latent"]).all()
    assert len(out["sigmas"]) == STEPS + 1


def test_same_seed_same_image_across_fresh_engines_and_other_seed_differs(engine_factory, tiny_models) -> None:
    first = run(engine_factory(), txt2img_graph(tiny_models, "euler_ancestral", seed=3), "image", "latent")
    again = run(engine_factory(), txt2img_graph(tiny_models, "euler_ancestral", seed=3), "image", "latent")
    other = run(engine_factory(), txt2img_graph(tiny_models, "euler_ancestral", seed=4), "image", "latent")
    assert torch.equal(first["latent"], again["latent"])
    assert torch.equal(first["image"], again["image"])
    assert not torch.equal(first["latent"], other["latent"])
    assert not torch.equal(first["image"], other["image"])


def test_prompt_reaches_the_denoiser(engine, tiny_models) -> None:
    a = run(engine, txt2img_graph(tiny_models, prompt="a red circle"), "latent")["latent"]
    b = run(engine, txt2img_graph(tiny_models, prompt="two blue squares"), "latent")["latent"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("arch, sampler", [("unet", "euler"), ("unet", "heun"), ("dit", "flow_euler")])
def test_batched_and_sequential_cfg_agree(engine, tiny_models, arch, sampler) -> None:
    batched = run(engine, txt2img_graph(tiny_models, sampler, arch=arch, mode="batched"), "latent", "image")
    sequential = run(engine, txt2img_graph(tiny_models, sampler, arch=arch, mode="sequential"), "latent", "image")
    unguided = run(engine, txt2img_graph(tiny_models, sampler, arch=arch, guidance=False), "latent")
    assert (batched["latent"] - sequential["latent"]).abs().max() <= 1e-5
    assert (batched["image"] - sequential["image"]).abs().max() <= 1e-5
    # Guidance at scale 3 does something, so the agreement above is not two unguided runs.
    assert (batched["latent"] - unguided["latent"]).abs().max() > 1e-3


def test_batched_and_sequential_cfg_agree_with_rescale(engine, tiny_models) -> None:
    graphs = {}
    for mode in ("batched", "sequential"):
        g = txt2img_graph(tiny_models, "euler", mode=mode)
        g["nodes"]["guided"]["inputs"]["rescale"] = 0.7
        graphs[mode] = run(engine, g, "latent")["latent"]
    plain = run(engine, txt2img_graph(tiny_models, "euler"), "latent")["latent"]
    assert (graphs["batched"] - graphs["sequential"]).abs().max() <= 1e-5
    assert not torch.allclose(graphs["batched"], plain)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_guidance_scale_one_equals_no_guidance(engine, tiny_models, mode) -> None:
    scale_one = run(engine, txt2img_graph(tiny_models, "dpmpp_2m", scale=1.0, mode=mode), "latent", "image")
    unguided = run(engine, txt2img_graph(tiny_models, "dpmpp_2m", guidance=False), "latent", "image")
    assert torch.equal(scale_one["latent"], unguided["latent"])
    assert torch.equal(scale_one["image"], unguided["image"])


# ---------------------------------------------------------------------------------------------------------
# img2img
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_img2img_noises_the_encoded_image_to_the_truncated_schedule(engine, tiny_models, arch) -> None:
    strength = 0.5
    out = run(engine, img2img_graph(tiny_models, arch=arch, strength=strength))
    assert_image(out["image"])
    sigmas, original, noise, start = out["sigmas"], out["original"], out["noise"], out["start"]
    assert len(sigmas) == round(strength * STEPS) + 1 and float(sigmas[-1]) == 0.0
    assert original.shape == noise.shape == LATENT
    s = sigmas[0]
    expected_start = (1 - s) * original + s * noise if arch == "dit" else original + s * noise
    assert torch.allclose(start, expected_start, atol=1e-6)
    with torch.inference_mode():
        loop = reference.SAMPLERS["flow_euler" if arch == "dit" else "euler"]
        expected = loop(out["model"], start.clone(), sigmas, out["cond"])
    assert torch.equal(out["latent"], expected)


def test_img2img_truncate_keeps_the_tail_of_the_full_schedule(engine, tiny_models) -> None:
    graph = img2img_graph(tiny_models, strength=0.75)
    graph["outputs"]["full"] = {"node": "sched", "output": "sigmas"}
    out = run(engine, graph, "sigmas", "full")
    assert torch.equal(out["sigmas"], out["full"][-(round(0.75 * STEPS) + 1):])


def test_img2img_strength_zero_returns_the_encoded_image(engine, tiny_models) -> None:
    out = run(engine, img2img_graph(tiny_models, strength=0.0), "latent", "original", "sigmas")
    assert out["sigmas"].tolist() == [0.0]
    assert torch.equal(out["latent"], out["original"])


def test_img2img_output_depends_on_the_input_image(engine, tiny_models) -> None:
    a = run(engine, img2img_graph(tiny_models, gradient_image((0.9, 0.1, 0.1), (0.1, 0.1, 0.9))), "latent")
    b = run(engine, img2img_graph(tiny_models, gradient_image((0.1, 0.9, 0.1), (0.9, 0.9, 0.1))), "latent")
    assert not torch.equal(a["latent"], b["latent"])


# ---------------------------------------------------------------------------------------------------------
# inpainting: an explicit loop with latent.inpaint_blend in the body, mask from mask.from_image
# ---------------------------------------------------------------------------------------------------------

BLACK = gradient_image((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))  # luminance 0 -> mask 0: keep everything
WHITE = gradient_image((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))  # luminance 1 -> mask 1: generate everything
LEFT_DARK = gradient_image((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # keep the left half, generate the right half


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_inpaint_with_an_empty_mask_keeps_the_original_latent(engine, tiny_models, arch) -> None:
    out = run(engine, inpaint_graph(tiny_models, BLACK, arch=arch), "latent", "original", "mask")
    assert out["mask"].shape == (1, 1, SIZE, SIZE) and out["mask"].max() == 0
    assert out["latent"].shape == LATENT
    assert torch.allclose(out["latent"], out["original"], atol=1e-6), (
        f"known region drifted: max abs diff {(out['latent'] - out['original']).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_inpaint_with_a_full_mask_equals_plain_img2img_from_the_same_noise(engine, tiny_models, arch) -> None:
    inpainted = run(engine, inpaint_graph(tiny_models, WHITE, arch=arch, seed=5), "latent", "mask")
    plain = run(engine, img2img_graph(tiny_models, arch=arch, seed=5), "latent", "original")
    assert inpainted["mask"].min() == 1
    assert not torch.allclose(plain["latent"], plain["original"])
    # mask * x + (1 - mask) * known with mask 1 is x exactly.
    assert torch.equal(inpainted["latent"], plain["latent"]), (
        f"max abs diff {(inpainted['latent'] - plain['latent']).abs().max().item():.3g}"
    )


def test_inpaint_half_mask_keeps_the_known_half_and_generates_the_other(engine, tiny_models) -> None:
    out = run(engine, inpaint_graph(tiny_models, LEFT_DARK), "latent", "original", "mask")
    mask = out["mask"][0, 0]
    assert mask[:, : SIZE // 2].max() == 0 and mask[:, SIZE // 2:].min() == 1
    half = LATENT[-1] // 2
    latent, original = out["latent"], out["original"]
    assert torch.allclose(latent[..., :half], original[..., :half], atol=1e-6)
    assert (latent[..., half:] - original[..., half:]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def test_cli_run_writes_a_png_carrying_its_graph(tiny_models, tmp_path, capsys) -> None:
    """The CLI names models inside ``--models`` roots (ComfyUI's folders; links inside a root are followed)."""
    root = tmp_path / "models"
    graph = txt2img_graph(tiny_models, "euler", seed=11)
    for node, folder in (("unet", "diffusion_models"), ("vae", "vae"), ("text", "text_encoders")):
        (root / folder).mkdir(parents=True)
        (root / folder / f"tiny-{node}").symlink_to(graph["nodes"][node]["inputs"]["path"])
        graph["nodes"][node]["inputs"]["path"] = f"tiny-{node}"
    graph["outputs"] = {"image": graph["outputs"]["image"]}
    path = tmp_path / "txt2img.json"
    path.write_text(json.dumps(graph))
    out_dir = tmp_path / "cli-out"
    rc = main(["run", str(path), "--out", str(out_dir), "--device", "cpu", "--input-root", str(tmp_path),
               "--models", str(root), "--json"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    report = json.loads(stdout)
    png = out_dir / "image.png"
    assert report["outputs"]["image"] == [str(png)]
    with Image.open(png) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        pixels = np.asarray(im)
        embedded = json.loads(im.text[PNG_GRAPH_KEY])
    assert {nid: n["type"] for nid, n in embedded["nodes"].items()} == {nid: n["type"] for nid, n in
                                                                        graph["nodes"].items()}
    assert embedded["nodes"]["noise"]["inputs"]["seed"] == 11
    # The embedded recipe reproduces the picture.
    engine = Engine(device="cpu", model_roots=[root], input_root=tmp_path, output_root=tmp_path / "out")
    again = engine.run(embedded, outputs=["image"]).outputs["image"]
    expected = again[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, expected)
