"""DiT: a latent diffusion transformer with AdaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers"), conditioned on text.

The latent is cut into ``patch_size`` x ``patch_size`` patches, embedded linearly, and given fixed 2-D
sine-cosine positions (computed for the actual grid, so any latent size divisible by the patch works).
Conditioning follows PixArt-alpha (Chen et al. 2023): the timestep embedding, plus an MLP of the pooled
text vector when given, drives each block's AdaLN-Zero modulation (shift / scale / gate, initialised to
zero so every block starts as the identity); the token embeddings enter through a cross-attention layer
between self-attention and the MLP, whose output projection also starts at zero.

``forward(x, t, context, context_mask=None, pooled=None, control=None)`` predicts a tensor shaped like
``x`` (what it means, eps / v / x0 / velocity, is the adapter's business). ``control`` is an optional list
with one token residual (N, T, D) per block (or None to skip a block), added after that block: the hook
for a DiT ControlNet.

``long_skip`` adds U-ViT's long skip connections (Bao et al. 2023, "All are Worth Words: A ViT Backbone for
Diffusion Models"): the outputs of the first ``depth // 2`` blocks are kept and each of the last
``depth // 2`` blocks first mixes in its mirror's output, ``h = Linear([h, skip])``, last in, first out.
U-ViT reports that these skips speed up training markedly; they leave the first half of the blocks (the part
a ControlNet copies) unchanged.

``mix_ffn`` puts a depthwise 3x3 convolution over the token grid inside each block's MLP, between its
expansion and the GELU ("Mix-FFN": Xie et al. 2021, "SegFormer"; used in a DiT by SANA, Xie et al. 2024, "SANA:
Efficient High-Resolution Image Synthesis with Linear Diffusion Transformers"). Each token then mixes with its
neighbours in every block, the locality a U-Net gets from its convolutions; on the small shapes data it lowers
the loss reached in a fixed CPU budget (docs/models.md). The convolution starts at zero, so a Mix-FFN block
starts as the plain MLP.

``pooled_tokens = k`` maps the pooled text vector linearly to ``k`` extra tokens that every cross-attention sees
beside the text encoder's per-byte tokens (``text_tokens=False``: instead of them). AdaLN spreads the pooled
vector over every image token alike, so it cannot say which object a token belongs to; byte tokens split
"red" and "circle" over many tokens, so a token of a red object must find the shape word that goes with its
colour. A text encoder trained to parse captions from its pooled vector (``nodes.training.text.pretrain_text``) puts
whole objects there, colour and shape together, and cross-attention to tokens made from it binds them per
image region: on the shapes data this raised the DiT's two-object accuracy in pilots (docs/models.md). The
mechanism is unCLIP's decoder (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents"), which projects a CLIP embedding into four extra context tokens beside the text encoder's.

The sinusoidal timestep embedding here is shared with the U-Net (``nodes.models.unet``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from nodes.models.config import ModelConfig, from_preset
from nodes.models.text import Attention, FeedForward


# --- config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiTConfig(ModelConfig):
    """Text-conditioned DiT. ``pooled_dim = 0`` disables the pooled-text path."""

    model_type: ClassVar[str] = "dit"
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 768
    pooled_dim: int = 768
    frequency_dim: int = 256
    long_skip: bool = False
    mix_ffn: bool = False
    pooled_tokens: int = 0
    text_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pooled_tokens and not self.pooled_dim:
            raise ValueError(f"pooled_tokens={self.pooled_tokens} needs a pooled text vector (pooled_dim > 0)")
        if not self.text_tokens and not self.pooled_tokens:
            raise ValueError("text_tokens=False leaves the cross-attention nothing to attend: set pooled_tokens > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")

    @classmethod
    def from_name(cls, name: str) -> "DiTConfig":
        return from_preset(PRESETS, name, cls.__name__)


# --- layers -----------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), ``[cos | sin]`` halves (Vaswani et al. 2017; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    return nn.functional.pad(emb, (0, dim % 2))  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features then ``Linear -> SiLU -> Linear``."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor | float, batch: int) -> Tensor:
        """``t`` scalar or (N,) -> (N, dim); a scalar is broadcast to ``batch``."""
        t = torch.as_tensor(t, device=self.mlp[0].weight.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"t has {t.numel()} values for a batch of {batch}")
        t = t.expand(batch)  # (N,)
        freq = timestep_embedding(t, self.frequency_dim)  # (N, F) float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, dim)


def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine positions (height * width, dim), as in DiT / MAE: the first half of the
    channels encodes the column, the second half the row, each as ``[sin | cos]`` over ``dim / 4``
    frequencies (computed in float64, returned as float32)."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    grid = [torch.arange(size, dtype=torch.float64) for size in (height, width)]
    rows, cols = torch.meshgrid(*grid, indexing="ij")  # (H, W) each
    axes = [pos.reshape(-1, 1) * omega for pos in (cols, rows)]  # 2 x (H*W, D/4)
    return torch.cat([f(a) for a in axes for f in (torch.sin, torch.cos)], dim=-1).float()  # (H*W, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: ``x * (1 + scale) + shift`` with per-sample (N, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --- blocks -----------------------------------------------------------------------------------------


class MixFeedForward(nn.Module):
    """``Linear -> (+ depthwise 3x3 conv over the token grid) -> GELU -> Linear`` (Mix-FFN, SegFormer / SANA)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``x`` (N, T, D) tokens of a row-major ``grid`` (rows, columns) -> (N, T, D)."""
        h = self.fc1(x)  # (N, T, Hd)
        n, t, c = h.shape
        spatial = h.transpose(1, 2).reshape(n, c, *grid)  # (N, Hd, rows, cols)
        h = h + self.dwconv(spatial).flatten(2).transpose(1, 2)  # (N, T, Hd)
        return self.fc2(nn.functional.gelu(h, approximate="tanh"))  # (N, T, D)


class DiTBlock(nn.Module):
    """AdaLN-Zero self-attention, un-gated cross-attention to text tokens, AdaLN-Zero MLP (or Mix-FFN)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int, mix_ffn: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads, context_dim=context_dim, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = MixFeedForward(dim, hidden) if mix_ffn else FeedForward(dim, hidden, approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor, context_mask: Tensor | None,
                grid: tuple[int, int] | None = None) -> Tensor:
        """``grid`` (rows, columns) of the tokens is needed with Mix-FFN."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (N, T, D)
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)  # (N, T, D)
        h = modulate(self.norm2(x), shift2, scale2)  # (N, T, D)
        if not isinstance(self.mlp, MixFeedForward):
            h = self.mlp(h)  # (N, T, D)
        elif grid is None:
            raise ValueError("a Mix-FFN DiT block needs the token grid (rows, columns)")
        else:
            h = self.mlp(h, grid)  # (N, T, D)
        return x + gate2[:, None] * h  # (N, T, D)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then a linear map from tokens to patch pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (N, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


# --- model ------------------------------------------------------------------------------------------


def add_stem(module: nn.Module, config: DiTConfig, depth: int) -> None:
    """Give ``module`` a DiT's patch embedding, conditioning embedders and ``depth`` blocks, under the DiT's
    attribute names (shared with the ControlNet, whose copies load the DiT's weights by these names)."""
    d, p = config.hidden_size, config.patch_size
    module.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
    module.t_embedder = TimestepEmbedder(d, config.frequency_dim)
    module.pooled_embedder = (
        nn.Sequential(nn.Linear(config.pooled_dim, d), nn.SiLU(), nn.Linear(d, d)) if config.pooled_dim else None
    )
    module.pooled_to_tokens = (
        nn.Linear(config.pooled_dim, config.pooled_tokens * config.context_dim) if config.pooled_tokens else None
    )
    module.blocks = nn.ModuleList(
        DiTBlock(d, config.num_heads, config.mlp_ratio, config.context_dim, config.mix_ffn) for _ in range(depth)
    )


class DiT(nn.Module):
    """Latent (N, C, H, W) + timestep + text -> prediction (N, C_out, H, W)."""

    takes_pooled = True  # whether forward takes ``pooled=`` (the pooled text vector); see nodes.adapters

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        add_stem(self, config, config.depth)
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, config.out_channels)
        half, d = config.depth // 2, config.hidden_size
        self.skip_linears = (
            nn.ModuleList(nn.Linear(2 * d, d) for _ in range(half)) if config.long_skip else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears, then zero every AdaLN modulation, cross-attention output, Mix-FFN convolution and the
        final layer; long skips start as ``[I | 0]``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.trunc_normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.trunc_normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero += [block.adaLN_modulation[-1], block.cross_attn.to_out]
            if isinstance(block.mlp, MixFeedForward):
                zero.append(block.mlp.dwconv)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for skip in self.skip_linears or ():  # start as "keep h, ignore the skip": every block stays the identity
            d = skip.out_features
            nn.init.zeros_(skip.weight)
            nn.init.zeros_(skip.bias)
            with torch.no_grad():
                skip.weight[:, :d].diagonal().fill_(1.0)

    def patchify(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, T, D) tokens with positions added, ``T = H * W / p**2``."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch_size {p}")
        h = self.x_embedder(x)  # (N, D, H/p, W/p)
        pos = sincos_2d(h.shape[-2], h.shape[-1], h.shape[1]).to(h.device, h.dtype)  # (T, D)
        return h.flatten(2).transpose(1, 2) + pos  # (N, T, D)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (rows, columns) of a ``height`` x ``width`` latent."""
        p = self.config.patch_size
        return height // p, width // p

    def unpatchify(self, x: Tensor, height: int, width: int) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W) for a latent of ``height`` x ``width``."""
        p, c = self.config.patch_size, self.config.out_channels
        n, gh, gw = x.shape[0], height // p, width // p
        x = x.reshape(n, gh, gw, p, p, c)  # (N, H/p, W/p, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, height, width)  # (N, C, H, W)

    def condition(self, t: Tensor | float, pooled: Tensor | None, batch: int) -> Tensor:
        """The AdaLN input (N, D): timestep embedding plus, when given, the pooled-text embedding."""
        c = self.t_embedder(t, batch)  # (N, D)
        if pooled is None:
            return c
        if self.pooled_embedder is None:
            raise ValueError("this DiT has pooled_dim=0 and takes no pooled text vector")
        return c + self.pooled_embedder(pooled)  # (N, D)

    def text_context(self, context: Tensor, context_mask: Tensor | None,
                     pooled: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The tokens every cross-attention sees: ``context`` plus, with ``pooled_tokens``, that many tokens
        mapped linearly from the pooled vector -> (N, L + k, Dc) and the mask (N, L + k); without
        ``text_tokens`` only the k pooled tokens (N, k, Dc); without ``pooled_tokens`` the inputs."""
        if self.pooled_to_tokens is None:
            return context, context_mask
        if pooled is None:
            raise ValueError(f"this DiT maps the pooled text vector to {self.config.pooled_tokens} context tokens "
                             "and needs it (pooled=None)")
        n, k = pooled.shape[0], self.config.pooled_tokens
        extra = self.pooled_to_tokens(pooled).reshape(n, k, -1)  # (N, k, Dc)
        ones = torch.ones(n, k, dtype=torch.bool, device=pooled.device)
        if not self.config.text_tokens:
            return extra, ones
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return torch.cat([context, extra], dim=1), torch.cat([context_mask, ones], dim=1)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        context_mask: Tensor | None = None,
        pooled: Tensor | None = None,
        control: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """``x`` (N, C, H, W), ``t`` scalar or (N,), ``context`` (N, L, Dc), ``context_mask`` (N, L) bool,
        ``pooled`` (N, Dp), ``control`` one (N, T, D) residual or None per block -> (N, C_out, H, W)."""
        height, width = x.shape[-2:]
        if control is not None and len(control) != len(self.blocks):
            raise ValueError(f"control has {len(control)} residuals, expected one per block ({len(self.blocks)})")
        h = self.patchify(x)  # (N, T, D)
        grid = self.grid(height, width)
        c = self.condition(t, pooled, h.shape[0])  # (N, D)
        context, context_mask = self.text_context(context, context_mask, pooled)  # (N, L [+ k], Dc)
        n_skips, skips = len(self.skip_linears or ()), []
        first_out = len(self.blocks) - n_skips  # blocks [0, n_skips) keep their output, [first_out, depth) take one
        for i, block in enumerate(self.blocks):
            if i >= first_out:
                h = self.skip_linears[i - first_out](torch.cat([h, skips.pop()], dim=-1))  # (N, T, D)
            h = block(h, c, context, context_mask, grid)  # (N, T, D)
            if control is not None and control[i] is not None:
                if control[i].shape != h.shape:
                    raise ValueError(
                        f"control[{i}] has shape {tuple(control[i].shape)}, expected {tuple(h.shape)} (N, T, D)"
                    )
                h = h + control[i]  # (N, T, D)
            if i < n_skips:
                skips.append(h)
        out = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(out, height, width)  # (N, C_out, H, W)


# --- presets ----------------------------------------------------------------------------------------

# "s-2" ... "xl-2" take hidden size, depth and heads from DiT Table 1 with patch 2 on a 4-channel latent.
PRESETS: dict[str, DiTConfig] = {
    "tiny-test": DiTConfig(hidden_size=32, depth=2, num_heads=2, context_dim=16, pooled_dim=16, frequency_dim=32),
    "shapes": DiTConfig(hidden_size=128, depth=6, num_heads=4, context_dim=128, pooled_dim=128, frequency_dim=128),
    "s-2": DiTConfig(hidden_size=384, depth=12, num_heads=6),
    "b-2": DiTConfig(hidden_size=768, depth=12, num_heads=12),
    "l-2": DiTConfig(hidden_size=1024, depth=24, num_heads=16),
    "xl-2": DiTConfig(hidden_size=1152, depth=28, num_heads=16),
}
