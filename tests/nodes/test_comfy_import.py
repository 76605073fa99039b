"""ComfyUI API prompts, UI workflows and PNGs run through the comfy pack's reader (nodes/comfy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from nodegraph import Engine  # noqa: E402

from .sd_fixtures import build  # noqa: E402

pytestmark = pytest.mark.xdist_group("checkpoints")
CKPT = "v1-5-pruned-emaonly.safetensors"


def default_prompt(steps: int = 4, sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0) -> dict:
    """ComfyUI's default text-to-image workflow as the frontend POSTs it (64 px, few steps)."""
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": steps, "cfg": 8.0, "sampler_name": sampler,
                                                   "scheduler": scheduler, "denoise": denoise, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery, (purple galaxy:1.2) bottle",
                                                         "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy-models")
    ck = build("sd1", root)
    ck.file.rename(root / "checkpoints" / CKPT)
    return root


@pytest.fixture()
def engine(root, tmp_path):
    return Engine(device="cpu", model_roots=[root], output_root=tmp_path)


def test_an_api_prompt_becomes_our_open_graph(engine):
    from nodes.comfy.importer import api_to_graph

    graph = api_to_graph(default_prompt())
    types = {nid: spec["type"] for nid, spec in graph["nodes"].items()}
    assert types["4"] == "checkpoint.load" and types["6"] == "clip.encode" and types["8"] == "vae.decode"
    assert types["3"] == "sample.euler" and types["3.sigmas"] == "schedule.comfy" and types["3.guidance"] == "guidance.cfg"
    assert graph["nodes"]["3.noise"]["inputs"]["seed"] == 7
    assert graph["outputs"] == {"9_images": {"node": "9", "output": "file"}}
    result = engine.validate(graph)
    assert result.ok, result.issues
    assert result.scope.nodes["4"].output_types["model"].param("family") == "sd1"


def test_run_and_validate_take_the_prompt_file_as_it_is(engine, root, tmp_path):
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(default_prompt()))
    result = engine.run(path)
    written = result.outputs["9_images"]
    assert Path(str(written)).name == "ComfyUI_00001_.png" and (tmp_path / "ComfyUI_00001_.png").is_file()
    again = engine.run(path)
    assert again.report.executed == ["9"]  # only the (uncached) save runs again


def test_unknown_node_types_are_all_listed_and_nothing_runs(engine):
    prompt = default_prompt()
    prompt["10"] = {"class_type": "ImpactWildcardProcessor", "inputs": {}}
    prompt["11"] = {"class_type": "FancyUpscaler", "inputs": {"image": ["8", 0]}}
    result = engine.validate(json.dumps(prompt))
    assert sorted(i.node for i in result.issues) == ["10", "11"]
    assert all(i.code == "unknown_type" for i in result.issues)
    assert "Impact" in result.issues[0].hint or "Impact" in result.issues[1].hint


def test_a_link_to_a_missing_slot_names_the_node(engine):
    prompt = default_prompt()
    prompt["8"]["inputs"]["vae"] = ["4", 5]
    result = engine.validate(prompt)
    assert [(i.code, i.node, i.port) for i in result.issues] == [("bad_link", "8", "vae")]


def test_the_cli_imports_and_reports_errors_as_json(tmp_path):
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(default_prompt()))
    done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "import", "comfy", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["nodes"]["4"]["type"] == "checkpoint.load"
    bad = default_prompt()
    bad["3"]["class_type"] = "NoSuchSampler"
    path.write_text(json.dumps(bad))
    done = subprocess.run([sys.executable, "-m", "nodegraph.cli", "import", "comfy", str(path), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = json.loads(done.stdout)["errors"]
    assert errors[0]["code"] == "unknown_type" and errors[0]["node"] == "3"


def test_the_default_ui_template_runs_as_it_is(engine, root, tmp_path):
    """ComfyUI's own default workflow (a UI file from the templates package), with a stand-in checkpoint saved
    under the name it asks for; sizes and steps overridden on the imported graph to keep the test small."""
    import shutil

    template = Path(__file__).parent / "data" / "comfy" / "default.json"
    shutil.copy(root / "checkpoints" / CKPT, root / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors")
    from nodes.comfy.pack import to_api

    prompt = to_api(json.loads(template.read_text()))
    assert prompt["3"]["inputs"]["seed"] == 685468484323813 and "control_after_generate" not in prompt["3"]["inputs"]
    assert {n["class_type"] for n in prompt.values()} == {"CheckpointLoaderSimple", "KSampler", "VAEDecode",
                                                          "SaveImage", "CLIPTextEncode", "EmptyLatentImage"}
    result = engine.run(template, {"5.width": 64, "5.height": 64, "3.sigmas.steps": 3})
    assert (tmp_path / "SD1.5_00001_.png").is_file() and "9_images" in result.outputs


def test_component_loaders_map_onto_the_checkpoint_component_nodes():
    from nodegraph.errors import GraphValidationError
    from nodes.comfy.importer import api_to_graph

    prompt = default_prompt()
    prompt["4"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "sdxl-unet.safetensors",
                                                          "weight_dtype": "default"}}
    prompt["10"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                               "clip_name2": "clip_g.safetensors", "type": "sdxl"}}
    prompt["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}}
    for nid in ("6", "7"):
        prompt[nid]["inputs"]["clip"] = ["10", 0]
    prompt["8"]["inputs"]["vae"] = ["11", 0]
    nodes = api_to_graph(prompt)["nodes"]
    assert nodes["4"] == {"type": "checkpoint.load_unet", "inputs": {"name": "sdxl-unet.safetensors"}}
    assert nodes["10"]["inputs"] == {"name": "clip_l.safetensors", "name2": "clip_g.safetensors", "family": "sdxl"}
    assert nodes["6"]["inputs"]["clip"] == {"node": "10", "output": "clip"}
    assert nodes["8"]["inputs"]["vae"] == {"node": "11", "output": "vae"}
    prompt["10"]["inputs"]["type"] = "flux"
    with pytest.raises(GraphValidationError) as err:
        api_to_graph(prompt)
    assert [(i.code, i.node, i.port) for i in err.value.issues] == [("unknown_type", "10", "type")]
