"""dia_fast.voice: VoicePool batching, CustomSpeaker files, Conversation (tiny random model, CPU, greedy)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from dia_fast.api import DiaTTS
from dia_fast.audio import crossfade_join
from dia_fast.voice import (
    Audio,
    Conversation,
    CustomSpeaker,
    Speaker,
    SpeakerFileError,
    VoicePool,
    default_max_batch,
)

GREEDY = {"do_sample": False, "max_new_tokens": 40}
LONGFORM = {"chars_per_second": 1000.0}  # tests use 40 decoder steps: let a sentence fit in them


@pytest.fixture(scope="module")
def tts():
    from dia_fast import DiaTTS

    return DiaTTS.random("tiny", seed=0, device="cpu", dtype="float32")


@pytest.fixture()
def pool(tts):
    with VoicePool(tts, max_batch=4) as p:
        yield p


def _single(tts, text, **kw):
    return tts.generate(text, progress=False, **GREEDY, **kw).codes[0]


def _voice_sample(tts, seconds=0.4, freq=220.0):
    t = np.arange(int(seconds * tts.sample_rate)) / tts.sample_rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


# --------------------------------------------------------------------------------------------- pool
def test_four_concurrent_conversations_are_one_batch_with_the_same_codes(tts, pool):
    texts = ["[S1] Hello there.", "[S2] Hi! How are you?", "[S1] Fine, thanks. (laughs)", "[S2] Good."]

    async def main():
        convs = [Conversation(t, None, pool, **GREEDY, **LONGFORM) for t in texts]
        return await asyncio.gather(*(c.generate() for c in convs))

    audios = asyncio.run(main())
    stats = pool.stats
    assert stats["requests"] == 4 and stats["largest_batch"] == 4 and stats["batched_steps"] > 0
    for text, audio in zip(texts, audios, strict=True):
        expected = _single(tts, text)
        assert len(audio.codes) == 1
        torch.testing.assert_close(audio.codes[0], expected, rtol=0, atol=0)
        np.testing.assert_allclose(audio.samples, tts.decode(expected), atol=1e-6)
        assert audio.sample_rate == tts.sample_rate
        assert audio.duration == pytest.approx(len(audio.samples) / tts.sample_rate)


def test_different_settings_share_decode_steps(tts, pool):
    async def main():
        return await asyncio.gather(
            pool.generate("[S1] One.", **GREEDY),
            pool.generate("[S1] Two.", **GREEDY, cfg_scale=2.0),
            pool.generate("[S1] Three.", **GREEDY),
        )

    one, two, three = asyncio.run(main())
    assert pool.stats["largest_batch"] == 3 and pool.stats["batched_steps"] > 0
    torch.testing.assert_close(one.codes, _single(tts, "[S1] One."), rtol=0, atol=0)
    torch.testing.assert_close(two.codes, _single(tts, "[S1] Two.", cfg_scale=2.0), rtol=0, atol=0)
    torch.testing.assert_close(three.codes, _single(tts, "[S1] Three."), rtol=0, atol=0)


def test_more_requests_than_max_batch_and_a_cancelled_caller(tts, pool):
    texts = [f"[S{1 + i % 2}] Number {i}." for i in range(6)]

    async def main():
        tasks = [asyncio.create_task(pool.generate(t, **GREEDY)) for t in texts]
        await asyncio.sleep(0)  # all six are queued
        tasks[1].cancel()  # this caller gives up: the others must still get their results
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    assert pool.stats["largest_batch"] == 4 and pool.stats["requests"] == 6  # the cancelled one was submitted
    for i in (0, 2, 3, 4, 5):
        torch.testing.assert_close(results[i].codes, _single(tts, texts[i]), rtol=0, atol=0)


def test_errors_reach_only_their_caller(tts, monkeypatch):
    from dia_fast.serving import engine as engine_module
    from dia_fast.text import decode_ids

    real_admit = engine_module.admit

    def admit_failing_on_boom(model, slots, s, text_ids, *args, **kwargs):
        if "boom" in decode_ids(text_ids[0].tolist()):
            raise RuntimeError("boom failed")
        return real_admit(model, slots, s, text_ids, *args, **kwargs)

    monkeypatch.setattr(engine_module, "admit", admit_failing_on_boom)
    pool = VoicePool(tts, max_batch=4)

    async def main():
        too_long = "[S1] " + "x" * (tts.config.data.text_length + 10)
        return await asyncio.gather(
            pool.generate("[S1] Good one.", **GREEDY),
            pool.generate("[S1] boom", **GREEDY),
            pool.generate(too_long, **GREEDY),
            pool.generate("[S2] Good two.", **GREEDY),
            return_exceptions=True,
        )

    good1, bad, too_long, good2 = asyncio.run(main())
    pool.close()
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)
    assert isinstance(too_long, ValueError) and "bytes" in str(too_long)
    torch.testing.assert_close(good1.codes, _single(tts, "[S1] Good one."), rtol=0, atol=0)
    torch.testing.assert_close(good2.codes, _single(tts, "[S2] Good two."), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="closed"):
        pool.generate_sync("[S1] Hi.")


def test_pool_construction_and_sync_generate(tts):
    assert default_max_batch("cpu") == 8 and default_max_batch("cuda") == 16 and default_max_batch("mps") == 4
    with VoicePool(tts) as pool:
        assert pool.max_batch == 8 and pool.sample_rate == tts.sample_rate
        result = pool.generate_sync("[S1] Hello.", **GREEDY)
        torch.testing.assert_close(result.codes, _single(tts, "[S1] Hello."), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_batch"):
        VoicePool(tts, max_batch=0)
    with pytest.raises(ValueError, match="already loaded"):
        VoicePool(tts, dtype="float16")
    with VoicePool(tts, device="cpu:0") as same:  # a device named with its index is the same device
        assert same.tts is tts
    with pytest.raises(ValueError, match="not on the requested device"):
        VoicePool(tts, device="meta")
    with pytest.raises(TypeError):
        VoicePool(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError), VoicePool(tts) as pool:
        pool.generate_sync("[S1] Hi.", temprature=1.0)  # misspelt option
    with pytest.warns(DeprecationWarning, match="batch_window_ms"), VoicePool(tts, batch_window_ms=5.0):
        pass  # accepted for old callers, says that it does nothing


# ------------------------------------------------------------------------------------------ speaker
def test_speaker_tags():
    assert Speaker.S1.tag == "[S1]" and Speaker.S2.index == 1
    assert Speaker.parse("s2") is Speaker.S2 and Speaker.parse("[S1]") is Speaker.S1 and Speaker.parse(1) is Speaker.S2
    with pytest.raises(ValueError):
        Speaker.parse(2)
    with pytest.raises(ValueError):
        Speaker.parse("S3")


def test_custom_speaker_save_load_round_trip(tts, pool, tmp_path):
    wav = tmp_path / "voice.wav"
    sf.write(wav, _voice_sample(tts), tts.sample_rate, subtype="PCM_16")
    alice = CustomSpeaker.from_audio(wav, "  Hi, I am Alice. ", pool, name="alice")
    assert alice.transcript == "Hi, I am Alice."
    torch.testing.assert_close(alice.codes, tts.encode_prompt(wav), rtol=0, atol=0)
    assert alice.codec["codec"] == "dac" and alice.codec["sample_rate"] == str(tts.sample_rate)

    path = alice.save(tmp_path / "alice.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.safetensors", "voice.wav"]
    back = CustomSpeaker.load(path, pool)
    torch.testing.assert_close(back.codes, alice.codes, rtol=0, atol=0)
    assert (back.transcript, back.codec, back.name) == (alice.transcript, alice.codec, "alice")
    assert back.tagged_transcript(1) == "[S2] Hi, I am Alice."

    # from an array at another rate (resampled with soxr before encoding)
    bob = CustomSpeaker.from_audio(_voice_sample(tts), "[S1] Hello. [S2] I am Bob.", tts, sample_rate=tts.sample_rate)
    assert bob.tagged_transcript(0) == "[S1] Hello. [S2] I am Bob."  # tagged transcripts are kept as written


def test_bad_speaker_files(tts, tmp_path):
    codes = tts.encode_prompt(_voice_sample(tts))
    good = CustomSpeaker(codes, "Hello.", {"codec": "dac"}, "x")
    meta = {
        "format": "dia_fast.speaker",
        "format_version": "1",
        "dia_fast_version": "0.1.0",
        "transcript": "Hello.",
        "name": "x",
        "codec": "dac",
        "sample_rate": str(tts.sample_rate),
        "n_codebooks": "9",
        "codebook_size": str(tts.codec.codebook_size),
        "hop_length": str(tts.codec.hop_length),
    }

    def write(name, tensors, metadata):
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    assert CustomSpeaker.load(write("ok.safetensors", {"codes": codes}, meta), tts).frames == codes.shape[0]
    with pytest.raises(FileNotFoundError):
        CustomSpeaker.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(SpeakerFileError, match="not a safetensors"):
        CustomSpeaker.load(junk)
    with pytest.raises(SpeakerFileError, match="not a dia_fast speaker"):
        CustomSpeaker.load(write("nofmt.safetensors", {"codes": codes}, {"transcript": "x"}))
    with pytest.raises(SpeakerFileError, match="version"):
        CustomSpeaker.load(write("v9.safetensors", {"codes": codes}, {**meta, "format_version": "9"}))
    with pytest.raises(SpeakerFileError, match="int64"):
        CustomSpeaker.load(write("f32.safetensors", {"codes": codes.float()}, meta))
    with pytest.raises(SpeakerFileError, match="outside"):
        CustomSpeaker.load(write("range.safetensors", {"codes": codes + 5000}, meta))
    with pytest.raises(SpeakerFileError, match="exactly one tensor"):
        CustomSpeaker.load(write("extra.safetensors", {"codes": codes, "more": codes}, meta))
    with pytest.raises(SpeakerFileError, match="lacks"):
        bare_meta = {k: meta[k] for k in ("format", "format_version")}
        CustomSpeaker.load(write("nometa.safetensors", {"codes": codes}, bare_meta))
    # a speaker made with another codec (EnCodec 24 kHz) loads alone but not for this model
    other = write("encodec.safetensors", {"codes": codes}, {**meta, "codec": "encodec", "sample_rate": "24000"})
    assert CustomSpeaker.load(other).codec["codec"] == "encodec"
    with pytest.raises(SpeakerFileError, match="another codec"):
        CustomSpeaker.load(other, tts)
    with pytest.raises(ValueError, match="transcript"):
        CustomSpeaker.from_audio(_voice_sample(tts), "  ", tts, sample_rate=tts.sample_rate)
    with pytest.raises(ValueError, match="silent"):
        CustomSpeaker.from_audio(np.zeros(4410, np.float32), "Hi.", tts, sample_rate=tts.sample_rate)
    assert good.frames == codes.shape[0]


# ------------------------------------------------------------------------------------- conversation
def test_conversation_text_from_turns_and_speakers(tts, pool):
    alice = CustomSpeaker.from_audio(_voice_sample(tts), "Hi, I am Alice.", tts, sample_rate=tts.sample_rate)
    conv = Conversation([(0, "Hello."), ("[S2]", " Hi! "), (Speaker.S1, "Bye.")], None, pool, **GREEDY, **LONGFORM)
    assert conv.text == "[S1] Hello. [S2] Hi! [S1] Bye."
    assert conv.prompt is None
    conv = Conversation([(alice, "Hello."), (1, "Hi!")], [alice, Speaker.S2], pool, **GREEDY, **LONGFORM)
    assert conv.text == "[S1] Hello. [S2] Hi!"
    assert conv.prompt_text == "[S1] Hi, I am Alice."
    assert Conversation("Just me.", Speaker.S2, pool, **GREEDY, **LONGFORM).text == "[S2] Just me."
    for name in ("[S2]", "S2", "s2"):  # a built-in voice by name (a string was taken as a list of 4 speakers)
        assert Conversation("Just me.", name, pool, **GREEDY, **LONGFORM).text == "[S2] Just me."
    assert Speaker.parse(np.int64(1)) is Speaker.S2
    assert Conversation("Just me.", alice, pool, **GREEDY, **LONGFORM).text == "[S1] Just me."
    bob = CustomSpeaker.from_audio(_voice_sample(tts, freq=150.0), "I am Bob.", tts, sample_rate=tts.sample_rate)
    both = Conversation("[S1] Hi. [S2] Yo.", [alice, bob], pool, **GREEDY, **LONGFORM)
    assert both.prompt_text == "[S1] Hi, I am Alice. [S2] I am Bob."
    torch.testing.assert_close(both.prompt, torch.cat([alice.codes, bob.codes]), rtol=0, atol=0)


def test_conversation_with_custom_voice_matches_prompted_generate(tts, pool, tmp_path):
    alice = CustomSpeaker.from_audio(_voice_sample(tts), "Hi, I am Alice.", pool, sample_rate=tts.sample_rate)
    conv = Conversation("[S1] Nice to meet you.", [alice], pool, **GREEDY, **LONGFORM)
    audio = conv.generate_sync()
    expected = tts.generate(
        "[S1] Nice to meet you.",
        audio_prompt=alice.codes,
        audio_prompt_text="[S1] Hi, I am Alice.",
        progress=False,
        **GREEDY,
    ).codes[0]
    torch.testing.assert_close(audio.codes[0], expected, rtol=0, atol=0)
    path = audio.save(tmp_path / "out.wav")
    assert sf.info(path).samplerate == tts.sample_rate and sf.info(path).frames == len(audio.samples)


def test_long_conversation_is_chunked_and_batched(tts, pool):
    text = "[S1] Hello there. How are you today? [S2] Fine, thanks. And you?"
    # 52 spoken characters over a budget of 1 character per second of the model's ~35 s: split, 25 s per chunk
    conv = Conversation(text, None, pool, chars_per_second=1.0, max_chunk_seconds=25.0, crossfade_ms=20.0, **GREEDY)
    assert conv.chunks == ["[S1] Hello there.", "[S1] How are you today?", "[S2] Fine, thanks. And you?"]
    audio = conv.generate_sync()
    # one request of the engine (counted once in its queue) whose three pieces decode side by side
    assert pool.stats["requests"] == 1 and pool.stats["largest_batch"] == 3
    singles = [_single(tts, c) for c in conv.chunks]
    for got, want in zip(audio.codes, singles, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    expected = crossfade_join([tts.decode(c) for c in singles], tts.sample_rate, 20.0)
    np.testing.assert_allclose(audio.samples, expected, atol=1e-6)
    assert isinstance(audio, Audio)


def test_conversation_bad_inputs(tts, pool):
    alice = CustomSpeaker.from_audio(_voice_sample(tts), "Hi.", tts, sample_rate=tts.sample_rate)
    with pytest.raises(ValueError, match="empty"):
        Conversation("   ", None, pool)
    with pytest.raises(ValueError, match="no turns"):
        Conversation([], None, pool)
    with pytest.raises(ValueError, match="no text"):
        Conversation([(0, " ")], None, pool)
    with pytest.raises(ValueError, match="contains a speaker tag"):
        Conversation([(0, "[S2] sneaky")], None, pool)
    with pytest.raises(TypeError, match="pair"):
        Conversation(["just a string"], None, pool)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="slot 0"):
        Conversation("Hi.", [Speaker.S2], pool)
    with pytest.raises(ValueError, match="two voices"):
        Conversation("Hi.", [Speaker.S1, Speaker.S2, alice], pool)
    with pytest.raises(ValueError, match="not one of"):
        Conversation([(alice, "Hi.")], None, pool)
    with pytest.raises(ValueError, match="speaker index"):
        Conversation([(3, "Hi.")], None, pool)
    with pytest.raises(TypeError, match="VoicePool"):
        Conversation("Hi.", None, tts)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Conversation("Hi.", None, pool, temprature=1.0)
    mismatched = CustomSpeaker(alice.codes, "Hi.", {**alice.codec, "sample_rate": "24000"})
    with pytest.raises(SpeakerFileError, match="another codec"):
        Conversation("Hi.", mismatched, pool)
    with pytest.raises(ValueError, match="does not fit"):  # 10 characters per chunk hold no 30-letter word
        Conversation("[S1] " + "a" * 30, None, pool, chars_per_second=0.5, **GREEDY)
    long = "[S1] " + "Many words here. " * 80  # a text that must be split: its budgets are used
    for bad, match in (
        (dict(crossfade_ms=float("nan")), "crossfade_ms must be a finite number >= 0"),
        (dict(crossfade_ms=-5), "crossfade_ms must be a finite number >= 0"),
        (dict(chars_per_second=0), "chars_per_second must be a finite number > 0"),
        (dict(chars_per_second=float("nan")), "chars_per_second must be a finite number > 0"),
        (dict(max_chunk_seconds=-1), "max_chunk_seconds must be a finite number > 0"),
        (dict(max_chunk_seconds=0.01), "no room for one character"),
    ):
        with pytest.raises(ValueError, match=match):  # when built, not at generation
            Conversation(long, None, pool, **bad)
    for bad in (dict(max_chunk_seconds=-1), dict(max_chunk_seconds=float("nan")), dict(chars_per_second=0)):
        with pytest.raises(ValueError, match="must be a finite number > 0"):  # a short text too (it needs no split)
            Conversation("[S1] Hello there.", None, pool, **bad)
    with pytest.raises(TypeError, match="max_chunk_seconds must be a number"):
        Conversation("[S1] Hello there.", None, pool, max_chunk_seconds="x")
    # max_new_tokens limits each generation, as in DiaTTS.generate: it splits nothing (it once cut this into words)
    text = "[S1] Wonderful weather today, isn't it?"
    assert Conversation(text, None, pool, max_new_tokens=60).chunks == [text]

    async def inside_loop():
        Conversation("Hi.", None, pool, **GREEDY, **LONGFORM).generate_sync()

    with pytest.raises(RuntimeError, match="await"):
        asyncio.run(inside_loop())


def test_audio_normalized_and_saved(tmp_path):
    import pyloudnorm

    rate = 24_000
    t = np.arange(rate) / rate
    audio = Audio((0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    loud = audio.normalized(-20.0)
    assert pyloudnorm.Meter(rate).integrated_loudness(loud.samples.astype(np.float64)) == pytest.approx(-20.0, abs=0.5)
    short = Audio(audio.samples[: rate // 10], rate)  # 100 ms: loudness undefined, left as is
    np.testing.assert_array_equal(short.normalized().samples, short.samples)
    back, sr = sf.read(loud.save(tmp_path / "a.wav", subtype="FLOAT"), dtype="float32")
    assert sr == rate
    np.testing.assert_array_equal(back, loud.samples)


def test_conversation_stream_joins_to_generate():
    """A two-chunk conversation streamed (sampled, seeded) equals generate()'s crossfaded samples; the stream
    runs on the pool's engine (its two chunks decode side by side) and leaving it early cancels the rest."""
    from dia_fast import DiaTTS
    from dia_fast.voice import Conversation, Speaker, VoicePool

    pool = VoicePool(DiaTTS.random("tiny", seed=0))
    text = "[S1] The first sentence of the talk. [S2] And a second one that answers it."
    # 1 character per second: the ~35 s budget holds 35 of the 64 spoken characters, one sentence per chunk
    conv = Conversation(
        text, [Speaker.S1, Speaker.S2], pool, max_new_tokens=64, seed=7, chars_per_second=1.0, max_chunk_seconds=None
    )
    assert len(conv.chunks) == 2
    whole = conv.generate_sync().samples
    before = dict(pool.stats)
    pieces = list(conv.stream(chunk_frames=8))
    assert len(pieces) > 2
    joined = np.concatenate(pieces)
    assert joined.shape == whole.shape
    np.testing.assert_allclose(joined, whole, rtol=0, atol=1e-5 * max(1.0, float(np.abs(whole).max())))
    assert pool.stats["requests"] == before["requests"] + 1  # one request, its two chunks as pieces
    assert pool.stats["batched_steps"] > before["batched_steps"]
    stream = conv.stream(chunk_frames=8)
    next(stream)
    stream.close()  # leaves early: the chunks still running are cancelled
    deadline = time.monotonic() + 30
    while pool.engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.engine.busy_slots == 0 and pool.engine.queued == 0
    pool.close()


