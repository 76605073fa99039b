"""Prompt emphasis in ComfyUI's syntax, and long prompts framed as several CLIP windows.

Syntax (what a ComfyUI user writes, parsed as ComfyUI's ``CLIPTextEncode`` parses it):

- ``(text)`` multiplies the weight of ``text`` by 1.1; groups nest multiplicatively (``((text))`` = 1.21).
- ``(text:1.3)`` *sets* the group's weight to 1.3, whatever the enclosing weight; groups inside it then
  multiply from 1.3. The number is what follows the group's *last* ``:`` (read with Python's ``float``, so
  ``" 1.3"``, ``"1e-1"`` and ``"inf"`` count). When that is not a number (``(a:b)``, ``(a (b:1.5) c)``), or the
  ``:`` is the group's first character, the colon is literal text and the group gets the plain 1.1 factor.
- ``\\(`` and ``\\)`` are literal parentheses: the backslash is dropped and the paren reaches the tokenizer.
  Any other backslash is ordinary text.
- ``[text]`` is ordinary text (A1111's de-emphasis is not ComfyUI syntax), as are ``BREAK`` and
  ``embedding:name`` (textual-inversion embeddings are not supported here).
- ``()`` vanishes; an empty prompt has no segments.

Unbalanced parentheses follow ComfyUI's scanner, which keeps one depth counter over the whole string:

- An unclosed ``(`` starts a piece that runs to the end of the text; a piece that does not both start
  with ``(`` and end with ``)`` is literal, so ``a (b (c) d`` is ``a `` then ``(b (c) d`` verbatim at the
  outer weight: the parens, even the balanced inner ``(c)``, are tokenized as text. A piece that ends
  with ``)`` by chance is still a group: ``((a)`` is the group ``(a`` at 1.1 (its inner ``(`` literal).
- A stray ``)`` drives the depth below zero; it and everything up to the ``(`` that brings the depth
  back to zero are literal, and only a ``(`` found at depth zero opens a group again. So ``a) (b)`` is
  all literal at 1.0, while ``a) ((b))`` is ``a) (`` at 1.0, ``b`` at 1.1, ``)`` at 1.0.

Matching ComfyUI here (rather than, say, auto-closing groups) keeps a workflow written for ComfyUI encoding
to the same tokens and weights.

Segments are tokenized one by one and never merged, so ``(a)(b)`` tokenizes ``a`` and ``b`` separately, as
ComfyUI does. ComfyUI splits each segment on spaces and tokenizes word by word; CLIP's pre-tokenizer never
joins across whitespace, so tokenizing the whole segment gives the same ids (for a prompt without
parentheses: exactly ``ClipTokenizer.encode(text)``).

Framing: windows of ``tokenizer.length`` (77) positions, ``[BOS, up to 75 ids, EOS, pad...]``; BOS, EOS and pad
carry weight 1. ``truncate=True`` keeps the first 75 ids in one window (diffusers' pipelines);
``truncate=False`` cuts the ids into plain consecutive 75-id chunks (A1111's chunking without its
word-boundary shift). ComfyUI additionally moves a word of fewer than 8 tokens that would straddle a chunk
boundary whole into the next chunk; that rule is deliberately not implemented, so the windows' ids are
always exactly :meth:`ClipTokenizer.frame`'s.

Weighting (ComfyUI's): the encoder runs on the unweighted windows and once on the empty window
``tokenizer.frame([])[0]`` (same encoder, same layer / clip skip), giving ``z_empty``. At every position with
weight ``w != 1``: ``z = (z - z_empty) * w + z_empty``, i.e. the token's offset from the empty prompt is
scaled; positions with weight exactly 1 are returned untouched. Weight 0 gives ``z_empty`` there. The
pooled vector is not weighted.
"""

from __future__ import annotations

import torch

from nodes.checkpoints.tokenizer import ClipTokenizer

GROUP_FACTOR = 1.1  # what one pair of parentheses multiplies the weight by
ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))  # escape -> placeholder the scanner cannot mistake for a paren

Segment = tuple[str, float]
WeightedId = tuple[int, float]
Frame = list[WeightedId]


# --- parsing ----------------------------------------------------------------------------------------


def parse_weights(text: str) -> list[Segment]:
    """``text`` as ``(segment, weight)`` pairs in order, by ComfyUI's emphasis rules (module docstring).

    Text without parentheses is one segment at weight 1.0; the empty string gives no segments."""
    return [(unescape(piece), weight) for piece, weight in weigh(escape(text), 1.0)]


