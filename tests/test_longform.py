"""Long-form text: splitting into chunks that fit Dia's budgets, and chunked generation with crossfades."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from dia_fast.audio import crossfade_join
from dia_fast.longform import chunk_budget, generate_long, split_text, split_text_spans, spoken_chars, text_tokens

TAG = re.compile(r"\[S[12]\]")
WORDS = ["hello", "there", "speech", "model", "(laughs)", "café", "naïve", "über", "data", "fast", "a", "I", "ok"]


def _random_text(rng: random.Random) -> str:
    parts = []
    if rng.random() < 0.3:
        parts.append("Intro without a tag. ")
    for _ in range(rng.randint(1, 6)):
        parts.append(rng.choice(["[S1]", "[S2]"]) + rng.choice([" ", "", "  "]))
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(1, 12)
            words = " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()
            parts.append(words + rng.choice([". ", "! ", "? ", "... ", ".\n", ", ", "… "]))
    return "".join(parts)


def _tag_before(text: str, pos: int) -> str | None:
    tags = [m.group() for m in TAG.finditer(text) if m.start() <= pos]
    return tags[-1] if tags else None


# ------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("max_bytes", "max_chars"), [(48, None), (1024, 30), (64, 40), (200, 120)])
def test_chunks_fit_and_cover_every_byte_once(seed, max_bytes, max_chars):
    text = _random_text(random.Random(seed))
    spans = split_text_spans(text, max_bytes, max_chars)
    chunks = split_text(text, max_bytes, max_chars)
    assert chunks == [s.text for s in spans]

    # contiguous spans covering the text once, in order; chunk = carried tag + source slice
    assert spans[0].start == 0 and spans[-1].end == len(text)
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.end == b.start
    for s in spans:
        assert s.text == s.prefix + text[s.start : s.end]
        assert s.prefix in ("", "[S1] ", "[S2] ")

    # independent of the spans: without tags and whitespace, the chunks concatenate to the text
    def bare(s: str) -> str:
        return re.sub(r"\s", "", TAG.sub("", s))

    assert "".join(bare(c) for c in chunks) == bare(text)

    for s in spans:
        assert not re.search(r"\[S[12]\]\s*$", s.text)  # no chunk ends in a tag with no words after it
        assert text_tokens(s.text) <= max_bytes
        assert max_chars is None or spoken_chars(s.text) <= max_chars
        # each chunk speaks as the speaker active where it starts in the source text
        assert TAG.match(s.text) or _tag_before(text, s.start) is None
        if TAG.match(s.text):
            assert s.text[:4] == _tag_before(text, s.start)
        # cuts fall between words: before a cut is whitespace or the end of a tag
        if s.start > 0:
            assert (
                text[s.start - 1].isspace()
                or text[s.start - 4 : s.start] in ("[S1]", "[S2]")
                or TAG.match(text, s.start)
            )


def test_a_turn_split_between_words_keeps_its_tag_with_its_first_word():
    # the [S2] sentence does not fit a chunk: before, its tag alone could end the previous chunk
    text = "[S1] Aaaa bbbb ccc. [S2] " + " ".join(f"word{i}" for i in range(30)) + "."
    chunks = split_text(text, 1024, 14)
    assert chunks[:3] == ["[S1] Aaaa bbbb ccc. ", "[S2] word0 word1 ", "[S2] word2 word3 "]


def test_split_prefers_sentence_and_turn_boundaries():
    text = "[S1] One two three. Four five six! [S2] Seven eight? Nine ten."
    assert split_text(text, 1024, 30) == ["[S1] One two three. Four five six! ", "[S2] Seven eight? Nine ten."]
    assert split_text(text, 1024, 20) == [
        "[S1] One two three. ",
        "[S1] Four five six! ",
        "[S2] Seven eight? ",
        "[S2] Nine ten.",
    ]
    assert split_text(text, 1024) == [text]
    # a line break ends a sentence too (titles, lists, verse)
    assert split_text("[S1] A title\n\nA first line\nthe second", 1024, 12) == [
        "[S1] A title\n\n",
        "[S1] A first line\n",
        "[S1] the second",
    ]


def test_long_sentence_splits_between_words_and_carries_the_tag():
    text = "[S2] alpha beta gamma delta epsilon zeta eta theta"
    chunks = split_text(text, 20)
    # tokens: the tag counts 1, so "[S2] alpha beta gamma " is 19 and "... delta " would be 25
    assert chunks == ["[S2] alpha beta gamma ", "[S2] delta epsilon ", "[S2] zeta eta theta"]
    assert all(text_tokens(c) <= 20 for c in chunks)


def test_a_long_sentence_is_never_cut_inside_a_non_verbal_tag():
    """Split between words, "(clears throat)" stays one word at every budget (the model read "(clears" and
    "throat)" as words); a long parenthetical aside still splits between its words."""
    text = "[S1] well I was going to say something about that but then (clears throat) I forgot what it was entirely"
    for budget in range(20, 100):
        chunks = split_text(text, 1024, budget)
        assert all(("(clears" in c) == ("throat)" in c) for c in chunks), (budget, chunks)
        assert "".join(re.sub(r"\[S1\] ", "", c) for c in chunks) == text.removeprefix("[S1] ")
    aside = "[S1] and then (" + "a very long aside that goes on and on " * 3 + ") it ended"
    assert len(split_text(aside, 1024, 40)) > 2
    # a tag longer than the chunk budget still splits, between its words (it was an error)
    tight = split_text("He stopped. (clears his throat and sighs) Then he went on.", 1024, 20)
    assert "".join(tight) == "He stopped. (clears his throat and sighs) Then he went on."
    assert all(spoken_chars(c) <= 20 for c in tight)


def test_byte_budget_counts_utf8_bytes_and_tags_as_one():
    assert text_tokens("[S1] é") == 1 + 1 + 2
    assert spoken_chars("[S1]  Hi   there [S2] x") == len("Hi there x")
    text = "[S1] ééé ééé"  # tokens: 1 + 1 + 6 + 1 + 6 = 15
    assert split_text(text, 15) == [text]
    assert split_text(text, 14) == ["[S1] ééé ", "[S1] ééé"]


def test_split_errors():
    with pytest.raises(ValueError, match="empty"):
        split_text("  \n ", 100)
    with pytest.raises(ValueError, match="supercalifragilistic"):
        split_text("[S1] a supercalifragilisticexpialidocious word", 20)
    with pytest.raises(ValueError, match="does not fit"):
        split_text("[S1] fine words then aaaaaaaaaaaaaaaaaaaaaaaaa", 1024, 10)
    with pytest.raises(ValueError, match="max_bytes"):
        split_text("hi", 0)
    with pytest.raises(TypeError):
        split_text(b"bytes", 10)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tts():
    from dia_fast import DiaTTS

    return DiaTTS.random("tiny", seed=0, device="cpu", dtype="float32")


GREEDY = {"do_sample": False, "max_new_tokens": 40}


def test_chunk_budget(tts):
    data = tts.config.data
    max_bytes, max_chars = chunk_budget(tts, max_new_tokens=40, chars_per_second=100.0)
    assert max_bytes == data.text_length
    assert max_chars == int(100.0 * (40 - data.max_delay - 1) / tts.codec.frame_rate)  # 24 frames
    max_bytes, _ = chunk_budget(tts, prompt_text="[S1] Hi there.", chars_per_second=100.0)
    assert max_bytes == data.text_length - len("_ Hi there.") - 1
    _, max_chars = chunk_budget(tts, max_chunk_seconds=20.0)
    assert max_chars == 12 * 20
    with pytest.raises(ValueError, match="no room left for audio: the prompt takes"):
        chunk_budget(tts, prompt_frames=data.audio_length)
    with pytest.raises(ValueError, match="no room left for audio: max_new_tokens=10 leaves none"):
        chunk_budget(tts, max_new_tokens=10)
    with pytest.raises(ValueError, match="the prompt's transcript takes 1028 of the model's 1024 text bytes"):
        chunk_budget(tts, prompt_text="[S1] " + "x" * 1025)


def test_generate_long_equals_chunks_generated_alone_and_joined(tts):
    text = "[S1] Hello there. How are you today? [S2] Fine, thanks. And you?"
    kwargs = dict(chars_per_second=100.0, crossfade_ms=20.0, progress=False, **GREEDY)
    _, max_chars = chunk_budget(tts, max_new_tokens=40, chars_per_second=100.0)
    assert max_chars == 27
    chunks = ["[S1] Hello there.", "[S1] How are you today?", "[S2] Fine, thanks. And you?"]

    audio, rate = generate_long(tts, text, **kwargs)
    assert rate == tts.sample_rate and audio.dtype == np.float32
    pieces = [tts.generate(c, progress=False, **GREEDY).audio[0] for c in chunks]
    expected = crossfade_join(pieces, rate, 20.0)
    np.testing.assert_allclose(audio, expected, atol=1e-6)

    seen = []
    batched, _ = generate_long(tts, text, batch_size=3, on_chunk=lambda i, a: seen.append((i, len(a))), **kwargs)
    np.testing.assert_allclose(batched, expected, atol=1e-5)
    assert seen == [(i, len(p)) for i, p in enumerate(pieces)]


def test_generate_long_reuses_the_prompt_for_every_chunk(tts):
    t = np.arange(int(0.3 * tts.sample_rate)) / tts.sample_rate
    codes = tts.encode_prompt((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    transcript = "[S1] This is my voice."
    text = "[S1] Hello there. How are you today?"
    audio, rate = generate_long(
        tts, text, audio_prompt=codes, audio_prompt_text=transcript, chars_per_second=100.0, progress=False, **GREEDY
    )
    pieces = [
        tts.generate(c, audio_prompt=codes, audio_prompt_text=transcript, progress=False, **GREEDY).audio[0]
        for c in ["[S1] Hello there.", "[S1] How are you today?"]
    ]
    np.testing.assert_allclose(audio, crossfade_join(pieces, rate, 40.0), atol=1e-6)


def test_generate_long_progress_bar_and_errors(tts, capsys):
    text = "[S1] Hello there. How are you today?"
    generate_long(tts, text, chars_per_second=100.0, progress=True, **GREEDY)
    assert "2/2" in capsys.readouterr().err
    generate_long(tts, text, chars_per_second=100.0, progress=False, **GREEDY)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="without an audio_prompt"):
        generate_long(tts, text, audio_prompt_text="[S1] hi", **GREEDY)
    with pytest.raises(ValueError, match="batch_size"):
        generate_long(tts, text, batch_size=0, **GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate_long(tts, "   ", **GREEDY)
    with pytest.raises(TypeError, match="decode_audio"):
        generate_long(tts, text, decode_audio=False, **GREEDY)
    assert torch.is_tensor(tts.encode_prompt(np.full(1000, 0.1, np.float32)))


def test_generate_long_holds_every_chunk_to_min_new_tokens():
    """min_new_tokens reaches every chunk's generation (a model that ends early on its own is held longer)."""
    import torch

    from dia_fast import DiaTTS
    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel

    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny")).eval()
    with torch.no_grad():  # channel 0's EOS logit just above a common token's: some generations end on their own
        w = model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[613]
    tts = DiaTTS(model, DiaTTS.random("tiny").codec)
    chunks = ["[S1] Hello there.", "[S1] How are you today?", "[S2] Fine, thanks. And you?"]
    kw = dict(progress=False, do_sample=False, max_new_tokens=120)

    def frames(min_new: int) -> list[int]:
        return [tts.generate(c, min_new_tokens=min_new, **kw).codes[0].shape[0] for c in chunks]

    free, held_frames = frames(0), frames(90)
    assert min(held_frames) >= 90 - 16 and min(free) < 90 - 16  # it binds
    held, _ = generate_long(tts, " ".join(chunks), chunks=chunks, min_new_tokens=90, crossfade_ms=0.0, **kw)
    assert len(held) == sum(held_frames) * tts.codec.hop_length


