"""LoRA files for the Stable Diffusion family: parse them against a loaded model, merge them into its weights.

The models are diffusers' ``UNet2DConditionModel`` (component ``"unet"``) and transformers'
``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (``"text_encoder"``, SDXL's second ``"text_encoder_2"``).
A LoRA is a list of :class:`LoraPatch`: one low-rank update ``up @ down`` (scaled by ``alpha / rank``) for one
module, named by its dotted path inside its component in the model's own naming.

Public API::

    LoraError(ValueError)
    LoraPatch(component, module, down, up, alpha=None)    .rank, .scale, .weight_name
    module_names(params) -> dict[str, set[str]]
    parse_lora(state, modules, unet_to_original=None) -> list[LoraPatch]
    merged_weights(patches, params, strength_model, strength_text) -> dict[str, Tensor]
    lora_family(names_and_shapes) -> "sd1" | "sd2" | "sdxl" | None

Styles read (the module path sits before the suffix):

* Kohya / A1111: ``lora_unet_<path>``, ``lora_te_<path>`` (SD1/SD2's one text encoder), ``lora_te1_`` /
  ``lora_te2_`` (SDXL's two), each with ``.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha``.
  LoCon's convolution LoRAs (a 4-D ``lora_down``) are plain LoRAs and are read too.
* diffusers / PEFT: ``unet.<module>``, ``text_encoder.<module>``, ``text_encoder_2.<module>`` (no prefix: the
  U-Net, as in early diffusers files) with ``.lora_A.weight`` / ``.lora_B.weight``, ``.lora.down.weight`` /
  ``.lora.up.weight`` or ``.lora_linear_layer.down.weight`` / ``.up.weight``, an optional ``<module>.alpha``, and
  the older attention-processor names (``attn1.processor.to_q_lora.down.weight`` -> ``attn1.to_q``;
  ``self_attn.to_out_lora`` -> ``self_attn.out_proj``).
* Refused, naming the style: LoHa (``hada_*``), LoKr (``lokr_*``), LoCon's Tucker ``lora_mid``, DoRA
  (``dora_scale``, ``lora_magnitude_vector``), OFT / BOFT and full-weight differences (``diff``). Their updates
  are not ``up @ down`` and merging them as if they were would be silently wrong.

Resolution. A Kohya name is a module path with every "." written "_", which cannot be undone by string rules
(``transformer_blocks`` holds an underscore of its own). So :func:`parse_lora` receives the real module names of
the target (``{component: names}``) and looks each name up in tables of the spellings a file may use for each
module, flattened for Kohya keys: the module's own name; for a text encoder also the name with the
``text_model.`` level added or removed (files always write ``text_model.encoder...``; transformers 5 flattened
``CLIPTextModel`` to ``encoder...`` but not ``CLIPTextModelWithProjection``); for the U-Net, given
``unet_to_original`` (a diffusers -> original module-path function, normally ``unet_map(layout).rename_back``),
also its original sgm name, which SDXL Kohya files use (``input_blocks_4_1_...``, ``middle_block_1_...``,
``output_blocks_...``; SD1/SD2 Kohya files name U-Net modules the diffusers way). A patch's ``module`` is always
the target's own name. A key that resolves to no module is an error that counts and quotes such keys (a LoRA for
another model shows this way); nothing is dropped silently. No alpha means alpha = rank (scale 1).

Merging. :func:`merged_weights` returns, for every patched module, ``W + strength * alpha / rank * up @ down``
computed in float32 and cast back to ``W``'s dtype; ``strength_model`` scales the U-Net's patches,
``strength_text`` both text encoders'. Patches of one module add up, so stacking LoRAs (merging B into the
result of merging A) equals adding both deltas to W. A module whose patches all have strength 0 comes back as
``W`` itself (bitwise unchanged). An update whose shape does not fit ``W`` is an error naming the module and both
shapes.

Family. :func:`lora_family` guesses the base family from names and shapes alone (a safetensors header), so a
graph can be refused before anything loads: SDXL by its second text encoder or sgm U-Net names, otherwise by
the input width of the cross-attention key/value projections (768 SD1, 1024 SD2, 2048 SDXL), and for a LoRA of
the text encoder alone by its width (768 SD1, 1024 SD2). Contradicting evidence gives None, as does none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                  ("lora_te2_", "text_encoder_2"))
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
              (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
              (".lora_linear_layer.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"),
              (".alpha", "alpha"))
# Older diffusers files name a projection inside the attention processor; per component: processor name -> ours.
PROCESSOR_NAMES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}
# (pattern of a key's parameter part, style): LyCORIS and other adapters whose update is not up @ down.
REFUSED = ((r"\.hada_", "LoHa"), (r"\.lokr_", "LoKr"), (r"\.lora_mid\.", "LoCon with a Tucker 'lora_mid'"),
           (r"\.dora_scale$", "DoRA"), (r"\.lora_magnitude_vector", "DoRA"), (r"\.b?oft_", "OFT / BOFT"),
           (r"\.diff(_b)?$", "full-weight difference"))
SDXL_UNET_NAMES = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
TEXT_Q = re.compile(r"self_attn[._]q_proj$")
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_FAMILY = {768: "sd1", 1024: "sd2"}
EXAMPLES = 5  # keys quoted in an error


class LoraError(ValueError):
    """A LoRA that does not fit the model: unknown keys, a refused style, incomplete pairs, wrong shapes."""


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One module's low-rank update: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), alpha (None = rank)."""

    component: str
    module: str
    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def weight_name(self) -> str:
        return f"{self.component}.{self.module}.weight"


