"""CLIP's tokenizer: byte-level BPE with an end-of-word marker (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"), the one every SD1.x / SD2.x / SDXL text encoder was trained with.

Vocabulary (49,408 ids, in this order): the 256 byte symbols (printable bytes first: ``!`` is 0, ``a`` is 64), the
same 256 with ``</w>`` appended (``a</w>`` is 320), one symbol per
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


PRINTABLE_BYTES = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def byte_symbols() -> dict[int, str]:
    """The printable symbol standing for each byte (byte-level BPE's alphabet), in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first, in byte order (``!`` is id
    0); the others (controls, space, a few Latin-1 gaps) follow, in byte order, given the code points from 256
    upward (space is ``Ġ``)."""
    kept = set(PRINTABLE_BYTES)
    rest = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in PRINTABLE_BYTES}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


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
    symbols = list(byte_symbols().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"a CLIP vocabulary has {VOCAB_SIZE} tokens; these merges give {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}


@dataclass(frozen=True)
class ClipTokenizer:
    """Text -> CLIP token ids. ``pad_id`` is what fills a frame after EOS (EOS for SD1.x, 0 for OpenCLIP).

    ``folder``: a diffusers ``tokenizer/`` folder whose ``vocab.json`` and ``merges.txt`` define the BPE (read by
    :func:`folder_tokenizer`, which also checks that it is CLIP's vocabulary); None: the shipped merges."""

    pad_id: int = VOCAB_SIZE - 1
    length: int = CONTEXT
    folder: str | None = None

    bos_id = VOCAB_SIZE - 2
    eos_id = VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text``, without BOS/EOS or padding."""
        return _backend(self.folder).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in _backend(self.folder).encode_batch(list(texts), add_special_tokens=False)]

    def frame(self, ids: list[int], *, truncate: bool = True) -> list[list[int]]:
        """``ids`` framed as ``length``-position windows ``[BOS, ..., EOS, pad...]``.

        ``truncate=True``: one window, ids cut to ``length - 2`` (the pipelines' behaviour). ``False``: as many
        windows of ``length - 2`` ids as needed (at least one)."""
        room = self.length - 2
        chunks = [ids[:room]] if truncate else [ids[i:i + room] for i in range(0, max(len(ids), 1), room)]
        return [[self.bos_id, *c, self.eos_id] + [self.pad_id] * (room - len(c)) for c in chunks]


MAX_VOCAB_BYTES = 16 << 20  # CLIP's vocab.json is 1.6 MB, merges.txt 0.5 MB


class TokenizerFilesError(ValueError):
    """A tokenizer folder whose files are missing or are not CLIP's BPE vocabulary."""


def folder_files(folder: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``vocab.json`` and ``merges.txt`` of a diffusers tokenizer folder, checked to be CLIP's layout (49,408
    ids, BOS 49406, EOS 49407, one merge per line after a ``#version`` header)."""
    import json

    from nodegraph.safeio import read_bytes

    folder = Path(folder)
    try:
        vocab = json.loads(read_bytes(folder / "vocab.json", MAX_VOCAB_BYTES))
        lines = read_bytes(folder / "merges.txt", MAX_VOCAB_BYTES).decode("utf-8").splitlines()
    except FileNotFoundError as exc:
        raise TokenizerFilesError(f"tokenizer file {folder.name}/{Path(exc.filename or '').name} is missing") from None
    except Exception:  # noqa: BLE001 - unreadable, too large, not JSON/UTF-8: one answer, without the contents
        raise TokenizerFilesError(f"{folder.name}/vocab.json or merges.txt is not a readable CLIP vocabulary") from None
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]
    ok = (isinstance(vocab, dict) and len(vocab) == VOCAB_SIZE and vocab.get(BOS) == VOCAB_SIZE - 2
          and vocab.get(EOS) == VOCAB_SIZE - 1 and all(len(m) == 2 for m in merges)
          and all(isinstance(v, int) for v in vocab.values()))
    if not ok:
        raise TokenizerFilesError(f"{folder.name}/ does not hold CLIP's BPE vocabulary ({VOCAB_SIZE} ids with "
                                  f"{BOS} = {VOCAB_SIZE - 2} and {EOS} = {VOCAB_SIZE - 1})")
    return vocab, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _backend(folder: str | None = None):
    """The ``tokenizers`` pipeline for CLIP's BPE, built once per process from the shipped merges (or from a
    tokenizer folder's files)."""
    try:
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    except ImportError as exc:  # pragma: no cover - the models extra installs it
        raise ImportError("CLIP tokenization needs the 'tokenizers' package: pip install 'nodegraph[models]'") from exc
    if folder is None:
        merges = read_merges()
        vocab = clip_vocab(merges)
    else:
        vocab, merges = folder_files(folder)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                               continuing_subword_prefix="", unk_token=EOS, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.add_special_tokens([BOS, EOS])  # written in a prompt they are the markers, as in CLIP and the pipelines
    return tok
