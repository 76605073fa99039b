"""Family detection and architecture inference, before any weight loads.

A checkpoint is either one ``.safetensors`` file in the original (ldm / sgm) layout — ``model.diffusion_model.``
(U-Net), ``first_stage_model.`` (VAE), ``cond_stage_model.`` or ``conditioner.embedders.N.`` (text encoders) — or a
diffusers pipeline folder (``model_index.json``, ``unet/ vae/ text_encoder[_2]/ tokenizer[_2]/ scheduler/``).

From a file's header (names and shapes; :mod:`.header`) or a folder's configs this module decides the family and
the architecture:

* **Family.** The U-Net's cross-attention width and its added embedding say it: 768 -> SD1.x, 1024 -> SD2.x,
  2048 with a 6-id time embedding -> SDXL base, 1280 with a 5-id one -> SDXL refiner. Nine input channels mark an
  inpainting variant. SD3 / Flux / other layouts are refused naming the families known here.
* **Architecture from the shapes.** Channels per level, resnets per level, which levels attend, transformer depth
  per block (down and up separately, so pruned variants such as SSD-1B load), linear or convolutional attention
  projections, the added-embedding width, the VAE's channels and levels, each text tower's width, depth, MLP
  width and projection: read from tensor shapes, never assumed.
* **What the shapes do not say** comes from the family's conventions (``data/families.json``), as the reference
  loaders use them: 32 GroupNorm groups; SD1.x U-Nets use 8 heads per block, SD2.x / SDXL U-Nets 64-wide heads;
  every CLIP tower 64-wide heads; quick_gelu for CLIP-L, gelu for OpenCLIP; the VAE scale (0.18215 / 0.13025);
  the scheduler config of a single file (SD2.x: v-prediction unless the loader says ``prediction="eps"``).
  SD2.x's OpenCLIP tower is used up to its penultimate layer: a single file's last layer is dropped, as the
  diffusers folders of SD2.x are stored.

The result (:class:`Detected`) types the loader's ports at validation and tells :mod:`.load` what to build.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from nodegraph.safeio import read_bytes

from .header import Header, WeightsError, read_header, refuse_pickle
from .keymaps import UNetLayout

DATA = Path(__file__).parent / "data" / "families.json"
MAX_CONFIG_BYTES = 1 << 20
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
KNOWN = "SD1.x (sd1), SD2.x (sd2, eps or v), SDXL base (sdxl), SDXL refiner (sdxl-refiner), and their inpainting " \
        "variants"


class CheckpointFormatError(ValueError):
    """A checkpoint whose layout is not one this package knows, or whose parts disagree."""


@dataclass(frozen=True)
class TextSpec:
    role: str  # "text_encoder" / "text_encoder_2": the diffusers component it becomes
    layout: str  # "clip" (transformers names) or "openclip"
    act: str
    pad: str  # "eos" or "zero": what fills a frame after EOS
    layer: int  # default hidden layer, counted from the end (-1 last)
    final_norm: bool  # apply the final LayerNorm to the chosen layer
    pooled: bool = False  # this tower's projected EOS state is the pooled vector the U-Net takes
    drop_last: bool = False  # a single file's last layer is not part of the model (SD2.x)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    space: str
    vae_scale: float
    unet_heads: Mapping[str, Any]
    sample_size: int
    text: tuple[TextSpec, ...]
    scheduler: str
    time_ids: int = 0
    upcast_attention: bool = False

    def unet_conventions(self, config: dict[str, Any], sample_size: bool = True) -> None:
        """Write what a U-Net's (or ControlNet's) tensors do not say into its inferred config: the family's heads,
        attention upcast and, for a U-Net, its native sample size."""
        heads = self.unet_heads
        channels = list(config["block_out_channels"])
        config["attention_head_dim"] = heads["value"] if heads["rule"] == "fixed" else [c // heads["value"]
                                                                                        for c in channels]
        if self.upcast_attention:
            config["upcast_attention"] = True
        if sample_size:
            config["sample_size"] = self.sample_size


@functools.lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def family(name: str) -> Family:
    spec = dict(_data()["families"][name])
    spec["text"] = tuple(TextSpec(**t) for t in spec["text"])
    return Family(name=name, **spec)


def family_names() -> list[str]:
    return list(_data()["families"])


def scheduler_config(name: str) -> dict[str, Any]:
    return dict(_data()["schedulers"][name])


@dataclass(frozen=True)
class TextPart:
    """One text tower: its family conventions, its transformers config, and where its weights are."""

    spec: TextSpec
    config: Mapping[str, Any]
    prefix: str = ""  # single file: the tower's prefix; folder: ""
    header: Header | None = None
    tokenizer: Path | None = None  # folder: the tokenizer folder; single file: None (the shipped BPE)


@dataclass(frozen=True)
class Detected:
    """A checkpoint's family and architecture, as validation sees it (no weights loaded)."""

    name: str
    path: Path
    source: str  # "file" or "folder"
    family: Family
    prediction: str  # "eps" or "v"
    inpaint: bool
    unet: Mapping[str, Any]
    unet_layout: UNetLayout | None
    vae: Mapping[str, Any]
    vae_shape: tuple[int, int]  # (levels, resnets per level) for the key map
    text: tuple[TextPart, ...]
    scheduler: Mapping[str, Any]
    headers: Mapping[str, Header] = field(default_factory=dict)  # component -> header (a single file: all one)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def label(self) -> str:
        return self.family.name + ("-inpaint" if self.inpaint else "")


