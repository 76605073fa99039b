"""Checkpoint ControlNets (SD1.x / SDXL; diffusers folders and single files) through ``control.apply``, against
diffusers' ControlNet pipelines.

The checkpoints are the tiny real-architecture models of tests/nodes/sd_fixtures.py; each ControlNet is diffusers'
``ControlNetModel.from_unet`` of the checkpoint's U-Net with random (not zero) output convolutions, saved as a
diffusers folder, as an original-layout (ldm) single file written through the inverse of the U-Net key map, and
(SD1) as a diffusers-named single file. Every image is compared with ``StableDiffusion[XL]ControlNetPipeline`` run
with the same Euler scheduler, seed, steps, guidance, control image (a [0, 1] tensor) and
``controlnet_conditioning_scale`` = strength: float32, max abs difference <= 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from nodegraph import Engine  # noqa: E402
from nodes.checkpoints.controlnet import load_controlnet, resolve_controlnet  # noqa: E402
from nodes.checkpoints.keymaps import unet_map  # noqa: E402

from .sd_fixtures import build, layout  # noqa: E402

pytestmark = pytest.mark.xdist_group("checkpoints")
REPO = Path(__file__).resolve().parents[2]
GRAPHS = REPO / "graphs"
CONTROL_IMAGE = GRAPHS / "assets" / "layout_square_left_circle_right.png"
PROMPT = "a red circle on a blue square, highly detailed"
SETTINGS = {"latent.width": 64, "latent.height": 64, "sigmas.steps": 4, "guidance.scale": 5.0, "noise.seed": 3,
            "prompt.text": PROMPT}
LOADER = "checkpoint.load_controlnet"


# -- fixtures -------------------------------------------------------------------------------------------------


def make_controlnet(unet, seed: int, hint=(8, 16, 32, 32)):
    import diffusers

    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    with torch.no_grad():  # zero convolutions random: the residuals must change the image
        for p in cn.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05 if p.dim() > 1 else 0.01)
    return cn.eval()


def save_controlnet(cn, unet, root: Path, name: str, prefix: str) -> dict[str, Path]:
    """``cn`` as a diffusers folder, an ldm single file (through the key map) and a diffusers-named file."""
    from safetensors.torch import save_file

    base = root / "controlnet"
    base.mkdir(parents=True, exist_ok=True)
    cn.save_pretrained(str(base / name), safe_serialization=True)
    ours = {k: v.contiguous() for k, v in cn.state_dict().items()}
    ldm, unmatched = unet_map(layout(unet), controlnet=True).to_original(ours)
    assert not unmatched, unmatched[:5]
    save_file({prefix + k: v.contiguous() for k, v in ldm.items()}, str(base / f"{name}.safetensors"))
    save_file(ours, str(base / f"{name}-diffusers.safetensors"))
    return {"folder": base / name, "ldm": base / f"{name}.safetensors",
            "diffusers": base / f"{name}-diffusers.safetensors"}


@pytest.fixture(scope="session")
def cn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-models")
    cks = {f: build(f, root) for f in ("sd1", "sdxl")}
    nets = {"sd1-a": make_controlnet(cks["sd1"].pipe.unet, 1),
            "sd1-b": make_controlnet(cks["sd1"].pipe.unet, 2, hint=(16, 16, 32, 64)),
            "sdxl-a": make_controlnet(cks["sdxl"].pipe.unet, 3)}
    files = {name: save_controlnet(cn, cks[name.split("-")[0]].pipe.unet, root, name,
                                   "control_model." if name == "sd1-a" else "")
             for name, cn in nets.items()}
    return root, cks, nets, files


@pytest.fixture(scope="session")
def engine(cn_root):
    return Engine(device="cpu", model_roots=[cn_root[0]], input_root=GRAPHS)


def graph() -> dict:
    return json.loads((GRAPHS / "checkpoint_controlnet.json").read_text())


def control_image() -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(CONTROL_IMAGE) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def reference(ck, controlnet, scale, start=0.0, end=1.0) -> torch.Tensor:
    """The diffusers ControlNet pipeline's image (one ControlNet, or a list for MultiControlNet)."""
    import diffusers

    if ck.family == "sdxl":
        pipe = diffusers.StableDiffusionXLControlNetPipeline(**ck.pipe.components, controlnet=controlnet)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(**ck.pipe.components, controlnet=controlnet,
                                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = control_image()
    many = isinstance(controlnet, list)
    return pipe(PROMPT, negative_prompt="", image=[image] * len(controlnet) if many else image,
                num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(3), output_type="pt",
                controlnet_conditioning_scale=scale, control_guidance_start=start,
                control_guidance_end=end).images


def run(engine, checkpoint: str, controlnet: str, g: dict | None = None, **settings) -> torch.Tensor:
    values = {**SETTINGS, "checkpoint.name": checkpoint, "controlnet.name": controlnet, **settings}
    return engine.run(g or graph(), values).outputs["image"]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (1, 3, 64, 64)
    return float((a - b).abs().max())


# -- parity ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_equals_the_diffusers_pipeline_from_folder_and_files(family, cn_root, engine):
    _, cks, nets, files = cn_root
    ck, name = cks[family], f"{family}-a"
    ref = reference(ck, nets[name], 0.8)
    plain = reference(ck, nets[name], 0.0)
    assert diff(ref, plain) > 1e-2  # the ControlNet changes the image: the comparison can tell
    kinds = ("folder", "ldm", "diffusers") if family == "sd1" else ("folder", "ldm")
    for ckpt in (ck.folder.name, ck.file.name):
        for kind in kinds:
            out = run(engine, ckpt, files[name][kind].name, **{"control.strength": 0.8})
            d = diff(out, ref)
            assert d <= 1e-4, f"{ckpt} + {files[name][kind].name}: {d:.2e}"


def test_start_and_end_equal_control_guidance_start_and_end(cn_root, engine):
    _, cks, nets, files = cn_root
    ck = cks["sd1"]
    ref = reference(ck, nets["sd1-a"], 1.0, start=0.25, end=0.75)
    full = reference(ck, nets["sd1-a"], 1.0)
    out = run(engine, ck.file.name, files["sd1-a"]["ldm"].name, **{"control.start": 0.25, "control.end": 0.75})
    assert diff(out, ref) <= 1e-4 and diff(ref, full) > 1e-3


def test_two_stacked_controlnets_equal_multicontrolnet(cn_root, engine):
    _, cks, nets, files = cn_root
    ck = cks["sd1"]
    g = graph()
    g["nodes"]["controlnet2"] = {"type": LOADER, "inputs": {"name": files["sd1-b"]["folder"].name}}
    g["nodes"]["control2"] = {"type": "control.apply", "inputs": {
        "model": {"node": "control", "output": "model"}, "controlnet": {"node": "controlnet2", "output": "controlnet"},
        "image": {"node": "control_image", "output": "image"}, "sigmas": {"node": "sigmas", "output": "sigmas"},
        "strength": 1.2, "start": 0.0, "end": 0.5}}
    g["nodes"]["guidance"]["inputs"]["model"] = {"node": "control2", "output": "model"}
    ref = reference(ck, [nets["sd1-a"], nets["sd1-b"]], [0.7, 1.2], start=[0.0, 0.0], end=[1.0, 0.5])
    out = run(engine, ck.folder.name, files["sd1-a"]["ldm"].name, g, **{"control.strength": 0.7})
    assert diff(out, ref) <= 1e-4
    single = reference(ck, nets["sd1-a"], 0.7)
    assert diff(ref, single) > 1e-3


# -- detection -------------------------------------------------------------------------------------------------


def norm(config, key: str) -> object:
    value = config.get(key)
    if key == "transformer_layers_per_block" and isinstance(value, int):  # one depth for every level
        value = [value] * len(config["block_out_channels"])
    return list(value) if isinstance(value, (list, tuple)) else value


def test_the_key_map_converts_back_and_the_config_comes_from_the_shapes(cn_root):
    from safetensors.torch import load_file

    _, cks, nets, files = cn_root
    for name, cn in nets.items():
        ref = cn.config
        for kind in ("folder", "ldm", "diffusers"):
            det = resolve_controlnet(files[name][kind].name, files[name][kind])
            assert det.family.name == name.split("-")[0] and det.space == ("sdxl" if "xl" in name else "sd15")
            for key in ("in_channels", "conditioning_channels", "conditioning_embedding_out_channels",
                        "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                        "use_linear_projection", "transformer_layers_per_block", "attention_head_dim",
                        "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                want, got = norm(ref, key), norm(det.config, key)
                assert got == want, f"{name} {kind}: {key} {got} != {want}"
        det = resolve_controlnet(name, files[name]["ldm"])
        raw = load_file(str(files[name]["ldm"]))
        raw = {k[len(det.prefix):]: v for k, v in raw.items()}
        ours, unmatched = unet_map(det.layout, controlnet=True).to_ours(raw)
        assert not unmatched and set(ours) == set(cn.state_dict())
        assert all(torch.equal(ours[k], v) for k, v in cn.state_dict().items())
        back, left = unet_map(det.layout, controlnet=True).to_original(ours)
        assert not left and all(torch.equal(back[k], raw[k]) for k in raw)


def test_ports_are_typed_at_validation(cn_root, engine):
    _, cks, _, files = cn_root
    for family, space in (("sd1", "sd15"), ("sdxl", "sdxl")):
        result = engine.validate(graph(), {"checkpoint.name": cks[family].file.name,
                                           "controlnet.name": files[f"{family}-a"]["ldm"].name})
        assert result.ok, result.issues
        assert result.scope.nodes["controlnet"].output_types["controlnet"].param("space") == space


# -- bad input --------------------------------------------------------------------------------------------------


def test_an_sdxl_controlnet_on_sd1_is_refused_naming_both(cn_root, engine):
    from nodes.adapters import Controlled
    from nodes.checkpoints.families import detect
    from nodes.checkpoints.handles import denoiser_for
    from nodes.checkpoints.load import build_unet

    _, cks, _, files = cn_root
    result = engine.validate(graph(), {"checkpoint.name": cks["sd1"].file.name,
                                       "controlnet.name": files["sdxl-a"]["folder"].name})
    errors = [i for i in result.issues if i.code == "type_mismatch"]
    assert errors and errors[0].node == "control" and "sdxl" in errors[0].message and "sd15" in errors[0].message
    # the handles themselves refuse too (a plain Python call, or a U-Net of the same latent space)
    det = detect("sd1", cks["sd1"].file)
    sd1 = denoiser_for(build_unet(det), det.family, det.prediction, dict(det.scheduler))
    sdxl_cn = load_controlnet(resolve_controlnet("x", files["sdxl-a"]["folder"]))
    with pytest.raises(ValueError, match="Stable Diffusion XL base but the U-Net is Stable Diffusion 1.x") as exc:
        Controlled(sd1, sdxl_cn, control_image())
    assert "cross_attention_dim 2048 != 768" in str(exc.value)


def _issue(engine, cks, controlnet: str):
    result = engine.validate(graph(), {"checkpoint.name": cks["sd1"].file.name, "controlnet.name": controlnet})
    assert not result.ok
    issue = result.issues[0]
    assert issue.node == "controlnet" and issue.port == "name", issue
    return issue


def test_bad_controlnet_files_are_validation_errors(cn_root, engine):
    from safetensors.torch import save_file

    root, cks, _, files = cn_root
    base = root / "controlnet"
    data = files["sd1-a"]["ldm"].read_bytes()
    (base / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    issue = _issue(engine, cks, "truncated.safetensors")
    assert issue.code == "bad_checkpoint" and "truncated" in issue.message
    (base / "old.pth").write_bytes(b"not opened")
    issue = _issue(engine, cks, "old.pth")
    assert issue.code == "bad_checkpoint" and "convert" in issue.message
    pickled = base / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((files["sd1-a"]["folder"] / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    issue = _issue(engine, cks, "pickled")
    assert issue.code == "bad_checkpoint" and "pickle" in issue.message
    (base / "whole.safetensors").symlink_to(cks["sd1"].file)
    issue = _issue(engine, cks, "whole.safetensors")
    assert issue.code == "bad_checkpoint" and "checkpoint.load" in issue.message
    save_file({"some.weight": torch.zeros(2)}, str(base / "other.safetensors"))
    issue = _issue(engine, cks, "other.safetensors")
    assert issue.code == "bad_checkpoint" and "SD1.x" in issue.message and "SDXL" in issue.message
    issue = _issue(engine, cks, "tiny-shapes/controlnet_unet")
    assert issue.code == "bad_checkpoint" and "model.load_controlnet" in issue.message
    issue = _issue(engine, cks, "missing.safetensors")
    assert issue.code == "unknown_model"
    # a file whose header is fine but whose tensors do not fit the inferred model fails at load, naming it
    from safetensors.torch import load_file

    broken = load_file(str(files["sd1-a"]["diffusers"]))
    broken.pop("controlnet_down_blocks.3.weight")
    save_file(broken, str(base / "broken.safetensors"))
    with pytest.raises(Exception, match="ControlNet weights do not fit"):
        run(engine, cks["sd1"].file.name, "broken.safetensors")