def test_cjk_sentences_end_without_a_space():
    """Chinese and Japanese put no space after 。！？: a long text in those scripts splits there (not refused as one
    overlong word), and the chunks still cover the text."""
    assert split_text("你好。再见！好的？", 12) == ["你好。", "再见！", "好的？"]
    # a closing bracket stays with its sentence, and a space after 。 stays with it as after "."
    mixed = "「はい。」と言った。 Then English. More"
    assert split_text(mixed, 20) == ["「はい。」", "と言った。 ", "Then English. More"]
    text = "[S1] " + "这是一个很长的句子，我们用它来测试。" * 40  # 2,165 bytes, no spaces
    spans = split_text_spans(text, 1024, 240)
    assert len(spans) >= 3 and "".join(text[c.start : c.end] for c in spans) == text
    assert all(text[c.start : c.end].endswith("。") for c in spans)


def test_given_chunks_are_checked_with_the_transcript_before_any_work(tts, monkeypatch):
    """Chunks given as they are: each must fit the text budget with the prompt's transcript in front, checked before
    the prompt is encoded or any chunk generated (the second chunk used to fail after the first was spoken)."""
    from dia_fast.longform import generate_long

    encoded, spoken = [], []
    monkeypatch.setattr(tts, "encode_prompt", lambda audio, *a: encoded.append(audio))
    chunks = ["[S1] The first chunk is short.", "[S1] " + "b" * 600]
    with pytest.raises(ValueError, match=r"transcript \(502 bytes\) and the text \(602 bytes\) are 1105 bytes"):
        generate_long(
            tts, "", chunks=chunks, audio_prompt=np.zeros(44100, np.float32), audio_prompt_text="[S1] " + "a" * 500,
            max_new_tokens=40, on_chunk=lambda i, audio: spoken.append(i),
        )  # fmt: skip
    assert encoded == [] and spoken == []
    with pytest.raises(ValueError, match="1202 bytes after tokenization"):  # a chunk too long by itself, no prompt
        generate_long(tts, "", chunks=["[S1] Fine.", "[S1] " + "c" * 1200], on_chunk=lambda i, a: spoken.append(i))
    assert spoken == []


