"""ComfyUI-syntax prompt weighting: parsing, weighted token ids, framing, and the blend with the empty prompt."""

from __future__ import annotations

import math

import pytest
import torch

from nodes.checkpoints.prompt import (apply_weights, frame_tensors, frame_weighted, needs_empty, parse_weights,
                                      split_groups, weighted_ids)


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("tokenizers")
    from nodes.checkpoints.tokenizer import ClipTokenizer
    return ClipTokenizer()


def segments(text: str) -> list[tuple[str, float]]:
    """parse_weights with weights rounded, so 1.1 * 1.1 compares as 1.21."""
    return [(s, round(w, 9)) for s, w in parse_weights(text)]


# --- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a photo of a cat", "masterpiece, best quality, 8k", "[cat] [[dog]]",
                                  "word:0.5", "a\\b c", "  spaced  out  ", "東京 🙂"])
def test_text_without_parentheses_is_one_segment(text):
    assert parse_weights(text) == [(text, 1.0)]


def test_empty_text_has_no_segments():
    assert parse_weights("") == []
    assert parse_weights("()") == []
    assert parse_weights("a()b") == [("a", 1.0), ("b", 1.0)]


def test_nesting_and_explicit_weights():
    assert segments("(a (b:1.5) c)") == [("a ", 1.1), ("b", 1.5), (" c", 1.1)]
    assert segments("x (a) y") == [("x ", 1.0), ("a", 1.1), (" y", 1.0)]
    (text, weight), = parse_weights("((a))")
    assert text == "a" and weight == pytest.approx(1.21) and weight != 1.1
    assert segments("(((a)))") == [("a", 1.331)]
    assert parse_weights("(a:0.5)") == [("a", 0.5)]
    assert parse_weights("((a:1.5))") == [("a", 1.5)]  # an explicit weight replaces the enclosing one
    assert segments("((a) b:2)") == [("a", 2.2), (" b", 2.0)]  # inner groups multiply from it
    assert segments("((a:0.5) b:2)") == [("a", 0.5), (" b", 2.0)]
    assert parse_weights("(a: 1.3 )") == [("a", 1.3)]  # Python float() accepts surrounding spaces
    assert parse_weights("(a:1e-1)") == [("a", 0.1)]
    assert parse_weights("(a:1.2:1.3)") == [("a:1.2", 1.3)]  # the last colon holds the number


def test_non_numeric_weight_is_literal_text():
    assert segments("(a:b)") == [("a:b", 1.1)]
    assert segments("(:1.3)") == [(":1.3", 1.1)]  # a colon first in the group is text
    assert segments("(a:1.2 b)") == [("a:1.2 b", 1.1)]
    assert segments("((a:b))") == [("a:b", 1.21)]


def test_square_brackets_are_text():
    assert segments("[a] (b) [c:0.5]") == [("[a] ", 1.0), ("b", 1.1), (" [c:0.5]", 1.0)]


def test_escaped_parentheses_are_literal():
    assert parse_weights(r"\(x\)") == [("(x)", 1.0)]
    assert segments(r"(\(x\))") == [("(x)", 1.1)]
    assert segments(r"a \(b (c) d\)") == [("a (b ", 1.0), ("c", 1.1), (" d)", 1.0)]
    assert parse_weights(r"(x\):2)") == [("x)", 2.0)]


def test_unclosed_parenthesis_is_literal_to_the_end():
    assert parse_weights("(a") == [("(a", 1.0)]
    assert parse_weights("a (b (c) d") == [("a ", 1.0), ("(b (c) d", 1.0)]
    assert segments("(x) (a") == [("x", 1.1), (" ", 1.0), ("(a", 1.0)]
    assert segments("((a)") == [("(a", 1.1)]  # the piece ends with ')' so it is a group; its '(' is text
    assert segments("((a:2)") == [("(a", 2.0)]


def test_stray_closing_parenthesis_disables_groups_until_depth_returns_to_zero():
    assert parse_weights("a)") == [("a)", 1.0)]
    assert parse_weights("a) (b)") == [("a) (b)", 1.0)]
    assert segments("a) ((b))") == [("a) (", 1.0), ("b", 1.1), (")", 1.0)]
    assert split_groups("a) ((b)) (c)") == ["a) (", "(b)", ") (c)"]


def test_split_groups_pieces_concatenate_to_the_text():
    for text in ["(a (b:1.5) c)", "a) ((b)) (c", "((((", "))))", ")(", "a(b)c(d(e)f)g", ""]:
        assert "".join(split_groups(text)) == text


# --- tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a photo of an astronaut riding a horse on mars", "", "Don't STOP, it's 100%!",
                                  "[cat] [[dog]] word:0.5 café 東京 🙂", "a\tb\n\nc   d", "e-mail C++ x² ½"])
def test_unweighted_ids_equal_plain_encoding(tok, text):
    pairs = weighted_ids(tok, text)
    assert [i for i, _ in pairs] == tok.encode(text)
    assert all(w == 1.0 for _, w in pairs)


def test_weights_reach_every_token_of_a_word(tok):
    word = "xyzzyplughfrobnicate"
    word_ids = tok.encode(word)
    assert len(word_ids) > 1
    pairs = weighted_ids(tok, f"a ({word}:1.3) b")
    assert [i for i, _ in pairs] == tok.encode("a") + word_ids + tok.encode("b")
    assert [w for _, w in pairs] == [1.0] + [1.3] * len(word_ids) + [1.0]


def test_escaped_parentheses_reach_the_tokenizer(tok):
    pairs = weighted_ids(tok, r"\(x\)")
    assert [i for i, _ in pairs] == tok.encode("(x)")
    assert tok.encode("(")[0] in [i for i, _ in pairs]
    assert [i for i, _ in weighted_ids(tok, r"(\(x\))")] == tok.encode("(x)")


