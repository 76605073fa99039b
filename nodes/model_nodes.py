"""Model nodes: load checkpoint folders, encode text, VAE encode/decode, latent construction.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (see :mod:`nodes.models.config`; only
safetensors is ever read); a denoiser folder may add ``denoiser.json`` (parameterisation, training schedule,
latent space; see :class:`nodes.adapters.DenoiserInfo`).

Model names. A loader's ``path`` input is a model *name*, resolved inside the model roots
(:mod:`nodegraph.roots`: ``--models DIR``, ``NODEGRAPH_MODELS``, ``Engine(model_roots=...)``) in ComfyUI's
folders: a denoiser under ``diffusion_models/``, a VAE under ``vae/``, a text encoder under ``text_encoders/``,
a ControlNet under ``controlnet/`` (:data:`DENOISER` ...). The weights shipped in ``nodes/weights/`` are
registered for each of those folders (:data:`SHIPPED_FOLDERS`, see :func:`nodes.register`), so
``tiny-shapes/dit`` names ``nodes/weights/tiny-shapes/dit``. Absolute paths, ``~`` and ``..`` are refused
(``bad_model_name``); an unknown name lists what each root holds (``unknown_model``).

Resolve once. Each loader's ``resolve`` hook runs at validation: it finds the folder and reads its
``config.json`` (and ``denoiser.json``) once, into a :class:`ModelRef`. The ``refine`` hook (port types: the
latent space, channel count and conditioning width, so an SDXL latent wired into an SD1.5 VAE is a validation
error before anything loads), the ``fingerprint`` hook (size and mtime of the folder's files) and the load
itself take that object (``ctx.resolved``). Only where validation could not resolve (a linked ``path``, a plain
Python call) does the loader resolve when it runs.

A root may hold anyone's folders: errors name the model and what is wrong (codes ``unknown_model``,
``wrong_model``, ``bad_checkpoint`` on port ``path``), never a value read from its files.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch

from nodegraph import Context, Field, node
from nodegraph import types as T
from nodegraph.roots import ModelNotFound, ModelRoots
from nodegraph.types import Var

from . import adapters
from .models.config import (CONFIG_NAME, MAX_CONFIG_BYTES, PLAIN_STRING, WEIGHTS_NAME, CheckpointError,
                            ForeignModel, ModelConfig, load_folder, read_config)

S, C, D = Var("space"), Var("channels"), Var("dim")
DType = Literal["float32", "float16", "bfloat16"]


class InputError(ValueError):
    """A user error found while validating or running a node; carries the code and port for reports."""

    def __init__(self, message: str, code: str = "bad_value", port: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.code, self.port, self.hint = code, port, hint


@dataclass(frozen=True)
class ModelKind:
    """What a loader loads: the model-root folder its names resolve in and the ``model_type`` values it takes."""

    folder: str
    types: tuple[str, ...]


DENOISER = ModelKind("diffusion_models", ("unet", "dit"))
VAE = ModelKind("vae", ("vae",))
TEXT_ENCODER = ModelKind("text_encoders", ("text",))
CONTROLNET = ModelKind("controlnet", ("controlnet_unet", "controlnet_dit"))

WEIGHTS_ROOT = Path(__file__).parent / "weights"  # holds <family>/<component>/, e.g. tiny-shapes/dit
SHIPPED_FOLDERS = tuple(k.folder for k in (DENOISER, VAE, TEXT_ENCODER, CONTROLNET))


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved once: its folder, its checked config and, for a denoiser, its ``denoiser.json``."""

    name: str
    folder: Path
    config: ModelConfig
    info: adapters.DenoiserInfo | None = None


def model_name(kind: ModelKind) -> Any:
    """The annotation of a loader's ``path`` input: a model name (the port keeps its old name ``path``)."""
    return Annotated[str, Field(description=f"model name in {kind.folder}/ of the model roots, or a shipped one "
                                            "(tiny-shapes/...)")]


def shipped_roots(roots: ModelRoots | None = None) -> ModelRoots:
    """``roots`` (default: those of ``NODEGRAPH_MODELS``) plus the shipped weights: where a name resolves when
    no engine says (a loader called as plain Python). An Engine gets the shipped folders from the registry."""
    roots = ModelRoots.from_env() if roots is None else roots
    for folder in SHIPPED_FOLDERS:
        roots = roots.with_folder(folder, WEIGHTS_ROOT)
    return roots


