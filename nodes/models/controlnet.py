"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") for the
U-Net and the DiT of this library.

**U-Net** (the paper's Fig. 3): a trainable copy of the U-Net encoder (time embedding, input blocks, middle
block: :class:`nodes.models.unet.UNetEncoder`), initialised from a trained U-Net by ``from_unet``. The control
image goes through a small hint encoder (3x3 convolutions with SiLU, one stride-2 convolution per factor of two
down to the latent resolution, last convolution zero-initialised) whose output is added after the copy's first
convolution. One zero-initialised 1x1 convolution per skip connection, and one for the middle block, map the
copy's features to exactly the residuals ``UNet.forward(control={"down": [...], "mid": ...})`` adds.

**DiT** (after PixArt-delta's ControlNet-Transformer, Chen et al. 2024): copies of the patch embedding, the
conditioning embedders and the first ``control_depth`` DiT blocks (``from_dit``). The hint encoder ends in a
zero-initialised patch embedding, so the control image becomes tokens added to the copy's input tokens; after
copied block ``i`` a zero-initialised linear maps its tokens to the residual of block ``i`` of the main DiT.
``DiT.forward(control=...)`` wants one entry per block, so the list is padded with ``None`` for blocks
``control_depth .. depth - 1`` (which therefore take no residual).

Every output layer starts at zero, so a fresh ControlNet returns exact zero residuals and leaves the denoiser's
output bit-identical; training moves the zero layers away from zero ("zero convolutions").

Both take ``forward(x_in, t, context, context_mask, ..., hint=image)``: the same network input and timestep
the base network receives (:class:`nodes.adapters.Controlled` derives them through the base denoiser's
parameterisation) and the control image (N, hint_channels, H * f, W * f) in [0, 1], ``f = config.hint_factor``
(the VAE's downsampling factor; 1 for a pixel-space model). ``embed_hint(image)`` may be run once and passed as
``hint_embedding`` instead (sampling: the image is the same at every step).

Configs extend the base model's config (a ControlNet checkpoint's ``config.json`` is a U-Net / DiT config plus
``hint_channels``, ``hint_widths``, ``space`` and, for the DiT, ``control_depth``); ``space`` names the latent
space the ControlNet was trained in, for the loader's typed port.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from nodes.models.config import ModelConfig, from_preset
from nodes.models.dit import PRESETS as DIT_PRESETS
from nodes.models.dit import DiT, DiTConfig, add_stem
from nodes.models.unet import PRESETS as UNET_PRESETS
from nodes.models.unet import UNet, UNetConfig, UNetEncoder

# --- config -----------------------------------------------------------------------------------------

Base = TypeVar("Base", bound=ModelConfig)


def _check_hint(config: Any) -> None:
    if config.hint_channels < 1:
        raise ValueError(f"hint_channels must be >= 1, got {config.hint_channels}")
    if not config.hint_widths or any(w < 1 for w in config.hint_widths):
        raise ValueError(f"hint_widths must be a non-empty list of positive widths, got {config.hint_widths}")


def _base_fields(config: ModelConfig, base: type[Base]) -> Base:
    """The base model's config inside a ControlNet config (the fields they share)."""
    return base(**{f.name: getattr(config, f.name) for f in dataclasses.fields(base)})


@dataclasses.dataclass(frozen=True)
class ControlNetUNetConfig(UNetConfig):
    """The U-Net's config plus the hint encoder: ``len(hint_widths) - 1`` stride-2 stages (``hint_factor``)."""

    model_type: ClassVar[str] = "controlnet_unet"
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    space: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_hint(self)

    @property
    def hint_factor(self) -> int:
        return 2 ** (len(self.hint_widths) - 1)

    def base_config(self) -> UNetConfig:
        return _base_fields(self, UNetConfig)

    @classmethod
    def from_name(cls, name: str) -> "ControlNetUNetConfig":
        return from_preset(UNET_CONTROL_PRESETS, name, cls.__name__)


@dataclasses.dataclass(frozen=True)
class ControlNetDiTConfig(DiTConfig):
    """The DiT's config (``depth`` is the main DiT's) plus ``control_depth`` copied blocks and the hint encoder."""

    model_type: ClassVar[str] = "controlnet_dit"
    control_depth: int = 2
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    space: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_hint(self)
        if not 1 <= self.control_depth <= self.depth:
            raise ValueError(f"control_depth must be in 1..depth ({self.depth}), got {self.control_depth}")

    @property
    def hint_factor(self) -> int:
        return 2 ** (len(self.hint_widths) - 1)

    def base_config(self) -> DiTConfig:
        return _base_fields(self, DiTConfig)

    @classmethod
    def from_name(cls, name: str) -> "ControlNetDiTConfig":
        return from_preset(DIT_CONTROL_PRESETS, name, cls.__name__)


# --- layers -----------------------------------------------------------------------------------------


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias: the ControlNet's "zero convolution" (or zero linear)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class HintEncoder(nn.Module):
    """Control image (N, C_hint, H * f, W * f) -> features (N, C_out, H / p, W / p), last layer zero-initialised.

    For widths ``(w0, ..., wk)``: conv(C_hint -> w0), then per stage conv(w_i -> w_i) and a stride-2
    conv(w_i -> w_{i+1}), SiLU after each (the paper's ``input_hint_block`` is widths (16, 32, 96, 256));
    then a 3x3 conv (``patch_size`` 1) or a ``p`` x ``p`` patch embedding to ``C_out``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int, patch_size: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        out = (nn.Conv2d(widths[-1], out_channels, 3, padding=1) if patch_size == 1
               else nn.Conv2d(widths[-1], out_channels, patch_size, stride=patch_size))
        self.out = zero_module(out)
        self.factor = 2 ** (len(widths) - 1)

    def forward(self, hint: Tensor) -> Tensor:
        return self.out(self.body(hint))  # (N, C_out, H / p, W / p)


def check_hint_size(hint: Tensor, x: Tensor, factor: int) -> None:
    """The control image must be exactly ``factor`` times the latent's size (resizing is the caller's policy)."""
    want = (x.shape[-2] * factor, x.shape[-1] * factor)
    if hint.dim() != 4 or tuple(hint.shape[-2:]) != want:
        raise ValueError(f"control image has shape {tuple(hint.shape)}; a latent of {tuple(x.shape[-2:])} needs "
                         f"(N, C, {want[0]}, {want[1]}) (factor {factor})")


# --- models -----------------------------------------------------------------------------------------


class ControlNetUNet(nn.Module):
    """Latent + timestep + text + control image -> ``{"down": [one residual per skip], "mid": residual}``."""

    takes_pooled = False  # whether forward takes ``pooled=`` (the pooled text vector); see nodes.adapters

    def __init__(self, config: ControlNetUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UNetEncoder(config.base_config())
        self.hint_encoder = HintEncoder(config.hint_channels, config.hint_widths, config.model_channels)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in self.encoder.skip_channels)
        mid = self.encoder.mid_channels
        self.mid_out = zero_module(nn.Conv2d(mid, mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3, hint_widths: tuple[int, ...] = (16, 32, 96, 256),
                  space: str | None = None) -> "ControlNetUNet":
        """A ControlNet whose encoder copy starts from ``unet``'s trained encoder (same device and dtype)."""
        config = ControlNetUNetConfig(**dataclasses.asdict(unet.config), hint_channels=hint_channels,
                                      hint_widths=tuple(hint_widths), space=space)
        ref = next(unet.parameters())
        model = cls(config).to(ref.device, ref.dtype)
        model.encoder.load_state_dict(unet.encoder.state_dict())
        return model

    def embed_hint(self, hint: Tensor) -> Tensor:
        """(N, C_hint, H * f, W * f) -> (N, model_channels, H, W), added after the copy's first convolution."""
        return self.hint_encoder(hint.to(self.mid_out.weight.dtype))

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, context_mask: Tensor | None = None,
                hint: Tensor | None = None, hint_embedding: Tensor | None = None) -> dict[str, Any]:
        """``x`` (N, C, H, W) as the U-Net sees it, ``hint`` (N, C_hint, H * f, W * f) or ``hint_embedding``
        (N, mc, H, W) -> {"down": [(N, C_i, H_i, W_i) per skip], "mid": (N, C_mid, H / d, W / d)}."""
        if hint_embedding is None:
            if hint is None:
                raise ValueError("a ControlNet needs a control image (hint) or its hint_embedding")
            check_hint_size(hint, x, self.config.hint_factor)
            hint_embedding = self.embed_hint(hint)  # (N, mc, H, W)
        skips, mid, _ = self.encoder(x, t, context, context_mask, hint=hint_embedding)
        down = [conv(s) for conv, s in zip(self.zero_convs, skips)]  # (N, C_i, H_i, W_i) each
        return {"down": down, "mid": self.mid_out(mid)}  # mid (N, C_mid, H / d, W / d)


