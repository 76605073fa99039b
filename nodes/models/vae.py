"""KL-regularised convolutional autoencoder: images <-> latents (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes"; the LDM first stage of Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models").

Images are (N, C, H, W) in [-1, 1]. ``encode`` returns the posterior's ``(mean, logvar)``; drawing a
latent is ``sample(mean, logvar, noise)`` with noise the caller supplies (no hidden randomness).
``decode`` maps raw latents back to images. Diffusion models see *scaled* latents:
``scale_latent(z) = (z - shift_factor) * scaling_factor`` and ``unscale_latent`` undoes it. The latent
space has a name (``config.space``) so graph validation can refuse wiring latents across spaces.

``tiled_decode`` decodes latents larger than one tile piece by piece; overlapping tiles are blended with
linear ramps across the overlap and normalised by the summed weights. A tile covering the whole latent is
exactly ``decode``.

The residual and resampling blocks here are shared with the U-Net (``nodes.models.unet``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodes.models.config import ModelConfig, from_preset


# --- config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    """AutoencoderKL; downsampling factor is ``2 ** (len(channel_mult) - 1)``."""

    model_type: ClassVar[str] = "vae"
    space: str = "sd15"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % self.norm_groups]
        if bad:
            raise ValueError(f"channel counts {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        return from_preset(PRESETS, name, cls.__name__)


# --- layers -----------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """``GroupNorm -> SiLU -> conv`` twice with a skip; adds a projected time embedding when ``time_dim``."""

    def __init__(
        self, in_ch: int, out_ch: int, groups: int, eps: float = 1e-6, time_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(emb))[:, :, None, None]  # (N, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, C_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; ``asymmetric_pad`` pads right/bottom only (the LDM autoencoder's variant)."""

    def __init__(self, channels: int, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        out = self.to_out(F.scaled_dot_product_attention(q, k, v)[:, 0])  # (N, HW, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


# --- blocks -----------------------------------------------------------------------------------------


class MidBlock(nn.Module):
    """ResBlock, optional attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block1 = ResBlock(channels, channels, groups)
        self.attn = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    """Image (N, C_in, H, W) -> posterior moments (N, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        prev = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(prev, width, groups))
                prev = width
            if level < len(widths) - 1:
                layers.append(Downsample(width, asymmetric_pad=True))
        self.down = nn.Sequential(*layers)
        self.mid = MidBlock(prev, groups, config.mid_attention)
        self.out = nn.Sequential(
            nn.GroupNorm(groups, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, 2 * config.latent_channels, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mid(self.down(x)))


class Decoder(nn.Module):
    """Latent (N, latent_channels, h, w) -> image (N, C_out, h*f, w*f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        prev = widths[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, prev, 3, padding=1)
        self.mid = MidBlock(prev, groups, config.mid_attention)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResBlock(prev, widths[level], groups))
                prev = widths[level]
            if level > 0:
                layers.append(Upsample(prev))
        self.up = nn.Sequential(*layers)
        self.out = nn.Sequential(
            nn.GroupNorm(groups, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, config.out_channels, 3, padding=1)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.up(self.mid(self.conv_in(z))))


# --- model ------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` -> (mean, logvar), ``decode`` raw latents, latent scaling helpers."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_quant_conv else nn.Identity()
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image (N, C, H, W) in [-1, 1] -> posterior mean and log-variance, each (N, L, H/f, W/f)."""
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the VAE factor {f}")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # 2 x (N, L, h, w)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
        """Reparameterised posterior draw ``mean + exp(logvar / 2) * noise``."""
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latent (N, L, h, w) -> image (N, C_out, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction, mean, logvar); decodes the mean when ``noise`` is None."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else self.sample(mean, logvar, noise)
        return self.decode(z), mean, logvar

    def scale_latent(self, z: Tensor) -> Tensor:
        """Raw latent -> the diffusion model's latent: ``(z - shift) * scale``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latent(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`scale_latent`."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def tiled_decode(self, z: Tensor, tile: int, overlap: int) -> Tensor:
        """Decode in ``tile`` x ``tile`` latent pieces overlapping by ``overlap`` latent pixels, blended."""
        return tiled_decode(self.decode, z, tile, overlap, self.config.downsample_factor)


def tiled_decode(decode, z: Tensor, tile: int, overlap: int, f: int) -> Tensor:
    """``decode`` (latent -> image, ``f`` pixels per latent pixel) applied in ``tile`` x ``tile`` latent pieces
    overlapping by ``overlap`` latent pixels, blended linearly across the overlaps."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    n, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    out = weight = None
    for y in _tile_starts(h, tile, overlap):
        for x in _tile_starts(w, tile, overlap):
            piece = decode(z[..., y : y + tile, x : x + tile])  # (N, C, th*f, tw*f)
            if out is None:
                out = piece.new_zeros(n, piece.shape[1], h * f, w * f)
                weight = piece.new_zeros(1, 1, h * f, w * f)
            ramp_y = _ramp(piece.shape[-2], overlap * f, y > 0, y + tile < h, piece)  # (th*f,)
            ramp_x = _ramp(piece.shape[-1], overlap * f, x > 0, x + tile < w, piece)  # (tw*f,)
            ramp = ramp_y[:, None] * ramp_x[None, :]  # (th*f, tw*f)
            region = (..., slice(y * f, y * f + piece.shape[-2]), slice(x * f, x * f + piece.shape[-1]))
            out[region] += piece * ramp
            weight[region] += ramp
    return out / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: stride ``tile - overlap``, the last tile flush with the end."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def _ramp(length: int, ramp: int, rise: bool, fall: bool, like: Tensor) -> Tensor:
    """1-D blend weights: linear up over the first ``ramp`` samples if ``rise``, down at the end if ``fall``."""
    weights = torch.ones(length, dtype=like.dtype, device=like.device)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=like.dtype, device=like.device) / (ramp + 1)
        if rise:
            weights[:ramp] = torch.minimum(weights[:ramp], up)
        if fall:
            weights[-ramp:] = torch.minimum(weights[-ramp:], up.flip(0))
    return weights


# --- presets ----------------------------------------------------------------------------------------

PRESETS: dict[str, VAEConfig] = {
    "tiny-test": VAEConfig(
        space="tiny-test", base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, scaling_factor=1.0
    ),
    # 64x64 RGB -> 16x16x4 for the embedded shapes family; scaling/shift are measured after training.
    # No attention: fully convolutional, so nodes.training can train it on crops.
    "shapes": VAEConfig(
        space="tiny-shapes", base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8,
        mid_attention=False, use_quant_conv=False, scaling_factor=1.0,
    ),
    "sd15": VAEConfig(space="sd15"),
    "sdxl": VAEConfig(space="sdxl", scaling_factor=0.13025),
    "flux": VAEConfig(
        space="flux", latent_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    ),
}
