"""Nodes for the checkpoints users already have: Stable Diffusion 1.x / 2.x / XL files and diffusers folders.

``checkpoint.load`` takes a model *name*: a ``.safetensors`` file under ``checkpoints/`` or a diffusers pipeline
folder under ``diffusers/`` of the model roots (``--models DIR``, ``NODEGRAPH_MODELS``). At validation its
``resolve`` hook reads the file's header or the folder's configs — no weights — and detects the family and the
architecture (:mod:`nodes.checkpoints.families`); the ports are typed from that: ``Denoiser(space="sdxl",
channels=4, context_dim=2048, family="sdxl")``, ``TextEncoder(dim=2048, family="sdxl")``, ``VAE(space="sdxl")``,
so an SDXL latent wired into an SD1.5 VAE is a validation error naming both. Running it builds diffusers' and
transformers' reference classes (imported only then, offline) and wraps them in the engine's handles
(:mod:`nodes.checkpoints.handles`).

``clip.encode`` encodes a prompt as the family's pipeline does (ComfyUI's weighting syntax, prompts longer than 75
tokens in chunks); ``clip.set_last_layer`` is ComfyUI's ``CLIPSetLastLayer``.

Errors name the node's port (``name``) with codes ``unknown_model`` (the hint lists what each root holds),
``bad_model_name``, ``bad_checkpoint`` (a pickle file, a truncated file, an unknown layout naming the families
known here, a missing tokenizer file).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from nodegraph import Context, Field, node
from nodegraph import types as T
from nodegraph.roots import ModelNotFound, ModelRoots
from nodegraph.types import Var

from .checkpoints.controlnet import ControlNetDetected, resolve_controlnet
from .checkpoints.families import (CheckpointFormatError, Component, Detected, detect, detect_text, detect_unet,
                                   detect_vae)
from .checkpoints.header import WeightsError, refuse_pickle
from .model_nodes import DType, InputError, shipped_roots

D, F = Var("dim"), Var("family")
Prediction = Literal["auto", "eps", "v"]


@dataclass(frozen=True)
class CheckpointRef:
    name: str
    prediction: str
    detected: Detected


def _locate(name: str, roots: ModelRoots) -> Path:
    """A single file under checkpoints/ or a folder under diffusers/; unknown: the hint lists both."""
    try:
        return roots.resolve(name, "checkpoints", want="file")
    except ModelNotFound as exc:
        if exc.code == "bad_model_name":
            raise InputError(str(exc), code=exc.code, port="name", hint=exc.hint) from None
    try:
        return roots.resolve(name, "diffusers", want="dir")
    except ModelNotFound:
        hint = f"{roots.describe('checkpoints', 'file')}; {roots.describe('diffusers', 'dir')}"
        raise InputError(f"no checkpoint {name!r} in checkpoints/ (single files) or diffusers/ (pipeline folders) of "
                         "the model roots", code="unknown_model", port="name", hint=hint) from None


def resolve_checkpoint(name: str, prediction: str = "auto", roots: ModelRoots | None = None) -> CheckpointRef:
    roots = shipped_roots() if roots is None else roots
    path = _locate(name, roots)
    try:
        refuse_pickle(path)
        return CheckpointRef(name, prediction, detect(name, path, prediction))
    except (CheckpointFormatError, WeightsError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None


def checkpoint_ref(literals: dict[str, Any], ctx: Context | None) -> CheckpointRef:
    resolved = getattr(ctx, "resolved", None)
    prediction = literals.get("prediction", "auto")
    if isinstance(resolved, CheckpointRef) and (resolved.name, resolved.prediction) == (literals["name"], prediction):
        return resolved
    return resolve_checkpoint(literals["name"], prediction, getattr(ctx, "models", None))


def _types(ref: CheckpointRef) -> dict[str, T.PortType]:
    det = ref.detected
    fam, space = det.family.name, det.family.space
    return {"model": T.Denoiser(space=space, channels=det.latent_channels, context_dim=det.context_dim, family=fam),
            "clip": T.TextEncoder(dim=det.context_dim, family=fam),
            "vae": T.VAE(space=space, channels=det.latent_channels)}


def _fingerprint(literals: dict[str, Any], ctx: Context) -> list:
    det = checkpoint_ref(literals, ctx).detected
    files = sorted({info.file for h in det.headers.values() for info in h.tensors.values()}
                   | {p.header.files[0] for p in det.text if p.header is not None and p.header.files})
    stamp = [(str(p.relative_to(det.path)) if det.source == "folder" else p.name, p.stat().st_size,
              p.stat().st_mtime_ns) for p in files]
    if det.source == "folder":
        for sub in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                    *(f"{t.spec.role}/config.json" for t in det.text),
                    *(f"{t.tokenizer.name}/{f}" for t in det.text if t.tokenizer for f in ("vocab.json", "merges.txt"))):
            path = det.path / sub
            if path.exists():
                stamp.append((sub, path.stat().st_size, path.stat().st_mtime_ns))
    return stamp


@node("checkpoint.load", category="model",
      resolve=lambda lit, ctx: resolve_checkpoint(lit["name"], lit.get("prediction", "auto"), ctx.models),
      refine=lambda lit, ctx: _types(checkpoint_ref(lit, ctx)), fingerprint=_fingerprint,
      requires=("diffusers", "transformers", "tokenizers"))
def load_checkpoint(
    name: Annotated[str, Field(description="a .safetensors file in checkpoints/ or a diffusers folder in diffusers/")],
    prediction: Prediction = "auto", dtype: DType = "float32", ctx: Context = None,
) -> {"model": T.Denoiser, "clip": T.TextEncoder, "vae": T.VAE}:
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint: denoiser, text encoder(s) and VAE (safetensors only).

    ``prediction`` overrides what the checkpoint is trained to predict (a single SD2.x file does not say: v by
    default, as the 768-px SD2.x models)."""
    import torch

    from .checkpoints import handles
    from .checkpoints.load import LoadError, build_text, build_unet, build_vae

    det = checkpoint_ref({"name": name, "prediction": prediction}, ctx).detected
    dt = getattr(torch, dtype)
    try:
        unet, vae = build_unet(det, dt), build_vae(det, dt)
        towers = [handles.Tower(build_text(p, dt), handles.tokenizer_for(p), p.spec.layer, p.spec.final_norm,
                                p.spec.pooled, p.spec.role) for p in det.text]
    except (LoadError, WeightsError, ValueError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    model = handles.denoiser_for(unet, det.family, det.prediction, dict(det.scheduler),
                                 2 ** (len(det.vae["block_out_channels"]) - 1))
    clip = handles.ClipText(towers, det.family.name, det.family.time_ids)
    return {"model": model, "clip": clip, "vae": handles.KLVAE(vae, det.family.space)}


Layer = Annotated[int, Field(ge=-48, le=-1, description="-1 the last layer, -2 the penultimate, ...")]
Size = Annotated[int, Field(ge=0, le=16384, description="pixels; 0 = the size of the image being made")]


@node("clip.encode", category="conditioning", output="cond")
def clip_encode(clip: T.TextEncoder(dim=D, family=F), text: str = "", width: Size = 0, height: Size = 0,
                crop_w: Annotated[int, Field(ge=0, le=16384)] = 0, crop_h: Annotated[int, Field(ge=0, le=16384)] = 0,
                target_width: Size = 0, target_height: Size = 0,
                aesthetic_score: Annotated[float, Field(ge=0, le=20)] = 6.0) -> T.Conditioning(dim=D):
    """Encode a prompt with a checkpoint's text encoder(s), as its pipeline does.

    ComfyUI's weighting syntax (``(word)``, ``(word:1.3)``, nesting, ``\\(`` escapes); prompts of more than 75
    tokens are encoded in chunks of 75 and concatenated. SDXL: width/height (original size), crop and target size
    are the size/crop conditioning (0 = the size being made, the pipeline default); the refiner takes
    ``aesthetic_score`` instead of the target size (6 for a prompt, 2.5 is the pipelines' negative default)."""
    if not hasattr(clip, "towers"):
        raise TypeError("clip.encode takes a checkpoint's text encoder (checkpoint.load's clip output); the embedded "
                        "tiny-shapes encoder is encoded by text.encode")
    micro = None
    if clip.time_ids == 6:
        micro = [float(height), float(width), float(crop_h), float(crop_w), float(target_height), float(target_width)]
    elif clip.time_ids == 5:
        micro = [float(height), float(width), float(crop_h), float(crop_w), float(aesthetic_score)]
    return clip.encode(text, micro)


@node("clip.set_last_layer", category="conditioning", output="clip")
def clip_set_last_layer(clip: T.TextEncoder(dim=D, family=F),
                        stop_at_clip_layer: Layer = -1) -> T.TextEncoder(dim=D, family=F):
    """Read the text encoder at another hidden layer (ComfyUI's CLIPSetLastLayer: -1 last, -2 penultimate, ...)."""
    if not hasattr(clip, "with_layer"):
        raise TypeError("clip.set_last_layer takes a checkpoint's text encoder (checkpoint.load's clip output)")
    return clip.with_layer(stop_at_clip_layer)


S, C = Var("space"), Var("channels")


@node("inpaint.condition", category="conditioning", output="cond")
def inpaint_condition(cond: T.Conditioning(dim=D), vae: T.VAE(space=S, channels=C), image: T.Image,
                      mask: T.Mask) -> T.Conditioning(dim=D):
    """Add what an inpainting checkpoint (a 9-channel U-Net) takes beside the sample: the mask at latent size and
    the latent of the image with the masked region blanked (mask >= 0.5 is repainted). Apply it to the positive
    and the negative conditioning alike (ComfyUI's InpaintModelConditioning, diffusers' inpainting pipelines)."""
    import torch
    import torch.nn.functional as tf

    from .model_nodes import _image_to_model

    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"a mask must be (B, 1, H, W); got {tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size")
    binary = (mask >= 0.5).to(image.dtype)
    pixels = _image_to_model(image, vae)
    dtype = next(vae.parameters()).dtype
    mean, _ = vae.encode((pixels * (1 - binary)).to(dtype))
    masked = vae.scale_latent(mean).float()
    small = tf.interpolate(binary, size=masked.shape[-2:])
    batch = max(masked.shape[0], cond["tokens"].shape[0])
    concat = torch.cat([small.expand(masked.shape[0], -1, -1, -1), masked], dim=1)
    return {**cond, "concat": concat.expand(batch, -1, -1, -1) if concat.shape[0] == 1 else concat}