# -- single files --------------------------------------------------------------------------------------------


def detect_file(name: str, path: Path, prediction: str = "auto") -> Detected:
    header = read_header(path)
    if not header.has_prefix(UNET_PREFIX + "input_blocks."):
        raise CheckpointFormatError(f"{name!r} is not a checkpoint of a known layout ({_guess_other(header)}); "
                                    f"known: {KNOWN}")
    unet, layout = unet_config(header, UNET_PREFIX)
    fam = unet_family(name, unet, header)
    fam.unet_conventions(unet)
    if not header.has_prefix(VAE_PREFIX):
        raise CheckpointFormatError(f"{name!r} has a U-Net but no VAE (first_stage_model.*); load the VAE from vae/")
    vae, vae_shape = vae_config(header, VAE_PREFIX, fam.vae_scale)
    text = tuple(_file_text(name, header, spec, fam) for spec in fam.text)
    if fam.time_ids:
        _check_time_embedding(name, unet, text, fam)
    pred = _prediction(prediction, fam, header)
    sched = scheduler_config(fam.scheduler if fam.name != "sd2" else ("sd2-v" if pred == "v" else "sd2-eps"))
    sched["prediction_type"] = "v_prediction" if pred == "v" else "epsilon"
    return Detected(name, path, "file", fam, pred, unet["in_channels"] == 9, unet, layout, vae, vae_shape, text,
                    sched, {"all": header})


def _guess_other(header: Header) -> str:
    if header.has_prefix("model.diffusion_model.joint_blocks.") or header.has_prefix("joint_blocks."):
        return "it looks like SD3 (MMDiT), a transformer family not supported yet"
    if header.has_prefix("double_blocks.") or header.has_prefix("model.diffusion_model.double_blocks."):
        return "it looks like Flux, a transformer family not supported yet"
    if header.has_prefix("lora_unet_") or any(".lora_A." in n or ".lora_down." in n for n in list(header.tensors)[:50]):
        return "it looks like a LoRA: load it with lora.apply from loras/"
    if header.has_prefix("conv_in.") and header.has_prefix("down_blocks."):
        return "it looks like a diffusers-format component, not a whole checkpoint"
    if header.has_prefix("control_model.") or header.has_prefix("input_hint_block."):
        return "it looks like a ControlNet: load it from controlnet/"
    return "no model.diffusion_model.* tensors"


def unet_family(name: str, unet: Mapping[str, Any], header: Header | None = None) -> Family:
    """The family a diffusers U-Net (or ControlNet) config is for: cross-attention width and added embedding."""
    ctx, adm = unet["cross_attention_dim"], unet.get("projection_class_embeddings_input_dim")
    if unet.get("addition_embed_type") == "text_time":
        fam = "sdxl" if ctx == 2048 else "sdxl-refiner" if ctx == 1280 else None
    elif adm is None:
        fam = {768: "sd1", 1024: "sd2"}.get(ctx)
    else:
        fam = None
    if fam is None:
        raise CheckpointFormatError(f"{name!r} has a U-Net of an unknown family (cross-attention width {ctx}"
                                    f"{', added embedding' if adm else ''}); known: {KNOWN}")
    return family(fam)


