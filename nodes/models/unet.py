"""Text-conditioned U-Net denoiser (Ronneberger et al. 2015; the DDPM U-Net of Ho et al. 2020 with the
cross-attention of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Layout: a sinusoidal timestep embedding; per resolution level ``num_res_blocks`` ResBlocks (each adding the
time embedding), optionally each followed by a spatial transformer (self-attention, cross-attention to the
text tokens, GEGLU MLP); a stride-2 downsample between levels; a middle block; and the mirror image going
up, where every ResBlock also takes one skip connection. Every skip is the output of one input block, so
there are ``1 + levels * num_res_blocks + (levels - 1)`` of them.

The encoder half (time embedding, input blocks, middle block) is its own module, :class:`UNetEncoder`, so a
ControlNet (Zhang et al. 2023) can copy it; its ``hint`` argument is added after the first convolution.
The full U-Net accepts ``control={"down": [one residual per skip], "mid": residual}``; residuals are added
to the skips and the middle block output before the decoder reads them. Either key may be left out.

Attention is ``scaled_dot_product_attention`` (via ``nodes.models.text.Attention``); the ResBlock and
resampling layers are the autoencoder's (``nodes.models.vae``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from nodes.models.config import ModelConfig, from_preset
from nodes.models.dit import TimestepEmbedder, sincos_2d
from nodes.models.text import Attention, FeedForward
from nodes.models.vae import Downsample, ResBlock, Upsample


# --- config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """Level ``i`` has ``model_channels * channel_mult[i]`` channels; ``attention_levels`` index levels."""

    model_type: ClassVar[str] = "unet"
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    mid_attention: bool = True
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    dropout: float = 0.0
    #: add a fixed 2D sine-cosine position embedding to the tokens of every spatial transformer, so attention
    #: knows where each token is (convolutions only see it through the zero padding at the borders)
    position_embedding: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must index channel_mult (0..{levels - 1})")
        for i, mult in enumerate(self.channel_mult):
            width = self.model_channels * mult
            if width % self.norm_groups:
                raise ValueError(f"level {i} width {width} is not divisible by norm_groups {self.norm_groups}")
            if (i in self.attention_levels or i == levels - 1) and width % self.num_heads:
                raise ValueError(f"level {i} width {width} is not divisible by num_heads {self.num_heads}")
            if (i in self.attention_levels or i == levels - 1) and self.position_embedding and width % 4:
                raise ValueError(f"level {i} width {width} is not divisible by 4 (the 2D position embedding)")

    @property
    def time_dim(self) -> int:
        return 4 * self.model_channels

    @classmethod
    def from_name(cls, name: str) -> "UNetConfig":
        return from_preset(PRESETS, name, cls.__name__)


# --- layers -----------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the context, GEGLU MLP; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim, gated=True)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (N, HW, C)
        x = x + self.attn2(self.norm2(x), context, context_mask)  # (N, HW, C)
        return x + self.ff(self.norm3(x))  # (N, HW, C)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, residual; ``proj_out`` starts at zero."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 position_embedding: bool = False) -> None:
        super().__init__()
        self.position_embedding = position_embedding
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (N, HW, C)
        if self.position_embedding:
            tokens = tokens + sincos_2d(h, w, c).to(tokens)  # (HW, C) broadcast over N
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)  # (N, HW, C)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)


# --- blocks -----------------------------------------------------------------------------------------


class UNetBlock(nn.ModuleList):
    """A run of layers; each receives what it needs (time embedding, text context, or nothing)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, context_mask: Tensor | None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def _res_block(config: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, config.norm_groups, eps=1e-5, time_dim=config.time_dim, dropout=config.dropout)


def _transformer(config: UNetConfig, channels: int) -> SpatialTransformer:
    return SpatialTransformer(
        channels, config.num_heads, config.transformer_depth, config.context_dim, config.norm_groups,
        config.position_embedding,
    )