def module_names(params: Iterable[str]) -> dict[str, set[str]]:
    """``{component: module paths}`` of the weights in ``"<component>.<module>.weight"`` names (the shape
    :func:`merged_weights` takes), ready for :func:`parse_lora`."""
    out: dict[str, set[str]] = {}
    for name in params:
        component, _, rest = name.partition(".")
        if rest.endswith(".weight"):
            out.setdefault(component, set()).add(rest[: -len(".weight")])
    return out


# -- reading keys --------------------------------------------------------------------------------------------


def _split(key: str) -> tuple[str, str, bool, str] | None:
    """``key`` -> (component, module name as written, whether Kohya-flattened, "down" / "up" / "alpha")."""
    for prefix, component in KOHYA_PREFIXES:
        if key.startswith(prefix):
            name, _, part = key[len(prefix):].partition(".")
            kind = KOHYA_PARTS.get(part)
            return None if kind is None or not name else (component, name, True, kind)
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        component, rest = "unet", key
    for suffix, kind in PEFT_PARTS:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return component, _processor_name(component, rest[: -len(suffix)]), False, kind
    return None


def _processor_name(component: str, name: str) -> str:
    """``...attn1.processor.to_q_lora`` -> ``...attn1.to_q`` (older diffusers files); other names as they are."""
    head, _, last = name.rpartition(".")
    table = PROCESSOR_NAMES["unet" if component == "unet" else "text"]
    if last not in table:
        return name
    head = head.removesuffix(".processor")
    return f"{head}.{table[last]}" if head else table[last]


def _refuse_styles(keys: Iterable[str]) -> None:
    for key in keys:
        for pattern, style in REFUSED:
            if re.search(pattern, key):
                raise LoraError(f"{style} LoRA files are not supported (key {key!r}); only plain LoRA / LoCon "
                                "(lora_down / lora_up, lora_A / lora_B) can be merged")