def test_audio_save_picks_the_container_by_extension(tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    clip = Audio((0.1 * rng.standard_normal(44100)).astype(np.float32), 44100)
    for name, fmt in (("a.wav", "WAV"), ("a.flac", "FLAC"), ("a.ogg", "OGG"), ("a.mp3", "MP3")):
        assert sf.info(clip.save(tmp_path / name)).format == fmt
    assert sf.info(clip.save(tmp_path / "b.bin", format="flac")).format == "FLAC"
    with pytest.raises(ValueError, match="supported are wav, flac, ogg, opus, mp3"):
        clip.save(tmp_path / "a.aiff")


def test_options_are_checked_when_a_conversation_or_request_is_built():
    pool = VoicePool(DiaTTS.random("tiny", seed=0), max_batch=2)
    try:
        for bad, error in (
            (dict(temperature=float("nan")), ValueError),
            (dict(max_new_tokens=-3), ValueError),
            (dict(max_new_tokens=2.5), TypeError),
            (dict(seed="x"), TypeError),
            # against the model, when built: the delay pattern needs 17 steps; the tiny model's audio length
            (dict(max_new_tokens=10), ValueError),
            (dict(max_new_tokens=99999), ValueError),
            (dict(min_new_tokens=39, max_new_tokens=40), ValueError),
        ):
            name = next(iter(bad))
            with pytest.raises(error, match=name) as caught:
                Conversation("[S1] Hello there, my friend.", None, pool, **bad)
            assert getattr(caught.value, "param", None) == name  # what the server answers as the error's param
            with pytest.raises(error, match=name):
                pool.submit("[S1] Hello there, my friend.", **bad)
        # NumPy integers are integers
        conv = Conversation("[S1] Hello there.", None, pool, max_new_tokens=np.int64(40), seed=np.int32(3))
        assert type(conv.options.max_new_tokens) is int and type(conv.options.seed) is int
    finally:
        pool.close()


def test_conversation_chunks_are_one_request_with_its_own_settings(tts):
    """Its chunks run as the pieces of one engine request: split once, with the conversation's settings (not again
    by the engine's defaults), counted once in the queue (a conversation longer than the queue still runs), with
    its crossfade and seeds seed + k; and max_new_tokens cutting a chunk shows as truncated."""
    with VoicePool(tts, max_batch=1) as small:
        sentence = "[S1] This is a sentence of a long talk, and it goes on. "
        conv = Conversation(sentence * 10, None, small, chars_per_second=30.0, max_new_tokens=24, seed=5)
        assert len(conv.chunks) == 1  # 30 characters a second: the whole text fits one generation
        handle = conv._submit()
        assert handle.pieces == 1  # the engine's default 12 characters a second would have split it in three
        handle.cancel()
        # 80 chunks, one slot and a queue of 64: one request, so not EngineBusy
        many = Conversation(sentence * 80, None, small, chars_per_second=10.0, max_chunk_seconds=6.0, **GREEDY)
        assert len(many.chunks) == 80  # a sentence (56 characters, 5.6 s) each
        stream = many.stream()
        first = next(stream)
        assert first.size > 0
        stream.close()  # cancels the rest
        deadline = time.monotonic() + 30
        while (small.engine.busy_slots or small.engine.queued) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert small.engine.busy_slots == 0 and small.engine.queued == 0

    with VoicePool(tts, max_batch=2) as pool:
        conv = Conversation("[S1] Hello there. [S2] Hi, how are you?", None, pool, max_chunk_seconds=None,
                            chars_per_second=0.5, crossfade_ms=15.0, **GREEDY)  # fmt: skip
        assert len(conv.chunks) == 2
        audio = conv.generate_sync()
        singles = [_single(tts, c) for c in conv.chunks]
        expected = crossfade_join([tts.decode(c) for c in singles], tts.sample_rate, 15.0)
        np.testing.assert_allclose(audio.samples, expected, atol=1e-6)  # its own crossfade, not the engine's 40 ms
        # max_new_tokens=40 on a random model that never stops: every chunk was cut
        assert audio.truncated and audio.normalized(-20.0).truncated
        seeded = Conversation("[S1] Hello there. [S2] Hi, how are you?", None, pool, max_chunk_seconds=None,
                              chars_per_second=0.5, max_new_tokens=40, seed=11)  # fmt: skip
        codes = seeded.generate_sync().codes
        for k, chunk in enumerate(seeded.chunks):  # chunk k: seed 11 + k, as a request of its own
            alone = pool.generate_sync(chunk, max_new_tokens=40, seed=11 + k)
            torch.testing.assert_close(codes[k], alone.codes, rtol=0, atol=0)
            assert alone.truncated


def test_a_seed_speaks_the_same_in_generate_and_in_the_pool(tts):
    """Sampled with a seed: DiaTTS.generate's text i (seed + i) gives exactly the codes of a pool request with that
    seed, so the library, the pool and the server agree on what a seed says."""
    texts = ["[S1] Hello there, how are you?", "[S2] Fine, thanks! And you, my friend?"]
    batch = tts.generate(texts, seed=41, max_new_tokens=40, temperature=0.9, progress=False, decode_audio=False)
    with VoicePool(tts, max_batch=2) as pool:
        for i, text in enumerate(texts):
            alone = pool.generate_sync(text, seed=41 + i, max_new_tokens=40, temperature=0.9)
            torch.testing.assert_close(batch.codes[i], alone.codes, rtol=0, atol=0)


def test_conversations_and_pool_requests_warn_about_doubtful_text_as_generate_does(tts, pool):
    """An unknown speaker tag warns in a Conversation and a VoicePool request too (only DiaTTS.generate did)."""
    text = "[S1] Hello there my friend. [S3] Who is speaking now?"
    with pytest.warns(UserWarning, match=r"\[S3\]"):
        Conversation(text, None, pool, **GREEDY, **LONGFORM)
    with pytest.warns(UserWarning, match=r"\[S3\]"):
        pool.submit(text, **GREEDY).cancel()


def test_a_custom_speaker_is_checked_as_its_file_would_be(tts, tmp_path):
    """What load() refuses, the constructor refuses too (codes outside the codebook, codebooks that differ from the
    codec's, a name that is not a str), and load() checks every number of the codec description."""
    from dia_fast.voice.speaker import codec_description

    codec = codec_description(tts.codec)
    codes = tts.encode_prompt(_voice_sample(tts))
    for bad, error, match in (
        (dict(codes=codes.clone().fill_(5000)), ValueError, "outside the codebook"),
        (dict(codes=codes[:, :4]), ValueError, "4 codebooks, the codec 9"),
        (dict(name=None), TypeError, "name must be a str"),
        (dict(codec={**codec, "hop_length": "512.0"}), ValueError, "hop_length must be a whole number"),
    ):
        kw = dict(codes=codes, transcript="Hi.", codec=codec, name="x") | bad
        with pytest.raises(error, match=match):
            CustomSpeaker(**kw)
    path = CustomSpeaker(codes, "Hi.", codec, "x").save(tmp_path / "x.safetensors")
    meta = {"format": "dia_fast.speaker", "format_version": "1", "transcript": "Hi.", "name": "x", **codec,
            "sample_rate": "abc"}  # fmt: skip
    save_file({"codes": codes.contiguous()}, str(path), metadata=meta)
    with pytest.raises(SpeakerFileError, match="bad codec metadata"):
        CustomSpeaker.load(path)
