"""ControlNets for the checkpoints users already have: SD1.x / SD2.x / SDXL, diffusers folders and single files.

Three layouts are read, all without loading a weight until the node runs:

* a diffusers folder: ``config.json`` (``_class_name`` ``ControlNetModel``) + ``diffusion_pytorch_model.safetensors``
  (or its fp16 / sharded variants); the config is taken as it is;
* a single file in the original (ldm) layout — ``input_blocks.*``, ``middle_block.*``, ``zero_convs.*``,
  ``middle_block_out.*``, ``input_hint_block.*``, with or without a ``control_model.`` prefix (the v1.0 files put the
  whole SD model beside it; only ``control_model.*`` is read) — renamed through the U-Net key map
  (:func:`.keymaps.unet_map` with ``controlnet=True``);
* a single file in diffusers' names (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.*``): the weights of
  a diffusers folder without its config.

A single file's ``ControlNetModel`` config is inferred from the shapes, in diffusers' names (an ldm file's names are
converted first, so there is one inference): channels per level, resnets per level, which levels attend and how
deep, cross-attention width, linear or convolutional projections, the added embedding, the hint embedding's input
channels and widths (``conditioning_embedding_out_channels``). The family follows from the cross-attention width and
the added embedding (768 -> SD1.x, 1024 -> SD2.x, 2048 with a size/crop embedding -> SDXL); what shapes do not say
is the family's convention (``data/families.json``: SD1.x 8 heads, SD2.x / SDXL 64-wide heads, SD2.x upcast
attention; GroupNorm 32; SDXL's size/crop ids embedded 256 wide, sgm's ``ConcatTimestepEmbedderND``).

The handle (:class:`CheckpointControlNet`) gives :class:`nodes.adapters.Controlled` the interface it drives: the
control image at pixel size (``hint_factor`` 8: diffusers' ControlNet embeds the image inside its forward, so
``embed_hint`` passes the image through and the result is the pipeline's exactly), the residuals as ``{"down":
[...], "mid": tensor}``, and :meth:`CheckpointControlNet.check_fits`, which refuses a ControlNet made for another
U-Net naming both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .families import (CheckpointFormatError, Family, component_weights, count, indices, plain_config, read_json,
                       unet_family)
from .header import Header, load_tensors, read_header, refuse_pickle
from .keymaps import UNetLayout, unet_map
from .load import assign, converted, diffusers

KNOWN = "ControlNets for SD1.x, SD2.x and SDXL (a diffusers ControlNetModel folder, or one .safetensors file in " \
        "the original or diffusers layout)"
LDM_PREFIX = "control_model."
SDXL_TIME_EMBED = 256  # the width each SDXL size/crop id is embedded at (sgm's ConcatTimestepEmbedderND)
CONFIG_KEYS = ("in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
               "mid_block_type", "only_cross_attention", "block_out_channels", "layers_per_block",
               "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
               "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
               "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
               "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
               "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
               "controlnet_conditioning_channel_order", "conditioning_embedding_out_channels",
               "global_pool_conditions")
FITS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "addition_embed_type",
        "projection_class_embeddings_input_dim", "addition_time_embed_dim")  # what the residuals and inputs must share


@dataclass(frozen=True)
class ControlNetDetected:
    """A ControlNet's family and ``ControlNetModel`` config, as validation sees it (no weights loaded)."""

    name: str
    path: Path
    source: str  # "folder" or "file"
    family: Family
    config: Mapping[str, Any]
    header: Header
    layout: UNetLayout | None = None  # an ldm-layout file: the key map's layout; None: diffusers names
    prefix: str = ""  # an ldm-layout file: "control_model." or ""

    @property
    def space(self) -> str:
        return self.family.space


def family_of(name: str, config: Mapping[str, Any]) -> Family:
    """The SD family a ``ControlNetModel`` config is for (as a U-Net's: cross-attention width, added embedding)."""
    if config.get("class_embed_type") is not None:
        raise CheckpointFormatError(f"{name!r} is a ControlNet with a class embedding, of no known family")
    return unet_family(name, config)


