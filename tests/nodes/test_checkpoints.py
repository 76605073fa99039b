"""Real checkpoints (SD1.x, SD2.x v-prediction, SDXL) through ordinary graphs, against diffusers' pipelines.

The checkpoints are tiny random models with the real architectures (tests/nodes/sd_fixtures.py), each as a
diffusers folder and as an original-layout single file. Every image is compared with the matching diffusers
pipeline run with the same scheduler (``EulerDiscreteScheduler.from_config`` of the checkpoint's scheduler
config), seed (CPU generator), steps and guidance: float32, max abs difference <= 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from nodegraph import Engine  # noqa: E402
from nodegraph.errors import GraphValidationError  # noqa: E402

from .sd_fixtures import build  # noqa: E402

pytestmark = pytest.mark.xdist_group("checkpoints")
REPO = Path(__file__).resolve().parents[2]
GRAPHS = REPO / "graphs"
FAMILIES = ("sd1", "sd2", "sdxl")
SETTINGS = {"latent.width": 64, "latent.height": 64, "sigmas.steps": 4, "guidance.scale": 5.0, "noise.seed": 3}
PROMPT = "a red circle on a blue square, highly detailed"


@pytest.fixture(scope="session")
def sd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, {f: build(f, root) for f in FAMILIES}


@pytest.fixture(scope="session")
def engine(sd_root):
    return Engine(device="cpu", model_roots=[sd_root[0]])


def graph(name: str = "checkpoint_txt2img.json") -> dict:
    return json.loads((GRAPHS / name).read_text())


def reference(pipe, prompt: str = PROMPT, negative: str = "", steps: int = 4, scale: float = 5.0, seed: int = 3,
              **kw) -> torch.Tensor:
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=scale, height=64,
                width=64, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kw).images


@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img_equals_the_diffusers_pipeline_from_folder_and_file(family, sd_root, engine):
    _, cks = sd_root
    ck = cks[family]
    ref = reference(ck.pipe)
    images = {}
    for name in (ck.folder.name, ck.file.name):
        out = engine.run(graph(), {**SETTINGS, "checkpoint.name": name, "prompt.text": PROMPT}).outputs["image"]
        assert out.shape == ref.shape == (1, 3, 64, 64)
        assert (out - ref).abs().max() <= 1e-4, f"{name}: {(out - ref).abs().max():.2e}"
        images[name] = out
    folder, file = images.values()
    assert (folder - file).abs().max() <= 1e-6
    assert ref.std() > 0.05  # a real image, not a constant one that any model would match


def test_a_second_seed_reruns_only_noise_sampler_and_decode(sd_root, engine):
    name = sd_root[1]["sd1"].file.name
    engine.run(graph(), {**SETTINGS, "checkpoint.name": name, "prompt.text": PROMPT})
    report = engine.run(graph(), {**SETTINGS, "checkpoint.name": name, "prompt.text": PROMPT,
                                  "noise.seed": 4}).report
    assert set(report.executed) == {"noise", "start", "sampler/loop", "decode"}


@pytest.mark.parametrize("family, space, dim", [("sd1", "sd15", 768), ("sd2", "sd15", 1024), ("sdxl", "sdxl", 2048)])
def test_ports_are_typed_from_the_header_at_validation(family, space, dim, sd_root, engine):
    ck = sd_root[1][family]
    for name in (ck.folder.name, ck.file.name):
        result = engine.validate(graph(), {"checkpoint.name": name})
        assert result.ok, result.issues
        types = result.scope.nodes["checkpoint"].output_types
        assert types["model"].param("space") == space and types["model"].param("family") == family
        assert types["model"].param("context_dim") == dim and types["clip"].param("dim") == dim
        assert types["vae"].param("space") == space and types["vae"].param("channels") == 4


def test_an_sdxl_latent_into_an_sd15_vae_is_a_validation_error_naming_both(sd_root, engine):
    g = graph()
    g["nodes"]["other"] = {"type": "checkpoint.load", "inputs": {"name": sd_root[1]["sd1"].file.name}}
    g["nodes"]["decode"]["inputs"]["vae"] = {"node": "other", "output": "vae"}
    result = engine.validate(g, {"checkpoint.name": sd_root[1]["sdxl"].file.name})
    errors = [i for i in result.issues if i.code == "type_mismatch"]
    assert errors and errors[0].node == "decode" and "sdxl" in errors[0].message and "sd15" in errors[0].message


def test_single_file_key_maps_convert_back_to_the_same_file(sd_root):
    from safetensors.torch import load_file

    from nodes.checkpoints.families import detect_file
    from nodes.checkpoints.keymaps import unet_map, vae_map

    for family in FAMILIES:
        ck = sd_root[1][family]
        det = detect_file(ck.file.name, ck.file)
        raw = load_file(str(ck.file))
        unet = {k[len("model.diffusion_model."):]: v for k, v in raw.items() if k.startswith("model.diffusion_model.")}
        ours, unmatched = unet_map(det.unet_layout).to_ours(unet)
        assert not unmatched and set(ours) == set(ck.pipe.unet.state_dict())
        back, left = unet_map(det.unet_layout).to_original(ours)
        assert not left and all(torch.equal(back[k], unet[k]) for k in unet)
        vae = {k[len("first_stage_model."):]: v for k, v in raw.items() if k.startswith("first_stage_model.")}
        ours, unmatched = vae_map(*det.vae_shape).to_ours(vae)
        assert not unmatched and all(torch.equal(ours[k], v) for k, v in ck.pipe.vae.state_dict().items())


def test_the_architecture_comes_from_the_shapes(sd_root):
    from nodes.checkpoints.families import detect_file

    for family in FAMILIES:
        ck = sd_root[1][family]
        det = detect_file(ck.file.name, ck.file)
        ref = ck.pipe.unet.config
        for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
                    "cross_attention_dim", "use_linear_projection"):
            assert list(det.unet[key]) == list(ref[key]) if isinstance(ref[key], (list, tuple)) else \
                det.unet[key] == ref[key], key
        assert det.family.name == family
        assert det.prediction == ("v" if family == "sd2" else "eps")


def test_clip_skip_reads_the_hidden_layer_with_the_final_norm(sd_root, engine):
    ck = sd_root[1]["sd1"]
    g = {"version": 1, "nodes": {
        "checkpoint": {"type": "checkpoint.load", "inputs": {"name": ck.file.name}},
        "skip": {"type": "clip.set_last_layer", "inputs": {"clip": {"node": "checkpoint", "output": "clip"},
                                                          "stop_at_clip_layer": -2}},
        "enc": {"type": "clip.encode", "inputs": {"clip": {"node": "skip", "output": "clip"}, "text": PROMPT}}},
        "outputs": {"cond": {"node": "enc", "output": "cond"}}}
    ours = engine.run(g).outputs["cond"]["tokens"]
    te, tok = ck.pipe.text_encoder, ck.pipe.tokenizer
    ids = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        expected = te.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not torch.allclose(ours, out.last_hidden_state, atol=1e-3)


def test_long_prompts_are_chunks_and_weights_change_only_their_tokens(sd_root, engine):
    ck = sd_root[1]["sd1"]

    def encode(text: str) -> torch.Tensor:
        g = {"version": 1, "nodes": {"checkpoint": {"type": "checkpoint.load", "inputs": {"name": ck.file.name}},
                                     "enc": {"type": "clip.encode",
                                             "inputs": {"clip": {"node": "checkpoint", "output": "clip"}, "text": text}}},
             "outputs": {"cond": {"node": "enc", "output": "cond"}}}
        return engine.run(g).outputs["cond"]["tokens"]

    long = " ".join(["word"] * 100)
    assert encode(long).shape == (1, 154, 768)
    plain, weighted = encode("a red circle"), encode("a (red:1.5) circle")
    assert plain.shape == weighted.shape == (1, 77, 768)
    differs = (plain - weighted).abs().amax(-1)[0] > 1e-6
    assert differs[2] and not differs[:2].any()  # BOS and "a" untouched, "red" (position 2) weighted


def test_sdxl_size_conditioning_is_a_node_input(sd_root, engine):
    ck = sd_root[1]["sdxl"]
    base = {**SETTINGS, "checkpoint.name": ck.file.name, "prompt.text": PROMPT}
    default = engine.run(graph(), base).outputs["image"]
    explicit = engine.run(graph(), {**base, "prompt.width": 64, "prompt.height": 64, "prompt.target_width": 64,
                                    "prompt.target_height": 64, "negative.width": 64, "negative.height": 64,
                                    "negative.target_width": 64, "negative.target_height": 64}).outputs["image"]
    assert torch.equal(default, explicit)  # 0 means the size being made, as the pipeline's default
    other = engine.run(graph(), {**base, "prompt.width": 1024, "prompt.height": 1024}).outputs["image"]
    ref = reference(ck.pipe, original_size=(1024, 1024), negative_original_size=(64, 64),
                    negative_target_size=(64, 64))  # diffusers uses both negative sizes or neither
    assert (other - ref).abs().max() <= 1e-4 and (other - default).abs().max() > 1e-4


def test_the_engine_and_tiny_graphs_do_not_import_the_reference_libraries():
    script = ("import sys, json; from nodegraph import Engine; e = Engine(device='cpu'); "
              f"r = e.validate(json.load(open({str(GRAPHS / 'txt2img.json')!r}))); assert r.ok, r.issues; "
              "e.run(json.load(open(" + repr(str(GRAPHS / "noisy_gradient.json")) + "))); "
              "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; print(bad); assert not bad")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# -- bad input: a clear error naming the node and port, nothing loaded ----------------------------------------


def _issue(engine, name: str):
    result = engine.validate(graph(), {"checkpoint.name": name})
    assert not result.ok
    issue = result.issues[0]
    assert issue.node == "checkpoint" and issue.port == "name"
    return issue


def test_bad_checkpoints_are_validation_errors(sd_root, engine, tmp_path):
    root = sd_root[0]
    data = sd_root[1]["sd1"].file.read_bytes()
    (root / "checkpoints" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    issue = _issue(engine, "truncated.safetensors")
    assert issue.code == "bad_checkpoint" and "truncated" in issue.message
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(root / "checkpoints" / "other.safetensors"))
    issue = _issue(engine, "other.safetensors")
    assert issue.code == "bad_checkpoint" and "SD1.x" in issue.message and "SDXL" in issue.message
    (root / "checkpoints" / "old.ckpt").write_bytes(b"not opened")
    issue = _issue(engine, "old.ckpt")
    assert issue.code == "bad_checkpoint" and "safetensors" in issue.message and "convert" in issue.message
    issue = _issue(engine, "../outside.safetensors")
    assert issue.code == "bad_model_name"
    issue = _issue(engine, "missing.safetensors")
    assert issue.code == "unknown_model" and "sd1.safetensors" in (issue.hint or "") and "sdxl" in (issue.hint or "")


def test_a_missing_tokenizer_file_is_named(sd_root, engine, tmp_path):
    import shutil

    root = sd_root[0]
    broken = root / "diffusers" / "no-tokenizer"
    shutil.copytree(sd_root[1]["sd1"].folder, broken)
    (broken / "tokenizer" / "merges.txt").unlink()
    issue = _issue(engine, "no-tokenizer")
    assert issue.code == "bad_checkpoint" and "tokenizer/merges.txt" in issue.message
    with pytest.raises(GraphValidationError):
        engine.run(graph(), {"checkpoint.name": "no-tokenizer"})


# -- LoRA ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def loras(sd_root):
    from safetensors.torch import save_file

    from .test_lora import components_of, kohya_state, peft_state, random_lora

    root, cks = sd_root
    (root / "loras").mkdir(exist_ok=True)
    lora = random_lora(components_of(cks["sd1"].pipe), seed=5, alpha="diffusers")
    save_file(peft_state(lora), str(root / "loras" / "peft.safetensors"))
    save_file(kohya_state(lora), str(root / "loras" / "kohya.safetensors"))
    kohya = kohya_state(lora)
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)},
              str(root / "loras" / "xl.safetensors"))
    return kohya  # what diffusers' load_lora_weights is given (its PEFT reader refuses the alpha keys)


def test_lora_graph_equals_the_pipeline_with_the_lora_fused(sd_root, engine, loras):
    import diffusers

    ck = sd_root[1]["sd1"]
    settings = {**SETTINGS, "checkpoint.name": ck.file.name, "prompt.text": PROMPT, "lora.strength_model": 0.3,
                "lora.strength_text": 0.2}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(ck.folder), local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = reference(pipe)
    pipe.load_lora_weights(dict(loras))
    pipe.fuse_lora(components=["unet"], lora_scale=0.3)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.2)
    ref = reference(pipe)
    assert (ref - plain).abs().max() > 1e-3  # the LoRA changes the image
    for name in ("peft.safetensors", "kohya.safetensors"):
        out = engine.run(graph("checkpoint_lora_txt2img.json"), {**settings, "lora.name": name}).outputs["image"]
        assert (out - ref).abs().max() <= 1e-4, f"{name}: {(out - ref).abs().max():.2e}"
    # the checkpoint's own model is untouched: the plain graph still gives the plain image
    again = engine.run(graph(), {**SETTINGS, "checkpoint.name": ck.file.name, "prompt.text": PROMPT}).outputs["image"]
    assert (again - plain).abs().max() <= 1e-4


def test_a_lora_stack_is_cached_and_a_strength_change_remerges_only_that(sd_root, engine, loras):
    g = graph("checkpoint_lora_txt2img.json")
    settings = {**SETTINGS, "checkpoint.name": sd_root[1]["sd1"].file.name, "lora.name": "peft.safetensors"}
    engine.run(g, settings)
    assert engine.run(g, settings).report.executed == []
    executed = set(engine.run(g, {**settings, "lora.strength_text": 0.5}).report.executed)
    assert "lora" in executed and "checkpoint" not in executed


def test_a_lora_for_another_family_is_a_validation_error_naming_both(sd_root, engine, loras):
    result = engine.validate(graph("checkpoint_lora_txt2img.json"),
                             {"checkpoint.name": sd_root[1]["sd1"].file.name, "lora.name": "xl.safetensors"})
    errors = [i for i in result.issues if i.node == "lora"]
    assert errors and errors[0].code == "type_mismatch"
    assert "sdxl" in errors[0].message and "sd1" in errors[0].message


# -- components stored on their own (diffusion_models/, vae/, text_encoders/) -----------------------------------


def _components_graph(family: str, unet: str, vae: str, clips: list[str]) -> dict:
    g = graph()
    nodes = g["nodes"]
    nodes["unet"] = {"type": "checkpoint.load_unet", "inputs": {"name": unet}}
    nodes["vae"] = {"type": "checkpoint.load_vae", "inputs": {"name": vae}}
    nodes["clip"] = {"type": "checkpoint.load_clip", "inputs": {"name": clips[0], "family": family,
                                                               **({"name2": clips[1]} if len(clips) > 1 else {})}}
    del nodes["checkpoint"]
    renames = {"model": ("unet", "model"), "vae": ("vae", "vae"), "clip": ("clip", "clip")}
    for spec in nodes.values():
        for port, value in spec["inputs"].items():
            if isinstance(value, dict) and value.get("node") == "checkpoint":
                spec["inputs"][port] = dict(zip(("node", "output"), renames[value["output"]]))
    return g


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_components_on_their_own_give_the_checkpoints_image(family, sd_root, engine):
    from safetensors.torch import load_file, save_file

    from .sd_fixtures import hf_names

    root, cks = sd_root
    ck = cks[family]
    raw = load_file(str(ck.file))
    for sub in ("diffusion_models", "vae", "text_encoders"):
        (root / sub).mkdir(exist_ok=True)
    # a U-Net in the original layout with its prefix, a VAE in diffusers' names, text encoders in both layouts
    save_file({k: v for k, v in raw.items() if k.startswith("model.diffusion_model.")},
              str(root / "diffusion_models" / f"{family}-unet.safetensors"))
    save_file({k: v.contiguous() for k, v in ck.pipe.vae.state_dict().items()},
              str(root / "vae" / f"{family}-vae.safetensors"))
    clips = [f"{family}-clip-l.safetensors"]
    save_file(hf_names(ck.pipe.text_encoder.state_dict()), str(root / "text_encoders" / clips[0]))
    if family == "sdxl":
        prefix = "conditioner.embedders.1.model."
        clips.append("sdxl-clip-g.safetensors")
        save_file({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)},
                  str(root / "text_encoders" / clips[1]))
    g = _components_graph(family, f"{family}-unet.safetensors", f"{family}-vae.safetensors", clips)
    result = engine.validate(g, {"vae.family": family})
    assert result.ok, result.issues
    assert result.scope.nodes["unet"].output_types["model"].param("family") == family
    run = {**SETTINGS, "prompt.text": PROMPT, "vae.family": family}
    out = engine.run(g, run).outputs["image"]
    whole = engine.run(graph(), {**SETTINGS, "prompt.text": PROMPT, "checkpoint.name": ck.file.name}).outputs["image"]
    assert (out - whole).abs().max() <= 1e-6
