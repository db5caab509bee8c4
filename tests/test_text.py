"""The byte tokenizer against transformers' DiaTokenizer and the official rules."""

from __future__ import annotations

import pytest
import torch

from dia_fast.text import decode_ids, encode_batch, encode_text

from .hf_reference import hf_processor

CASES = [
    "[S1] Hello there. [S2] Hi!",
    "[S1] Ünïcödé — ça va? 日本語 (laughs)",
    "no tags at all",
    "[S2][S1] adjacent tags [S1]",
    "x",
]


@pytest.fixture(scope="module")
def tokenizer():
    return hf_processor().tokenizer


@pytest.mark.parametrize("text", CASES)
def test_ids_match_transformers_tokenizer(tokenizer, text):
    assert encode_text(text) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_official_rules():
    # [S1] -> 1, [S2] -> 2, every other UTF-8 byte as itself
    assert encode_text("[S1] é[S2]") == [1, 32, 0xC3, 0xA9, 2]
    assert decode_ids(encode_text(CASES[1])) == CASES[1]


def test_batch_is_right_padded_with_a_mask(tokenizer):
    ids, mask = encode_batch(CASES)
    ref = tokenizer(CASES, padding=True, add_special_tokens=False, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"].bool())
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_pad_to_multiple_keeps_the_mask():
    ids, mask = encode_batch(["abc"], pad_to_multiple=8)
    assert ids.shape == (1, 8) and mask.sum() == 3 and ids[0, 3:].eq(0).all()
    for bad, error in ((0, ValueError), (-8, ValueError), (8.0, TypeError)):  # 0 divided by zero
        with pytest.raises(error, match="pad_to_multiple must be"):
            encode_batch(["abc"], pad_to_multiple=bad)


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_empty_text_is_an_error(bad):
    with pytest.raises(ValueError, match="empty"):
        encode_text(bad)


def test_too_long_text_names_byte_count_and_limit():
    text = "é" * 600  # 1200 bytes
    with pytest.raises(ValueError, match=r"1200 bytes .* at most 1024"):
        encode_text(text)
    assert len(encode_text("[S1]" * 1024)) == 1024  # tags count one byte each: fits exactly


def test_non_string_and_empty_batch():
    with pytest.raises(TypeError):
        encode_text(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no texts"):
        encode_batch([])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[S1] Hello there, how are you today?", []),
        ("[S1] Hi! [S2] Hello there, friend.", []),
        ("[S3] Hello there, how are you today?", ["unknown speaker tag(s) [S3]", "does not start with [S1] or [S2]"]),
        ("[S1] Hello there. [S4] How are you today?", ["unknown speaker tag(s) [S4]"]),
        ("Hello there, how are you today?", ["does not start with [S1] or [S2]"]),
        ("[S1] [S2] ", ["only speaker tags"]),
        ("[S1] Hi.", ["very short text (3 characters)"]),
        ("[S1] Hello\x00 there, how are you today?", ["control characters (U+0000)"]),
        ("[S1] Line one, and more.\n[S2] Line two, and more.", []),  # newlines and tabs are fine
    ],
)
def test_doubtful_text_warns_what_is_doubtful(text, expected):
    from dia_fast.text import text_doubts

    doubts = text_doubts(text)
    assert len(doubts) == len(expected), doubts
    for d, e in zip(doubts, expected, strict=True):
        assert e in d
