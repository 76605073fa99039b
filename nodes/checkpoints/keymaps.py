"""Key maps between the original (ldm / sgm / OpenCLIP) layout of single-file checkpoints and the layout of the
reference classes (diffusers' ``UNet2DConditionModel``, ``AutoencoderKL``, ``ControlNetModel``; transformers'
``CLIPTextModel``).

A map is data: pairs of *module* prefixes ``(original, ours)`` — the parameter names under a module are the same
on both sides (``weight``, ``bias``) — plus a few whole-tensor rules where the tensors themselves differ (OpenCLIP's
fused ``in_proj`` split into q/k/v, its ``text_projection`` transposed, the VAE's 1x1-conv attention as linear
layers). The maps are generated from the architecture inferred from the tensor shapes (:mod:`.families`), so
they cover pruned and resized variants; a key that no pair covers is reported, never dropped silently. The same
table converts both ways (:meth:`KeyMap.to_ours`, :meth:`KeyMap.to_original`); the tests write original-layout
files through :meth:`KeyMap.to_original` and check that converting back is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorRule:
    """One original tensor that is not a plain rename: ``split`` (fused rows into ``len(ours)`` equal parts),
    ``transpose`` (a matrix stored the other way round) or ``squeeze`` (a 1x1 conv kernel as a linear weight)."""

    original: str
    ours: tuple[str, ...]
    op: str


@dataclass
class KeyMap:
    """Module-prefix pairs plus whole-tensor rules; converts a state dict either way (see the module docstring)."""

    modules: list[tuple[str, str]] = field(default_factory=list)
    tensors: list[TensorRule] = field(default_factory=list)

    def add(self, original: str, ours: str) -> None:
        self.modules.append((original, ours))

    def extend(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.modules.extend(pairs)

    def prefixed(self, original: str, ours: str) -> "KeyMap":
        """This map with ``original`` / ``ours`` put in front of every name (a component inside a bigger file)."""
        join = lambda p, n: f"{p}{n}" if n else p.rstrip(".")  # noqa: E731
        return KeyMap([(join(original, o), join(ours, d)) for o, d in self.modules],
                      [TensorRule(join(original, r.original), tuple(join(ours, d) for d in r.ours), r.op)
                       for r in self.tensors])

    def to_ours(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """``state`` in the original layout -> (state in our layout, original keys no rule covers)."""
        return _convert(state, dict(self.modules), {r.original: r for r in self.tensors}, forward=True)

    def to_original(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """The inverse of :meth:`to_ours` (used to write original-layout files, e.g. in the tests)."""
        by_ours: dict[str, TensorRule] = {}
        for rule in self.tensors:
            for name in rule.ours:
                by_ours[name] = rule
        return _convert(state, {d: o for o, d in self.modules}, by_ours, forward=False)

    def rename(self, name: str) -> str | None:
        """The name in our layout of an original module or parameter path (None when no pair covers it)."""
        return _lookup(name, dict(self.modules))

    def rename_back(self, name: str) -> str | None:
        return _lookup(name, {d: o for o, d in self.modules})


def _lookup(key: str, prefixes: Mapping[str, str]) -> str | None:
    """Longest-prefix rename of a dotted name (the prefix ends at a dot or is the whole name)."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            tail = ".".join(parts[cut:])
            new = prefixes[head]
            return f"{new}.{tail}" if tail and new else (new or tail)
    return None


def _convert(state: Mapping[str, Tensor], prefixes: Mapping[str, str], rules: Mapping[str, TensorRule],
             forward: bool) -> tuple[dict[str, Tensor], list[str]]:
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    pending: dict[TensorRule, dict[str, Tensor]] = {}
    for key, value in state.items():
        rule = rules.get(key)
        if rule is not None:
            if forward:
                out.update(_apply(rule, value))
            else:
                pending.setdefault(rule, {})[key] = value
            continue
        new = _lookup(key, prefixes)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    for rule, parts in pending.items():
        missing = [n for n in rule.ours if n not in parts]
        if missing:
            unmatched.extend(sorted(parts))
            continue
        out[rule.original] = _unapply(rule, [parts[n] for n in rule.ours])
    return out, unmatched


def _apply(rule: TensorRule, value: Tensor) -> dict[str, Tensor]:
    if rule.op == "split":
        return dict(zip(rule.ours, value.chunk(len(rule.ours), dim=0)))
    if rule.op == "transpose":
        return {rule.ours[0]: value.t().contiguous()}
    if rule.op == "squeeze":
        return {rule.ours[0]: value.reshape(value.shape[0], -1) if value.dim() > 2 else value}
    raise ValueError(f"unknown tensor rule {rule.op!r}")


def _unapply(rule: TensorRule, values: list[Tensor]) -> Tensor:
    if rule.op == "split":
        return torch.cat(values, dim=0)
    if rule.op == "transpose":
        return values[0].t().contiguous()
    if rule.op == "squeeze":
        v = values[0]
        return v.reshape(*v.shape, 1, 1) if v.dim() == 2 else v
    raise ValueError(f"unknown tensor rule {rule.op!r}")


# -- U-Net (ldm "model.diffusion_model." layout <-> diffusers UNet2DConditionModel) ---------------------------

RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
          ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _resnet(original: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{original}.{a}", f"{ours}.{b}") for a, b in RESNET]


@dataclass(frozen=True)
class UNetLayout:
    """What a U-Net map needs: per level whether it has attention, the resnets per level, and the extras."""

    attention: tuple[bool, ...]  # per level, down path (the up path mirrors it)
    layers_per_block: int
    mid_attention: bool = True
    time_cond: bool = False  # SDXL's add_embedding (ldm label_emb)

    @classmethod
    def of(cls, config: Any) -> "UNetLayout":
        """The layout of a diffusers ``UNet2DConditionModel`` config (an object or a dict)."""
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
        return cls(attention=tuple(t.startswith("CrossAttn") for t in get("down_block_types")),
                   layers_per_block=int(get("layers_per_block")), time_cond=get("addition_embed_type") == "text_time")


def unet_map(layout: UNetLayout, controlnet: bool = False) -> KeyMap:
    """The U-Net's map (a ControlNet: its encoder half plus the zero convolutions and the hint embedding)."""
    m = KeyMap()
    m.extend([("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
              ("input_blocks.0.0", "conv_in")])
    if layout.time_cond:
        m.extend([("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")])
    levels, per = len(layout.attention), layout.layers_per_block
    k = 1
    for level, attn in enumerate(layout.attention):
        for j in range(per):
            m.extend(_resnet(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}"))
            if attn:
                m.add(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}")
            k += 1
        if level < levels - 1:
            m.add(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            k += 1
    m.extend(_resnet("middle_block.0", "mid_block.resnets.0"))
    if layout.mid_attention:
        m.add("middle_block.1", "mid_block.attentions.0")
        m.extend(_resnet("middle_block.2", "mid_block.resnets.1"))
    else:
        m.extend(_resnet("middle_block.1", "mid_block.resnets.1"))
    if controlnet:
        m.extend([(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}") for i in range(k)])
        m.add("middle_block_out.0", "controlnet_mid_block")
        m.add("input_hint_block.0", "controlnet_cond_embedding.conv_in")
        # ldm's hint block: conv, SiLU, conv, SiLU, ... conv (zero); diffusers names the inner convs blocks.N.
        for i in range(6):
            m.add(f"input_hint_block.{2 * i + 2}", f"controlnet_cond_embedding.blocks.{i}")
        m.add("input_hint_block.14", "controlnet_cond_embedding.conv_out")
        return m
    k = 0
    for up, attn in enumerate(reversed(layout.attention)):
        for j in range(per + 1):
            m.extend(_resnet(f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}"))
            idx = 1
            if attn:
                m.add(f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}")
                idx = 2
            if j == per and up < levels - 1:
                m.add(f"output_blocks.{k}.{idx}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            k += 1
    m.extend([("out.0", "conv_norm_out"), ("out.2", "conv_out")])
    return m


# -- VAE (ldm "first_stage_model." layout <-> diffusers AutoencoderKL) ---------------------------------------

VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("nin_shortcut", "conv_shortcut"))


def vae_map(levels: int, layers_per_block: int) -> KeyMap:
    m = KeyMap()
    for side in ("encoder", "decoder"):
        m.extend([(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.norm_out", f"{side}.conv_norm_out"),
                  (f"{side}.conv_out", f"{side}.conv_out")])
        for i, name in ((1, 0), (2, 1)):
            m.extend((f"{side}.mid.block_{i}.{a}", f"{side}.mid_block.resnets.{name}.{b}") for a, b in VAE_RESNET)
        m.add(f"{side}.mid.attn_1.norm", f"{side}.mid_block.attentions.0.group_norm")
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            m.tensors.append(TensorRule(f"{side}.mid.attn_1.{a}.weight", (f"{side}.mid_block.attentions.0.{b}.weight",),
                                        "squeeze"))
            m.add(f"{side}.mid.attn_1.{a}.bias", f"{side}.mid_block.attentions.0.{b}.bias")
    for i in range(levels):
        for j in range(layers_per_block):
            m.extend((f"encoder.down.{i}.block.{j}.{a}", f"encoder.down_blocks.{i}.resnets.{j}.{b}")
                     for a, b in VAE_RESNET)
        if i < levels - 1:
            m.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        up = levels - 1 - i  # the decoder's ldm levels count from the bottom
        for j in range(layers_per_block + 1):
            m.extend((f"decoder.up.{up}.block.{j}.{a}", f"decoder.up_blocks.{i}.resnets.{j}.{b}")
                     for a, b in VAE_RESNET)
        if i < levels - 1:
            m.add(f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    m.extend([("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")])
    return m


# -- text encoders -------------------------------------------------------------------------------------------


def hf_clip_map() -> KeyMap:
    """A transformers CLIP text model stored under a prefix (SD1.x's ``cond_stage_model.transformer.``,
    SDXL's first encoder): the names are transformers' own."""
    return KeyMap([("text_model", "text_model")], [])


def openclip_map(layers: int, projection: bool) -> KeyMap:
    """OpenCLIP's text tower (SD2.x's ``cond_stage_model.model.``, SDXL's second encoder) as transformers'
    ``CLIPTextModel[WithProjection]``."""
    m = KeyMap()
    m.extend([("token_embedding", "text_model.embeddings.token_embedding"),
              ("ln_final", "text_model.final_layer_norm"),
              ("positional_embedding", "text_model.embeddings.position_embedding.weight")])
    for i in range(layers):
        o, d = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        m.extend([(f"{o}.ln_1", f"{d}.layer_norm1"), (f"{o}.ln_2", f"{d}.layer_norm2"),
                  (f"{o}.attn.out_proj", f"{d}.self_attn.out_proj"), (f"{o}.mlp.c_fc", f"{d}.mlp.fc1"),
                  (f"{o}.mlp.c_proj", f"{d}.mlp.fc2")])
        for part in ("weight", "bias"):
            m.tensors.append(TensorRule(f"{o}.attn.in_proj_{part}",
                                        tuple(f"{d}.self_attn.{p}_proj.{part}" for p in "qkv"), "split"))
    if projection:
        m.tensors.append(TensorRule("text_projection", ("text_projection.weight",), "transpose"))
    return m