# -- detection -----------------------------------------------------------------------------------------------


def resolve_controlnet(name: str, path: Path) -> ControlNetDetected:
    """A ControlNet folder or file, detected from its config or header (raises CheckpointFormatError /
    WeightsError, naming ``name``)."""
    path = Path(path)
    if path.is_dir():
        return _detect_folder(name, path)
    refuse_pickle(path)
    header = read_header(path)
    if header.has_prefix("controlnet_cond_embedding.") and header.has_prefix("controlnet_down_blocks."):
        config = config_from_shapes(name, header)
        return ControlNetDetected(name, path, "file", _with_conventions(name, config), config, header)
    prefix = LDM_PREFIX if header.has_prefix(LDM_PREFIX + "input_hint_block.") else ""
    if not (header.has_prefix(prefix + "input_hint_block.") and header.has_prefix(prefix + "zero_convs.")):
        raise CheckpointFormatError(f"{name!r} is not a ControlNet of a known layout ({_guess_other(header)}); "
                                    f"known: {KNOWN}")
    layout = ldm_layout(name, header, prefix)
    renamed, unmatched = unet_map(layout, controlnet=True).to_ours(
        {k[len(prefix):]: v for k, v in header.tensors.items() if k.startswith(prefix)})
    if unmatched:
        raise CheckpointFormatError(f"{name!r} has {len(unmatched)} ControlNet tensors of an unknown layout "
                                    f"({', '.join(_printable(unmatched[:3]))}); known: {KNOWN}")
    config = config_from_shapes(name, Header(renamed, {}, header.files))
    return ControlNetDetected(name, path, "file", _with_conventions(name, config), config, header, layout, prefix)


def _detect_folder(name: str, folder: Path) -> ControlNetDetected:
    if not (folder / "config.json").is_file():
        raise CheckpointFormatError(f"{name!r} is a folder without config.json; known: {KNOWN}")
    data = read_json(folder / "config.json", f"{name!r}: the ControlNet config")
    kind = data.get("_class_name")
    if kind != "ControlNetModel":
        if "model_type" in data:
            raise CheckpointFormatError(f"{name!r} is one of this package's own ControlNets: load it with "
                                        "model.load_controlnet")
        what = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) < 64 else "another model"
        raise CheckpointFormatError(f"{name!r} holds {what}, not a ControlNetModel; known: {KNOWN}")
    config = {k: v for k, v in plain_config(data, "unet").items() if k in CONFIG_KEYS}
    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        if key not in config:
            raise CheckpointFormatError(f"{name!r}: config.json lacks {key}; known: {KNOWN}")
    header = read_header(component_weights(folder, f"{name!r}"))
    return ControlNetDetected(name, folder, "folder", family_of(name, config), config, header)


def _with_conventions(name: str, config: dict[str, Any]) -> Family:
    """The family of an inferred config, with the family's conventions written into it."""
    fam = family_of(name, config)
    fam.unet_conventions(config, sample_size=False)
    if fam.time_ids:
        width = config["projection_class_embeddings_input_dim"]
        if width <= fam.time_ids * SDXL_TIME_EMBED:
            raise CheckpointFormatError(f"{name!r}: the added embedding ({width} wide) does not hold a pooled vector "
                                        f"and {fam.time_ids} size/crop ids of {SDXL_TIME_EMBED}")
        config["addition_time_embed_dim"] = SDXL_TIME_EMBED
    return fam


def ldm_layout(name: str, header: Header, p: str) -> UNetLayout:
    """What the ldm key map needs, from the ``input_blocks`` names: a ``.0.op`` block starts the next level, a
    ``.1`` module in a block is its attention."""
    levels: list[list[bool]] = [[]]
    for k in indices(header, p + "input_blocks"):
        if k == 0:
            continue
        if header.has_prefix(f"{p}input_blocks.{k}.0.op."):
            levels.append([])
        else:
            levels[-1].append(header.has_prefix(f"{p}input_blocks.{k}.1."))
    per = {len(lv) for lv in levels}
    if len(per) != 1 or 0 in per or any(len(set(lv)) != 1 for lv in levels):
        raise CheckpointFormatError(f"{name!r}: ControlNet levels differ in resnets or attention; known: {KNOWN}")
    return UNetLayout(attention=tuple(lv[0] for lv in levels), layers_per_block=per.pop(),
                      mid_attention=header.has_prefix(p + "middle_block.2."),
                      time_cond=header.has_prefix(p + "label_emb."))