def _prediction(prediction: str, fam: Family, header: Header) -> str:
    if prediction in ("eps", "v"):
        return prediction
    if "v_pred" in header.tensors:
        return "v"
    return "v" if fam.name == "sd2" else "eps"


def count(header: Header, prefix: str) -> int:
    """How many consecutive integer children ``prefix.0``, ``prefix.1``, ... a header has."""
    found = set()
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    for n in header.tensors:
        m = pat.match(n)
        if m:
            found.add(int(m.group(1)))
    return len(found)


def indices(header: Header, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for n in header.tensors if (m := pat.match(n))})


def _shape(header: Header, key: str, name: str = "checkpoint") -> tuple[int, ...]:
    shape = header.shape(key)
    if shape is None:
        raise CheckpointFormatError(f"{name}: tensor {key!r} is missing (an unknown or damaged layout); known: {KNOWN}")
    return shape


def unet_config(header: Header, p: str) -> tuple[dict[str, Any], UNetLayout]:
    """A diffusers ``UNet2DConditionModel`` config (without heads and sample size) from ldm-layout shapes."""
    conv_in = _shape(header, p + "input_blocks.0.0.weight")
    levels: list[dict[str, Any]] = [{"channels": None, "depths": []}]
    for k in indices(header, p + "input_blocks"):
        if k == 0:
            continue
        if header.shape(f"{p}input_blocks.{k}.0.op.weight") is not None:
            levels.append({"channels": None, "depths": []})
            continue
        out = _shape(header, f"{p}input_blocks.{k}.0.out_layers.3.weight")[0]
        level = levels[-1]
        if level["channels"] not in (None, out):
            raise CheckpointFormatError(f"U-Net level {len(levels) - 1} changes width inside the level")
        level["channels"] = out
        level["depths"].append(count(header, f"{p}input_blocks.{k}.1.transformer_blocks"))
    per = {len(lv["depths"]) for lv in levels}
    if len(per) != 1 or 0 in per:
        raise CheckpointFormatError(f"U-Net levels have different resnet counts; known: {KNOWN}")
    layers_per_block = per.pop()
    attention = tuple(any(d > 0 for d in lv["depths"]) for lv in levels)
    if any(a and 0 in lv["depths"] for a, lv in zip(attention, levels)):
        raise CheckpointFormatError("U-Net level attends in some blocks only; not a known layout")
    down_depths = [_one(lv["depths"]) for lv in levels]
    # up path: output_blocks (levels * (layers_per_block + 1)), deepest level first
    up_depths = []
    k = 0
    for up in range(len(levels)):
        depths = []
        for _ in range(layers_per_block + 1):
            depths.append(count(header, f"{p}output_blocks.{k}.1.transformer_blocks"))
            k += 1
        up_depths.append(depths)
    mid_depth = count(header, f"{p}middle_block.1.transformer_blocks")
    if mid_depth == 0:
        raise CheckpointFormatError(f"U-Net without a middle attention block; known: {KNOWN}")
    attn_key = next((n for n in header.tensors if n.startswith(p) and n.endswith("attn2.to_k.weight")), None)
    proj_key = next((n for n in header.tensors if n.startswith(p) and n.endswith(".proj_in.weight")), None)
    if attn_key is None or proj_key is None:
        raise CheckpointFormatError(f"U-Net without cross-attention; known: {KNOWN}")
    channels = [lv["channels"] for lv in levels]
    time_dim = _shape(header, p + "time_embed.0.weight")[0]
    config: dict[str, Any] = {
        "in_channels": conv_in[1],
        "out_channels": _shape(header, p + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": header.shape(attn_key)[1],
        "use_linear_projection": len(header.shape(proj_key)) == 2,
        "transformer_layers_per_block": [d if d else 1 for d in down_depths],
        "norm_num_groups": 32,
    }
    if mid_depth != (down_depths[-1] or 1):
        raise CheckpointFormatError("U-Net middle block depth differs from the deepest level's; not a known layout")
    expected_up = [[d or 0] * (layers_per_block + 1) for d in reversed(down_depths)]
    if up_depths != expected_up:
        config["reverse_transformer_layers_per_block"] = [[d or 1 for d in ds] for ds in up_depths]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    adm = header.shape(p + "label_emb.0.0.weight")
    if adm is not None:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm[1])
    layout = UNetLayout(attention=attention, layers_per_block=layers_per_block, time_cond=adm is not None)
    return config, layout