class ControlNetDiT(nn.Module):
    """Latent + timestep + text + control image -> one (N, T, D) residual per DiT block (``None`` past the copies).

    Patchify and the AdaLN conditioning are the DiT's own methods, shared rather than copied.
    """

    takes_pooled = True  # whether forward takes ``pooled=`` (the pooled text vector); see nodes.adapters

    patchify = DiT.patchify
    grid = DiT.grid
    condition = DiT.condition
    text_context = DiT.text_context

    def __init__(self, config: ControlNetDiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        add_stem(self, config, config.control_depth)
        self.hint_encoder = HintEncoder(config.hint_channels, config.hint_widths, d, patch_size=p)
        self.zero_linears = nn.ModuleList(zero_module(nn.Linear(d, d)) for _ in range(config.control_depth))

    @classmethod
    def from_dit(cls, dit: DiT, control_depth: int = 2, hint_channels: int = 3,
                 hint_widths: tuple[int, ...] = (16, 32, 96, 256), space: str | None = None) -> "ControlNetDiT":
        """A ControlNet whose embedders and blocks start from ``dit``'s first ``control_depth`` (same device/dtype)."""
        config = ControlNetDiTConfig(**dataclasses.asdict(dit.config), control_depth=control_depth,
                                     hint_channels=hint_channels, hint_widths=tuple(hint_widths), space=space)
        ref = next(dit.parameters())
        model = cls(config).to(ref.device, ref.dtype)
        for name in ("x_embedder", "t_embedder", "pooled_embedder", "pooled_to_tokens"):
            if getattr(model, name) is not None:
                getattr(model, name).load_state_dict(getattr(dit, name).state_dict())
        for copy, block in zip(model.blocks, dit.blocks):
            copy.load_state_dict(block.state_dict())
        return model

    def embed_hint(self, hint: Tensor) -> Tensor:
        """(N, C_hint, H * f, W * f) -> tokens (N, T, D) added to the copy's input tokens."""
        h = self.hint_encoder(hint.to(self.x_embedder.weight.dtype))  # (N, D, H / p, W / p)
        return h.flatten(2).transpose(1, 2)  # (N, T, D)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor, context_mask: Tensor | None = None,
                pooled: Tensor | None = None, hint: Tensor | None = None,
                hint_embedding: Tensor | None = None) -> list[Tensor | None]:
        """``x`` (N, C, H, W), ``hint`` (N, C_hint, H * f, W * f) or ``hint_embedding`` (N, T, D)
        -> ``depth`` entries: (N, T, D) for the first ``control_depth`` blocks, then None."""
        if hint_embedding is None:
            if hint is None:
                raise ValueError("a ControlNet needs a control image (hint) or its hint_embedding")
            check_hint_size(hint, x, self.config.hint_factor)
            hint_embedding = self.embed_hint(hint)  # (N, T, D)
        h = self.patchify(x)  # (N, T, D)
        if hint_embedding.shape != h.shape:
            raise ValueError(f"hint tokens {tuple(hint_embedding.shape)} do not match the latent's {tuple(h.shape)}")
        h = h + hint_embedding  # (N, T, D)
        grid = self.grid(*x.shape[-2:])
        c = self.condition(t, pooled, h.shape[0])  # (N, D)
        context, context_mask = self.text_context(context, context_mask, pooled)  # (N, L [+ k], Dc)
        out: list[Tensor | None] = []
        for block, zero in zip(self.blocks, self.zero_linears):
            h = block(h, c, context, context_mask, grid)  # (N, T, D)
            out.append(zero(h))  # (N, T, D)
        return out + [None] * (self.config.depth - len(out))