# -- LoRA ----------------------------------------------------------------------------------------------------

M = T.Denoiser(space=S, channels=C, context_dim=D, family=F)
Strength = Annotated[float, Field(ge=-20, le=20)]


@dataclass(frozen=True)
class LoraRef:
    name: str
    path: Path
    family: str | None


def resolve_lora(name: str, roots: ModelRoots | None) -> LoraRef:
    from .checkpoints.header import read_header
    from .checkpoints.lora import lora_family

    roots = shipped_roots() if roots is None else roots
    try:
        path = roots.resolve(name, "loras", want="file")
        refuse_pickle(path)
        header = read_header(path)
    except ModelNotFound as exc:
        raise InputError(str(exc), code=exc.code, port="name", hint=exc.hint) from None
    except WeightsError as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    return LoraRef(name, path, lora_family({k: v.shape for k, v in header.tensors.items()}))


def _lora_ref(literals: dict[str, Any], ctx: Context | None) -> LoraRef:
    resolved = getattr(ctx, "resolved", None)
    if isinstance(resolved, LoraRef) and resolved.name == literals["name"]:
        return resolved
    return resolve_lora(literals["name"], getattr(ctx, "models", None))


def _lora_types(literals: dict[str, Any], ctx: Context) -> dict[str, T.PortType]:
    """The family the LoRA file was made for, as a constraint on what is linked into ``model`` and ``clip``."""
    family = _lora_ref(literals, ctx).family
    return {} if family is None else {"input:model": T.Denoiser(family=family),
                                      "input:clip": T.TextEncoder(family=family)}


