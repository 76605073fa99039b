"""nodes.comfy.workflow: UI workflow -> API prompt as the ComfyUI frontend's graphToPrompt builds it; PNG chunks."""

from __future__ import annotations

import copy
import json
import random
import struct
import zlib
from datetime import datetime
from pathlib import Path

import pytest

from nodes.comfy.workflow import (FRONTEND_ONLY_WIDGETS, MAX_TEXT_CHUNK, VIRTUAL_NODE_TYPES, Issue, WorkflowError,
                                  detect, process_dynamic_prompt, read_png, ui_to_api)

DATA = Path(__file__).parent / "data" / "comfy"

# The persisted widgets of the node types used here, in order (what widget_names() gives for a type).
WIDGETS: dict[str, list[str]] = {
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "LoadImage": ["image", "upload"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "VAEDecode": [],
    "VAEEncode": [],
    "LatentUpscale": ["upscale_method", "width", "height", "crop"],
    "ConditioningZeroOut": [],
    "ControlNetLoader": ["control_net_name"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
    "PrimitiveInt": ["value", "control_after_generate"],
    "PrimitiveStringMultiline": ["value"],
    "StringConcatenate": ["string_a", "string_b", "delimiter"],
    "ModelSamplingAuraFlow": ["shift"],
    "TestMaskThenImage": [],
    "TestAny": [],
}
DISPLAY = {"KSampler": "KSampler", "CLIPTextEncode": "CLIP Text Encode (Prompt)", "VAEDecode": "VAE Decode",
           "EmptyLatentImage": "Empty Latent Image", "SaveImage": "Save Image",
           "CheckpointLoaderSimple": "Load Checkpoint", "LoraLoader": "Load LoRA", "PrimitiveInt": "Int"}


def convert(wf: dict, **kw):
    return ui_to_api(wf, WIDGETS.get, **kw)


class UI:
    """Builds UI workflows as the frontend saves them: version 0.4 (links as arrays) or 1 (links as objects)."""

    def __init__(self, version: float = 0.4):
        self.version = version
        self.nodes: list[dict] = []
        self.links: list[tuple] = []
        self.sub_inputs: list[dict] = []
        self.sub_outputs: list[dict] = []
        self.next_link = 101

    def node(self, id, type, widgets=None, inputs=(), outputs=(), mode=0, title=None, props=None) -> dict:
        """``inputs``: ``(name, type)``, or ``(name, type, True)`` for a widget converted to an input."""
        n = {"id": id, "type": type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": len(self.nodes),
             "mode": mode, "inputs": [], "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
             "properties": dict(props or {})}
        for spec in inputs:
            slot = {"name": spec[0], "type": spec[1], "link": None}
            if len(spec) > 2 and spec[2]:
                slot["widget"] = {"name": spec[0]}
            n["inputs"].append(slot)
        if widgets is not None:
            n["widgets_values"] = widgets
        if title is not None:
            n["title"] = title
        self.nodes.append(n)
        return n

    def _node(self, id) -> dict:
        return next(n for n in self.nodes if n["id"] == id)

    def link(self, origin, oslot: int, target, name) -> int:
        """``origin``/``target`` -10/-20 are a subgraph's input/output nodes (``name``: the output slot index)."""
        lid = self.next_link
        self.next_link += 1
        if target == -20:
            tslot, ltype = name, self.sub_outputs[name]["type"]
            self.sub_outputs[name]["linkIds"].append(lid)
        else:
            tnode = self._node(target)
            tslot = next(i for i, s in enumerate(tnode["inputs"]) if s["name"] == name)
            tnode["inputs"][tslot]["link"] = lid
            ltype = tnode["inputs"][tslot]["type"]
        if origin == -10:
            self.sub_inputs[oslot]["linkIds"].append(lid)
        else:
            self._node(origin)["outputs"][oslot]["links"].append(lid)
        self.links.append((lid, origin, oslot, target, tslot, ltype))
        return lid

    def unlink(self, target, name) -> None:
        """Remove the link into input ``name`` of node ``target``."""
        slot = next(s for s in self._node(target)["inputs"] if s["name"] == name)
        lid, slot["link"] = slot["link"], None
        self.links = [link for link in self.links if link[0] != lid]
        for n in self.nodes:
            for out in n["outputs"]:
                if lid in out["links"]:
                    out["links"].remove(lid)

    def build(self, **extra) -> dict:
        ids = [n["id"] for n in self.nodes if isinstance(n["id"], int)]
        wf = {"id": "00000000-0000-4000-8000-000000000001", "revision": 0, "nodes": self.nodes,
              "groups": [{"id": 1, "title": "a group", "bounding": [0, 0, 500, 500]}], "config": {},
              "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": self.version}
        if self.version == 0.4:
            wf.update(last_node_id=max(ids, default=0), last_link_id=self.next_link - 1,
                      links=[list(link) for link in self.links])
        else:
            wf.update(state={"lastGroupId": 1, "lastNodeId": max(ids, default=0), "lastLinkId": self.next_link - 1,
                             "lastRerouteId": 0}, links=self._link_objects())
        wf.update(extra)
        return wf

    def _link_objects(self) -> list[dict]:
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        return [dict(zip(keys, link)) for link in self.links]

    def subgraph(self, sid: str, name: str = "my subgraph") -> dict:
        """This builder's nodes and links as a subgraph definition (``definitions.subgraphs`` entry)."""
        return {"id": sid, "version": 1, "state": {"lastGroupId": 0, "lastNodeId": 0, "lastLinkId": 0,
                                                   "lastRerouteId": 0},
                "revision": 0, "config": {}, "name": name, "inputNode": {"id": -10, "bounding": [0, 0, 10, 10]},
                "outputNode": {"id": -20, "bounding": [0, 0, 10, 10]}, "inputs": self.sub_inputs,
                "outputs": self.sub_outputs, "widgets": [], "nodes": self.nodes, "groups": [],
                "links": self._link_objects(), "extra": {}}

    def sub_input(self, name: str, type: str) -> None:
        self.sub_inputs.append({"id": f"in-{name}", "name": name, "type": type, "linkIds": [],
                                "pos": [0, 0]})

    def sub_output(self, name: str, type: str) -> None:
        self.sub_outputs.append({"id": f"out-{name}", "name": name, "type": type, "linkIds": [], "pos": [0, 0]})


def txt2img(ui: UI, *, seed_widgets=None) -> UI:
    """The default SD1.5 graph, two notes and a group."""
    ui.node(4, "CheckpointLoaderSimple", ["v1-5.safetensors"], outputs=("MODEL", "CLIP", "VAE"),
            title="Load Checkpoint", props={"cnr_id": "comfy-core", "ver": "v0.3.10"})
    ui.node(6, "CLIPTextEncode", ["a cat"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",), title="Positive")
    ui.node(7, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    ui.node(5, "EmptyLatentImage", [512, 512, 1], outputs=("LATENT",))
    ui.node(3, "KSampler", seed_widgets or [42, "randomize", 20, 8, "euler", "normal", 1],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                    ("latent_image", "LATENT")], outputs=("LATENT",),
            props={"cnr_id": "comfy-core", "ver": "latest", "Node name for S&R": "KSampler"})
    ui.node(8, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=("IMAGE",))
    ui.node(9, "SaveImage", ["ComfyUI"], inputs=[("images", "IMAGE")])
    ui.node(10, "Note", ["a note"])
    ui.node(11, "MarkdownNote", ["# notes"])
    ui.link(4, 0, 3, "model")
    ui.link(4, 1, 6, "clip")
    ui.link(4, 1, 7, "clip")
    ui.link(6, 0, 3, "positive")
    ui.link(7, 0, 3, "negative")
    ui.link(5, 0, 3, "latent_image")
    ui.link(3, 0, 8, "samples")
    ui.link(4, 2, 8, "vae")
    ui.link(8, 0, 9, "images")
    return ui


TXT2IMG = {
    "4": {"inputs": {"ckpt_name": "v1-5.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint", "cnr_id": "comfy-core", "ver": "0.3.10"}},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"text": "a cat", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "Positive"}},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "3": {"inputs": {"seed": 42, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                     "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler", "cnr_id": "comfy-core"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
}


# ------------------------------------------------------------------------------------------------- formats


def test_v04_txt2img_is_the_exact_prompt_in_execution_order() -> None:
    wf = txt2img(UI()).build()
    before = copy.deepcopy(wf)
    prompt, issues = convert(wf, display_name=DISPLAY.get)
    assert issues == []
    assert prompt == TXT2IMG
    # Kahn's order over the node list: 4, 5 (and the notes) start; KSampler once its 4 inputs are done
    assert list(prompt) == ["4", "5", "6", "7", "3", "8", "9"]
    # JSON-serialisable as posted; the notes, the group and the frontend-only control widget are not sent
    assert "control_after_generate" not in json.dumps(prompt)
    assert wf == before  # the input is not modified


def test_v1_links_as_objects_give_the_same_prompt() -> None:
    wf = txt2img(UI(version=1)).build()
    assert isinstance(wf["links"][0], dict) and "state" in wf
    prompt, issues = convert(wf, display_name=DISPLAY.get)
    assert issues == [] and prompt == TXT2IMG
    # without display names a node saved without a title is titled by its class type; pack metadata optional
    prompt, _ = convert(wf, pack_meta=False)
    assert prompt["8"]["_meta"] == {"title": "VAEDecode"}
    assert prompt["4"]["_meta"] == {"title": "Load Checkpoint"}


def test_old_true_control_value_and_sample_prefix() -> None:
    wf = txt2img(UI(), seed_widgets=[5, True, 30, 7.5, "sample_euler_ancestral", "karras", 0.5]).build()
    prompt, issues = convert(wf)
    assert issues == []
    assert prompt["3"]["inputs"] == {"seed": 5, "steps": 30, "cfg": 7.5, "sampler_name": "euler_ancestral",
                                     "scheduler": "karras", "denoise": 0.5, "model": ["4", 0],
                                     "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}


def test_wrong_widget_count_is_reported_and_unknown_types_pass_through() -> None:
    ui = txt2img(UI(), seed_widgets=[5, "fixed", 30, 7.5, "euler", "karras"])  # denoise missing
    ui.node(20, "SomeCustomNode", [1, 2, 3], inputs=[("image", "IMAGE")])
    ui.link(8, 0, 20, "image")
    prompt, issues = convert(ui.build())
    assert [(i.code, i.node) for i in issues] == [("bad_widgets", "3")]
    assert "denoise" not in prompt["3"]["inputs"] and prompt["3"]["inputs"]["scheduler"] == "karras"
    # an unknown type: sent with its class_type and links, its positional values unmapped
    assert prompt["20"] == {"inputs": {"image": ["8", 0]}, "class_type": "SomeCustomNode",
                            "_meta": {"title": "SomeCustomNode"}}


# ----------------------------------------------------------------------------------------- virtual nodes


def test_reroute_chains_are_followed() -> None:
    ui = txt2img(UI())
    ui.unlink(3, "model")  # route KSampler.model and VAEDecode.vae through reroutes
    ui.unlink(8, "vae")
    ui.node(30, "Reroute", None, inputs=[("", "*")], outputs=("MODEL",))
    ui.node(31, "Reroute", None, inputs=[("", "*")], outputs=("MODEL",))
    ui.node(32, "Reroute", None, inputs=[("", "*")], outputs=("MODEL",))
    ui.node(33, "Reroute", None, inputs=[("", "*")], outputs=("VAE",), mode=4)  # a bypassed reroute passes too
    ui.link(4, 0, 30, "")
    ui.link(30, 0, 31, "")
    ui.link(31, 0, 32, "")
    ui.link(32, 0, 3, "model")
    ui.link(4, 2, 33, "")
    ui.link(33, 0, 8, "vae")
    prompt, issues = convert(ui.build(), display_name=DISPLAY.get)
    assert issues == []
    assert prompt == TXT2IMG  # same inputs as the direct links; no Reroute in the prompt


def test_a_primitive_feeds_every_widget_it_links_to() -> None:
    ui = UI()
    ui.node(1, "CheckpointLoaderSimple", ["m.safetensors"], outputs=("MODEL", "CLIP", "VAE"))
    ui.node(2, "PrimitiveNode", [1234, "increment"], outputs=("INT",), title="seed")
    ui.node(3, "PrimitiveNode", ["a shared prompt"], outputs=("STRING",))
    ui.node(4, "PrimitiveNode", [7])  # never linked: no widget, no value, not sent
    for k in (10, 11):
        ui.node(k, "KSampler", [k, "randomize", 20, 8, "euler", "normal", 1],
                inputs=[("model", "MODEL"), ("seed", "INT", True)], outputs=("LATENT",))
        ui.link(1, 0, k, "model")
        ui.link(2, 0, k, "seed")
    for k in (12, 13):
        ui.node(k, "CLIPTextEncode", ["own text"], inputs=[("clip", "CLIP"), ("text", "STRING", True)],
                outputs=("CONDITIONING",))
        ui.link(1, 1, k, "clip")
        ui.link(3, 0, k, "text")
    prompt, issues = convert(ui.build())
    assert issues == []
    assert set(prompt) == {"1", "10", "11", "12", "13"}
    for k in ("10", "11"):
        assert prompt[k]["inputs"] == {"seed": 1234, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                       "scheduler": "normal", "denoise": 1, "model": ["1", 0]}
    for k in ("12", "13"):
        assert prompt[k]["inputs"] == {"text": "a shared prompt", "clip": ["1", 1]}


def test_a_widget_converted_to_an_input_takes_the_link() -> None:
    ui = txt2img(UI())
    ks = ui._node(3)
    ks["inputs"].append({"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}})
    ui.node(20, "PrimitiveInt", [99, "fixed"], outputs=("INT",))
    ui.link(20, 0, 3, "seed")
    prompt, issues = convert(ui.build())
    assert issues == []
    assert prompt["20"]["inputs"] == {"value": 99}
    inputs = prompt["3"]["inputs"]
    assert inputs["seed"] == ["20", 0]
    assert list(inputs)[0] == "seed"  # the link replaces the widget value where the widget stood


def test_bypassed_nodes_pass_through_a_matching_input() -> None:
    ui = txt2img(UI())
    for target, name in ((3, "model"), (6, "clip"), (7, "clip")):
        ui.unlink(target, name)
    for k, src in ((40, 4), (41, 40)):  # two bypassed LoRAs in a chain
        ui.node(k, "LoraLoader", ["x.safetensors", 1, 1], inputs=[("model", "MODEL"), ("clip", "CLIP")],
                outputs=("MODEL", "CLIP"), mode=4)
        ui.link(src, 0, k, "model")
        ui.link(src, 1, k, "clip")
    ui.link(41, 0, 3, "model")
    ui.link(41, 1, 6, "clip")
    ui.link(41, 1, 7, "clip")
    prompt, issues = convert(ui.build(), display_name=DISPLAY.get)
    assert issues == [] and prompt == TXT2IMG


def test_bypass_slot_choice_follows_the_frontend() -> None:
    ui = UI()
    ui.node(1, "LoadImage", ["cat.png", "image"], outputs=("IMAGE", "MASK"))
    # the same-index input is a MASK, the output an IMAGE: the first input of exactly the target's type wins
    # over an earlier one that merely connects ("IMAGE,MASK")
    ui.node(2, "TestMaskThenImage", [], inputs=[("mask", "MASK"), ("either", "IMAGE,MASK"), ("image", "IMAGE")],
            outputs=("IMAGE",), mode=4)
    ui.link(1, 1, 2, "mask")
    ui.link(1, 1, 2, "either")
    ui.link(1, 0, 2, "image")
    ui.node(3, "SaveImage", ["a"], inputs=[("images", "IMAGE")])
    ui.link(2, 0, 3, "images")
    # a '*' target takes the input at the output's index
    ui.node(4, "TestAny", [], inputs=[("source", "*")])
    ui.link(2, 0, 4, "source")
    # no input of a matching type: nothing passes, the input is left out
    ui.node(5, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=("IMAGE",), mode=4)
    ui.node(6, "SaveImage", ["b"], inputs=[("images", "IMAGE")])
    ui.link(5, 0, 6, "images")
    prompt, issues = convert(ui.build())
    assert issues == []
    assert prompt["1"]["inputs"] == {"image": "cat.png"}  # the upload button is not sent
    assert prompt["3"]["inputs"] == {"filename_prefix": "a", "images": ["1", 0]}
    assert prompt["4"]["inputs"] == {"source": ["1", 1]}
    assert prompt["6"]["inputs"] == {"filename_prefix": "b"}
    assert set(prompt) == {"1", "3", "4", "6"}


def test_muted_nodes_are_dropped_with_the_inputs_pointing_at_them() -> None:
    ui = txt2img(UI())
    ui._node(9)["mode"] = 2  # the SaveImage branch is muted
    ui.node(12, "PreviewImage", [], inputs=[("images", "IMAGE")])
    ui.link(8, 0, 12, "images")
    ui.unlink(3, "model")
    ui.node(40, "LoraLoader", ["x.safetensors", 1, 1], inputs=[("model", "MODEL"), ("clip", "CLIP")],
            outputs=("MODEL", "CLIP"), mode=2)
    ui.link(4, 0, 40, "model")
    ui.link(4, 1, 40, "clip")
    ui.link(40, 0, 3, "model")
    ks = ui._node(3)
    ks["inputs"].append({"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}})
    ui.node(20, "PrimitiveInt", [99, "fixed"], outputs=("INT",), mode=2)
    ui.link(20, 0, 3, "seed")
    prompt, issues = convert(ui.build(), display_name=DISPLAY.get)
    assert issues == []
    assert set(prompt) == {"4", "5", "6", "7", "3", "8", "12"}
    expected = dict(TXT2IMG["3"]["inputs"])
    del expected["model"]  # the link to the muted LoRA is dropped
    assert prompt["3"]["inputs"] == expected  # seed: the muted source leaves the widget's own value
    assert prompt["12"]["inputs"] == {"images": ["8", 0]}


# ---------------------------------------------------------------------------------------------- subgraphs

SG = "5e1c6a08-4d5e-4f3f-9a6b-2a9f6f0b7c11"


def sampler_subgraph() -> dict:
    """model, clip, latent, seed -> LoRA -> two prompts -> KSampler -> LATENT. Inner id 1 collides with a root id."""
    sg = UI()
    for name, t in (("model", "MODEL"), ("clip", "CLIP"), ("latent", "LATENT"), ("seed", "INT")):
        sg.sub_input(name, t)
    sg.sub_output("LATENT", "LATENT")
    sg.node(1, "LoraLoader", ["l.safetensors", 0.8, 0.9], inputs=[("model", "MODEL"), ("clip", "CLIP")],
            outputs=("MODEL", "CLIP"))
    sg.node(3, "CLIPTextEncode", ["a cat"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    sg.node(4, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    sg.node(5, "KSampler", [7, "randomize", 20, 8, "euler", "normal", 1],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                    ("latent_image", "LATENT"), ("seed", "INT", True)], outputs=("LATENT",))
    sg.node(6, "Note", ["inside"])
    sg.link(-10, 0, 1, "model")
    sg.link(-10, 1, 1, "clip")
    sg.link(1, 1, 3, "clip")
    sg.link(1, 1, 4, "clip")
    sg.link(1, 0, 5, "model")
    sg.link(3, 0, 5, "positive")
    sg.link(4, 0, 5, "negative")
    sg.link(-10, 2, 5, "latent_image")
    sg.link(-10, 3, 5, "seed")
    sg.link(5, 0, -20, 0)
    return sg.subgraph(SG)


def subgraph_workflow(host_mode: int = 0, second_instance: bool = False) -> dict:
    ui = UI()
    ui.node(1, "CheckpointLoaderSimple", ["m.safetensors"], outputs=("MODEL", "CLIP", "VAE"))
    ui.node(2, "EmptyLatentImage", [512, 512, 1], outputs=("LATENT",))
    hosts = (10, 20) if second_instance else (10,)
    for k, seed in zip(hosts, (123, 999)):
        ui.node(k, SG, [seed], inputs=[("model", "MODEL"), ("clip", "CLIP"), ("latent", "LATENT"),
                                       ("seed", "INT", True)], outputs=("LATENT",), mode=host_mode)
        ui.link(1, 0, k, "model")
        ui.link(1, 1, k, "clip")
        ui.link(2, 0, k, "latent")
    ui.node(11, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=("IMAGE",))
    ui.node(12, "SaveImage", ["sg"], inputs=[("images", "IMAGE")])
    ui.link(10, 0, 11, "samples")
    ui.link(1, 2, 11, "vae")
    ui.link(11, 0, 12, "images")
    return ui.build(definitions={"subgraphs": [sampler_subgraph()]})


def test_subgraph_instances_expand_to_outer_inner_ids() -> None:
    prompt, issues = convert(subgraph_workflow(), display_name=DISPLAY.get)
    assert issues == []
    # inner id 1 collides with the root's node 1: reminted to last_node_id + 1 = 13, as the frontend does
    assert prompt == {
        "1": {"inputs": {"ckpt_name": "m.safetensors"}, "class_type": "CheckpointLoaderSimple",
              "_meta": {"title": "Load Checkpoint"}},
        "2": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage",
              "_meta": {"title": "Empty Latent Image"}},
        "10:13": {"inputs": {"lora_name": "l.safetensors", "strength_model": 0.8, "strength_clip": 0.9,
                             "model": ["1", 0], "clip": ["1", 1]}, "class_type": "LoraLoader",
                  "_meta": {"title": "Load LoRA"}},
        "10:3": {"inputs": {"text": "a cat", "clip": ["10:13", 1]}, "class_type": "CLIPTextEncode",
                 "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "10:4": {"inputs": {"text": "blurry", "clip": ["10:13", 1]}, "class_type": "CLIPTextEncode",
                 "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "10:5": {"inputs": {"seed": 123, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                            "denoise": 1, "model": ["10:13", 0], "positive": ["10:3", 0],
                            "negative": ["10:4", 0], "latent_image": ["2", 0]},
                 "class_type": "KSampler", "_meta": {"title": "KSampler"}},
        "11": {"inputs": {"samples": ["10:5", 0], "vae": ["1", 2]}, "class_type": "VAEDecode",
               "_meta": {"title": "VAE Decode"}},
        "12": {"inputs": {"filename_prefix": "sg", "images": ["11", 0]}, "class_type": "SaveImage",
               "_meta": {"title": "Save Image"}},
    }
    assert list(prompt) == ["1", "2", "10:13", "10:3", "10:4", "10:5", "11", "12"]


def test_each_subgraph_instance_has_its_own_ids_and_promoted_values() -> None:
    prompt, issues = convert(subgraph_workflow(second_instance=True))
    assert issues == []
    assert prompt["10:5"]["inputs"]["seed"] == 123 and prompt["20:5"]["inputs"]["seed"] == 999
    # the colliding inner id 1 is reminted once, for the definition: last_node_id (20) + 1
    assert prompt["20:5"]["inputs"]["model"] == ["20:21", 0] and prompt["10:5"]["inputs"]["model"] == ["10:21", 0]
    assert {k for k in prompt if k.startswith("20:")} == {"20:21", "20:3", "20:4", "20:5"}


def test_muted_and_bypassed_subgraph_instances() -> None:
    prompt, issues = convert(subgraph_workflow(host_mode=2))
    assert issues == []
    assert set(prompt) == {"1", "2", "11", "12"} and "samples" not in prompt["11"]["inputs"]
    # bypassed: VAEDecode.samples (LATENT) passes through the instance's LATENT input
    prompt, issues = convert(subgraph_workflow(host_mode=4))
    assert issues == []
    assert set(prompt) == {"1", "2", "11", "12"}
    assert prompt["11"]["inputs"]["samples"] == ["2", 0]


INNER, OUTER = "0b0e8a52-0000-4000-8000-00000000000b", "0a0e8a52-0000-4000-8000-00000000000a"


def nested_workflow(inner_mode: int) -> dict:
    inner = UI()
    inner.sub_input("clip", "CLIP")
    inner.sub_output("CONDITIONING", "CONDITIONING")
    inner.node(2, "CLIPTextEncode", ["nested text"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    inner.link(-10, 0, 2, "clip")
    inner.link(2, 0, -20, 0)
    outer = UI()
    outer.sub_input("clip", "CLIP")
    outer.sub_output("CONDITIONING", "CONDITIONING")
    outer.node(7, INNER, [], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",), mode=inner_mode)
    outer.node(9, "CLIPTextEncode", ["sibling"], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    outer.link(-10, 0, 7, "clip")
    outer.link(-10, 0, 9, "clip")
    outer.link(7, 0, -20, 0)
    outer_def = outer.subgraph(OUTER)
    outer_def["definitions"] = {"subgraphs": [inner.subgraph(INNER)]}  # nested definitions are flattened
    ui = UI()
    ui.node(1, "CheckpointLoaderSimple", ["m.safetensors"], outputs=("MODEL", "CLIP", "VAE"))
    ui.node(5, OUTER, [], inputs=[("clip", "CLIP")], outputs=("CONDITIONING",))
    ui.node(6, "TestAny", [], inputs=[("source", "CONDITIONING")])
    ui.link(1, 1, 5, "clip")
    ui.link(5, 0, 6, "source")
    return ui.build(definitions={"subgraphs": [outer_def]})


def test_nested_subgraphs_and_the_inner_instance_mode() -> None:
    prompt, issues = convert(nested_workflow(0))
    assert issues == []
    assert prompt == {
        "1": {"inputs": {"ckpt_name": "m.safetensors"}, "class_type": "CheckpointLoaderSimple",
              "_meta": {"title": "CheckpointLoaderSimple"}},
        "5:7:2": {"inputs": {"text": "nested text", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
                  "_meta": {"title": "CLIPTextEncode"}},
        "5:9": {"inputs": {"text": "sibling", "clip": ["1", 1]}, "class_type": "CLIPTextEncode",
                "_meta": {"title": "CLIPTextEncode"}},
        "6": {"inputs": {"source": ["5:7:2", 0]}, "class_type": "TestAny", "_meta": {"title": "TestAny"}},
    }
    for mode in (2, 4):  # a muted or bypassed inner instance: its contents go, its output resolves to nothing
        prompt, issues = convert(nested_workflow(mode))
        assert issues == []
        assert set(prompt) == {"1", "5:9", "6"} and prompt["6"]["inputs"] == {}


def test_a_promoted_widget_linked_from_outside_takes_the_link() -> None:
    wf = subgraph_workflow()
    wf["nodes"].append({"id": 30, "type": "PrimitiveInt", "mode": 0, "widgets_values": [5, "fixed"], "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [900]}], "properties": {}})
    host = next(n for n in wf["nodes"] if n["id"] == 10)
    host["inputs"][3]["link"] = 900
    wf["links"].append([900, 30, 0, 10, 3, "INT"])
    prompt, issues = convert(wf)
    assert issues == []
    assert prompt["10:5"]["inputs"]["seed"] == ["30", 0]


# ------------------------------------------------------------------------------------------------- errors


def test_bad_links_and_widgets_are_all_reported_at_once() -> None:
    ui = txt2img(UI(), seed_widgets=[1, "fixed", 20])
    ui.node(12, "PreviewImage", [], inputs=[("images", "IMAGE")])
    ui.node(13, "PreviewImage", [], inputs=[("images", "IMAGE")])
    wf = ui.build()
    wf["links"] += [[500, 99, 0, 12, 0, "IMAGE"],  # from a missing node
                    [501, 4, 7, 13, 0, "IMAGE"],  # from a missing output slot
                    [502, 4, 0, 5, 3, "MODEL"],  # into an input EmptyLatentImage does not have
                    [503, 4, 0, 98, 0, "MODEL"],  # to a missing node
                    [504, 4, 2, 9, 0, "VAE"]]  # competing for SaveImage.images: dropped
    prompt, issues = convert(wf)
    codes = sorted((i.code, i.node) for i in issues)
    assert codes == [("bad_link", "12"), ("bad_link", "4"), ("bad_link", "5"), ("bad_link", "9"),
                     ("bad_link", "98"), ("bad_widgets", "3")]
    assert all(isinstance(i, Issue) and i.message for i in issues)
    assert prompt["9"]["inputs"]["images"] == ["8", 0] and prompt["8"]["inputs"]["vae"] == ["4", 2]
    assert prompt["12"]["inputs"] == {} and prompt["13"]["inputs"] == {}
    with pytest.raises(WorkflowError) as err:
        convert(wf, strict=True)
    assert isinstance(err.value, ValueError) and len(err.value.issues) == 6
    assert "does not exist" in str(err.value)
    with pytest.raises(WorkflowError) as err:
        convert({"1": {"class_type": "KSampler", "inputs": {}}})
    assert err.value.code == "not_ui"


def test_duplicate_links_into_one_input_and_realignment_by_name() -> None:
    wf = txt2img(UI()).build()
    # an exact duplicate is dropped silently; a competing link that no input names loses to the first
    wf["links"].append([600, 7, 0, 3, 1, "CONDITIONING"])
    wf["links"].append([601, 6, 0, 3, 1, "CONDITIONING"])
    # VAEDecode.vae's link saved with a stale target slot: the input naming it decides
    vae = next(l for l in wf["links"] if l[1] == 4 and l[2] == 2)
    vae[4] = 5
    prompt, issues = convert(wf)
    assert [(i.code, i.node, i.port) for i in issues] == [("bad_link", "3", 1)]
    assert prompt["3"]["inputs"]["positive"] == ["6", 0]
    assert prompt["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    # a later link that the input does name replaces the first one
    ks = next(n for n in wf["nodes"] if n["id"] == 3)
    ks["inputs"][1]["link"] = 600
    prompt, _ = convert(wf)
    assert prompt["3"]["inputs"]["positive"] == ["7", 0]
    # a link that stays in its slot keeps it against one that would move there
    wf["links"].append([602, 5, 0, 8, 1, "LATENT"])
    prompt, issues = convert(wf)
    assert prompt["8"]["inputs"]["vae"] == ["5", 0]
    assert ("bad_link", "8", 5) in [(i.code, i.node, i.port) for i in issues]


# --------------------------------------------------------------------------------------- serializeValue


def test_filename_prefix_replacements_and_dynamic_prompts() -> None:
    ui = txt2img(UI())
    ui._node(9)["widgets_values"] = ["out/%date:yyyy-MM-dd hh-mm%_%KSampler.seed%_%Positive.text%_"
                                     "%CLIPTextEncode.text%_%Negative.text%_%nope.x%"]
    ui._node(7)["title"] = "Negative"
    ui._node(7)["widgets_values"] = ["a {red|green|blue}/cat // a comment\nnext line /* gone */"]
    names = {"CLIPTextEncode": ["text"]}
    prompt, _ = convert(ui.build(), now=datetime(2024, 1, 2, 3, 4, 5), dynamic_prompts=names.get,
                        rng=random.Random(0))
    # replacements read the widgets' own values (not dynamic-prompt output); '/' etc. become '_'
    assert prompt["9"]["inputs"]["filename_prefix"] == (
        "out/2024-01-02 03-04_42_a cat_a cat_a {red_green_blue}_cat __ a comment_next line __ gone ___%nope.x%")
    text = prompt["7"]["inputs"]["text"]
    assert text in ("a red/cat \nnext line ", "a green/cat \nnext line ", "a blue/cat \nnext line ")
    assert prompt["6"]["inputs"]["text"] == "a cat"
    prompt, _ = convert(ui.build())  # without dynamic_prompts the text is sent as saved
    assert prompt["7"]["inputs"]["text"] == "a {red|green|blue}/cat // a comment\nnext line /* gone */"
    assert process_dynamic_prompt("{a|{b|c}}", random.Random(1)) in ("a", "b", "c")
    assert process_dynamic_prompt(r"keep \{this\}") == r"keep \{this\}"
    seen = {process_dynamic_prompt("{x|y}", random.Random(s)) for s in range(20)}
    assert seen == {"x", "y"}


def test_array_widget_values_are_wrapped() -> None:
    ui = UI()
    ui.node(1, "TestAny", None, inputs=[])
    ui._node(1)["widgets_values"] = [[1, 2, 3]]
    prompt, _ = ui_to_api(ui.build(), {"TestAny": ["points"]}.get)
    assert prompt["1"]["inputs"] == {"points": {"__value__": [1, 2, 3]}}


# -------------------------------------------------------------------------------------------- templates

TEMPLATES = ["default.json", "image_sdxl_simple.json", "sdxl_simple_example.json", "sd3.5_large_blur.json",
             "image_netayume_lumina_t2i.json"]


def _walk(graph: dict, defs: dict, prefix: str = ""):
    """(prompt id, node) for every node that should be sent (non-virtual, not muted/bypassed)."""
    for n in graph["nodes"]:
        if n.get("mode") in (2, 4):
            continue
        if n["type"] in defs:
            yield from _walk(defs[n["type"]], defs, f"{prefix}{n['id']}:")
        elif n["type"] not in VIRTUAL_NODE_TYPES:
            yield f"{prefix}{n['id']}", n


@pytest.mark.parametrize("name", TEMPLATES)
def test_real_templates_convert_structurally(name: str) -> None:
    wf = json.loads((DATA / name).read_text(encoding="utf-8"))
    assert detect(wf) == "ui" and detect(json.dumps(wf)) == "ui"
    prompt, issues = convert(wf)
    assert issues == []
    defs = {d["id"]: d for d in (wf.get("definitions") or {}).get("subgraphs", [])}
    expected = dict(_walk(wf, defs))
    assert set(prompt) == set(expected)
    for pid, entry in prompt.items():
        node = expected[pid]
        assert entry["class_type"] == node["type"] in WIDGETS
        names = WIDGETS[node["type"]]
        assert len(node.get("widgets_values", [])) == len(names)
        sent = [n for n in names if n not in FRONTEND_ONLY_WIDGETS]
        widget_keys = [k for k in entry["inputs"] if k in names]
        assert widget_keys == sent  # every sent widget, in widget order (a link may replace the value)
        for key, value in entry["inputs"].items():
            if isinstance(value, list):
                assert value[0] in prompt, f"{pid}.{key} -> {value}"
                assert isinstance(value[1], int)
        socket_inputs = {s["name"] for s in node.get("inputs", []) if "widget" not in s and s.get("link")}
        assert socket_inputs <= set(entry["inputs"])


def test_template_values_come_from_primitives_and_subgraphs() -> None:
    wf = json.loads((DATA / "sdxl_simple_example.json").read_text(encoding="utf-8"))
    prompt, _ = convert(wf)
    base, refiner = prompt["10"]["inputs"], prompt["11"]["inputs"]
    assert base["steps"] == refiner["steps"] == 25  # one PrimitiveNode, two KSamplerAdvanced
    assert base["end_at_step"] == refiner["start_at_step"] == 20
    assert prompt["6"]["inputs"]["text"] == prompt["15"]["inputs"]["text"] == (
        "evening sunset scenery blue sky nature, glass bottle with a galaxy in it")
    assert prompt["10"]["_meta"]["title"] == "KSampler (Advanced) - BASE"

    wf = json.loads((DATA / "image_netayume_lumina_t2i.json").read_text(encoding="utf-8"))
    prompt, _ = convert(wf)
    assert prompt["9"]["inputs"]["images"] == ["48:36", 0]  # root SaveImage <- subgraph output
    assert prompt["48:35:43"]["inputs"]["clip"] == ["48:34", 1]  # nested instance input from its parent
    assert prompt["48:33"]["inputs"]["negative"] == ["48:35:43", 0]  # nested instance output
    assert prompt["48:31"]["inputs"] == {"width": 1024, "height": 1024, "batch_size": 1}  # promoted widgets
    assert prompt["48:34"]["inputs"] == {"ckpt_name": "NetaYumev35_pretrained_all_in_one.safetensors"}

    wf = json.loads((DATA / "default.json").read_text(encoding="utf-8"))
    prompt, _ = convert(wf)
    assert prompt["3"]["inputs"] == {"seed": 685468484323813, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                     "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                     "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}


# ---------------------------------------------------------------------------------------------- detect


def test_detect() -> None:
    api = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    assert detect(api) == "api" and detect(json.dumps(api)) == "api" and detect(json.dumps(api).encode()) == "api"
    assert detect(txt2img(UI()).build()) == "ui"
    assert detect(png([])) == "png"
    assert detect({}) is None and detect({"3": {"inputs": {}}}) is None and detect("not json") is None
    assert detect(b"\xff\xfe") is None and detect({"nodes": {}, "links": []}) is None


# ------------------------------------------------------------------------------------------------- PNG


def chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def png(chunks: list[bytes]) -> bytes:
    """A 1x1 RGB PNG with ``chunks`` between IHDR and IDAT."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + chunk(b"IEND", b"")


def test_png_round_trip_with_text_chunks() -> None:
    wf = txt2img(UI()).build()
    prompt, _ = convert(wf)
    data = png([chunk(b"tEXt", b"prompt\0" + json.dumps(prompt).encode()),
                chunk(b"tEXt", b"workflow\0" + json.dumps(wf).encode()),
                chunk(b"tEXt", b"parameters\0something else")])
    got = read_png(data)
    assert got == {"prompt": prompt, "workflow": wf}
    assert detect(got["workflow"]) == "ui" and detect(got["prompt"]) == "api"
    assert convert(got["workflow"])[0] == prompt


def test_png_itxt_ztxt_and_last_chunk_wins() -> None:
    text = json.dumps({"title": "ünïcode"}).encode()
    data = png([chunk(b"tEXt", b"workflow\0{\"old\": 1}"),
                chunk(b"iTXt", b"workflow\0\x01\x00en\0\0" + zlib.compress(json.dumps({"new": "é"}).encode())),
                chunk(b"zTXt", b"prompt\0\x00" + zlib.compress(text))])
    assert read_png(data) == {"workflow": {"new": "é"}, "prompt": {"title": "ünïcode"}}
    data = png([chunk(b"iTXt", b"prompt\0\x00\x00\0\0" + json.dumps({"1": 2}).encode())])
    assert read_png(data) == {"prompt": {"1": 2}}


def test_png_errors() -> None:
    with pytest.raises(WorkflowError) as err:
        read_png(png([]))
    assert err.value.code == "no_workflow" and isinstance(err.value, ValueError)
    with pytest.raises(WorkflowError) as err:
        read_png(png([chunk(b"tEXt", b"Software\0ComfyUI")]))
    assert err.value.code == "no_workflow"
    with pytest.raises(WorkflowError) as err:
        read_png(b"GIF89a....")
    assert err.value.code == "not_png"
    with pytest.raises(WorkflowError) as err:
        read_png(png([chunk(b"tEXt", b"prompt\0{not json")]))
    assert err.value.code == "bad_json"
    # a bad CRC is tolerated (the frontend does not check) unless asked
    bad = png([chunk(b"tEXt", b'prompt\0{"1": 1}', crc=1234)])
    assert read_png(bad) == {"prompt": {"1": 1}}
    with pytest.raises(WorkflowError) as err:
        read_png(bad, check_crc=True)
    assert err.value.code == "bad_png"
    whole = png([chunk(b"tEXt", b'prompt\0{"1": 1}')])
    with pytest.raises(WorkflowError) as err:
        read_png(whole[:40])  # cut inside the text chunk
    assert err.value.code == "bad_png"
    with pytest.raises(WorkflowError) as err:
        read_png(png([chunk(b"tEXt", b"workflow\0" + b" " * MAX_TEXT_CHUNK)]))
    assert err.value.code == "too_large"
    bomb = zlib.compress(b"[" + b" " * (MAX_TEXT_CHUNK + 10) + b"]")
    with pytest.raises(WorkflowError) as err:
        read_png(png([chunk(b"zTXt", b"workflow\0\x00" + bomb)]))
    assert err.value.code == "too_large"