# --- presets ----------------------------------------------------------------------------------------

# Hint widths give the pixel -> latent factor: tiny-test VAE 2 (32 -> 16), tiny-shapes VAE 4 (64 -> 16), SD 8.
UNET_CONTROL_PRESETS: dict[str, ControlNetUNetConfig] = {
    "tiny-test": ControlNetUNetConfig(**dataclasses.asdict(UNET_PRESETS["tiny-test"]), hint_widths=(8, 16),
                                      space="tiny-test"),
    "shapes": ControlNetUNetConfig(**dataclasses.asdict(UNET_PRESETS["shapes"]), hint_widths=(16, 32, 64),
                                   space="tiny-shapes"),
    "sd15": ControlNetUNetConfig(**dataclasses.asdict(UNET_PRESETS["sd15"]), space="sd15"),
}
DIT_CONTROL_PRESETS: dict[str, ControlNetDiTConfig] = {
    "tiny-test": ControlNetDiTConfig(**dataclasses.asdict(DIT_PRESETS["tiny-test"]), control_depth=1,
                                     hint_widths=(8, 16), space="tiny-test"),
    "shapes": ControlNetDiTConfig(**dataclasses.asdict(DIT_PRESETS["shapes"]), control_depth=3,
                                  hint_widths=(16, 32, 64), space="tiny-shapes"),
}