def _lora_fingerprint(literals: dict[str, Any], ctx: Context) -> list:
    st = _lora_ref(literals, ctx).path.stat()
    return [st.st_size, st.st_mtime_ns]


@node("lora.apply", category="model", resolve=lambda lit, ctx: resolve_lora(lit["name"], ctx.models),
      refine=_lora_types, fingerprint=_lora_fingerprint)
def lora_apply(model: M, clip: T.TextEncoder(dim=D, family=F),
               name: Annotated[str, Field(description="a .safetensors LoRA in loras/ (Kohya/A1111 or diffusers/PEFT)")],
               strength_model: Strength = 1.0, strength_text: Strength = 1.0,
               ctx: Context = None) -> {"model": M, "clip": T.TextEncoder(dim=D, family=F)}:
    """Merge a LoRA into a checkpoint's U-Net and text encoder(s): W + strength * alpha / rank * up @ down, in
    float32. The inputs are left untouched (the outputs are new models sharing every weight the LoRA does not
    patch), and the result is cached like any node output: the same stack costs nothing the second time, and
    changing one LoRA's strength re-merges only that LoRA and those after it."""
    import torch

    from .checkpoints import handles
    from .checkpoints.header import load_tensors, read_header
    from .checkpoints.keymaps import unet_map
    from .checkpoints.lora import LoraError, merged_weights, parse_lora

    if not isinstance(model, handles.UNetDenoiser) or not hasattr(clip, "towers"):
        raise TypeError("lora.apply takes a checkpoint's model and clip (checkpoint.load's outputs, possibly through "
                        "other lora.apply nodes)")
    ref = _lora_ref({"name": name}, ctx)
    try:
        state = load_tensors(read_header(ref.path))
    except WeightsError as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    parts = {"unet": model.net, **{t.role: t.model for t in clip.towers}}
    modules = {role: {n for n, _ in part.named_modules()} for role, part in parts.items()}
    try:
        patches = parse_lora(state, modules, unet_map(model.layout).rename_back)
        params = {f"{role}.{n}": p for role, part in parts.items() for n, p in part.named_parameters()}
        merged = merged_weights(patches, params, strength_model, strength_text)
    except LoraError as exc:
        raise InputError(f"LoRA {name!r}: {exc}", code="bad_lora", port="name") from None
    changed = {key.split(".", 1)[0] for key in merged if merged[key] is not params[key]}
    new_model = handles.shared_copy(model) if "unet" in changed else model  # the wrapper and its net, weights shared
    copies = {"unet": new_model.net} if "unet" in changed else {}
    copies.update({t.role: handles.shared_copy(t.model) for t in clip.towers if t.role in changed})
    for key, weight in merged.items():
        role, path = key.split(".", 1)
        if weight is not params[key]:
            owner, leaf = path.rsplit(".", 1)
            copies[role].get_submodule(owner).register_parameter(leaf, torch.nn.Parameter(weight, requires_grad=False))
    towers = [handles.replace(t, model=copies.get(t.role, t.model)) for t in clip.towers]
    return {"model": new_model, "clip": handles.ClipText(towers, clip.family, clip.time_ids)}