class UNetEncoder(nn.Module):
    """Time embedding, input blocks and middle block: the half a ControlNet copies.

    ``skip_channels[i]`` is the channel count of the ``i``-th skip; ``downsample_factor`` the total
    reduction at the middle block.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        self.time_embed = TimestepEmbedder(config.time_dim, frequency_dim=mc)
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
        self.skip_channels = [mc]
        prev = mc
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [_res_block(config, prev, mc * mult)]
                prev = mc * mult
                if level in config.attention_levels:
                    layers.append(_transformer(config, prev))
                self.input_blocks.append(UNetBlock(layers))
                self.skip_channels.append(prev)
            if level < last:
                self.input_blocks.append(UNetBlock([Downsample(prev)]))
                self.skip_channels.append(prev)
        middle: list[nn.Module] = [_res_block(config, prev, prev)]
        if config.mid_attention:
            middle.append(_transformer(config, prev))
        middle.append(_res_block(config, prev, prev))
        self.mid_block = UNetBlock(middle)
        self.mid_channels = prev
        self.downsample_factor = 2**last

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        hint: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """-> (skips, one (N, C_i, H_i, W_i) per input block; middle (N, C_mid, H/f, W/f); emb (N, 4 * mc)).

        ``hint`` (N, mc, H, W), when given, is added to the first convolution's output (ControlNet).
        """
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the U-Net factor {f}")
        emb = self.time_embed(t, x.shape[0])  # (N, 4 * mc)
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, context_mask)  # (N, C_i, H_i, W_i)
            if i == 0 and hint is not None:
                h = h + hint
            skips.append(h)
        h = self.mid_block(h, emb, context, context_mask)  # (N, C_mid, H/f, W/f)
        return skips, h, emb


# --- model ------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """Latent (N, C, H, W) + timestep + text tokens (+ ControlNet residuals) -> prediction (N, C_out, H, W)."""

    takes_pooled = False  # whether forward takes ``pooled=`` (the pooled text vector); see nodes.adapters

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UNetEncoder(config)
        mc = config.model_channels
        skips = list(self.encoder.skip_channels)
        prev = self.encoder.mid_channels
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [_res_block(config, prev + skips.pop(), mc * config.channel_mult[level])]
                prev = mc * config.channel_mult[level]
                if level in config.attention_levels:
                    layers.append(_transformer(config, prev))
                if level > 0 and i == config.num_res_blocks:
                    layers.append(Upsample(prev))
                self.output_blocks.append(UNetBlock(layers))
        self.out = nn.Sequential(
            nn.GroupNorm(config.norm_groups, prev), nn.SiLU(), nn.Conv2d(prev, config.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        control: Mapping[str, Tensor | Sequence[Tensor]] | None = None,
    ) -> Tensor:
        """``x`` (N, C, H, W), ``t`` scalar or (N,), ``context`` (N, L, Dc), ``context_mask`` (N, L) bool,
        ``control`` {"down": [(N, C_i, H_i, W_i) per skip], "mid": (N, C_mid, H/f, W/f)} -> (N, C_out, H, W)."""
        skips, h, emb = self.encoder(x, t, context, context_mask)  # skips, (N, C_mid, H/f, W/f), (N, 4mc)
        if control is not None:
            down, mid = _check_control(control, skips, h)
            skips = [s if r is None else s + r for s, r in zip(skips, down)]
            h = h if mid is None else h + mid  # (N, C_mid, H/f, W/f)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (N, C + C_skip, H_j, W_j)
            h = block(h, emb, context, context_mask)  # (N, C_j, H_j', W_j')
        return self.out(h)  # (N, C_out, H, W)


def _check_control(
    control: Mapping[str, Tensor | Sequence[Tensor]], skips: list[Tensor], mid: Tensor
) -> tuple[list[Tensor | None], Tensor | None]:
    """Validate ControlNet residuals against the skips they will be added to; name the first bad one."""
    unknown = sorted(set(control) - {"down", "mid"})
    if unknown:
        raise ValueError(f"control has unknown key(s) {unknown}; expected 'down' and/or 'mid'")
    down = control.get("down")
    if down is None:
        down = [None] * len(skips)
    elif isinstance(down, Tensor) or len(down) != len(skips):
        got = "a tensor" if isinstance(down, Tensor) else f"{len(down)} residuals"
        raise ValueError(f"control['down'] must be a list of {len(skips)} residuals (one per skip), got {got}")
    for i, (residual, skip) in enumerate(zip(down, skips)):
        if residual is not None and residual.shape != skip.shape:
            raise ValueError(f"control['down'][{i}] has shape {tuple(residual.shape)}, expected {tuple(skip.shape)}")
    residual = control.get("mid")
    if residual is not None and residual.shape != mid.shape:
        raise ValueError(f"control['mid'] has shape {tuple(residual.shape)}, expected {tuple(mid.shape)}")
    return list(down), residual


# --- presets ----------------------------------------------------------------------------------------

PRESETS: dict[str, UNetConfig] = {
    "tiny-test": UNetConfig(
        model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
        context_dim=16, norm_groups=4,
    ),
    # 16x16x4 latents of the shapes VAE; levels at 16x16 (48 ch) and 8x8 (96 ch, attention).
    "shapes": UNetConfig(
        model_channels=48, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=4,
        context_dim=128, norm_groups=16, position_embedding=True,
    ),
    "sd15": UNetConfig(),
}