def resolve_model(name: str, kind: ModelKind, roots: ModelRoots | None = None) -> ModelRef:
    """Find model ``name`` of ``kind`` in ``roots`` (default :func:`shipped_roots`) and read its config once."""
    roots = shipped_roots() if roots is None else roots
    try:
        folder = roots.resolve(name, kind.folder, want="dir")
    except ModelNotFound as exc:
        raise InputError(str(exc), code=exc.code, port="path", hint=exc.hint) from None
    if not (folder / CONFIG_NAME).exists():  # a grouping folder (tiny-shapes), or not a model of this package
        raise InputError(f"model {name!r} is a folder without {CONFIG_NAME} and {WEIGHTS_NAME}", code="unknown_model",
                         port="path", hint=roots.describe(kind.folder, "dir"))
    wanted = " or ".join(kind.types)
    try:
        config = read_config(folder)
    except ForeignModel:
        raise InputError(f"{name!r} holds a model of another kind (not {wanted})", code="wrong_model",
                         port="path") from None
    except CheckpointError as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="path") from None
    if config.model_type not in kind.types:
        raise InputError(f"{name!r} holds a {config.model_type} model, not {wanted}", code="wrong_model", port="path")
    return ModelRef(name, folder, config, _denoiser_info(name, folder) if kind is DENOISER else None)


def _denoiser_info(name: str, folder: Path) -> adapters.DenoiserInfo:
    """``denoiser.json``, refused (without quoting it) unless a small regular file of plain values."""
    sidecar = folder / adapters.SIDECAR
    try:
        if sidecar.exists():
            st = sidecar.stat()
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
                raise ValueError("not a small regular file")
        info = adapters.DenoiserInfo.read(folder)
        plain = all(v is None or (isinstance(v, str) and PLAIN_STRING.fullmatch(v)) for v in vars(info).values())
    except (OSError, ValueError, TypeError):
        plain = False
    if not plain:
        raise InputError(f"{name!r} has a {adapters.SIDECAR} that is not valid (fields: "
                         f"{', '.join(adapters.DenoiserInfo.__dataclass_fields__)}, short plain names)",
                         code="bad_checkpoint", port="path")
    return info


def model_ref(name: str, kind: ModelKind, ctx: Context | None) -> ModelRef:
    """What validation resolved for this node (``ctx.resolved``), or a fresh resolution where it could not."""
    resolved = getattr(ctx, "resolved", None)
    if isinstance(resolved, ModelRef) and resolved.name == name:
        return resolved
    return resolve_model(name, kind, getattr(ctx, "models", None))


def folder_fingerprint(folder: Path) -> list:
    """Size and modification time of every file in the folder: a changed checkpoint changes the cache key."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def loader_hooks(kind: ModelKind, types: Callable[[ModelRef], dict[str, T.PortType]]) -> dict[str, Any]:
    """The ``resolve`` / ``refine`` / ``fingerprint`` hooks of a loader whose ``path`` names a model of ``kind``;
    ``types(ref)`` gives its output types from the resolved model."""

    def resolve(literals: dict, ctx: Context) -> ModelRef:
        return resolve_model(literals["path"], kind, ctx.models)

    def refine(literals: dict, ctx: Context) -> dict[str, T.PortType]:
        return types(model_ref(literals["path"], kind, ctx))

    def fingerprint(literals: dict, ctx: Context) -> list:
        return folder_fingerprint(model_ref(literals["path"], kind, ctx).folder)

    return {"resolve": resolve, "refine": refine, "fingerprint": fingerprint}


def load_checked(ref: ModelRef, dtype: str) -> torch.nn.Module:
    """Load a resolved checkpoint folder (its config is not read again); errors carry a code and port."""
    try:
        return load_folder(ref.folder, dtype=dtype, config=ref.config).requires_grad_(False)
    except CheckpointError as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="path") from None


def _denoiser_types(ref: ModelRef) -> dict[str, T.PortType]:
    return {"model": T.Denoiser(space=ref.info.latent_space, channels=ref.config.in_channels,
                                context_dim=ref.config.context_dim)}


@node("model.load_denoiser", category="model", output="model", **loader_hooks(DENOISER, _denoiser_types))
def load_denoiser(path: model_name(DENOISER), dtype: DType = "float32", ctx: Context = None) -> T.Denoiser:
    """Load a U-Net or DiT denoiser by name (``diffusion_models/`` of the model roots; safetensors only)."""
    ref = model_ref(path, DENOISER, ctx)
    return adapters.DenoiserModel(load_checked(ref, dtype), ref.info)


@node("model.load_vae", category="model", output="vae", **loader_hooks(
    VAE, lambda ref: {"vae": T.VAE(space=ref.config.space, channels=ref.config.latent_channels)}))
def load_vae(path: model_name(VAE), dtype: DType = "float32", ctx: Context = None) -> T.VAE:
    """Load a KL autoencoder by name (``vae/`` of the model roots; safetensors only)."""
    return load_checked(model_ref(path, VAE, ctx), dtype)


@node("model.load_text_encoder", category="model", output="encoder", **loader_hooks(
    TEXT_ENCODER, lambda ref: {"encoder": T.TextEncoder(dim=ref.config.width)}))
def load_text_encoder(path: model_name(TEXT_ENCODER), dtype: DType = "float32", ctx: Context = None) -> T.TextEncoder:
    """Load the byte-level text encoder by name (``text_encoders/`` of the model roots; safetensors only)."""
    return load_checked(model_ref(path, TEXT_ENCODER, ctx), dtype)


@node("text.encode", category="conditioning", output="cond")
def encode_text(encoder: T.TextEncoder(dim=D), text: str = "",
                batch: Annotated[int, Field(ge=1, le=64)] = 1) -> T.Conditioning(dim=D):
    """Encode a prompt (any UTF-8 text; the tokenizer is byte-level) into token embeddings and a pooled vector."""
    tokens, pooled, mask = encoder.encode([text] * batch, pad_to_max_length=True)
    return {"tokens": tokens.float(), "pooled": pooled.float(), "mask": mask}


def _image_to_model(image: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    if image.dim() != 4 or image.shape[1] not in (1, 3, 4):
        raise ValueError(f"an image must be (B, C, H, W) with C in 1, 3, 4; got {tuple(image.shape)}")
    image = image[:, :3] if image.shape[1] == 4 else image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
    f = vae.config.downsample_factor
    if image.shape[-1] % f or image.shape[-2] % f:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the VAE factor {f}")
    return image * 2 - 1


@node("vae.encode", category="latent", output="latent")
def vae_encode(vae: T.VAE(space=S, channels=C), image: T.Image) -> T.Latent(space=S, channels=C):
    """Encode an image in [0, 1] to the diffusion model's (scaled) latent, using the posterior mean."""
    dtype = next(vae.parameters()).dtype
    mean, _ = vae.encode(_image_to_model(image, vae).to(dtype))
    return vae.scale_latent(mean).float()