# -- ControlNet ----------------------------------------------------------------------------------------------


def resolve_checkpoint_controlnet(name: str, roots: ModelRoots | None = None) -> ControlNetDetected:
    roots = shipped_roots() if roots is None else roots
    try:
        path = roots.resolve(name, "controlnet")
    except ModelNotFound as exc:
        raise InputError(str(exc), code=exc.code, port="name", hint=exc.hint) from None
    try:
        return resolve_controlnet(name, path)
    except (CheckpointFormatError, WeightsError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None


def controlnet_ref(literals: dict[str, Any], ctx: Context | None) -> ControlNetDetected:
    resolved = getattr(ctx, "resolved", None)
    if isinstance(resolved, ControlNetDetected) and resolved.name == literals["name"]:
        return resolved
    return resolve_checkpoint_controlnet(literals["name"], getattr(ctx, "models", None))


def _controlnet_fingerprint(literals: dict[str, Any], ctx: Context) -> list:
    det = controlnet_ref(literals, ctx)
    files = [*det.header.files, *([det.path / "config.json"] if det.source == "folder" else [])]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


@node("checkpoint.load_controlnet", category="model", output="controlnet",
      resolve=lambda lit, ctx: resolve_checkpoint_controlnet(lit["name"], ctx.models),
      refine=lambda lit, ctx: {"controlnet": T.ControlNet(space=controlnet_ref(lit, ctx).space)},
      fingerprint=_controlnet_fingerprint, requires=("diffusers",))
def load_checkpoint_controlnet(
    name: Annotated[str, Field(description="a ControlNet in controlnet/: a diffusers folder or a .safetensors file")],
    dtype: DType = "float32", ctx: Context = None,
) -> T.ControlNet:
    """Load an SD1.x / SD2.x / SDXL ControlNet (a diffusers ControlNetModel folder, or one .safetensors file in the
    original or diffusers layout) for control.apply on a checkpoint's model (safetensors only)."""
    import torch

    from .checkpoints.controlnet import load_controlnet
    from .checkpoints.load import LoadError

    det = controlnet_ref({"name": name}, ctx)
    try:
        return load_controlnet(det, getattr(torch, dtype))
    except (LoadError, WeightsError, ValueError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None


# -- components: a U-Net, a VAE or text encoders stored on their own (ComfyUI's UNETLoader, VAELoader, CLIPLoader)

FamilyName = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]


def _component(kind: str, literals: dict[str, Any], roots: ModelRoots | None) -> Component:
    roots = shipped_roots() if roots is None else roots
    folder = {"unet": "diffusion_models", "vae": "vae", "clip": "text_encoders"}[kind]
    names = [literals["name"]] + ([literals["name2"]] if literals.get("name2") else [])
    paths = []
    for port, name in zip(("name", "name2"), names):
        try:
            paths.append(roots.resolve(name, folder, want="file" if kind == "clip" else "any"))
            refuse_pickle(paths[-1])
        except ModelNotFound as exc:
            raise InputError(str(exc), code=exc.code, port=port, hint=exc.hint) from None
        except WeightsError as exc:
            raise InputError(str(exc), code="bad_checkpoint", port=port) from None
    try:
        if kind == "unet":
            found = detect_unet(names[0], paths[0], literals.get("family", "auto"), literals.get("prediction", "auto"))
        elif kind == "vae":
            found = detect_vae(names[0], paths[0], literals.get("family", "auto"))
        else:
            found = detect_text(names, paths, literals.get("family", "sd1"))
    except (CheckpointFormatError, WeightsError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    return replace(found, key=_key(literals))


def _component_hooks(kind: str, types) -> dict[str, Any]:
    def ref(literals: dict[str, Any], ctx: Context | None) -> Component:
        resolved = getattr(ctx, "resolved", None)
        if isinstance(resolved, Component) and resolved.key == _key(literals):
            return resolved
        return _component(kind, literals, getattr(ctx, "models", None))

    def resolve(literals: dict[str, Any], ctx: Context) -> Component:
        return _component(kind, literals, ctx.models)

    def fingerprint(literals: dict[str, Any], ctx: Context) -> list:
        comp = ref(literals, ctx)
        headers = [comp.header] if comp.header is not None else [p.header for p in comp.text]
        files = sorted({f for h in headers for f in h.files})
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    return {"resolve": resolve, "refine": lambda lit, ctx: types(ref(lit, ctx)), "fingerprint": fingerprint,
            "requires": ("diffusers",) if kind != "clip" else ("transformers", "tokenizers")}, ref


def _key(literals: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in literals.items() if k in ("name", "name2", "family", "prediction")))


_unet_hooks, _unet_ref = _component_hooks("unet", lambda c: {"model": T.Denoiser(
    space=c.family.space, channels=int(c.config.get("out_channels", 4)),
    context_dim=int(c.config["cross_attention_dim"]), family=c.family.name)})
_vae_hooks, _vae_ref = _component_hooks("vae", lambda c: {"vae": T.VAE(
    space=c.family.space, channels=int(c.config.get("latent_channels", 4)))})
_clip_hooks, _clip_ref = _component_hooks("clip", lambda c: {"clip": T.TextEncoder(
    dim=sum(int(p.config["hidden_size"]) for p in c.text), family=c.family.name)})


@node("checkpoint.load_unet", category="model", output="model", **_unet_hooks)
def load_unet(name: Annotated[str, Field(description="a U-Net in diffusion_models/: a .safetensors file or a "
                                                     "diffusers unet folder")],
              family: Literal["auto", "sd1", "sd2", "sdxl", "sdxl-refiner"] = "auto", prediction: Prediction = "auto",
              dtype: DType = "float32", ctx: Context = None) -> T.Denoiser:
    """Load a Stable Diffusion U-Net stored on its own (ComfyUI's UNETLoader); the family is detected from its
    shapes unless given, its scheduler is the family's standard one."""
    import torch

    from .checkpoints import handles
    from .checkpoints.load import LoadError, unet_from

    comp = _unet_ref({"name": name, "family": family, "prediction": prediction}, ctx)
    try:
        net = unet_from(comp.config, comp.header, comp.prefix, comp.layout, getattr(torch, dtype))
    except (LoadError, WeightsError, ValueError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    return handles.denoiser_for(net, comp.family, comp.prediction, comp.scheduler)


@node("checkpoint.load_vae", category="model", output="vae", **_vae_hooks)
def load_sd_vae(name: Annotated[str, Field(description="a VAE in vae/: a .safetensors file or a diffusers folder")],
                family: Literal["auto", "sd1", "sd2", "sdxl"] = "auto", dtype: DType = "float32",
                ctx: Context = None) -> T.VAE:
    """Load a Stable Diffusion VAE stored on its own (ComfyUI's VAELoader). A file does not say whether it is an
    SD1.x/2.x or an SDXL VAE (same architecture, another latent scale): ``auto`` takes SDXL when the file name says
    "xl"; set ``family`` otherwise."""
    import torch

    from .checkpoints import handles
    from .checkpoints.load import LoadError, vae_from

    comp = _vae_ref({"name": name, "family": family}, ctx)
    try:
        net = vae_from(comp.config, comp.header, comp.prefix, comp.layout, getattr(torch, dtype))
    except (LoadError, WeightsError, ValueError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    return handles.KLVAE(net, comp.family.space)


@node("checkpoint.load_clip", category="model", output="clip", **_clip_hooks)
def load_clip(name: Annotated[str, Field(description="a text encoder in text_encoders/ (.safetensors)")],
              name2: Annotated[str, Field(description="SDXL: the second encoder (OpenCLIP bigG)")] = "",
              family: FamilyName = "sd1", dtype: DType = "float32", ctx: Context = None) -> T.TextEncoder:
    """Load text encoders stored on their own (ComfyUI's CLIPLoader / DualCLIPLoader): one file per tower of the
    family (SDXL: CLIP-L in ``name``, OpenCLIP bigG in ``name2``), encoded as the family's pipeline does."""
    import torch

    from .checkpoints import handles
    from .checkpoints.load import LoadError, build_text

    comp = _clip_ref({"name": name, "name2": name2, "family": family}, ctx)
    try:
        towers = [handles.Tower(build_text(p, getattr(torch, dtype)), handles.tokenizer_for(p), p.spec.layer,
                                p.spec.final_norm, p.spec.pooled, p.spec.role) for p in comp.text]
    except (LoadError, WeightsError, ValueError) as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="name") from None
    return handles.ClipText(towers, comp.family.name, comp.family.time_ids)



@node("latent.empty_sd", category="latent", output="latent",
      cost=lambda lit: {"pixels": lit["width"] * lit["height"] * lit.get("batch", 1)})
def empty_sd_latent(width: Annotated[int, Field(ge=8, le=16384)] = 512,
                    height: Annotated[int, Field(ge=8, le=16384)] = 512,
                    batch: Annotated[int, Field(ge=1, le=64)] = 1) -> T.Latent(channels=4):
    """A zero latent of a Stable Diffusion VAE (8x downsampling) for a width x height image, without a VAE (ComfyUI's
    EmptyLatentImage): sizes are rounded down to multiples of 8 as ComfyUI does."""
    import torch

    return torch.zeros(batch, 4, height // 8, width // 8)
