"""Thin adapters from the reference classes to the engine's handles (the one network-call path).

* :class:`UNetDenoiser` — a diffusers ``UNet2DConditionModel`` as a :class:`nodes.adapters.DenoiserModel`: the
  scaling, timesteps and parameterisation stay in ``DenoiserModel``; this class only renames the arguments:
  ``context`` -> ``encoder_hidden_states``, ControlNet residuals, SDXL's added conditioning (pooled vector and
  size/crop ids), the inpainting channels (``cond["concat"]``, the mask and masked-image latent that 9-channel
  U-Nets take beside the sample).
* :class:`ClipText` — one or two CLIP text towers with their tokenizers: prompt weighting and chunking
  (:mod:`.prompt`), the chosen hidden layer, the pooled vector, SDXL's micro-conditioning.
* :class:`KLVAE` — a diffusers ``AutoencoderKL`` with the interface the VAE nodes use (``encode`` -> mean and
  log-variance, ``decode``, ``tiled_decode``, ``scale_latent``).

SDXL's size/crop ids travel in the conditioning as ``cond["micro"]`` (B, 6) — original height and width, crop
top and left, target height and width — or (B, 5) for the refiner (original size, crop, aesthetic score). A size
of 0 means "the size of the image being made" (the pipelines' default), filled in from the latent at each call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import DenoiserInfo, DenoiserModel, SamplingDefaults
from ..diffusion.schedules import TrainSchedule
from .families import Family, TextPart
from .keymaps import UNetLayout
from .prompt import apply_weights, frame_tensors, frame_weighted, needs_empty, weighted_ids
from .tokenizer import ClipTokenizer


def train_schedule(config: dict[str, Any]) -> TrainSchedule:
    """The training schedule a diffusers scheduler config describes (VP betas)."""
    kind = config.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        kind = "cosine"
    if kind not in ("linear", "scaled_linear", "cosine") or config.get("trained_betas"):
        raise ValueError(f"scheduler beta_schedule {kind!r} is not supported (linear, scaled_linear, "
                         "squaredcos_cap_v2)")
    return TrainSchedule(kind, int(config.get("num_train_timesteps", 1000)), float(config.get("beta_start", 0.0001)),
                         float(config.get("beta_end", 0.02)))


def sampling_defaults(config: dict[str, Any]) -> SamplingDefaults:
    """What ``EulerDiscreteScheduler.from_config(config)`` would do with spacing and the first noise."""
    spacing = config.get("timestep_spacing")
    spacing = spacing if spacing in ("leading", "trailing", "linspace") else None
    euler_spacing = spacing or "linspace"
    return SamplingDefaults(spacing=spacing, steps_offset=int(config.get("steps_offset", 0) or 0),
                            start="sigma" if euler_spacing in ("linspace", "trailing") else "vp")


class UNetDenoiser(DenoiserModel):
    """A diffusers ``UNet2DConditionModel`` through :class:`DenoiserModel`'s call path (see the module docstring)."""

    def __init__(self, net: nn.Module, info: DenoiserInfo, schedule: TrainSchedule, sampling: SamplingDefaults,
                 family: str, pixel_factor: int = 8, time_ids: int = 0):
        super().__init__(net, info, takes_pooled=time_ids > 0, schedule=schedule, sampling=sampling)
        self.family, self.pixel_factor, self.time_ids = family, pixel_factor, time_ids

    @property
    def layout(self) -> UNetLayout:
        """The U-Net's level layout (for the original-layout names of its modules, e.g. in SDXL LoRA files)."""
        return UNetLayout.of(self.net.config)

    def network_inputs(self, x: Tensor, sigma: Tensor | float,
                       cond: dict[str, Any] | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
        cond = cond or {}
        x_in, t, kwargs = super().network_inputs(x, sigma, cond)
        kwargs.pop("context_mask", None)  # the pipelines give the U-Net no text mask
        if cond.get("concat") is not None:
            kwargs["concat"] = cond["concat"]
        if self.time_ids:
            pooled = kwargs.pop("pooled", None)
            if pooled is None:
                raise ValueError(f"an {self.family} U-Net needs the pooled text vector: encode the prompt with "
                                 "clip.encode of this checkpoint's text encoders")
            kwargs["added"] = {"text_embeds": pooled, "time_ids": self.micro(cond.get("micro"), x)}
        return x_in, t, kwargs

    def micro(self, micro: Tensor | None, x: Tensor) -> Tensor:
        """The size/crop ids for latent ``x``: zeros (sizes) replaced by the image size being made."""
        h, w = x.shape[-2] * self.pixel_factor, x.shape[-1] * self.pixel_factor
        n = x.shape[0]
        if micro is None:
            micro = torch.zeros(n, self.time_ids)
        if micro.shape[-1] != self.time_ids:
            raise ValueError(f"size/crop conditioning has {micro.shape[-1]} ids; this {self.family} U-Net takes "
                             f"{self.time_ids} (encode with this checkpoint's clip)")
        ids = micro.to(x.device, torch.float32).clone()
        if ids.shape[0] != n:
            ids = ids.expand(n, -1).clone()
        sizes = (0, 1, 4, 5) if self.time_ids == 6 else (0, 1)
        for col in sizes:
            fill = h if col % 2 == 0 else w
            ids[:, col] = torch.where(ids[:, col] == 0, torch.full_like(ids[:, col], fill), ids[:, col])
        return ids

    def call_network(self, x_in: Tensor, t: Tensor, kwargs: dict[str, Any]) -> Tensor:
        net = self.net
        dtype = net.dtype
        self._check_channels(x_in, kwargs.get("concat"))
        sample = x_in.to(dtype)
        if kwargs.get("concat") is not None:
            sample = torch.cat([sample, kwargs["concat"].to(sample)], dim=1)
        control = kwargs.get("control") or {}
        added = kwargs.get("added")
        out = net(sample, t, encoder_hidden_states=kwargs["context"].to(dtype),
                  added_cond_kwargs=None if added is None else {k: v.to(dtype) for k, v in added.items()},
                  down_block_additional_residuals=control.get("down"),
                  mid_block_additional_residual=control.get("mid"), return_dict=False)[0]
        return out.to(x_in.dtype)


    def _check_channels(self, x_in: Tensor, concat: Tensor | None) -> None:
        want, extra = self.net.config.in_channels, 0 if concat is None else concat.shape[1]
        if concat is not None and concat.shape[-2:] != x_in.shape[-2:]:
            raise ValueError(f"inpaint.condition's image is {tuple(concat.shape[-2:])} latent pixels, the sample "
                             f"{tuple(x_in.shape[-2:])}: make the latent the image's size")
        if x_in.shape[1] + extra == want:
            return
        if extra:
            raise ValueError(f"this U-Net takes {want} input channels, not the sample's {x_in.shape[1]} plus "
                             f"inpaint.condition's {extra}: inpaint.condition needs an inpainting checkpoint (9 "
                             "channels); an ordinary checkpoint inpaints by blending in the sampler loop")
        raise ValueError(f"this U-Net takes {want} input channels and the sample has {x_in.shape[1]}: an inpainting "
                         "checkpoint needs its prompt and negative conditioned with inpaint.condition")


def denoiser_for(net: nn.Module, family: Family, prediction: str, scheduler: dict[str, Any],
                 pixel_factor: int = 8) -> UNetDenoiser:
    """A checkpoint's U-Net as a denoiser: its family's latent space and size ids, the training schedule and the
    spacing rules of its scheduler config, diffusers' linear sigma -> timestep rule."""
    info = DenoiserInfo(prediction=prediction, latent_space=family.space, interpolation="linear")
    return UNetDenoiser(net, info, train_schedule(scheduler), sampling_defaults(scheduler), family.name,
                        pixel_factor, family.time_ids)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of a module tree that shares every parameter and buffer with the original (only the module objects
    are new): replacing a weight in the copy leaves the original, and anything cached that holds it, untouched."""
    import copy

    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


# -- text ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    """One text encoder with its tokenizer and the hidden layer it is read at."""

    model: nn.Module
    tokenizer: ClipTokenizer
    layer: int
    final_norm: bool
    pooled: bool
    role: str = "text_encoder"  # the diffusers component name (SDXL's second tower: "text_encoder_2")


class ClipText:
    """The checkpoint's text encoders as one handle: ``encode(text, micro) -> conditioning`` (module docstring).

    ``layer`` counts hidden layers from the end, as ComfyUI's ``CLIPSetLastLayer`` does (-1 the last, -2 the
    penultimate); :meth:`with_layer` gives a copy read at another layer. Not an ``nn.Module``: it lists its
    towers through ``__nodegraph_modules__`` so the engine moves and charges each network once."""

    def __init__(self, towers: list[Tower], family: str, time_ids: int = 0):
        self.towers, self.family, self.time_ids = towers, family, time_ids

    def __nodegraph_modules__(self) -> list[nn.Module]:
        return [t.model for t in self.towers]

    @property
    def dim(self) -> int:
        return sum(t.model.config.hidden_size for t in self.towers)

    def with_layer(self, layer: int) -> "ClipText":
        for t in self.towers:
            if not 1 <= -layer <= t.model.config.num_hidden_layers:
                raise ValueError(f"layer {layer} is outside this text encoder's {t.model.config.num_hidden_layers} "
                                 "layers (-1 is the last)")
        return ClipText([replace(t, layer=layer) for t in self.towers], self.family, self.time_ids)

    def encode(self, text: str, micro: list[float] | None = None) -> dict[str, Tensor]:
        parts, pooled = [], None
        for tower in self.towers:
            z, p = self._tower(tower, text)
            parts.append(z)
            if tower.pooled:
                pooled = p
        if pooled is None:
            pooled = p  # SD1.x / SD2.x: the (unused by the U-Net) pooled state of the last tower
        cond = {"tokens": torch.cat(parts, dim=-1).float(), "pooled": pooled.float()}
        if self.time_ids:
            cond["micro"] = torch.tensor([micro or [0.0] * self.time_ids], dtype=torch.float32)
        return cond

    def _tower(self, tower: Tower, text: str) -> tuple[Tensor, Tensor]:
        frames = frame_weighted(weighted_ids(tower.tokenizer, text), tower.tokenizer, truncate=False)
        ids, weights = frame_tensors(frames)
        weighted = needs_empty(frames)
        if weighted:
            empty, _ = frame_tensors(frame_weighted([], tower.tokenizer, truncate=True))
            ids = torch.cat([ids, empty])
        hidden, pooled = self._run(tower, ids)
        if weighted:
            hidden, empty_hidden = hidden[:-1], hidden[-1:]
            hidden = apply_weights(hidden, empty_hidden, weights.to(hidden.device))
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled[:1]

    @staticmethod
    def _run(tower: Tower, ids: Tensor) -> tuple[Tensor, Tensor]:
        model = tower.model
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), output_hidden_states=True)
        hidden = out.hidden_states[tower.layer]
        if tower.final_norm:
            hidden = getattr(model, "text_model", model).final_layer_norm(hidden)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return hidden, pooled


def tokenizer_for(part: TextPart) -> ClipTokenizer:
    pad = part.config.get("pad_token_id")
    if part.tokenizer is not None:
        pad = _folder_pad(part)
    return ClipTokenizer(pad_id=int(pad), folder=None if part.tokenizer is None else str(part.tokenizer))


def _folder_pad(part: TextPart) -> int:
    """The pad id a tokenizer folder declares (``special_tokens_map.json`` / ``tokenizer_config.json``), else the
    family's convention."""
    from .families import read_json
    from .tokenizer import folder_files

    vocab, _ = folder_files(part.tokenizer)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = part.tokenizer / name
        if path.is_file():
            token = read_json(path, f"tokenizer {name}").get("pad_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and token in vocab:
                return int(vocab[token])
    return 49407 if part.spec.pad == "eos" else 0


# -- VAE -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEInfo:
    space: str
    latent_channels: int
    downsample_factor: int
    scaling_factor: float
    shift_factor: float = 0.0


class KLVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` with the VAE nodes' interface (see the module docstring)."""

    def __init__(self, net: nn.Module, space: str):
        super().__init__()
        self.net = net
        cfg = net.config
        self.config = VAEInfo(space, int(cfg.latent_channels), 2 ** (len(cfg.block_out_channels) - 1),
                              float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dist = self.net.encode(x).latent_dist
        return dist.mean, dist.logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z, return_dict=False)[0]

    def tiled_decode(self, z: Tensor, tile: int, overlap: int) -> Tensor:
        from ..models.vae import tiled_decode

        return tiled_decode(self.decode, z, tile, overlap, self.config.downsample_factor)

    def scale_latent(self, z: Tensor) -> Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latent(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor
