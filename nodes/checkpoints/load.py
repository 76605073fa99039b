"""Building the reference classes from a detected checkpoint (:class:`.families.Detected`).

The reference libraries (diffusers, transformers) are imported here, on first use, with their hub switches off
(``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``DIFFUSERS_OFFLINE``, no telemetry): nothing ever contacts a model
hub; every config comes from the checkpoint (its folder's JSON or the shapes of its file) and the family data.

Each model is built on the ``meta`` device (no random init, no memory), its state dict is read from the
safetensors file(s) — converted from the original layout through :mod:`.keymaps` for a single file — checked
against the model (missing and unexpected keys reported together, without quoting foreign names beyond a few)
and assigned, cast to ``dtype``. Buffers that are not in any state dict (CLIP's ``position_ids``) are rebuilt.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .families import Detected, TextPart
from .header import Header, load_tensors
from .keymaps import KeyMap, hf_clip_map, openclip_map, unet_map, vae_map

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1"}
IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")  # buffers some files carry; no model weight


class LoadError(ValueError):
    """The weights do not fit the model built for them (wrong, missing or extra tensors)."""


def offline() -> None:
    for key, value in OFFLINE.items():
        os.environ[key] = value


def diffusers() -> Any:
    offline()
    import diffusers as d
    return d


def transformers() -> Any:
    offline()
    import transformers as t
    t.utils.logging.set_verbosity_error()
    return t


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _component(header: Header, prefix: str, dtype: torch.dtype | None) -> dict[str, Tensor]:
    return _strip(load_tensors(header, header.names(prefix), dtype), prefix)


def _few(keys: list[str], n: int = 5) -> str:
    shown = [k if len(k) < 100 and k.isprintable() else "(unprintable)" for k in keys[:n]]
    return ", ".join(shown) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def fit_prefix(state: dict[str, Tensor], want: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """Add or drop ``prefix`` on ``state``'s keys to match the model (transformers 5's ``CLIPTextModel`` keeps its
    weights without the ``text_model.`` that files written with transformers 4, and every SD checkpoint, carry)."""
    model_has = any(k.startswith(prefix) for k in want)
    state_has = any(k.startswith(prefix) for k in state)
    if model_has == state_has:
        return state
    if state_has:
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return {k if k in want else prefix + k: v for k, v in state.items()}


def assign(model: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
    """Check ``state`` against a meta-device model and assign it (the model's own keys must all be there)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want and not k.endswith(IGNORED_SUFFIXES)]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape ({_few(wrong)})")
        raise LoadError(f"the {what} weights do not fit its architecture: {'; '.join(parts)}")
    model.load_state_dict({k: state[k] for k in want}, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "position_ids":
                raise LoadError(f"the {what} has a buffer {name!r} that no weights file holds")
            owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval().requires_grad_(False)


def converted(state: dict[str, Tensor], keymap: KeyMap, what: str,
               ignore: tuple[str, ...] = ()) -> dict[str, Tensor]:
    out, unmatched = keymap.to_ours(state)
    unmatched = [k for k in unmatched if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(ignore)]
    if unmatched:
        raise LoadError(f"the {what} has {len(unmatched)} tensors of an unknown layout ({_few(unmatched)})")
    return out


def build_unet(det: Detected, dtype: torch.dtype | None = None) -> nn.Module:
    if det.source == "file":
        return unet_from(det.unet, det.headers["all"], "model.diffusion_model.", det.unet_layout, dtype)
    return unet_from(det.unet, det.headers["unet"], "", None, dtype)


def unet_from(config: Mapping[str, Any], header: Header, prefix: str, layout: Any, dtype: torch.dtype | None) -> nn.Module:
    """A ``UNet2DConditionModel`` of ``config`` with the weights under ``prefix`` of ``header``: converted from the
    original layout when ``layout`` (a :class:`.keymaps.UNetLayout`) is given, else already in diffusers' names."""
    d = diffusers()
    with torch.device("meta"):
        model = d.UNet2DConditionModel.from_config(dict(config))
    state = _component(header, prefix, dtype) if prefix else load_tensors(header, dtype=dtype)
    if layout is not None:
        state = converted(state, unet_map(layout), "U-Net")
    return assign(model, state, "U-Net")


def build_vae(det: Detected, dtype: torch.dtype | None = None) -> nn.Module:
    if det.source == "file":
        return vae_from(det.vae, det.headers["all"], "first_stage_model.", det.vae_shape, dtype)
    return vae_from(det.vae, det.headers["vae"], "", None, dtype)


def vae_from(config: Mapping[str, Any], header: Header, prefix: str, shape: tuple[int, int] | None,
             dtype: torch.dtype | None) -> nn.Module:
    """An ``AutoencoderKL`` of ``config``; ``shape`` (levels, resnets per level) when the weights are in the original
    layout, None when in diffusers' names."""
    d = diffusers()
    with torch.device("meta"):
        model = d.AutoencoderKL.from_config(dict(config))
    state = _component(header, prefix, dtype) if prefix else load_tensors(header, dtype=dtype)
    if shape is not None:
        state = converted(state, vae_map(*shape), "VAE")
    return assign(model, state, "VAE")


def build_text(part: TextPart, dtype: torch.dtype | None = None) -> nn.Module:
    t = transformers()
    config = t.CLIPTextConfig(**dict(part.config))
    with_projection = part.spec.pooled
    cls = t.CLIPTextModelWithProjection if with_projection else t.CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    what = part.spec.role.replace("_", " ")
    if part.tokenizer is None:  # a single file (a whole checkpoint's tower under its prefix, or a component file)
        raw = _component(part.header, part.prefix, dtype) if part.prefix else load_tensors(part.header, dtype=dtype)
        if part.spec.layout == "openclip":
            layers = config.num_hidden_layers
            keymap = openclip_map(layers, projection=with_projection)
            dropped = (f"transformer.resblocks.{layers}.",) if part.spec.drop_last else ()
            state = converted(raw, keymap, what, ignore=dropped + (() if with_projection else ("text_projection",)))
        else:
            if not any(k.startswith("text_model.") for k in raw):  # older transformers names, no text_model.
                raw = {f"text_model.{k}" if not k.startswith("text_projection") else k: v for k, v in raw.items()}
            state = converted(raw, hf_clip_map(), what, ignore=("text_projection",) if not with_projection else ())
    else:
        state = load_tensors(part.header, dtype=dtype)
        if not with_projection:
            state = {k: v for k, v in state.items() if not k.startswith("text_projection")}
    return assign(model, fit_prefix(state, model.state_dict(), "text_model."), what)
