"""CLIP's tokenizer: byte-level BPE with an end-of-word marker (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"), the one every SD1.x / SD2.x / SDXL text encoder was trained with.

Vocabulary (49,408 ids, in this order): the 256 byte symbols, the same 256 with ``</w>`` appended, one symbol per
merge (48,894 merges), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). The merges ship in this
package (``data/clip_bpe_merges.txt.gz``: the first 48,894 merge lines of the vocabulary file in open_clip's wheel),
so nothing is fetched at run time. The BPE itself runs in the ``tokenizers`` library (optional dependency,
imported on first use).

Text pipeline: Unicode NFC, runs of whitespace to one space, lower case; words split by CLIP's pattern (letters
runs, single digits, runs of other symbols, English contractions); each word is encoded as UTF-8 bytes mapped to
printable symbols and merged. The markers ``<|startoftext|>``/``<|endoftext|>`` written in a prompt are the special tokens, as in CLIP's
reference tokenizer. Without ``ftfy`` installed this is exactly what transformers' ``CLIPTokenizer`` does
(tested against it on varied prompts).

Framing (:meth:`ClipTokenizer.frame`): ``[BOS] tokens [EOS] pad...`` to 77 positions. SD1.x pads with EOS;
OpenCLIP's encoders (SD2.x, SDXL's second encoder) pad with id 0. Prompts longer than 75 tokens are framed as
several chunks of 75 (what ComfyUI and A1111 do); plain truncation is what diffusers' pipelines do.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

MERGES_FILE = Path(__file__).parent / "data" / "clip_bpe_merges.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT = 77
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The printable symbol standing for each byte 0..255 (byte-level BPE's alphabet).

    Bytes that are printable Latin-1 characters stand for themselves; the others (controls, space, a few
    Latin-1 gaps) are given the code points from 256 upward, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    symbols, extra = [], 0
    for b in range(256):
        if b in kept:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def read_merges(path: Path = MERGES_FILE) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        next(fh)  # the header line (merges themselves may start with '#')
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    merges = []
    for line in lines:
        a, b = line.split(" ")
        merges.append((a, b))
    return merges


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"a CLIP vocabulary has {VOCAB_SIZE} tokens; these merges give {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}


@dataclass(frozen=True)
class ClipTokenizer:
    """Text -> CLIP token ids. ``pad_id`` is what fills a frame after EOS (EOS for SD1.x, 0 for OpenCLIP)."""

    pad_id: int = VOCAB_SIZE - 1
    length: int = CONTEXT

    bos_id = VOCAB_SIZE - 2
    eos_id = VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text``, without BOS/EOS or padding."""
        return _backend().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in _backend().encode_batch(list(texts), add_special_tokens=False)]

    def frame(self, ids: list[int], *, truncate: bool = True) -> list[list[int]]:
        """``ids`` framed as ``length``-position windows ``[BOS, ..., EOS, pad...]``.

        ``truncate=True``: one window, ids cut to ``length - 2`` (the pipelines' behaviour). ``False``: as many
        windows of ``length - 2`` ids as needed (at least one)."""
        room = self.length - 2
        chunks = [ids[:room]] if truncate else [ids[i:i + room] for i in range(0, max(len(ids), 1), room)]
        return [[self.bos_id, *c, self.eos_id] + [self.pad_id] * (room - len(c)) for c in chunks]


@functools.lru_cache(maxsize=1)
def _backend():
    """The ``tokenizers`` pipeline for CLIP's BPE, built once per process from the shipped merges."""
    try:
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    except ImportError as exc:  # pragma: no cover - the models extra installs it
        raise ImportError("CLIP tokenization needs the 'tokenizers' package: pip install 'nodegraph[models]'") from exc
    merges = read_merges()
    tok = Tokenizer(models.BPE(vocab=clip_vocab(merges), merges=merges, end_of_word_suffix="</w>",
                               continuing_subword_prefix="", unk_token=EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.add_special_tokens([BOS, EOS])  # written in a prompt they are the markers, as in CLIP and the pipelines
    return tok