def _spellings(component: str, name: str, unet_to_original: Callable[[str], str | None] | None) -> list[str]:
    """The dotted names a LoRA may use for a module: its own; for a text encoder the same with or without the
    ``text_model.`` level (transformers 5 flattened ``CLIPTextModel``, files keep it); for the U-Net its original
    (sgm) name."""
    if component != "unet":
        return [name, name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"]
    original = unet_to_original(name) if unet_to_original is not None and name else None
    return [name, original] if original else [name]


def _tables(modules: Mapping[str, Iterable[str]], unet_to_original: Callable[[str], str | None] | None
            ) -> dict[tuple[str, bool], dict[str, str | None]]:
    """``(component, flattened)`` -> spelling -> module name; None marks a spelling two modules share."""
    tables: dict[tuple[str, bool], dict[str, str | None]] = {}
    for component, names in modules.items():
        dotted, flat = tables.setdefault((component, False), {}), tables.setdefault((component, True), {})
        for name in names:
            for spelling in _spellings(component, name, unet_to_original):
                for table, key in ((dotted, spelling), (flat, spelling.replace(".", "_"))):
                    table[key] = name if table.get(key, name) == name else None
    return tables


def _examples(keys: list[str]) -> str:
    more = f", ... ({len(keys) - EXAMPLES} more)" if len(keys) > EXAMPLES else ""
    return ", ".join(repr(k) for k in sorted(keys)[:EXAMPLES]) + more


def parse_lora(state: Mapping[str, Tensor], modules: Mapping[str, Iterable[str]],
               unet_to_original: Callable[[str], str | None] | None = None) -> list[LoraPatch]:
    """The patches of a LoRA state dict, each resolved to a module of the target (see the module docstring).

    ``modules``: ``{component: module paths}`` of the target, e.g. ``{"unet": set(dict(unet.named_modules())),
    "text_encoder": ...}`` or :func:`module_names` of its weights. ``unet_to_original``: a diffusers -> original
    U-Net module-path function (``unet_map(layout).rename_back``) for SDXL Kohya files' sgm names.
    """
    _refuse_styles(state)
    tables = _tables(modules, unet_to_original)
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        parsed = _split(key)
        if parsed is None:
            unmatched.append(key)
            continue
        component, name, flat, kind = parsed
        module = tables.get((component, flat), {}).get(name, "")
        if module is None:
            raise LoraError(f"LoRA key {key!r} could name more than one {component} module")
        if not module:
            unmatched.append(key)
            continue
        group = groups.setdefault((component, module), {})
        if kind in group:
            raise LoraError(f"LoRA keys {group[kind][0]!r} and {key!r} both patch {component}.{module}")
        group[kind] = (key, value)
    if unmatched:
        raise LoraError(f"{len(unmatched)} LoRA keys match nothing in this model, e.g. {_examples(unmatched)}")
    return [_patch(component, module, group) for (component, module), group in groups.items()]


def _patch(component: str, module: str, group: Mapping[str, tuple[str, Tensor]]) -> LoraPatch:
    missing = [kind for kind in ("down", "up") if kind not in group]
    if missing:
        keys = [key for key, _ in group.values()]
        raise LoraError(f"LoRA for {component}.{module} has no {' / '.join(missing)} weight (keys {_examples(keys)})")
    (down_key, down), (up_key, up) = group["down"], group["up"]
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.flatten(1).shape[1] != down.shape[0]:
        raise LoraError(f"LoRA for {component}.{module}: {down_key!r} {tuple(down.shape)} and {up_key!r} "
                        f"{tuple(up.shape)} are not a rank-r pair")
    alpha = float(group["alpha"][1]) if "alpha" in group else None
    return LoraPatch(component, module, down, up, alpha)


# -- merging -------------------------------------------------------------------------------------------------


def _fits(patch: LoraPatch, weight: Tensor) -> bool:
    """``up @ down`` reshapes to ``weight``: same rows, same input numel, same kernel (1x1 reads as linear)."""
    down, up = patch.down, patch.up
    if weight.dim() not in (2, 4) or up.shape[0] != weight.shape[0] or down.flatten(1).shape[1] != weight[0].numel():
        return False
    if any(s != 1 for s in up.shape[2:]):
        return False
    if down.dim() == 4 and weight.dim() == 4:
        return down.shape[2:] == weight.shape[2:]
    return all(s == 1 for s in (*down.shape[2:], *weight.shape[2:]))


def _delta(patch: LoraPatch, weight: Tensor) -> Tensor:
    """``alpha / rank * up @ down`` in float32, in ``weight``'s shape and on its device."""
    up = patch.up.to(weight.device, torch.float32).flatten(1)  # (out, r)
    down = patch.down.to(weight.device, torch.float32).flatten(1)  # (r, in * kh * kw)
    return (up @ down).reshape(weight.shape) * patch.scale


def merged_weights(patches: Iterable[LoraPatch], params: Mapping[str, Tensor], strength_model: float,
                   strength_text: float) -> dict[str, Tensor]:
    """``{"<component>.<module>.weight": W + strength * delta}`` for every patched module (see the module
    docstring); ``params`` holds the current weights under the same names."""
    strengths = {"unet": strength_model, "text_encoder": strength_text, "text_encoder_2": strength_text}
    out: dict[str, Tensor] = {}
    deltas: dict[str, Tensor] = {}
    for patch in patches:
        name = patch.weight_name
        weight = params.get(name)
        if weight is None:
            raise LoraError(f"LoRA patches {name}, which this model does not have")
        if not _fits(patch, weight):
            raise LoraError(f"LoRA for {patch.component}.{patch.module} does not fit: the model's weight is "
                            f"{tuple(weight.shape)}, the LoRA's up x down is {tuple(patch.up.shape)} x "
                            f"{tuple(patch.down.shape)} (a LoRA for another model?)")
        out[name] = weight
        strength = strengths[patch.component]
        if strength != 0:
            delta = strength * _delta(patch, weight)
            deltas[name] = deltas[name] + delta if name in deltas else delta
    for name, delta in deltas.items():
        out[name] = (out[name].float() + delta).to(out[name].dtype)
    return out


# -- family --------------------------------------------------------------------------------------------------


def lora_family(names_and_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The base family ("sd1", "sd2", "sdxl") from tensor names and shapes alone; None when they do not tell or
    contradict each other (see the module docstring)."""
    votes: set[str] = set()
    text: set[str] = set()
    for key, shape in names_and_shapes.items():
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or SDXL_UNET_NAMES.match(key):
            votes.add("sdxl")
        parsed = _split(key)
        if parsed is None or parsed[3] != "down" or len(shape) < 2:
            continue
        component, name = parsed[0], parsed[1]
        if component == "unet" and CROSS_KV.search(name) and shape[1] in CONTEXT_FAMILY:
            votes.add(CONTEXT_FAMILY[shape[1]])
        elif component == "text_encoder" and TEXT_Q.search(name) and shape[1] in TEXT_FAMILY:
            text.add(TEXT_FAMILY[shape[1]])
    guess = votes or text
    return next(iter(guess)) if len(guess) == 1 else None
