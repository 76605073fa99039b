"""The shipped CLIP tokenizer against transformers' CLIPTokenizer (built from the same vocabulary files)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from nodes.checkpoints.tokenizer import VOCAB_SIZE, ClipTokenizer, byte_symbols, clip_vocab, read_merges  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from .sd_fixtures import clip_tokenizer, tokenizer_files

    folder = tmp_path_factory.mktemp("clip_tok")
    tokenizer_files(folder, "<|endoftext|>")
    return clip_tokenizer(folder)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "highly", "detailed", "8k",
             "masterpiece", "(best quality:1.2)", "[cat]", "don't", "it's", "we're", "they'll", "I'd", "you've",
             "café", "naïve", "Straße", "東京", "猫", "🙂", "🚀🌕", "—", "…", "100%", "3.14159", "#hashtag",
             "@user", "e-mail", "C++", "x²", "½", "ＡＢＣ", "Ω", "\t", "\n", "  ", "UPPER", "MiXeD", "<|endoftext|>",
             "!!!", "???", "a,b,c", "(((", ")))", "\\(escaped\\)", "word:0.5", "cyberpunk", "neon-lit", "ré", "ß"]
    out = []
    for i in range(n):
        k = rng.randint(0, 90 if i % 10 == 0 else 15)
        out.append(" ".join(rng.choice(words) for _ in range(k)))
    for _ in range(n // 10):  # raw random code points, printable and not
        out.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF), rng.randint(0x3000, 0x9FFF),
                                         rng.randint(0x1F300, 0x1FAFF)])) for _ in range(rng.randint(1, 40))))
    return out


def test_vocabulary_layout():
    vocab = clip_vocab(read_merges())
    assert len(vocab) == VOCAB_SIZE == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    symbols = byte_symbols()
    assert len(set(symbols.values())) == 256 and symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"
    # CLIP's published ids (the vocabulary order of its reference tokenizer: printable bytes first)
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 320 and vocab["Ġ"] == 220


def test_known_ids_of_clips_reference_vocabulary():
    """"a photo of a cat" is [320, 1125, 539, 320, 2368] in every CLIP text encoder's vocabulary."""
    assert ClipTokenizer().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ClipTokenizer().encode("!") == [256]  # "!</w>": 256 + 0


def test_ids_equal_transformers_on_varied_prompts(reference):
    tok = ClipTokenizer()
    texts = prompts(1100)
    ours = tok.encode_batch(texts)
    theirs = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches[:3], f"{len(mismatches)} of {len(texts)} prompts differ"


def test_framing_matches_the_pipelines(reference):
    text = "a photo of an astronaut riding a horse on mars"
    sd1 = ClipTokenizer()
    ids = sd1.frame(sd1.encode(text))[0]
    ref = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids == ref and len(ids) == 77 and ids[-1] == 49407
    open_clip = ClipTokenizer(pad_id=0)
    framed = open_clip.frame(open_clip.encode(text))[0]
    n = len(open_clip.encode(text)) + 2
    assert framed[:n] == ref[:n] and framed[n:] == [0] * (77 - n)


def test_long_prompts_are_chunked_or_truncated():
    tok = ClipTokenizer()
    ids = tok.encode("cat " * 200)
    assert len(ids) == 200
    (one,) = tok.frame(ids)
    assert len(one) == 77 and one[1:76] == ids[:75]
    chunks = tok.frame(ids, truncate=False)
    assert [len(c) for c in chunks] == [77, 77, 77]
    assert sum(c.count(ids[0]) for c in chunks) == 200
    assert tok.frame([], truncate=False) == [[49406, 49407] + [49407] * 75]
