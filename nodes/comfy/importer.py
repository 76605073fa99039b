"""ComfyUI API prompts -> this engine's graphs: each ComfyUI node becomes our nodes, with ComfyUI's semantics.

An API prompt (what the frontend POSTs to ``/prompt``; a UI workflow is first converted to one by
:mod:`.workflow`) is ``{id: {"class_type", "inputs", "_meta"}}`` with links ``[id, slot]``. Every supported
``class_type`` has a :class:`ComfyType`: the names of its widget inputs in ComfyUI's order (what a UI workflow's
``widgets_values`` are matched against), the names its output slots get here, and a translation into our nodes.
The result is an ordinary graph: ``KSampler`` becomes the schedule, noise, guidance and sampler nodes it is made of
(ComfyUI hides the loop in one node; here it is open), with ids ``<comfy id>.<part>`` so every node of the import
names the ComfyUI node it came from.

Node types that are not supported are all reported at once (``unknown_type``, naming the node id and class
type), links to missing nodes or slots as ``bad_link``; nothing runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from nodegraph.errors import GraphValidationError, Issue

Link = list  # [source id, slot]


@dataclass
class Out:
    """What the translation of one ComfyUI node gives its output slots: (our node id, our output) per slot."""

    slots: list[tuple[str, str] | None] = field(default_factory=list)


@dataclass
class Build:
    """The graph being built: our nodes, the graph outputs, and where each ComfyUI output slot went."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    slots: dict[str, list[tuple[str, str] | None]] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    def add(self, nid: str, type_id: str, inputs: dict[str, Any]) -> str:
        self.nodes[nid] = {"type": type_id, "inputs": inputs}
        return nid


def ref(node: str, output: str) -> dict[str, str]:
    return {"node": node, "output": output}


@dataclass(frozen=True)
class ComfyType:
    widgets: tuple[str, ...]
    outputs: tuple[str, ...]
    translate: Callable[[Build, str, dict[str, Any]], list[tuple[str, str] | None]]
    output_node: bool = False


def _single(type_id: str, renames: dict[str, str], output: str):
    """A ComfyUI node that is one of ours with renamed inputs."""

    def translate(b: Build, nid: str, inputs: dict[str, Any]) -> list[tuple[str, str] | None]:
        b.add(nid, type_id, {ours: inputs[theirs] for theirs, ours in renames.items() if theirs in inputs})
        return [(nid, output)]

    return translate