def test_doubtful_text_warnings_are_about_the_text_as_written_not_its_chunks(tts):
    """A long text's chunks may be short or start mid-turn: generate_long checks the whole text once instead."""
    import warnings

    text = "[S1] " + "This sentence is one of many in a long text. " * 3 + "[S2] Yes."
    budget = dict(chars_per_second=300.0)  # 48 characters in 30 steps: one sentence a chunk
    assert split_text(text, *chunk_budget(tts, max_new_tokens=30, **budget))[-1] == "[S2] Yes."  # a short chunk
    kw = {**GREEDY, "progress": False, "max_new_tokens": 30}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate_long(tts, text, **budget, **kw)
    assert not [w for w in caught if "very short text" in str(w.message)]
    with pytest.warns(UserWarning, match="does not start with"):  # the whole text still gets its check
        generate_long(tts, text[5:], **budget, **kw)


SAME = "[S1] This is a sentence that talks about nothing much."


def test_chunk_k_is_seeded_seed_plus_k(tts):
    """Chunks of the same text do not repeat one audio: chunk k is generate(chunk, seed=seed + k), sampled, whatever
    the batch size (text i of a generate batch draws with seed + i)."""
    kw = dict(seed=5, max_new_tokens=40, crossfade_ms=0.0, progress=False)
    alone = [tts.generate(SAME, seed=5 + k, max_new_tokens=40, progress=False).audio[0] for k in range(4)]
    assert not np.array_equal(alone[0], alone[1])
    for batch_size in (1, 2, 3):
        got: dict[int, np.ndarray] = {}
        generate_long(tts, None, chunks=[SAME] * 4, batch_size=batch_size, on_chunk=got.__setitem__, **kw)
        assert len(got) == 4
        for k in range(4):
            np.testing.assert_allclose(got[k], alone[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(chunks=SAME), TypeError, "chunks must be a sequence of str .* got a str"),
        (dict(chunks=[SAME, 3]), TypeError, "chunks must be a sequence of str"),
        (dict(batch_size=2.0), TypeError, "batch_size must be an int, got 2.0"),
        (dict(batch_size="2"), TypeError, "batch_size must be an int, got '2'"),
        (dict(batch_size=True), TypeError, "batch_size must be an int, got True"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
        (dict(crossfade_ms=float("nan")), ValueError, "crossfade_ms must be a finite number >= 0, got nan"),
        (dict(crossfade_ms=-1), ValueError, "crossfade_ms must be a finite number >= 0, got -1"),
        (dict(crossfade_ms="10"), TypeError, "crossfade_ms must be a number"),
        (dict(seed=1.5), TypeError, "seed must be an int or None, got 1.5"),
    ],
)
def test_generate_long_checks_its_options_before_any_chunk_is_generated(tts, monkeypatch, kwargs, error, message):
    calls: list[object] = []
    monkeypatch.setattr(tts, "generate", lambda *a, **k: calls.append(a))
    with pytest.raises(error, match=message):
        generate_long(tts, SAME + " " + SAME, **{**GREEDY, "progress": False, **kwargs})
    assert calls == []