def config_from_shapes(name: str, header: Header) -> dict[str, Any]:
    """A ``ControlNetModel`` config (without the family's conventions) from diffusers-named shapes."""

    def shape(key: str) -> tuple[int, ...]:
        found = header.shape(key)
        if found is None:
            raise CheckpointFormatError(f"{name!r}: ControlNet tensor {key!r} is missing (an unknown or damaged "
                                        f"layout); known: {KNOWN}")
        return found

    levels = indices(header, "down_blocks")
    per = count(header, "down_blocks.0.resnets")
    if not levels or per == 0 or levels != list(range(len(levels))):
        raise CheckpointFormatError(f"{name!r}: no ControlNet down blocks; known: {KNOWN}")
    channels, depths = [], []
    for i in levels:
        channels.append(shape(f"down_blocks.{i}.resnets.{per - 1}.conv2.weight")[0])
        depth = {count(header, f"down_blocks.{i}.attentions.{j}.transformer_blocks") for j in range(per)}
        if len(depth) != 1:
            raise CheckpointFormatError(f"{name!r}: ControlNet level {i} attends in some blocks only or at "
                                        "different depths; not a known layout")
        depths.append(depth.pop())
    if not header.has_prefix("mid_block.attentions.0."):
        raise CheckpointFormatError(f"{name!r}: ControlNet without a middle attention block; known: {KNOWN}")
    attn = next((n for n in header.tensors if n.endswith("attn2.to_k.weight")), None)
    proj = next((n for n in header.tensors if n.endswith(".proj_in.weight")), None)
    if attn is None or proj is None:
        raise CheckpointFormatError(f"{name!r}: ControlNet without cross-attention; known: {KNOWN}")
    if shape("time_embedding.linear_1.weight")[0] != 4 * channels[0]:
        raise CheckpointFormatError(f"{name!r}: ControlNet time embedding of a width other than 4 x "
                                    f"{channels[0]}; not a known layout")
    hint = [shape("controlnet_cond_embedding.conv_in.weight")[0]]
    blocks = count(header, "controlnet_cond_embedding.blocks")
    hint += [shape(f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight")[0] for i in range(blocks // 2)]
    config: dict[str, Any] = {
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape("controlnet_cond_embedding.conv_in.weight")[1],
        "conditioning_embedding_out_channels": hint,
        "block_out_channels": channels,
        "layers_per_block": per,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "transformer_layers_per_block": [d or 1 for d in depths],
        "cross_attention_dim": shape(attn)[1],
        "use_linear_projection": len(shape(proj)) == 2,
        "norm_num_groups": 32,
    }
    added = header.shape("add_embedding.linear_1.weight")
    if added is not None:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=added[1])
    return config


def _printable(keys: list[str]) -> list[str]:
    return [k if len(k) < 100 and k.isprintable() else "(unprintable)" for k in keys]


def _guess_other(header: Header) -> str:
    if header.has_prefix("model.diffusion_model."):
        return "it looks like a whole checkpoint: load it with checkpoint.load from checkpoints/"
    if any(".lora_" in n or "lora_unet_" in n for n in list(header.tensors)[:50]):
        return "it looks like a LoRA (a control-LoRA is not supported)"
    return "no input_hint_block / controlnet_cond_embedding tensors"


# -- loading -------------------------------------------------------------------------------------------------


def load_controlnet(det: ControlNetDetected, dtype: torch.dtype | None = None) -> "CheckpointControlNet":
    """Build diffusers' ``ControlNetModel`` on the meta device and assign the checkpoint's weights (cast to
    ``dtype``); raises LoadError / WeightsError."""
    d = diffusers()
    with torch.device("meta"):
        model = d.ControlNetModel.from_config(dict(det.config))
    if det.layout is None:
        state = load_tensors(det.header, dtype=dtype)
    else:
        raw = load_tensors(det.header, det.header.names(det.prefix), dtype)
        raw = {k[len(det.prefix):]: v for k, v in raw.items()}
        state = converted(raw, unet_map(det.layout, controlnet=True), "ControlNet")
    return CheckpointControlNet(assign(model, state, "ControlNet"), det.family)


@dataclass(frozen=True)
class ControlNetInfo:
    """What :class:`nodes.adapters.Controlled` reads from ``controlnet.config``."""

    hint_channels: int  # the control image's channels
    hint_factor: int  # control image pixels per latent pixel (the VAE factor)
    space: str
    family: str


class CheckpointControlNet(nn.Module):
    """A diffusers ``ControlNetModel`` with the interface :class:`nodes.adapters.Controlled` drives (module
    docstring): ``forward(x_in, t, hint_embedding, context, added) -> {"down": [...], "mid": tensor}``."""

    takes_pooled = False  # SDXL's pooled vector reaches the ControlNet inside ``added``, as it reaches the U-Net

    def __init__(self, net: nn.Module, fam: Family):
        super().__init__()
        self.net, self.family = net, fam
        cfg = net.config
        self.config = ControlNetInfo(int(cfg.conditioning_channels),
                                     2 ** (len(cfg.conditioning_embedding_out_channels) - 1), fam.space, fam.name)

    def embed_hint(self, image: Tensor) -> Tensor:
        """The control image itself, (B, C, H, W) in [0, 1]: the ControlNet embeds it in :meth:`forward`."""
        return image

    def forward(self, x_in: Tensor, t: Tensor, hint_embedding: Tensor, context: Tensor | None = None,
                added: Mapping[str, Tensor] | None = None, concat: Tensor | None = None,
                **ignored: Any) -> dict[str, Any]:
        dtype = self.net.dtype
        sample = x_in.to(dtype)  # (N, 4, h, w)
        if concat is not None and self.net.config.in_channels == sample.shape[1] + concat.shape[1]:
            sample = torch.cat([sample, concat.to(sample)], dim=1)  # an inpainting ControlNet takes the mask too
        added = None if added is None else {k: v.to(dtype) for k, v in added.items()}  # SDXL: pooled, size ids
        down, mid = self.net(sample, t, encoder_hidden_states=context.to(dtype),
                             controlnet_cond=hint_embedding.to(dtype), added_cond_kwargs=added, return_dict=False)
        return {"down": list(down), "mid": mid}

    def check_fits(self, unet: nn.Module) -> None:
        """Refuse a U-Net whose skips this ControlNet's residuals do not fit, naming both families."""
        mine = self.net.config
        if not hasattr(getattr(unet, "config", None), "cross_attention_dim") or not hasattr(unet, "down_blocks"):
            raise ValueError(f"this {self.family.title} ControlNet controls a checkpoint's U-Net (checkpoint.load), "
                             f"not a {type(unet).__name__}")
        theirs = unet.config
        wrong = [f"{k} {_show(mine.get(k))} != {_show(theirs.get(k))}" for k in FITS
                 if _show(mine.get(k)) != _show(theirs.get(k))]
        if mine.in_channels not in (theirs.in_channels, theirs.out_channels):
            wrong.append(f"in_channels {mine.in_channels} != {theirs.in_channels}")
        if wrong:
            try:
                other = family_of("U-Net", theirs).title
            except CheckpointFormatError:
                other = "of an unknown family"
            raise ValueError(f"this ControlNet is for {self.family.title} but the U-Net is {other}: {'; '.join(wrong)}")


def _show(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


__all__ = ["CheckpointControlNet", "ControlNetDetected", "ControlNetInfo", "config_from_shapes", "family_of",
           "ldm_layout", "load_controlnet", "resolve_controlnet"]