@node("vae.decode", category="latent", output="image")
def vae_decode(vae: T.VAE(space=S, channels=C), latent: T.Latent(space=S, channels=C),
               tile: Annotated[int, Field(ge=0, description="latent tile size; 0 = decode in one piece")] = 0,
               overlap: Annotated[int, Field(ge=0)] = 4) -> T.Image:
    """Decode a latent to an image in [0, 1]; tiled when ``tile`` is set and smaller than the latent."""
    if latent.dim() != 4 or latent.shape[1] != vae.config.latent_channels:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not fit this VAE "
                         f"({vae.config.latent_channels} channels)")
    dtype = next(vae.parameters()).dtype
    z = vae.unscale_latent(latent.to(dtype))
    if tile and (z.shape[-1] > tile or z.shape[-2] > tile):
        if overlap >= tile:
            raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")
        x = vae.tiled_decode(z, tile, overlap)
    else:
        x = vae.decode(z)
    return ((x.float() + 1) / 2).clamp(0, 1)


def _image_cost(literals: dict) -> dict[str, int]:
    """An image of width x height per batch item (the latent is smaller, the decoded image is this size)."""
    return {"pixels": literals["width"] * literals["height"]}


@node("latent.empty", category="latent", output="latent", cost=_image_cost)
def empty_latent(vae: T.VAE(space=S, channels=C), width: Annotated[int, Field(ge=8, le=8192)] = 64,
                 height: Annotated[int, Field(ge=8, le=8192)] = 64,
                 batch: Annotated[int, Field(ge=1, le=64)] = 1) -> T.Latent(space=S, channels=C):
    """A zero latent for an image of width x height (multiples of the VAE's downsampling factor)."""
    f = vae.config.downsample_factor
    if width % f or height % f:
        raise ValueError(f"width and height must be multiples of {f}; got {width}x{height}")
    return torch.zeros(batch, vae.config.latent_channels, height // f, width // f)


@node("latent.noise", category="latent", output="noise")
def latent_noise(like: T.Latent, seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0) -> T.Noise:
    """Standard-normal noise shaped like a latent, generated on CPU from the seed (same image on any device)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.device)


@node("latent.upscale", category="latent", output="latent")
def latent_upscale(latent: T.Latent(space=S, channels=C), scale: Annotated[float, Field(gt=0, le=8)] = 2.0,
                   mode: Literal["nearest", "bilinear", "bicubic"] = "bilinear") -> T.Latent(space=S, channels=C):
    """Resize a latent by a factor (for hires-fix style second passes)."""
    size = (max(1, round(latent.shape[-2] * scale)), max(1, round(latent.shape[-1] * scale)))
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(latent, size=size, mode=mode, **kwargs)