def _checkpoint(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    b.add(nid, "checkpoint.load", {"name": inputs.get("ckpt_name")})
    return [(nid, "model"), (nid, "clip"), (nid, "vae")]


def _lora(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    b.add(nid, "lora.apply", {"model": inputs.get("model"), "clip": inputs.get("clip"), "name": inputs.get("lora_name"),
                              "strength_model": inputs.get("strength_model", 1.0),
                              "strength_text": inputs.get("strength_clip", 1.0)})
    return [(nid, "model"), (nid, "clip")]


CLIP_FAMILIES = {"stable_diffusion": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}  # CLIPLoader's type


def _clip_loader(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    names = [inputs.get("clip_name"), inputs.get("clip_name1"), inputs.get("clip_name2")]
    names = [n for n in names if n is not None]
    kind = inputs.get("type", "stable_diffusion")
    family = CLIP_FAMILIES.get(kind)
    if family is None:
        b.issues.append(Issue("unknown_type", f"CLIP type {kind!r} is not supported (supported: "
                              f"{', '.join(sorted(CLIP_FAMILIES))})", nid, "type"))
        family = "sd1"
    b.add(nid, "checkpoint.load_clip", {"name": names[0] if names else None,
                                        **({"name2": names[1]} if len(names) > 1 else {}), "family": family})
    return [(nid, "clip")]


def _empty_latent(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    b.add(nid, "latent.empty_sd", {"width": inputs.get("width", 512), "height": inputs.get("height", 512),
                                   "batch": inputs.get("batch_size", 1)})
    return [(nid, "latent")]


ANCESTRAL = {"euler_ancestral", "ddpm", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm"}


def ksampler_parts(b: Build, nid: str, model: Any, positive: Any, negative: Any, latent: Any, seed: Any,
                   steps: Any, cfg: Any, sampler: str, scheduler: str, denoise: Any) -> tuple[str, str]:
    """ComfyUI's KSampler as our nodes: its schedule, its noise from the seed, the start latent, CFG, the sampler."""
    b.add(f"{nid}.sigmas", "schedule.comfy", {"model": model, "steps": steps, "scheduler": scheduler,
                                              "denoise": denoise, "sampler": sampler})
    b.add(f"{nid}.noise", "latent.noise", {"like": latent, "seed": seed})
    b.add(f"{nid}.start", "latent.add_noise", {"model": model, "latent": latent,
                                               "noise": ref(f"{nid}.noise", "noise"),
                                               "sigmas": ref(f"{nid}.sigmas", "sigmas"), "start": "auto"})
    b.add(f"{nid}.guidance", "guidance.cfg", {"model": model, "negative": negative, "scale": cfg})
    sample = {"model": ref(f"{nid}.guidance", "model"), "latent": ref(f"{nid}.start", "latent"),
              "sigmas": ref(f"{nid}.sigmas", "sigmas"), "cond": positive}
    if sampler in ANCESTRAL:
        sample["seed"] = seed
    b.add(nid, f"sample.{sampler}", sample)
    return nid, "latent"


def _ksampler(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    return [ksampler_parts(b, nid, inputs.get("model"), inputs.get("positive"), inputs.get("negative"),
                           inputs.get("latent_image"), inputs.get("seed", 0), inputs.get("steps", 20),
                           inputs.get("cfg", 8.0), inputs.get("sampler_name", "euler"),
                           inputs.get("scheduler", "normal"), inputs.get("denoise", 1.0))]


def _save(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    prefix = inputs.get("filename_prefix", "ComfyUI")
    b.add(nid, "image.save", {"image": inputs.get("images"), "path": f"{prefix}_00001_.png"})
    b.outputs[f"{nid}_images"] = ref(nid, "file")
    return []


def _preview(b: Build, nid: str, inputs: dict[str, Any]) -> list:
    images = inputs.get("images")
    if isinstance(images, dict):
        b.outputs[f"{nid}_images"] = images
    return []


TYPES: dict[str, ComfyType] = {
    "CheckpointLoaderSimple": ComfyType(("ckpt_name",), ("model", "clip", "vae"), _checkpoint),
    "CLIPTextEncode": ComfyType(("text",), ("cond",), _single("clip.encode", {"clip": "clip", "text": "text"}, "cond")),
    "CLIPSetLastLayer": ComfyType(("stop_at_clip_layer",), ("clip",), _single(
        "clip.set_last_layer", {"clip": "clip", "stop_at_clip_layer": "stop_at_clip_layer"}, "clip")),
    "EmptyLatentImage": ComfyType(("width", "height", "batch_size"), ("latent",), _empty_latent),
    "KSampler": ComfyType(("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"), ("latent",), _ksampler),
    "VAEDecode": ComfyType((), ("image",), _single("vae.decode", {"vae": "vae", "samples": "latent"}, "image")),
    "VAEEncode": ComfyType((), ("latent",), _single("vae.encode", {"vae": "vae", "pixels": "image"}, "latent")),
    "VAELoader": ComfyType(("vae_name",), ("vae",), _single("checkpoint.load_vae", {"vae_name": "name"}, "vae")),
    "UNETLoader": ComfyType(("unet_name", "weight_dtype"), ("model",),
                            _single("checkpoint.load_unet", {"unet_name": "name"}, "model")),
    "CLIPLoader": ComfyType(("clip_name", "type", "device"), ("clip",), _clip_loader),
    "DualCLIPLoader": ComfyType(("clip_name1", "clip_name2", "type", "device"), ("clip",), _clip_loader),
    "LoraLoader": ComfyType(("lora_name", "strength_model", "strength_clip"), ("model", "clip"), _lora),
    "LoadImage": ComfyType(("image", "upload"), ("image", "mask"), _single("image.load", {"image": "path"}, "image")),
    "SaveImage": ComfyType(("filename_prefix",), (), _save, output_node=True),
    "PreviewImage": ComfyType((), (), _preview, output_node=True),
}

SEED_WIDGETS = ("seed", "noise_seed")  # followed in a UI workflow by the frontend-only control_after_generate


def widget_names(class_type: str) -> list[str] | None:
    """A supported node type's widget inputs in ComfyUI's order, with the frontend-only ``control_after_generate``
    after a seed widget (what a UI workflow's ``widgets_values`` list holds); None for an unknown type."""
    spec = TYPES.get(class_type)
    if spec is None:
        return None
    out: list[str] = []
    for name in spec.widgets:
        out.append(name)
        if name in SEED_WIDGETS:
            out.append("control_after_generate")
    return out


def api_to_graph(prompt: dict[str, Any], title: str = "imported ComfyUI workflow") -> dict[str, Any]:
    """Our graph for an API prompt; raises GraphValidationError listing every node it cannot convert."""
    if not isinstance(prompt, dict) or not prompt:
        raise GraphValidationError([Issue("bad_graph", "a ComfyUI prompt is a non-empty object of nodes")])
    unknown = [Issue("unknown_type", f"ComfyUI node type {spec.get('class_type')!r} is not supported",
                     str(nid), None, _hint(spec.get("class_type")))
               for nid, spec in prompt.items()
               if not isinstance(spec, dict) or spec.get("class_type") not in TYPES]
    if unknown:
        raise GraphValidationError(unknown)
    b = Build()
    pending: list[tuple[str, str, Link]] = []  # (our node, our port, [comfy id, slot]) resolved after translating
    for nid, spec in prompt.items():
        nid = str(nid)
        inputs = {}
        for name, value in (spec.get("inputs") or {}).items():
            inputs[name] = _LinkMark(value) if _is_link(value) else value
        before = set(b.nodes)
        b.slots[nid] = TYPES[spec["class_type"]].translate(b, nid, inputs)
        for our in set(b.nodes) - before:
            for port, value in b.nodes[our]["inputs"].items():
                if isinstance(value, _LinkMark):
                    pending.append((our, port, value.link))
        if (spec.get("_meta") or {}).get("title"):
            b.nodes[nid].setdefault("meta", {})["title"] = str(spec["_meta"]["title"])[:200]
    for our, port, (src, slot) in pending:
        slots = b.slots.get(str(src))
        if slots is None or not isinstance(slot, int) or not 0 <= slot < len(slots) or slots[slot] is None:
            b.issues.append(Issue("bad_link", f"input {port!r} links to output {slot} of ComfyUI node {src!r}, "
                                  "which does not exist", our.split(".")[0], port))
            continue
        b.nodes[our]["inputs"][port] = ref(*slots[slot])
    if b.issues:
        raise GraphValidationError(b.issues)
    if not b.outputs:
        raise GraphValidationError([Issue("bad_graph", "the workflow has no output node (SaveImage, PreviewImage)")])
    for spec in b.nodes.values():  # inputs a ComfyUI node left unset take our defaults
        spec["inputs"] = {k: v for k, v in spec["inputs"].items() if v is not None}
    return {"version": 1, "meta": {"title": title, "source": "ComfyUI"}, "nodes": b.nodes, "outputs": b.outputs}


@dataclass(frozen=True)
class _LinkMark:
    link: Link


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int))


CUSTOM_PACKS = {  # where unsupported node types usually come from
    "Impact": "ComfyUI-Impact-Pack", "WAS": "WAS Node Suite", "IPAdapter": "ComfyUI_IPAdapter_plus",
    "AnimateDiff": "ComfyUI-AnimateDiff-Evolved", "VHS_": "ComfyUI-VideoHelperSuite", "Efficient": "efficiency-nodes",
}


def _hint(class_type: Any) -> str:
    name = str(class_type)
    for key, pack in CUSTOM_PACKS.items():
        if key in name:
            return f"a node of the custom pack {pack}, which is not supported"
    return f"supported ComfyUI node types: {', '.join(sorted(TYPES))}"