def test_a_prompt_that_leaves_too_little_audio_is_blamed_not_the_text(tts):
    """A text that splits without the voice prompt but not after it: the error is about the prompt and names a
    prompt length that works (checked: a prompt that long splits the text, one a frame over the limit does not)."""
    from dia_fast.longform import PromptTooLong, pieces
    from dia_fast.serving import BatchEngine

    data, rate = tts.config.data, tts.codec.frame_rate
    text = "[S1] Extraordinarily wonderful."
    assert pieces(tts, text) == [text]
    long_prompt = data.audio_length - 1 - (data.max_delay + 1) - 5  # leaves 5 frames: 0.7 characters at 12/s
    with pytest.raises(PromptTooLong, match="the audio prompt is too long for this text") as caught:
        pieces(tts, text, prompt_frames=long_prompt)
    most = float(re.search(r"at most ([0-9.]+) s", str(caught.value)).group(1))
    assert pieces(tts, text, prompt_frames=int(most * rate))  # the advice holds
    with pytest.raises(ValueError) as caught:  # a word too long even without a prompt: not the prompt's fault alone
        pieces(tts, "[S1] " + "x" * 600, prompt_frames=long_prompt)
    assert not isinstance(caught.value, PromptTooLong)
    codes = torch.zeros(long_prompt, data.channels, dtype=torch.long)
    with BatchEngine(tts, max_slots=1) as engine, pytest.raises(PromptTooLong) as caught:
        engine.submit(text, audio_prompt=codes, audio_prompt_text="[S1] Hi.", max_new_tokens=20)
    assert caught.value.param == "audio_prompt"  # (the server answers param "voice")