def escape(text: str) -> str:
    for written, placeholder in ESCAPES:
        text = text.replace(written, placeholder)
    return text


def unescape(text: str) -> str:
    for written, placeholder in ESCAPES:
        text = text.replace(placeholder, written[1])
    return text


def split_groups(text: str) -> list[str]:
    """The top-level pieces of ``text``: runs of text, and ``(...)`` spans closed at depth zero.

    One depth counter for the whole string, which may go negative after a stray ``)``; only a ``(`` met at
    depth zero starts a new piece. An unclosed group runs to the end of the text."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(" and depth == 0 and current:
            pieces.append(current)
            current = ""
        current += char
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current)
                current = ""
    if current:
        pieces.append(current)
    return pieces


def group_weight(inner: str, outer: float) -> Segment:
    """The text and weight of a group's inside: an explicit ``:number`` suffix replaces the weight, otherwise
    the enclosing weight is multiplied by :data:`GROUP_FACTOR`."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1:])
        except ValueError:
            pass
    return inner, outer * GROUP_FACTOR


def weigh(text: str, weight: float) -> list[Segment]:
    """Escaped ``text`` at ``weight``, its groups weighted recursively (one level per nesting level)."""
    out: list[Segment] = []
    for piece in split_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            out += weigh(*group_weight(piece[1:-1], weight))
        else:
            out.append((piece, weight))
    return out


# --- tokens and frames ------------------------------------------------------------------------------


def weighted_ids(tokenizer: ClipTokenizer, text: str) -> list[WeightedId]:
    """The BPE ids of ``text`` (no BOS/EOS), each carrying the weight of the segment it came from."""
    segments = parse_weights(text)
    if not segments:
        return []
    encoded = tokenizer.encode_batch([piece for piece, _ in segments])
    return [(i, weight) for ids, (_, weight) in zip(encoded, segments) for i in ids]


def frame_weighted(pairs: list[WeightedId], tokenizer: ClipTokenizer, *, truncate: bool) -> list[Frame]:
    """``pairs`` framed as windows ``[BOS, up to length - 2 pairs, EOS, pad...]``, specials at weight 1.

    ``truncate=True``: one window of the first ``length - 2``. ``False``: plain consecutive chunks, at least
    one (no word-boundary shifting); the ids equal ``tokenizer.frame(ids, truncate=truncate)``."""
    room = tokenizer.length - 2
    chunks = [pairs[:room]] if truncate else [pairs[i:i + room] for i in range(0, max(len(pairs), 1), room)]
    bos, eos, pad = (tokenizer.bos_id, 1.0), (tokenizer.eos_id, 1.0), (tokenizer.pad_id, 1.0)
    return [[bos, *chunk, eos] + [pad] * (room - len(chunk)) for chunk in chunks]


def frame_tensors(frames: list[Frame]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames as an id tensor (chunks, length) int64 and a weight tensor (chunks, length) float32."""
    ids = torch.tensor([[i for i, _ in frame] for frame in frames], dtype=torch.long)
    weights = torch.tensor([[w for _, w in frame] for frame in frames], dtype=torch.float32)
    return ids, weights


def needs_empty(frames: list[Frame]) -> bool:
    """Whether any position is weighted (weight != 1), i.e. whether the empty window must be encoded."""
    return any(w != 1.0 for frame in frames for _, w in frame)


# --- applying weights to hidden states --------------------------------------------------------------


def apply_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z`` (chunks, T, D) with ``(z - z_empty) * w + z_empty`` at every position whose weight ``w != 1``.

    ``z_empty`` (T, D) or (1, T, D): the encoder's hidden states for the empty window. ``weights``
    (chunks, T). The blend is computed in at least float32 and cast back to ``z``'s dtype; positions with
    weight exactly 1 are ``z``'s own values, bit for bit."""
    if z_empty.dim() == 2:
        z_empty = z_empty.unsqueeze(0)  # (1, T, D)
    if z.dim() != 3 or z_empty.shape != (1, *z.shape[1:]) or weights.shape != z.shape[:2]:
        raise ValueError(f"apply_weights wants z (chunks, T, D), z_empty (T, D) or (1, T, D), weights "
                         f"(chunks, T); got {tuple(z.shape)}, {tuple(z_empty.shape)}, {tuple(weights.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    w = weights.to(device=z.device, dtype=dtype).unsqueeze(-1)  # (chunks, T, 1)
    base = z_empty.to(device=z.device, dtype=dtype)
    blended = ((z.to(dtype) - base) * w + base).to(z.dtype)
    return torch.where(w != 1, blended, z)