def _one(depths: list[int]) -> int:
    if len(set(depths)) != 1:
        raise CheckpointFormatError("U-Net level with different transformer depths per block; not supported yet")
    return depths[0]


def vae_config(header: Header, p: str, scale: float) -> tuple[dict[str, Any], tuple[int, int]]:
    levels = count(header, p + "encoder.down")
    per = count(header, p + "encoder.down.0.block")
    if levels == 0 or per == 0:
        raise CheckpointFormatError(f"VAE of an unknown layout; known: {KNOWN}")
    channels = [_shape(header, f"{p}encoder.down.{i}.block.{per - 1}.conv2.weight")[0] for i in range(levels)]
    config = {
        "in_channels": _shape(header, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(header, p + "decoder.conv_out.weight")[0],
        "latent_channels": _shape(header, p + "decoder.conv_in.weight")[1],
        "block_out_channels": channels,
        "layers_per_block": per,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "scaling_factor": scale,
    }
    return config, (levels, per)


def _file_text(name: str, header: Header, spec: TextSpec, fam: Family) -> TextPart:
    candidates = {
        ("sd1", "text_encoder"): ["cond_stage_model.transformer."],
        ("sd2", "text_encoder"): ["cond_stage_model.model."],
        ("sdxl", "text_encoder"): ["conditioner.embedders.0.transformer."],
        ("sdxl", "text_encoder_2"): ["conditioner.embedders.1.model."],
        ("sdxl-refiner", "text_encoder_2"): ["conditioner.embedders.0.model."],
    }[fam.name, spec.role]
    prefix = next((c for c in candidates if header.has_prefix(c)), None)
    if prefix is None:
        raise CheckpointFormatError(f"{name!r} ({fam.title}) has no {spec.role.replace('_', ' ')} "
                                    f"({candidates[0]}*); load one from text_encoders/")
    return TextPart(spec, text_config(header, prefix, spec), prefix, header)


def text_config(header: Header, prefix: str, spec: TextSpec) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict from a tower's shapes (transformers or OpenCLIP names)."""
    if spec.layout == "openclip":
        vocab, width = _shape(header, prefix + "token_embedding.weight")
        layers = count(header, prefix + "transformer.resblocks")
        mlp = _shape(header, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        positions = _shape(header, prefix + "positional_embedding")[0]
        proj = header.shape(prefix + "text_projection")
        projection = proj[1] if proj is not None else None
    else:
        base = prefix + "text_model."
        vocab, width = _shape(header, base + "embeddings.token_embedding.weight")
        layers = count(header, base + "encoder.layers")
        mlp = _shape(header, base + "encoder.layers.0.mlp.fc1.weight")[0]
        positions = _shape(header, base + "embeddings.position_embedding.weight")[0]
        proj = header.shape(prefix + "text_projection.weight")
        projection = proj[0] if proj is not None else None
    if spec.drop_last:
        layers -= 1
    config = clip_config(vocab, width, layers, mlp, positions, spec.act, spec.pad)
    if projection is not None and spec.pooled:
        config["projection_dim"] = projection
    return config


def clip_config(vocab: int, width: int, layers: int, mlp: int, positions: int, act: str, pad: str) -> dict[str, Any]:
    if width % 64:
        raise CheckpointFormatError(f"text encoder width {width} is not a multiple of the 64-wide heads")
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": width // 64, "max_position_embeddings": positions, "hidden_act": act,
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407 if pad == "eos" else 0, "projection_dim": width}


def _check_time_embedding(name: str, unet: dict[str, Any], text: tuple[TextPart, ...], fam: Family) -> None:
    pooled = next((t.config.get("projection_dim") for t in text if t.spec.pooled), None)
    adm = unet["projection_class_embeddings_input_dim"]
    rest = adm - int(pooled or 0)
    if pooled is None or rest <= 0 or rest % fam.time_ids:
        raise CheckpointFormatError(f"{name!r}: the U-Net's added embedding ({adm} wide) does not fit the pooled text "
                                    f"vector ({pooled}) plus {fam.time_ids} size/crop ids")
    unet["addition_time_embed_dim"] = rest // fam.time_ids


# -- diffusers folders ---------------------------------------------------------------------------------------

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(read_bytes(path, MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise CheckpointFormatError(f"{what} is missing ({path.parent.name}/{path.name})") from None
    except Exception:  # noqa: BLE001 - unreadable, too large, not JSON: the same answer, without its contents
        raise CheckpointFormatError(f"{what} ({path.parent.name}/{path.name}) is not a small JSON file") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{what} ({path.parent.name}/{path.name}) is not a JSON object")
    return data


def component_weights(folder: Path, what: str) -> Path:
    """The safetensors weights of a diffusers component folder (pickle-only folders are refused)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    pickles = [p for p in folder.glob("*") if p.name.lower().endswith((".bin", ".ckpt", ".pt", ".pth"))]
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointFormatError(f"{what} has no safetensors weights in {folder.name}/")


_CONFIG_KEYS = {  # what we pass on from a folder's config; anything else there is ignored
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "mid_block_type", "cross_attention_dim", "use_linear_projection",
             "transformer_layers_per_block", "reverse_transformer_layers_per_block", "norm_num_groups",
             "attention_head_dim", "num_attention_heads", "sample_size", "upcast_attention", "addition_embed_type",
             "addition_time_embed_dim", "projection_class_embeddings_input_dim", "time_embedding_dim",
             "flip_sin_to_cos", "freq_shift", "act_fn", "norm_eps", "center_input_sample", "downsample_padding",
             "mid_block_scale_factor", "dual_cross_attention", "only_cross_attention", "class_embed_type",
             "num_class_embeds", "resnet_time_scale_shift", "encoder_hid_dim", "encoder_hid_dim_type",
             "conditioning_channels", "controlnet_conditioning_channel_order",
             "conditioning_embedding_out_channels", "global_pool_conditions", "attention_type"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "norm_num_groups", "act_fn", "scaling_factor", "shift_factor",
            "sample_size", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"),
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
             "pad_token_id", "projection_dim", "attention_dropout", "dropout", "initializer_factor",
             "initializer_range"),
}


def plain_config(data: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The known fields of a read config whose values are plain JSON (numbers, short strings, lists of them)."""
    out = {}
    for key in _CONFIG_KEYS[kind]:
        if key in data and _plain(data[key]):
            out[key] = data[key]
    return out


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 64 and value.isprintable()
    if isinstance(value, list) and depth < 2 and len(value) <= 64:
        return all(_plain(v, depth + 1) for v in value)
    return False


def detect_folder(name: str, folder: Path, prediction: str = "auto") -> Detected:
    read_json(folder / "model_index.json", f"{name!r}: model_index.json")
    unet = plain_config(read_json(folder / "unet" / "config.json", f"{name!r}: the U-Net config"), "unet")
    for key in ("cross_attention_dim", "in_channels", "block_out_channels"):
        if key not in unet:
            raise CheckpointFormatError(f"{name!r}: unet/config.json lacks {key}; known: {KNOWN}")
    fam = unet_family(name, unet, None)
    vae = plain_config(read_json(folder / "vae" / "config.json", f"{name!r}: the VAE config"), "vae")
    vae.setdefault("scaling_factor", fam.vae_scale)
    sched = read_json(folder / "scheduler" / "scheduler_config.json", f"{name!r}: the scheduler config")
    sched = {k: v for k, v in sched.items() if _plain(v)}
    pred_type = sched.get("prediction_type", "epsilon")
    if pred_type not in ("epsilon", "v_prediction"):
        raise CheckpointFormatError(f"{name!r}: scheduler prediction_type must be epsilon or v_prediction")
    pred = prediction if prediction in ("eps", "v") else ("v" if pred_type == "v_prediction" else "eps")
    text = []
    for spec in fam.text:
        sub = folder / spec.role
        config = plain_config(read_json(sub / "config.json", f"{name!r}: the {spec.role} config"), "text")
        tok = folder / spec.role.replace("text_encoder", "tokenizer")
        for needed in ("vocab.json", "merges.txt"):
            if not (tok / needed).is_file():
                raise CheckpointFormatError(f"{name!r}: the tokenizer file {tok.name}/{needed} is missing")
        text.append(TextPart(spec, config, "", read_header(component_weights(sub, spec.role)), tok))
    headers = {"unet": read_header(component_weights(folder / "unet", "the U-Net")),
               "vae": read_header(component_weights(folder / "vae", "the VAE"))}
    return Detected(name, folder, "folder", fam, pred, unet["in_channels"] == 9, unet, None, vae, (0, 0),
                    tuple(text), sched, headers)


def detect(name: str, path: Path, prediction: str = "auto") -> Detected:
    """A checkpoint file or a diffusers folder, detected (raises CheckpointFormatError / WeightsError)."""
    if path.is_dir():
        return detect_folder(name, path, prediction)
    return detect_file(name, path, prediction)


__all__ = ["CheckpointFormatError", "Detected", "Family", "TextPart", "TextSpec", "WeightsError", "detect",
           "detect_file", "detect_folder", "family", "scheduler_config", "unet_config", "vae_config"]


# -- components (ComfyUI's diffusion_models/, vae/, text_encoders/ folders) ----------------------------------


@dataclass(frozen=True)
class Component:
    """One model of a checkpoint stored on its own: a U-Net, a VAE or text encoders (see :func:`detect_unet`)."""

    name: str
    path: Path
    family: Family
    config: Mapping[str, Any]
    header: Header | None
    prefix: str = ""
    layout: Any = None  # the original-layout map's shape (UNetLayout / (levels, resnets)); None: diffusers names
    prediction: str = "eps"
    text: tuple[TextPart, ...] = ()
    key: tuple = ()  # the loader literals it was resolved for

    @property
    def scheduler(self) -> dict[str, Any]:
        name = self.family.scheduler if self.family.name != "sd2" else ("sd2-v" if self.prediction == "v" else
                                                                          "sd2-eps")
        config = scheduler_config(name)
        config["prediction_type"] = "v_prediction" if self.prediction == "v" else "epsilon"
        return config


def _renamed(header: Header, rename) -> Header:
    """A header whose names went through ``rename`` (diffusers names -> original names), for shape inference."""
    tensors = {}
    for key, info in header.tensors.items():
        new = rename(key)
        if new is not None:
            tensors[new] = info
    return Header(tensors, header.metadata, header.files)


def _diffusers_unet_layout(header: Header) -> UNetLayout:
    levels = count(header, "down_blocks")
    if levels == 0:
        raise CheckpointFormatError(f"a U-Net of an unknown layout; known: {KNOWN}")
    attention = tuple(header.has_prefix(f"down_blocks.{i}.attentions.") for i in range(levels))
    return UNetLayout(attention, count(header, "down_blocks.0.resnets"),
                      time_cond=header.shape("add_embedding.linear_1.weight") is not None)


def detect_unet(name: str, path: Path, family_name: str = "auto", prediction: str = "auto") -> Component:
    """A U-Net alone: a diffusers ``unet`` folder, an original-layout file (``model.diffusion_model.`` prefix or
    none) or a diffusers-named file."""
    from .keymaps import unet_map

    prefix = ""
    if path.is_dir():
        header = read_header(component_weights(path, f"{name!r}"))
        config = plain_config(read_json(path / "config.json", f"{name!r}: config.json"), "unet")
        layout = None
    else:
        header = read_header(path)
        prefix = UNET_PREFIX if header.has_prefix(UNET_PREFIX) else ""
        if header.shape(prefix + "input_blocks.0.0.weight") is not None:
            config, layout = unet_config(header, prefix)
        elif header.shape("conv_in.weight") is not None and header.has_prefix("down_blocks."):
            diff_layout = _diffusers_unet_layout(header)
            config, _ = unet_config(_renamed(header, unet_map(diff_layout).rename_back), "")
            layout = None
        else:
            raise CheckpointFormatError(f"{name!r} is not a U-Net of a known layout ({_guess_other(header)}); "
                                        f"known: {KNOWN}")
        if config.get("addition_embed_type") == "text_time":
            config["addition_time_embed_dim"] = 256  # sgm's size/crop embedding width (not in any tensor shape)
    fam = family(family_name) if family_name != "auto" else unet_family(name, config, None)
    if not path.is_dir():
        fam.unet_conventions(config)
    pred = prediction if prediction in ("eps", "v") else ("v" if fam.name == "sd2" else "eps")
    return Component(name, path, fam, config, header, prefix, layout, pred)


def _strip_header(header: Header, prefix: str) -> Header:
    if not prefix:
        return header
    return Header({k[len(prefix):]: v for k, v in header.tensors.items() if k.startswith(prefix)}, header.metadata,
                  header.files)


def detect_vae(name: str, path: Path, family_name: str = "auto") -> Component:
    """A VAE alone: a diffusers folder, or a file in the original (``first_stage_model.`` or no prefix) or
    diffusers layout. The file does not say its family (SD1.x/2.x and SDXL VAEs share the architecture): ``auto``
    reads a folder's scaling factor, and for a file takes SDXL when its name says "xl", else SD1.x."""
    from .keymaps import vae_map

    if family_name == "auto" and not path.is_dir():
        family_name = "sdxl" if "xl" in path.name.lower() else "sd1"
    if path.is_dir():
        config = plain_config(read_json(path / "config.json", f"{name!r}: config.json"), "vae")
        if family_name == "auto":
            family_name = "sdxl" if abs(float(config.get("scaling_factor", 0.18215)) - 0.13025) < 1e-6 else "sd1"
        fam = family(family_name)
        config.setdefault("scaling_factor", fam.vae_scale)
        return Component(name, path, fam, config, read_header(component_weights(path, f"{name!r}")))
    fam = family(family_name)
    header = read_header(path)
    prefix = VAE_PREFIX if header.has_prefix(VAE_PREFIX) else ""
    view = _strip_header(header, prefix)
    if view.has_prefix("encoder.down."):
        config, shape = vae_config(view, "", fam.vae_scale)
        return Component(name, path, fam, config, header, prefix, shape)
    if view.has_prefix("encoder.down_blocks."):
        levels, per = count(view, "encoder.down_blocks"), count(view, "encoder.down_blocks.0.resnets")
        config, _ = vae_config(_renamed(view, vae_map(levels, per).rename_back), "", fam.vae_scale)
        return Component(name, path, fam, config, header, prefix)
    raise CheckpointFormatError(f"{name!r} is not a VAE of a known layout (encoder.down.* or encoder.down_blocks.*)")


def detect_text(names: list[str], paths: list[Path], family_name: str) -> Component:
    """Text encoders alone, one file per tower of the family (SDXL: CLIP-L, then OpenCLIP bigG), each in
    transformers' names (``text_model.*``) or OpenCLIP's (``transformer.resblocks.*``)."""
    fam = family(family_name)
    if len(paths) != len(fam.text):
        raise CheckpointFormatError(f"{fam.title} has {len(fam.text)} text encoder(s); {len(paths)} given")
    parts = []
    for name, path, spec in zip(names, paths, fam.text):
        header = read_header(path)
        openclip = header.has_prefix("transformer.resblocks.")
        hf = header.has_prefix("text_model.") or header.has_prefix("encoder.layers.")
        if not (openclip or hf):
            raise CheckpointFormatError(f"{name!r} is not a CLIP text encoder (text_model.* or "
                                        "transformer.resblocks.* tensors)")
        view = header
        if hf and not header.has_prefix("text_model."):  # transformers 5's own CLIPTextModel names
            view = Header({f"text_model.{k}" if not k.startswith("text_projection") else k: v
                           for k, v in header.tensors.items()}, header.metadata, header.files)
        from dataclasses import replace

        spec = replace(spec, layout="openclip" if openclip else "clip", drop_last=spec.drop_last and openclip)
        parts.append(TextPart(spec, text_config(view, "", spec), "", header))
    return Component(names[0], paths[0], fam, {}, None, text=tuple(parts))