def test_chunk_kwargs_give_a_chunk_its_own_length_or_seed(tts):
    """``chunk_kwargs``: a chunk's own options over the others, ``seed`` included (it clashed with the seed that
    generate_long passes); the whole text's prompt and progress cannot be set per chunk."""
    chunks = ["[S1] The first chunk of speech.", "[S2] And the second one here."]
    got: dict[int, np.ndarray] = {}
    own = {chunks[0]: {"seed": 77, "max_new_tokens": 40}, chunks[1]: {"max_new_tokens": 30}}
    generate_long(tts, "", chunks=chunks, seed=5, chunk_kwargs=own.__getitem__, progress=False,
                  on_chunk=lambda i, audio: got.__setitem__(i, audio))  # fmt: skip
    first = tts.generate(chunks[0], seed=77, max_new_tokens=40).audio[0]
    second = tts.generate(chunks[1], seed=5 + 1, max_new_tokens=30).audio[0]
    np.testing.assert_array_equal(got[0], first)
    np.testing.assert_array_equal(got[1], second)
    with pytest.raises(TypeError, match="chunk_kwargs cannot set progress"):
        generate_long(tts, "", chunks=chunks, chunk_kwargs=lambda c: {"progress": True})


def test_a_prompted_text_that_fits_once_stripped_is_one_piece(tts):
    """With a voice prompt the text is encoded stripped (prompted_text): a trailing newline must not make a text
    that fits into two generations."""
    from dia_fast.longform import chunk_budget, pieces

    prompt_text = "[S1] The words of the prompt."
    max_bytes, _ = chunk_budget(tts, prompt_text=prompt_text, prompt_frames=10, max_chunk_seconds=None,
                                chars_per_second=1000.0)  # fmt: skip
    text = "[S1] " + "word " * ((max_bytes - 5) // 5 - 1) + "end."
    assert text_tokens(text) <= max_bytes < text_tokens(text + "\n" * 8)
    got = pieces(tts, text + "\n" * 8, prompt_text=prompt_text, prompt_frames=10, chars_per_second=1000.0)
    assert got == [text + "\n" * 8]
