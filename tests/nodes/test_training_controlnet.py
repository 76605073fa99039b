"""ControlNet training and the text encoder's caption-parsing pretraining, on tiny presets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nodegraph import Engine
from nodes.adapters import DenoiserInfo, DenoiserModel
from nodes.image_ops import object_mask
from nodes.models.dit import DiT, DiTConfig
from nodes.models.text import TextConfig, TextEncoder
from nodes.models.unet import UNet, UNetConfig
from nodes.shapes import data
from nodes.shapes_nodes import image_to_uint8
from nodes.training.common import Budget, CaptionTable
from nodes.training.controlnet import controlnet_loss, hint_images, iou, mask_of, new_controlnet, train_controlnet
from nodes.training.denoiser import sample_sigmas
from nodes.training.text import CAPTION_SLOTS, caption_labels, pretrain_text
from tests.nodes.conftest import randomize


def base_model(arch: str) -> DenoiserModel:
    """A denoiser with every weight random: a fresh one's zero-initialised output layer would hide the
    ControlNet's residuals from the loss (zero gradient), unlike the trained denoisers a ControlNet starts from."""
    torch.manual_seed(0)
    if arch == "dit":
        net, info = DiT(DiTConfig.from_name("tiny-test")), DenoiserInfo("flow", "sd3", "tiny-test")
    else:
        net, info = UNet(UNetConfig.from_name("tiny-test")), DenoiserInfo("v", "sd15", "tiny-test")
    return DenoiserModel(randomize(net), info)


def test_mask_of_matches_the_object_mask_node() -> None:
    images, _, _ = data.batch(3, 4)
    expected = object_mask(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)["mask"][:, 0].bool().numpy()
    assert np.array_equal(mask_of(images), expected)
    assert hint_images(mask_of(images)).shape == (4, 3, 64, 64)


def test_iou() -> None:
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    a[1], b[1] = True, True
    assert iou(a, b).tolist() == [pytest.approx(1 / 3), 1.0, 1.0]


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_controlnet_trainer_trains_only_the_controlnet(arch: str) -> None:
    base = base_model(arch)
    torch.manual_seed(1)
    text = TextEncoder(TextConfig.from_name("tiny-test"))
    controlnet = new_controlnet(base, "tiny-test")
    base_before = [p.clone() for p in base.net.parameters()]
    images, captions, _ = data.batch(5, 8)
    masks = mask_of(images)
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(8, 4, 16, 16, generator=gen)
    table = CaptionTable(text, captions)
    gen = torch.Generator().manual_seed(3)
    draws = [(torch.randn(latents.shape, generator=gen), sample_sigmas(base, 8, gen)) for _ in range(6)]

    def loss(net: torch.nn.Module) -> float:  # mean training loss over fixed noise draws
        with torch.no_grad():
            return sum(float(controlnet_loss(base, net, latents, noise, sigma, table(captions), hint_images(masks)))
                       for noise, sigma in draws) / len(draws)

    before = loss(controlnet)
    record, ema = train_controlnet(base, controlnet, text, latents, masks, captions, Budget(5.0, 30), batch=8,
                                   lr=3e-3, drop=0.0, log=lambda _: None)
    assert record["steps"] == 30
    assert all(torch.equal(a, b) for a, b in zip(base_before, base.net.parameters()))
    assert loss(controlnet) < before  # the zero layers moved, and the loss went down


def test_caption_labels_cover_every_slot() -> None:
    labels = caption_labels("a large red circle on the left")
    values = {slot: CAPTION_SLOTS[slot][i] for slot, i in zip(CAPTION_SLOTS, labels)}
    assert values == {"template": "single", "size": "large", "position": "left", "color_1": "red",
                      "shape_1": "circle", "color_2": None, "shape_2": None}
    pair = dict(zip(CAPTION_SLOTS, caption_labels("a blue square above a white triangle")))
    assert CAPTION_SLOTS["template"][pair["template"]] == "above"
    assert CAPTION_SLOTS["color_2"][pair["color_2"]] == "white"
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        caption_labels("a cat")


def test_text_pretraining_learns_to_parse() -> None:
    torch.manual_seed(0)
    text = TextEncoder(TextConfig(max_length=48, width=32, layers=1, heads=2))
    record = pretrain_text(text, Budget(5.0, 120), batch=64, lr=3e-3, check=200, log=lambda _: None)
    assert record["steps"] == 120
    curve = [row[2] for row in record["loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]
    # colours and shapes of the first object are the easiest slots; a tiny encoder learns them in 120 steps
    assert record["parsing_accuracy"]["color_1"] > 0.9
    assert not any(p.requires_grad for p in text.parameters())


# --- the shipped ControlNets ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("graph,plain", [("controlnet.json", "txt2img_unet.json"), ("controlnet_dit.json", "txt2img.json")])
def test_shipped_controlnet_graph_puts_the_objects_where_the_mask_says(graph: str, plain: str, tmp_path: Path) -> None:
    engine = Engine(device="cpu", input_root=REPO / "graphs", output_root=tmp_path)
    controlled = json.loads((REPO / "graphs" / graph).read_text())
    out = engine.run(controlled, outputs=["image", "mask"]).outputs
    control = out["mask"][0, 0].numpy() > 0.5
    assert 0.05 < control.mean() < 0.6  # the asset's two objects
    image = image_to_uint8(out["image"])
    prompt = controlled["nodes"]["prompt"]["inputs"]["text"]
    seed = controlled["nodes"]["noise"]["inputs"]["seed"]
    free = engine.run(json.loads((REPO / "graphs" / plain).read_text()),
                      overrides={"prompt.text": prompt, "noise.seed": seed}, outputs=["image"]).outputs
    with_control = float(iou(mask_of(image), control[None])[0])
    without = float(iou(mask_of(image_to_uint8(free["image"])), control[None])[0])
    assert with_control > 0.6 and with_control > without + 0.2, (with_control, without)


@pytest.mark.parametrize("module,prog", [("nodes.training", "python -m nodes.training"),
                                         ("nodes.training.controlnet", "python -m nodes.training.controlnet"),
                                         ("nodes.training_controlnet", "python -m nodes.training.controlnet")])
def test_the_training_commands_run(module: str, prog: str) -> None:
    """The commands docs/models.md and the shipped training records name (the old ControlNet one is an alias)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog} ")
    assert ("--only" in done.stdout) == (module == "nodes.training")
