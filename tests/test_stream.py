"""Streaming: the joined chunks equal the one-shot audio; early close, errors, EOS, prompts."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from dia_fast.api import DiaTTS
from dia_fast.generation.stream import codec_context_frames, stream_generate

TEXT = "[S1] Hello there, this is a streaming test. [S2] Nice."
GREEDY = dict(do_sample=False, progress=False)


@pytest.fixture(scope="module")
def tts() -> DiaTTS:
    return DiaTTS.random("tiny", seed=0)


@pytest.fixture(scope="module")
def one_shot(tts: DiaTTS) -> np.ndarray:
    audio = tts.generate(TEXT, max_new_tokens=60, **GREEDY).audio[0]
    assert audio.shape[0] == 44 * tts.codec.hop_length  # 60 - 16 frames
    return audio


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dia_fast-stream"]


def _close_to(joined: np.ndarray, ref: np.ndarray) -> None:
    assert joined.dtype == np.float32
    assert joined.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 1e-3  # the reference is not silence
    np.testing.assert_allclose(joined, ref, rtol=0, atol=1e-5 * scale)


# 44 frames: with 43-frame chunks the lookahead is only there at the end, so one chunk holds all
@pytest.mark.parametrize(("chunk", "first", "first_size"), [(7, 5, 5), (43, None, 44), (1, None, 1)])
def test_joined_stream_equals_one_shot(tts, one_shot, chunk, first, first_size):
    stream = stream_generate(tts, TEXT, chunk_frames=chunk, first_chunk_frames=first, max_new_tokens=60, **GREEDY)
    chunks = list(stream)
    hop = tts.codec.hop_length
    sizes = [c.shape[0] // hop for c in chunks]
    assert all(c.shape[0] % hop == 0 for c in chunks)
    assert sizes[0] == first_size
    assert all(s == chunk for s in sizes[1:-1])
    _close_to(np.concatenate(chunks), one_shot)
    st = stream.stats
    assert st.frames == 44 and st.samples == one_shot.shape[0] and st.chunks == len(chunks)
    assert 0 < st.time_to_first_audio_s <= st.total_s
    assert st.steps == 60 and st.prefill_s > 0 and st.decode_s > 0
    assert not _stream_threads()


def test_context_is_needed(tts, one_shot):
    """Without the codec's context the chunk edges are wrong: the equality above is not vacuous."""
    left, right = codec_context_frames(tts.codec)
    assert left > 0 and right > 0
    stream = stream_generate(
        tts, TEXT, chunk_frames=7, left_context_frames=0, lookahead_frames=0, max_new_tokens=60, **GREEDY
    )
    joined = np.concatenate(list(stream))
    assert joined.shape == one_shot.shape
    assert np.abs(joined - one_shot).max() > 1e-2 * np.abs(one_shot).max()


def test_first_chunk_before_generation_ends(tts):
    """The first chunk comes out while the decoder is still running (a long generation)."""
    stream = stream_generate(tts, TEXT, chunk_frames=8, max_new_tokens=400, **GREEDY)
    first = next(stream)
    assert first.shape[0] == 8 * tts.codec.hop_length
    assert stream.stats.steps == 0  # generation has not finished
    stream.close()


def test_early_close_stops_generation(tts):
    stream = stream_generate(tts, TEXT, chunk_frames=4, max_new_tokens=800, **GREEDY)
    next(stream)
    stream.close()
    assert not stream._thread.is_alive()
    assert not _stream_threads()
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.stats.steps == 0  # stopped before the end: the decode loop never finished

    with stream_generate(tts, TEXT, chunk_frames=4, max_new_tokens=800, **GREEDY) as s2:
        next(s2)
    assert not _stream_threads()


