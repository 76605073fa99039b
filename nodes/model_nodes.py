"""Model nodes: load checkpoint folders, encode text, VAE encode/decode, latent construction.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (see :mod:`nodes.models.config`; only
safetensors is ever read); a denoiser folder may add ``denoiser.json`` (parameterisation, training schedule,
latent space; see :class:`nodes.adapters.DenoiserInfo`). Relative paths are resolved against the working
directory. Loaders read ``config.json`` at validation time (never weights) so port types carry the model's
latent space, channel count and conditioning width: an SDXL latent wired into an SD1.5 VAE, or a text
encoder of the wrong width, is a validation error before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from nodegraph import Context, Field, node
from nodegraph import types as T
from nodegraph.types import Var

from . import adapters
from .models.config import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_folder

S, C, D = Var("space"), Var("channels"), Var("dim")
DType = Literal["float32", "float16", "bfloat16"]


class InputError(ValueError):
    """A user error found while validating or running a node; carries the code and port for reports."""

    def __init__(self, message: str, code: str = "bad_value", port: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.code, self.port, self.hint = code, port, hint


WEIGHTS_ROOT = Path(__file__).parent / "weights"


def catalog() -> dict[str, Path]:
    """Models shipped inside the package, by name: ``"<family>/<component>"``, e.g. ``"tiny-shapes/dit"``."""
    if not WEIGHTS_ROOT.is_dir():
        return {}
    return {f"{p.parent.parent.name}/{p.parent.name}": p.parent
            for p in sorted(WEIGHTS_ROOT.glob("*/*/" + CONFIG_NAME))}


def model_folder(path: str) -> Path:
    """A shipped model's name (see :func:`catalog`) or a checkpoint folder path."""
    shipped = catalog()
    if path in shipped:
        return shipped[path]
    folder = Path(path).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        names = ", ".join(shipped) or "none installed"
        raise InputError(f"unknown model {path!r}: not a shipped model name and not a folder holding {CONFIG_NAME}"
                         f" and {WEIGHTS_NAME}", code="unknown_model", port="path", hint=f"shipped models: {names}")
    return folder


def read_config(path: str, expected: tuple[str, ...]) -> dict[str, Any]:
    folder = model_folder(path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    if data.get("model_type") not in expected:
        raise InputError(f"{path!r} holds a {data.get('model_type')!r} model, not {' or '.join(expected)}",
                         code="wrong_model", port="path")
    return data


def weights_fingerprint(literals: dict, ctx: Context) -> Any:
    """Size and modification time of every file in the folder: a changed checkpoint changes the cache key."""
    folder = model_folder(literals["path"])
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def _denoiser_types(literals: dict) -> dict[str, T.PortType]:
    cfg = read_config(literals["path"], ("unet", "dit"))
    info = adapters.DenoiserInfo.read(model_folder(literals["path"]))
    return {"model": T.Denoiser(space=info.latent_space, channels=cfg.get("in_channels"),
                                context_dim=cfg.get("context_dim"))}


def _vae_types(literals: dict) -> dict[str, T.PortType]:
    cfg = read_config(literals["path"], ("vae",))
    return {"vae": T.VAE(space=cfg.get("space"), channels=cfg.get("latent_channels"))}


def _text_types(literals: dict) -> dict[str, T.PortType]:
    cfg = read_config(literals["path"], ("text",))
    return {"encoder": T.TextEncoder(dim=cfg.get("width"))}


def load_checked(path: str, dtype: str, expected: tuple[str, ...]) -> torch.nn.Module:
    """Load a checkpoint folder of one of the ``expected`` model types; errors carry a code and port."""
    read_config(path, expected)
    try:
        return load_folder(model_folder(path), dtype=dtype).requires_grad_(False)
    except CheckpointError as exc:
        raise InputError(str(exc), code="bad_checkpoint", port="path") from None


@node("model.load_denoiser", category="model", output="model", fingerprint=weights_fingerprint, refine=_denoiser_types)
def load_denoiser(path: str, dtype: DType = "float32") -> T.Denoiser:
    """Load a U-Net or DiT denoiser from a checkpoint folder (safetensors only)."""
    net = load_checked(path, dtype, ("unet", "dit"))
    return adapters.DenoiserModel(net, adapters.DenoiserInfo.read(model_folder(path)))


@node("model.load_vae", category="model", output="vae", fingerprint=weights_fingerprint, refine=_vae_types)
def load_vae(path: str, dtype: DType = "float32") -> T.VAE:
    """Load a KL autoencoder from a checkpoint folder (safetensors only)."""
    return load_checked(path, dtype, ("vae",))


@node("model.load_text_encoder", category="model", output="encoder", fingerprint=weights_fingerprint,
      refine=_text_types)
def load_text_encoder(path: str, dtype: DType = "float32") -> T.TextEncoder:
    """Load the byte-level text encoder from a checkpoint folder (safetensors only)."""
    return load_checked(path, dtype, ("text",))


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


@node("latent.empty", category="latent", output="latent")
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