def test_segments_are_tokenized_separately(tok):
    """As in ComfyUI, '(a)(b)' is two words, not the word 'ab'."""
    assert [i for i, _ in weighted_ids(tok, "(cat)(dog)")] == tok.encode("cat") + tok.encode("dog")
    assert tok.encode("cat") + tok.encode("dog") != tok.encode("catdog")


# --- frames -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 75, 76, 150, 151])
@pytest.mark.parametrize("truncate", [True, False])
def test_frames_equal_tokenizer_frames(tok, n, truncate):
    text = " ".join(["cat"] * n)
    ids = tok.encode(text)
    assert len(ids) == n
    frames = frame_weighted(weighted_ids(tok, text), tok, truncate=truncate)
    assert [[i for i, _ in f] for f in frames] == tok.frame(ids, truncate=truncate)
    assert len(frames) == (1 if truncate else max(1, math.ceil(n / 75)))
    assert all(len(f) == 77 and all(w == 1.0 for _, w in f) for f in frames)
    assert not needs_empty(frames)


def test_frames_with_openclip_padding():
    pytest.importorskip("tokenizers")
    from nodes.checkpoints.tokenizer import ClipTokenizer
    tok0 = ClipTokenizer(pad_id=0)
    frames = frame_weighted(weighted_ids(tok0, "(a cat:1.2)"), tok0, truncate=False)
    assert [[i for i, _ in f] for f in frames] == tok0.frame(tok0.encode("a cat"), truncate=False)
    assert frames[0][:4] == [(tok0.bos_id, 1.0), *((i, 1.2) for i in tok0.encode("a cat")), (tok0.eos_id, 1.0)]
    assert frames[0][4:] == [(0, 1.0)] * 73


def test_empty_prompt_frame(tok):
    frames = frame_weighted([], tok, truncate=False)
    assert frames == [[(tok.bos_id, 1.0), (tok.eos_id, 1.0)] + [(tok.pad_id, 1.0)] * 75]
    assert frame_weighted(weighted_ids(tok, ""), tok, truncate=True) == frames


def test_weights_follow_their_tokens_across_chunks(tok):
    text = " ".join(["cat"] * 76) + " (dog:1.5) cat"
    frames = frame_weighted(weighted_ids(tok, text), tok, truncate=False)
    assert len(frames) == 2
    dog = tok.encode("dog")[0]
    assert frames[1][:5] == [(tok.bos_id, 1.0), (tok.encode("cat")[0], 1.0), (dog, 1.5),
                             (tok.encode("cat")[0], 1.0), (tok.eos_id, 1.0)]
    assert needs_empty(frames)
    assert not needs_empty(frame_weighted(weighted_ids(tok, text), tok, truncate=True))  # dog was cut off


def test_frame_tensors_and_needs_empty(tok):
    frames = frame_weighted(weighted_ids(tok, "a (cat) (dog:1)"), tok, truncate=True)
    ids, weights = frame_tensors(frames)
    assert ids.shape == weights.shape == (1, 77) and ids.dtype == torch.long and weights.dtype == torch.float32
    assert ids[0, :5].tolist() == [tok.bos_id, *tok.encode("a cat dog"), tok.eos_id]
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.1, 1.0, 1.0])
    assert needs_empty(frames)
    assert not needs_empty(frame_weighted(weighted_ids(tok, "a (cat:1) dog"), tok, truncate=True))


# --- applying weights -------------------------------------------------------------------------------


def random_states(chunks: int = 2, length: int = 77, dim: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(chunks, length, dim, generator=g).to(dtype)
    z_empty = torch.randn(length, dim, generator=g).to(dtype)
    weights = torch.ones(chunks, length)
    weights[0, 3], weights[0, 4], weights[1, 10], weights[1, 11] = 1.1, 0.0, 2.5, -0.5
    return z, z_empty, weights


def test_apply_weights_formula():
    z, z_empty, weights = random_states()
    out = apply_weights(z, z_empty, weights)
    keep = weights == 1
    assert torch.equal(out[keep], z[keep])  # bit-identical, not merely close
    for c, t in (~keep).nonzero().tolist():
        w = weights[c, t]
        assert torch.equal(out[c, t], (z[c, t] - z_empty[t]) * w + z_empty[t])
    assert torch.equal(out[0, 4], z_empty[4])  # weight 0: the empty prompt's state
    assert not torch.allclose(out[0, 3], z[0, 3])


def test_apply_weights_matches_a_per_position_loop():
    z, z_empty, weights = random_states()
    expected = z.clone()
    for c in range(z.shape[0]):
        for t in range(z.shape[1]):
            w = float(weights[c, t])
            if w != 1.0:
                expected[c, t] = (expected[c, t] - z_empty[t]) * w + z_empty[t]
    assert torch.allclose(apply_weights(z, z_empty, weights), expected, atol=1e-6, rtol=0)


def test_apply_weights_accepts_batched_empty_and_keeps_dtype():
    z, z_empty, weights = random_states()
    assert torch.equal(apply_weights(z, z_empty[None], weights), apply_weights(z, z_empty, weights))
    z16, e16, _ = random_states(dtype=torch.float16)
    out = apply_weights(z16, e16, weights)
    assert out.dtype == torch.float16
    assert torch.equal(out[weights == 1], z16[weights == 1])
    assert torch.equal(apply_weights(z, z_empty, torch.ones(2, 77)), z)


def test_apply_weights_rejects_mismatched_shapes():
    z, z_empty, weights = random_states()
    with pytest.raises(ValueError, match="apply_weights"):
        apply_weights(z, z_empty[:76], weights)
    with pytest.raises(ValueError, match="apply_weights"):
        apply_weights(z, z_empty, weights[:1])
