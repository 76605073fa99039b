"""Byte-level text encoder: UTF-8 bytes -> pre-LN transformer -> token embeddings + pooled vector.

The tokenizer needs no vocabulary file: every string is its UTF-8 bytes shifted past three special ids
(PAD=0, BOS=1, EOS=2), framed as ``BOS bytes EOS`` and truncated to ``max_length`` (byte-level models:
ByT5, Xue et al. 2022). The encoder is a bidirectional pre-LN transformer (Vaswani et al. 2017) with
learned absolute positions; padding is excluded from attention by a key mask, padded output tokens are
zero, and the pooled vector is a masked mean of the final tokens followed by a linear projection, so a
sequence's outputs do not depend on how much padding its batch needed.

This module also holds the attention and feed-forward layers shared by the denoisers (``dit``, ``unet``):
:class:`Attention` (self- or cross-attention through ``scaled_dot_product_attention`` with an optional key
mask) and :class:`FeedForward` (GELU MLP, or GEGLU as in Shazeer 2020).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nodes.models.config import ModelConfig, from_preset

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


# --- config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextConfig(ModelConfig):
    """Byte-level transformer text encoder; ``width`` is both the token and the pooled dimension."""

    model_type: ClassVar[str] = "text"
    max_length: int = 77  # tokens including BOS and EOS
    width: int = 512
    layers: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS + EOS), got {self.max_length}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_name(cls, name: str) -> "TextConfig":
        return from_preset(PRESETS, name, cls.__name__)


# --- tokenizer --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes + BOS/EOS/PAD; no vocabulary file."""

    max_length: int

    def tokenize(self, text: str) -> list[int]:
        """``[BOS, byte + 3 ..., EOS]``, bytes truncated so the whole fits ``max_length``."""
        body = text.encode("utf-8")[: self.max_length - 2]
        return [BOS_ID, *(b + BYTE_OFFSET for b in body), EOS_ID]

    def __call__(self, texts: Sequence[str], pad_to_max_length: bool = False) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) int64 right-padded with PAD, and the attention mask (B, L) bool (True = token).

        ``L`` is the longest sequence in the batch, or ``max_length`` when ``pad_to_max_length``.
        """
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a single string")
        rows = [self.tokenize(t) for t in texts]
        length = self.max_length if pad_to_max_length else max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of :meth:`tokenize` (special ids dropped, invalid UTF-8 replaced)."""
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


# --- layers (shared with the denoisers) -------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, else cross-attention to it.

    ``mask`` (N, S) bool marks the keys that may be attended (True = keep). A sample whose keys are all
    masked gets a zero attention output (before ``to_out``) instead of NaN.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        n, t, d = x.shape  # (N, T, D)
        source = x if context is None else context  # (N, S, Dc)
        q, k, v = (
            proj(inp).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, H, T|S, D/H)
            for proj, inp in ((self.to_q, x), (self.to_k, source), (self.to_v, source))
        )
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        else:
            any_key = mask.any(dim=-1)  # (N,)
            keep = (mask | ~any_key[:, None])[:, None, None, :]  # (N, 1, 1, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            out = out * any_key[:, None, None, None].to(out.dtype)
        return self.to_out(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class FeedForward(nn.Module):
    """Position-wise MLP: ``Linear -> GELU -> Linear``, or GEGLU (gated GELU) when ``gated``."""

    def __init__(self, dim: int, hidden: int, gated: bool = False, approximate: str = "none") -> None:
        super().__init__()
        self.gated = gated
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden * 2 if gated else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # (..., hidden or 2 * hidden)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate, approximate=self.approximate)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.fc2(h)  # (..., dim)


# --- blocks -----------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: masked self-attention then MLP, each residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)  # (B, L, D)
        return x + self.mlp(self.norm2(x))  # (B, L, D)


# --- model ------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Strings -> (tokens (B, L, D), pooled (B, D), mask (B, L)) with ``D = config.width``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = ByteTokenizer(config.max_length)
        self.token_embedding = nn.Parameter(torch.empty(VOCAB_SIZE, config.width))
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(
            EncoderBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width)
        self.pool_proj = nn.Linear(config.width, config.width)
        # trunc_normal_ rather than normal_: normal_ on the meta device (used by load_folder) imports torch._dynamo.
        nn.init.trunc_normal_(self.token_embedding, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.01)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and mask (B, L) -> tokens (B, L, D) (zero at padding) and pooled (B, D)."""
        length = ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.config.max_length}")
        x = F.embedding(ids, self.token_embedding) + self.position_embedding[:length]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)  # (B, L, D)
        keep = mask[..., None].to(x.dtype)  # (B, L, 1)
        x = self.norm(x) * keep  # (B, L, D)
        pooled = x.sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, D)
        return x, self.pool_proj(pooled)  # (B, L, D), (B, D)

    def encode(self, texts: Sequence[str], pad_to_max_length: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenize and encode: (tokens (B, L, D), pooled (B, D), mask (B, L) bool)."""
        ids, mask = self.tokenizer(texts, pad_to_max_length)
        device = self.token_embedding.device
        ids, mask = ids.to(device), mask.to(device)
        tokens, pooled = self(ids, mask)
        return tokens, pooled, mask


# --- presets ----------------------------------------------------------------------------------------

PRESETS: dict[str, TextConfig] = {
    "tiny-test": TextConfig(max_length=16, width=16, layers=1, heads=2),
    "shapes": TextConfig(max_length=48, width=128, layers=3, heads=4),
    "base": TextConfig(max_length=256, width=512, layers=8, heads=8),
}