def test_dropped_stream_stops_its_thread(tts):
    stream = stream_generate(tts, TEXT, chunk_frames=4, max_new_tokens=800, **GREEDY)
    next(stream)
    thread = stream._thread
    del stream
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_errors_propagate(tts, monkeypatch):
    """An error in the worker thread is raised from next(), and the thread is gone."""
    import dia_fast.generation.stream as stream_mod

    def failing_generate(*args, **kwargs):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(stream_mod, "generate_codes", failing_generate)
    stream = stream_generate(tts, TEXT, max_new_tokens=60, **GREEDY)
    with pytest.raises(RuntimeError, match="decoder failed"):
        next(stream)
    assert not _stream_threads()


BAD_STREAM_INPUTS = [
    ("", {}, ValueError, "text is empty"),
    ([TEXT, TEXT], {}, TypeError, "one text"),
    (TEXT, dict(max_new_tokens=30.5), TypeError, "max_new_tokens must be an int"),
    (TEXT, dict(max_new_tokens=5), ValueError, "max_new_tokens=5 is too small"),
    (TEXT, dict(max_new_tokens=40, min_new_tokens=30), ValueError, "min_new_tokens must be in"),
    (TEXT, dict(min_new_tokens=-1), ValueError, "min_new_tokens must be >= 0"),
    (TEXT, dict(temprature=1.0), TypeError, "unexpected keyword argument 'temprature'"),
    (TEXT, dict(decode_audio=False), TypeError, "unexpected keyword argument 'decode_audio'"),
    (TEXT, dict(seed="a"), TypeError, "seed must be an int or None"),
    (TEXT, dict(top_p=2.0), ValueError, "top_p"),
    (TEXT, dict(chunk_frames=0), ValueError, "chunk_frames must be >= 1"),
    (TEXT, dict(chunk_frames=1.5), TypeError, "chunk_frames must be an int"),
    (TEXT, dict(chunk_frames="4"), TypeError, "chunk_frames must be an int"),
    (TEXT, dict(first_chunk_frames=-3), ValueError, "first_chunk_frames must be >= 1"),
    (TEXT, dict(first_chunk_frames=2.5), TypeError, "first_chunk_frames must be an int"),
    (TEXT, dict(left_context_frames=-1), ValueError, "left_context_frames must be >= 0"),
    (TEXT, dict(lookahead_frames=2.5), TypeError, "lookahead_frames must be an int"),
    (TEXT, dict(sync_every=0), ValueError, "sync_every must be >= 1"),
    (TEXT, dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be a bool or None"),
    (TEXT, dict(audio_prompt=[None]), TypeError, "one audio prompt"),
    (TEXT, dict(audio_prompt_text="[S1] Hi there."), ValueError, "without an audio_prompt"),
]


@pytest.mark.parametrize(("text", "kw", "error", "message"), BAD_STREAM_INPUTS)
def test_bad_input_is_an_error_when_called_before_any_thread(tts, monkeypatch, text, kw, error, message):
    """Every input that generate() refuses is refused by generate_stream() itself, not at the first next(), and no
    worker thread is started for it."""
    import dia_fast.generation.stream as stream_mod

    started: list[object] = []
    monkeypatch.setattr(stream_mod, "_worker", lambda *args: started.append(args))
    with pytest.raises(error, match=message):
        tts.generate_stream(text, **kw)
    with pytest.raises(error, match=message):
        stream_generate(tts, text, **kw)
    assert started == [] and not _stream_threads()


def test_stream_warns_about_doubtful_text_as_generate_does(tts, monkeypatch):
    import dia_fast.generation.stream as stream_mod

    monkeypatch.setattr(stream_mod, "_worker", lambda *args: None)  # the warnings come before any work
    with pytest.warns(UserWarning, match="does not start with") as caught:
        tts.generate_stream("Hello there, no speaker tag here at all.", max_new_tokens=60)
    assert caught[0].filename == __file__  # pointing at the caller, as generate's warnings do


def test_natural_eos_mid_stream():
    """Channel 0's EOS made to win mid-way: the stream stops there and still equals the one-shot audio."""
    tts = DiaTTS.random("tiny", seed=0)
    plain = tts.generate(TEXT, max_new_tokens=120, **GREEDY).delayed[0, 1:, 0]
    candidates = [(int((plain == t).nonzero()[0]), t) for t in torch.unique(plain).tolist() if t < 1024]
    first, token = min((f, t) for f, t in candidates if 20 < f < 70)
    with torch.no_grad():
        w = tts.model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[token]  # channel 0's EOS row
    ref = tts.generate(TEXT, max_new_tokens=120, **GREEDY)
    n = ref.codes[0].shape[0]
    assert 0 < n < 120 - 16  # stopped on its own
    stream = stream_generate(tts, TEXT, chunk_frames=6, max_new_tokens=120, **GREEDY)
    _close_to(np.concatenate(list(stream)), ref.audio[0])
    assert stream.stats.frames == n


def test_audio_prompt_codes(tts):
    prompt = torch.randint(0, 1024, (12, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(audio_prompt=prompt, audio_prompt_text="[S1] A prompt.", max_new_tokens=50, **GREEDY)
    ref = tts.generate(TEXT, **kw).audio[0]
    stream = stream_generate(tts, TEXT, chunk_frames=9, **kw)
    _close_to(np.concatenate(list(stream)), ref)


def test_declared_context_is_used(tts):
    class Declared:
        def __init__(self, codec):
            self._codec = codec
            self.context_frames = (3, 4)

        def __getattr__(self, name):
            return getattr(self._codec, name)

    assert codec_context_frames(Declared(tts.codec)) == (3, 4)
    c = tts.codec.context_frames
    assert codec_context_frames(tts.codec) == ((c, c) if isinstance(c, int) else tuple(c))


def test_measured_context_covers_the_receptive_field(tts, one_shot):
    """Without a declared context it is measured (no more than the DAC's analytic figure + the margin),
    and the measured context alone gives exact joins."""

    class Undeclared:
        def __init__(self, codec):
            self._codec = codec

        def __getattr__(self, name):
            if name == "context_frames":
                raise AttributeError(name)
            return getattr(self._codec, name)

    codec = Undeclared(tts.codec)
    left, right = codec_context_frames(codec, "cpu")
    assert 0 < left <= tts.codec.context_frames + 2 and 0 < right <= tts.codec.context_frames + 2
    stream = stream_generate(
        tts, TEXT, chunk_frames=5, left_context_frames=left, lookahead_frames=right, max_new_tokens=60, **GREEDY
    )
    _close_to(np.concatenate(list(stream)), one_shot)


def test_a_context_longer_than_the_probe_warns():
    """A decoder whose every output depends on every frame (a running sum: unbounded memory) has no finite context:
    the measurement stops at its longest probe and says that the joins may not be exact, instead of returning the
    probe's reach as if it were the codec's."""

    class RunningSum:
        hop_length, n_codebooks, codebook_size, sample_rate = 4, 2, 16, 64

        def decode(self, codes: torch.Tensor) -> torch.Tensor:
            frames = codes.float().sum(-1).cumsum(-1)  # [B, T]: each frame changes everything after it
            return frames.repeat_interleave(self.hop_length, dim=-1)

    with pytest.warns(RuntimeWarning, match="one frame still changes the audio 512 frames away"):
        left, right = codec_context_frames(RunningSum(), "cpu")
    assert left > 500 and right >= 0


@pytest.mark.parametrize(("chunk", "first"), [(1, None), (5, 3), (16, 1)])
def test_encodec_streams_with_small_first_chunks_equal_one_shot(chunk, first):
    """EnCodec's reflect padding extends an input shorter than the pad with zeros first, so a first window of a
    few frames decoded differently from the whole (up to 40% relative error): the first window is now at least
    the measured minimum (7 frames for EnCodec), in DiaTTS.generate_stream and in the batching engine's streams."""
    from dia_fast.codec.encodec import EncodecCodec
    from dia_fast.generation.stream import codec_min_window_frames
    from dia_fast.serving import BatchEngine

    codec = EncodecCodec.random("tiny")
    tts = DiaTTS.random("tiny", seed=0, codec=codec)
    assert codec_min_window_frames(codec) == 7 and codec_min_window_frames(DiaTTS.random("tiny").codec) == 1
    one_shot = tts.generate(TEXT, max_new_tokens=60, **GREEDY).audio[0]
    stream = tts.generate_stream(TEXT, chunk_frames=chunk, first_chunk_frames=first, max_new_tokens=60, **GREEDY)
    chunks = list(stream)
    assert chunks[0].shape[0] == (first or chunk) * codec.hop_length  # the first chunk keeps its size
    _close_to(np.concatenate(chunks), one_shot)
    with BatchEngine(tts, max_slots=1) as engine:
        handle = engine.submit(TEXT, max_new_tokens=60, do_sample=False, stream=True, chunk_frames=chunk,
                               first_chunk_frames=first)  # fmt: skip
        _close_to(np.concatenate(list(handle)), one_shot)


def test_dia_tts_generate_stream(tts, one_shot):
    stream = tts.generate_stream(TEXT, chunk_frames=10, max_new_tokens=60, do_sample=False)
    _close_to(np.concatenate(list(stream)), one_shot)
    assert stream.stats.time_to_first_audio_s is not None


def test_codec_error_stops_the_decoder(tts):
    """An error in the caller's thread (here: the codec) is raised and stops the worker thread."""

    class FailingCodec:
        def __init__(self, codec):
            self._codec = codec
            self.calls = 0

        def decode(self, codes):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("codec failed")
            return self._codec.decode(codes)

        def __getattr__(self, name):
            return getattr(self._codec, name)

    failing = DiaTTS(tts.model, FailingCodec(tts.codec))
    stream = stream_generate(failing, TEXT, chunk_frames=4, max_new_tokens=800, **GREEDY)
    next(stream)
    with pytest.raises(RuntimeError, match="codec failed"):
        next(stream)
    assert not stream._thread.is_alive()
    assert stream.stats.steps == 0  # the decode loop was stopped, not run to its end


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_stream_on_cuda_equals_one_shot(cuda_graphs):
    """On CUDA (bf16 model, CUDA graphs captured in the worker thread, or eager) the stream joins to the
    one-shot audio; cuDNN may pick other conv algorithms per window length, hence a looser tolerance."""
    gpu_tts = DiaTTS.random("tiny", seed=0, device="cuda")
    kw = dict(max_new_tokens=120, cuda_graphs=cuda_graphs, **GREEDY)
    ids_ref = gpu_tts.generate(TEXT, max_new_tokens=120, **GREEDY)
    ref = ids_ref.audio[0]
    stream = stream_generate(gpu_tts, TEXT, chunk_frames=9, first_chunk_frames=4, **kw)
    joined = np.concatenate(list(stream))
    assert joined.shape == ref.shape
    np.testing.assert_allclose(joined, ref, rtol=0, atol=5e-3 * float(np.abs(ref).max()))
    assert stream.stats.time_to_first_audio_s is not None and not _stream_threads()


def test_consumer_decodes_with_the_models_device_current(tts, one_shot, monkeypatch):
    """The caller's thread runs the codec (and undelay_codes, a Triton kernel on CUDA) with the model's device made
    current: Triton launches on the current device, which need not be the model's in the caller's thread."""
    from contextlib import contextmanager

    import dia_fast.generation.stream as stream_mod

    inside: list[bool] = []
    entered: list[torch.device] = []

    @contextmanager
    def using_device(device):
        entered.append(device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    decode = tts.codec.decode

    def checked_decode(codes):
        assert inside, "codec.decode outside the device guard"
        return decode(codes)

    monkeypatch.setattr(stream_mod, "using_device", using_device)
    monkeypatch.setattr(tts.codec, "decode", checked_decode)
    chunks = list(stream_generate(tts, TEXT, chunk_frames=7, max_new_tokens=60, **GREEDY))
    _close_to(np.concatenate(chunks), one_shot)
    assert len(entered) == len(chunks) and set(entered) == {tts.device}
