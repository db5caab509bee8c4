"""Continuous batching (dia_fast.serving.BatchEngine) on the CPU with the tiny model, fp32, seeded: requests that
join and leave a running batch give exactly the codes of their solo runs, whatever runs beside them."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest
import torch

from dia_fast import ops
from dia_fast.api import DiaTTS
from dia_fast.config import DiaConfig
from dia_fast.model import DiaModel
from dia_fast.serving import BatchEngine, EngineBusy, EngineClosed, RequestCancelled
from dia_fast.serving import engine as engine_module

TEXTS = [
    "[S1] Hello there. [S2] Hi!",
    "[S1] A longer sentence (laughs) to pad the other one.",
    "[S2] Third.",
    "[S1] How fast can this go? [S2] Let us measure it.",
]


def _tts(eos_token: int | None = 613, seed: int = 0) -> DiaTTS:
    """Tiny random Dia whose channel-0 EOS logit sits just above a common token's, so requests stop on their
    own at different steps (as in tests/test_engine.py)."""
    torch.manual_seed(seed)
    model = DiaModel(DiaConfig.preset("tiny")).eval()
    if eos_token is not None:
        with torch.no_grad():
            w = model.decoder.logits_dense.weight
            w[1024] = 1.05 * w[eos_token]
    return DiaTTS(model, DiaTTS.random("tiny").codec)


@pytest.fixture(scope="module")
def tts() -> DiaTTS:
    return _tts()


def _requests() -> list[dict]:
    """16 requests: different texts, lengths, sampling settings (greedy among them), voice prompts and seeds."""
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(16):
        opts: dict = dict(text=TEXTS[i % 4] + (" More words." * (i % 3)), max_new_tokens=30 + 7 * i, seed=1000 + i)
        if i % 4 == 0:
            opts["do_sample"] = False
        else:
            opts.update(
                temperature=0.8 + 0.1 * (i % 5), top_p=(0.7, 0.9, 1.0)[i % 3], cfg_filter_top_k=(45, None, 8)[i % 3]
            )
        opts["cfg_scale"] = (3.0, 1.5, 0.0)[i % 3]
        if i % 5 == 1:
            opts["audio_prompt"] = torch.randint(0, 1024, (3 + i, 9), generator=g)
            opts["audio_prompt_text"] = "[S1] The prompt."
        reqs.append(opts)
    return reqs


def _solo(tts: DiaTTS, opts: dict) -> torch.Tensor:
    with BatchEngine(tts, max_slots=1) as engine:
        return engine.submit(**opts).result(120, decode_audio=False).codes


def test_requests_joining_at_different_steps_equal_their_solo_runs(tts):
    """16 requests submitted from threads and from asyncio while others run: each gives exactly its solo codes
    (greedy and sampled with its seed), and steps really ran with several requests."""
    reqs = _requests()
    results: dict[int, torch.Tensor] = {}
    with BatchEngine(tts, max_slots=8, poll_every=2) as engine:

        def submit_from_thread(i: int) -> None:
            time.sleep(0.01 * (i % 4))  # staggered: they join a batch that is already running
            results[i] = engine.submit(**reqs[i]).result(120, decode_audio=False).codes

        threads = [threading.Thread(target=submit_from_thread, args=(i,)) for i in range(0, 16, 2)]
        for t in threads:
            t.start()

        async def from_asyncio() -> None:
            async def one(i: int) -> None:
                await asyncio.sleep(0.02 * (i % 3))
                results[i] = (await engine.generate(**reqs[i])).codes

            await asyncio.gather(*(one(i) for i in range(1, 16, 2)))

        asyncio.run(from_asyncio())
        for t in threads:
            t.join()
        stats = dict(engine.stats)
    assert stats["batched_steps"] > 0 and stats["largest_batch"] >= 4 and stats["failed"] == 0
    for i, opts in enumerate(reqs):
        assert torch.equal(results[i], _solo(tts, opts)), i
    assert len({results[i].shape[0] for i in range(16)}) > 3  # they stopped at different steps


def test_greedy_solo_run_equals_generate(tts):
    """The engine's greedy codes are those of DiaTTS.generate (the static batch path), voice prompt included."""
    prompt = torch.randint(0, 1024, (6, 9), generator=torch.Generator().manual_seed(1))
    for kw in (dict(), dict(audio_prompt=prompt, audio_prompt_text="[S1] Prompt words.")):
        want = tts.generate(TEXTS[1], max_new_tokens=50, do_sample=False, progress=False, **kw).codes[0]
        assert torch.equal(_solo(tts, dict(text=TEXTS[1], max_new_tokens=50, do_sample=False, **kw)), want)
    # a text is spoken as given, outer whitespace included, by both (the engine stripped it and differed)
    text = " " + TEXTS[1] + "\n"
    want = tts.generate(text, max_new_tokens=50, do_sample=False, progress=False).codes[0]
    assert not torch.equal(want, tts.generate(TEXTS[1], max_new_tokens=50, do_sample=False).codes[0])
    assert torch.equal(_solo(tts, dict(text=text, max_new_tokens=50, do_sample=False)), want)


def test_truncated_matches_generate(tts):
    """EngineResult.truncated: max_new_tokens ended the speech, as GenerationResult.truncated says for the same run."""
    with BatchEngine(tts, max_slots=2) as engine:
        for kw in (dict(max_new_tokens=300), dict(max_new_tokens=60, min_new_tokens=44)):
            want = tts.generate(TEXTS[1], do_sample=False, progress=False, decode_audio=False, **kw).truncated[0]
            got = engine.submit(TEXTS[1], do_sample=False, **kw).result(120, decode_audio=False).truncated
            assert got == want == (kw["max_new_tokens"] == 60), kw


def test_cancel_mid_run_frees_the_slot_and_the_others_still_match(tts):
    reqs = _requests()[:6]
    with BatchEngine(tts, max_slots=4, poll_every=1) as engine:
        handles = [engine.submit(**r) for r in reqs]
        long_one = engine.submit(TEXTS[0], max_new_tokens=400, min_new_tokens=350, seed=7)
        deadline = time.monotonic() + 30
        while long_one._reqs[0].steps < 3 and time.monotonic() < deadline:  # it is running
            time.sleep(0.005)
        assert long_one.cancel()
        with pytest.raises(RequestCancelled):
            long_one.result(30)
        codes = [h.result(120, decode_audio=False).codes for h in handles]
        assert engine.busy_slots == 0 and not long_one.cancel()  # finished: nothing to cancel
    for r, c in zip(reqs, codes, strict=True):
        assert torch.equal(c, _solo(tts, r))


def test_cancelling_the_awaiting_task_frees_the_slot(tts):
    """``await engine.generate(...)`` and ``await handle.result_async()`` in a task that is cancelled: the request
    leaves its slot (asyncio's cancellation reaching the future must not settle it behind the engine's back)."""
    with BatchEngine(tts, max_slots=2, poll_every=1) as engine:

        async def cancelled_while_running(make) -> None:
            task = asyncio.create_task(make())
            deadline = time.monotonic() + 30
            while engine.busy_slots == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert engine.busy_slots == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            while engine.busy_slots and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert engine.busy_slots == 0 and engine.queued == 0

        long = dict(max_new_tokens=400, min_new_tokens=350, seed=7)
        asyncio.run(cancelled_while_running(lambda: engine.generate(TEXTS[0], **long)))
        asyncio.run(cancelled_while_running(lambda: engine.submit(TEXTS[0], **long).result_async()))
        steps = engine.stats["steps"]
        assert steps < 2 * 400  # neither ran to its end
        assert engine.submit(TEXTS[2], max_new_tokens=30, seed=1).result(60, decode_audio=False).codes.shape[0] > 0


def test_a_list_of_texts_is_one_request_of_those_pieces(tts):
    """``submit([t0, t1])``: the pieces as given (seeded seed + k), joined with the request's crossfade; the stream
    crossfades them the same way, so it joins to the result's audio."""
    from dia_fast.audio import crossfade_join

    texts = ["[S1] Hello there, how are you?", "[S2] Fine, thanks! And you?"]
    opts = dict(max_new_tokens=40, seed=21, temperature=0.9)
    with BatchEngine(tts, max_slots=2) as engine:
        handle = engine.submit(texts, crossfade_ms=10.0, stream=True, chunk_frames=4, **opts)
        assert handle.pieces == 2
        streamed = np.concatenate(list(handle))
        parts = handle.results()
        whole = handle.result()
    for k, text in enumerate(texts):
        torch.testing.assert_close(parts[k].codes, _solo(tts, dict(opts, text=text, seed=21 + k)), rtol=0, atol=0)
    expected = crossfade_join([p.audio for p in parts], tts.sample_rate, 10.0)
    np.testing.assert_allclose(whole.audio, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(streamed, whole.audio, rtol=0, atol=1e-5)
    assert whole.truncated == handle.truncated == any(p.truncated for p in parts)


def test_generate_codes_with_seeds_draws_as_the_engine_does(tts):
    """``generate_codes(..., seeds=[s0, s1])``: item i draws exactly as an engine request with seed s_i (sampled)."""
    from dia_fast.generation.generate import generate_codes
    from dia_fast.generation.sampling import SamplingConfig
    from dia_fast.text import encode_batch

    texts = [TEXTS[1], TEXTS[3]]
    ids, mask = encode_batch(texts, tts.config.data.text_length)
    sampling = SamplingConfig(temperature=0.9, top_p=0.9)
    out = generate_codes(tts.model, ids, mask, max_new_tokens=40, sampling=sampling, seeds=[7, 2**70], progress=False)
    for text, seed, codes in zip(texts, (7, 2**70), out.frames(tts.config), strict=True):
        solo = _solo(tts, dict(text=text, max_new_tokens=40, temperature=0.9, top_p=0.9, seed=seed))
        torch.testing.assert_close(codes, solo, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 seeds for 2 texts"):
        generate_codes(tts.model, ids, mask, max_new_tokens=40, seeds=[1], progress=False)


def test_bad_requests_name_their_option(tts):
    """Errors raised at submit carry ``param`` (the speech server answers it); NumPy integers are integers; a top-k
    over the vocabulary keeps every id, however large."""
    with BatchEngine(tts, max_slots=1) as engine:
        for kw, error, param in (
            (dict(text=[]), TypeError, "text"),
            (dict(text=["[S1] Hi there.", " "]), TypeError, "text"),
            (dict(text="x" * 5000), ValueError, "text"),
            (dict(text="[S1] Hi.", max_new_tokens=5), ValueError, "max_new_tokens"),
            (dict(text="[S1] Hi.", max_new_tokens=40, min_new_tokens=30), ValueError, "min_new_tokens"),
            (dict(text="[S1] Hi.", crossfade_ms=float("nan")), ValueError, "crossfade_ms"),
            (dict(text="[S1] Hi.", temperature=1e39), ValueError, "temperature"),
            (dict(text="[S1] Hi.", seed=1.5), TypeError, "seed"),
            (dict(text="[S1] Hi.", cfg_filter_top_k=0), ValueError, "cfg_filter_top_k"),
        ):
            with pytest.raises(error) as caught:
                engine.submit(**kw)
            assert caught.value.param == param, kw
        base = dict(text="[S1] Hello there, how are you?", max_new_tokens=24, seed=np.int64(4))
        huge = engine.submit(**base, cfg_filter_top_k=2**63).result(60, decode_audio=False).codes
        k = tts.config.model.decoder.vocab_size
        vocab = engine.submit(**base, cfg_filter_top_k=k).result(60, decode_audio=False).codes
        torch.testing.assert_close(huge, vocab, rtol=0, atol=0)


def test_given_pieces_that_do_not_fit_with_the_transcript_fail_before_the_prompt_is_encoded(tts, monkeypatch):
    """A list of texts (pieces as given) with a voice prompt: each piece and the transcript must fit together; the
    error names both, param "text", and comes before the prompt is encoded (a file decode, perhaps)."""
    encoded: list[object] = []
    monkeypatch.setattr(tts, "encode_prompt", lambda audio, *a: encoded.append(audio))
    with BatchEngine(tts, max_slots=1) as engine:
        with pytest.raises(ValueError, match=r"transcript \(502 bytes\) and the text \(602 bytes\)") as caught:
            engine.submit(
                ["[S1] Short.", "[S1] " + "b" * 600],
                audio_prompt=np.zeros(44100, np.float32),
                audio_prompt_text="[S1] " + "a" * 500,
            )
    assert caught.value.param == "text" and encoded == []


def test_a_request_that_fails_fails_alone(tts, monkeypatch):
    """An error while a request is prefilled fails that request; the others complete with their solo codes.
    Bad options fail in the caller, before anything is queued."""
    real_admit = engine_module.admit
    bad_text_ids: list[torch.Tensor] = []

    def admit(model, slots, s, text_ids, *args, **kwargs):
        if any(torch.equal(text_ids, b) for b in bad_text_ids):
            raise RuntimeError("planted prefill failure")
        return real_admit(model, slots, s, text_ids, *args, **kwargs)

    monkeypatch.setattr(engine_module, "admit", admit)
    reqs = _requests()[:3]
    with BatchEngine(tts, max_slots=2) as engine:
        bad = engine.submit("[S1] This one breaks.", max_new_tokens=40, seed=1)
        bad_text_ids.append(bad._reqs[0].text_ids)
        handles = [engine.submit(**r) for r in reqs]
        with pytest.raises(RuntimeError, match="planted"):
            bad.result(60)
        codes = [h.result(120, decode_audio=False).codes for h in handles]
        for kwargs, err in [
            (dict(temperature=-1.0), ValueError),
            (dict(max_new_tokens=5), ValueError),
            (dict(max_new_tokens=40, min_new_tokens=30), ValueError),
            (dict(seed=1.5), TypeError),
            (dict(audio_prompt_text="[S1] no audio"), ValueError),
            (dict(timeout=0), ValueError),
        ]:
            with pytest.raises(err):
                engine.submit(TEXTS[0], **kwargs)
        with pytest.raises(ValueError, match="empty"):
            engine.submit("   ")
        # a request of two pieces whose first fails: the request has failed, its second piece stops too
        two = engine.submit(["[S1] This one breaks.", TEXTS[1]], max_new_tokens=300, min_new_tokens=250, seed=3)
        with pytest.raises(RuntimeError, match="planted"):
            two.result(60)
        with pytest.raises(RequestCancelled):
            two._reqs[1].future.result(30)  # (left alone it would have run its 250 steps and succeeded)
    monkeypatch.setattr(engine_module, "admit", real_admit)
    for r, c in zip(reqs, codes, strict=True):
        assert torch.equal(c, _solo(tts, r))


def test_full_queue_is_an_error_and_timeouts_fail_requests(tts):
    with BatchEngine(tts, max_slots=1, max_queue=2) as engine:
        first = engine.submit(TEXTS[0], max_new_tokens=300, min_new_tokens=250, seed=0)  # holds the only slot
        deadline = time.monotonic() + 30
        while engine.busy_slots == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = [engine.submit(TEXTS[1], max_new_tokens=30, seed=i) for i in range(2)]
        with pytest.raises(EngineBusy, match="queue is full"):
            engine.submit(TEXTS[2], max_new_tokens=30)
        for h in queued:
            h.cancel()
        late = engine.submit(TEXTS[2], max_new_tokens=30, timeout=0.05)
        with pytest.raises(TimeoutError):
            late.result(60)
        first.cancel()
    with pytest.raises(EngineClosed):
        engine.submit(TEXTS[0])


def test_the_queue_limit_counts_requests_that_wait_for_a_slot(tts):
    """``max_queue`` bounds the requests that wait for a slot: those the free slots take at the next step do not
    wait, and the pieces of one long text count once. The test holds the engine's lock, so the scheduler admits
    nothing meanwhile (every request submitted is still queued)."""
    with BatchEngine(tts, max_slots=4, max_queue=2) as engine:
        with engine._cv:  # (a reentrant lock: submit takes it too)
            burst = [engine.submit(TEXTS[i % 4], max_new_tokens=30, seed=i) for i in range(6)]  # 4 slots + 2
            assert engine.queued == 6
            with pytest.raises(EngineBusy, match=r"queue is full \(2 of 2 waiting\)"):
                engine.submit(TEXTS[0], max_new_tokens=30)
            for h in burst:
                h.cancel()
    with BatchEngine(tts, max_slots=1, max_queue=1) as engine:
        with engine._cv:
            long = engine.submit("[S1] This sentence is one of many in a long text. " * 60, max_new_tokens=30)
            assert long.pieces >= 3 and engine.queued == 1  # one request, its first piece about to run
            with pytest.raises(EngineBusy, match="queue is full"):
                engine.submit(TEXTS[0], max_new_tokens=30)
            long.cancel()


def test_close_fails_what_is_pending_or_drains_it(tts):
    engine = BatchEngine(tts, max_slots=1)
    handles = [engine.submit(TEXTS[i], max_new_tokens=200, min_new_tokens=150, seed=i) for i in range(3)]
    engine.close()
    for h in handles:
        with pytest.raises(EngineClosed):
            h.result(30)
    engine = BatchEngine(tts, max_slots=2)
    handles = [engine.submit(TEXTS[i], max_new_tokens=30, seed=i) for i in range(3)]
    engine.close(drain=True)
    assert all(h.result(0, decode_audio=False).codes.shape[1] == 9 for h in handles)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(max_slots=3), ValueError, "max_slots must be a power of two"),
        (dict(max_slots=2.0), TypeError, "max_slots must be an int"),
        (dict(max_queue=0), ValueError, "max_queue must be >= 1"),
        (dict(max_queue="8"), TypeError, "max_queue must be an int"),
        (dict(poll_every=1.5), TypeError, "poll_every must be an int"),
        (dict(cpu_threads=0), ValueError, "cpu_threads must be >= 1"),
        (dict(chunk_frames=0), ValueError, "chunk_frames must be >= 1"),
        (dict(first_chunk_frames="4"), TypeError, "first_chunk_frames must be an int"),
    ],
)
def test_engine_options_are_checked_when_it_is_built(tts, options, error, match):
    """A bad engine option is an error naming it before any thread starts (a float max_slots was truncated, a
    bad chunk size failed only the first stream)."""
    before = threading.active_count()
    with pytest.raises(error, match=match) as info:
        BatchEngine(tts, **options)
    assert info.value.param == next(iter(options))
    assert threading.active_count() == before


def test_min_new_tokens_holds_eos_back():
    tts = _tts(eos_token=250)  # every request would stop within a few steps
    with BatchEngine(tts, max_slots=2) as engine:
        early = engine.submit(TEXTS[0], max_new_tokens=100, do_sample=False).result(60, decode_audio=False)
        held = engine.submit(TEXTS[0], max_new_tokens=100, min_new_tokens=40, do_sample=False).result(60)
    assert early.stats["eos_position"] - early.stats["prefix_length"] < 40
    assert held.stats["eos_position"] - held.stats["prefix_length"] >= 40
    assert held.codes.shape[0] >= 40 and held.audio.shape[0] == held.codes.shape[0] * tts.codec.hop_length


def test_stream_chunks_join_to_the_result_audio(tts):
    with BatchEngine(tts, max_slots=4, chunk_frames=8, first_chunk_frames=4) as engine:
        other = engine.submit(TEXTS[1], max_new_tokens=80, seed=2)
        handle = engine.submit(TEXTS[3], max_new_tokens=90, min_new_tokens=60, seed=5, stream=True)
        chunks = list(handle)
        result = handle.result(60)
        other.result(60)

        async def astream() -> list[np.ndarray]:
            return [c async for c in engine.stream(TEXTS[3], max_new_tokens=90, min_new_tokens=60, seed=5)]

        again = asyncio.run(astream())
        own = engine.submit(TEXTS[3], max_new_tokens=90, min_new_tokens=60, seed=5, stream=True, chunk_frames=5,
                            first_chunk_frames=3)  # fmt: skip
        own_chunks = list(own)
        with pytest.raises(ValueError, match="chunk_frames"):
            engine.submit(TEXTS[3], stream=True, chunk_frames=0)
    assert own_chunks[0].shape[0] == 3 * tts.codec.hop_length and own_chunks[1].shape[0] == 5 * tts.codec.hop_length
    np.testing.assert_allclose(np.concatenate(own_chunks), result.audio, atol=1e-5)
    assert len(chunks) > 2 and chunks[0].shape[0] == 4 * tts.codec.hop_length
    np.testing.assert_allclose(np.concatenate(chunks), result.audio, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(again), result.audio, atol=1e-5)
    assert handle.stats.time_to_first_audio_s is not None


def test_long_text_runs_as_pieces_side_by_side(tts):
    sentence = "[S1] This sentence is one of many in a text that is much too long for one generation. "
    text = sentence * 14  # over the 1024 text bytes of one generation
    with BatchEngine(tts, max_slots=8) as engine:
        handle = engine.submit(text, seed=3, max_new_tokens=40)
        result = handle.result(120)
    assert handle.pieces > 1
    assert result.stats["pieces"] == handle.pieces and result.stats["batch_peak"] > 1
    assert result.codes.shape[0] == result.stats["frames"]
    assert result.audio.shape[0] > 0


def test_each_draw_depends_on_its_seed_and_position_only():
    """The sampled draws come from Philox keyed by the request's seed at its own positions: the same seed gives
    the same codes in a busy batch, another seed other codes."""
    tts = _tts(eos_token=None)
    kw = dict(max_new_tokens=40, temperature=1.5, top_p=1.0, cfg_filter_top_k=None)
    with BatchEngine(tts, max_slots=4) as engine:
        busy = [engine.submit(TEXTS[i], seed=i, **kw) for i in range(3)]
        a = engine.submit(TEXTS[0], seed=11, **kw).result(60, decode_audio=False).codes
        b = engine.submit(TEXTS[0], seed=12, **kw).result(60, decode_audio=False).codes
        for h in busy:
            h.result(60)
    assert torch.equal(a, _solo(tts, dict(text=TEXTS[0], seed=11, **kw)))
    assert not torch.equal(a, b)


def test_the_triton_step_ops_run_the_engine_too(tts):
    """The slot bookkeeping and the sampler on the Triton backend (the interpreter here) give the same codes."""
    reqs = _requests()[:3]
    want = [_solo(tts, r) for r in reqs]
    for op in ("cfg_sample", "slot_update"):
        ops.set_backend("triton", op)
    try:
        with BatchEngine(tts, max_slots=4) as engine:
            got = [engine.submit(**r).result(120, decode_audio=False).codes for r in reqs]
    finally:
        for op in ("cfg_sample", "slot_update"):
            ops.set_backend(None, op)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
def test_gpu_graphed_engine_equals_eager_engine():
    """On CUDA the engine replays one captured graph per bucket: the codes equal eager steps' (greedy and
    sampled, requests of different lengths joining at different steps)."""
    tts = DiaTTS.random("tiny", seed=0, device="cuda", dtype="float32")
    with torch.no_grad():
        w = tts.model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[613]  # requests stop on their own at different steps
    reqs = _requests()[:6]
    for r in reqs:
        if "audio_prompt" in r:
            r["audio_prompt"] = r["audio_prompt"].cuda()
    got = {}
    for graphs in (True, False):
        with BatchEngine(tts, max_slots=4, cuda_graphs=graphs, poll_every=2) as engine:
            assert bool(engine._graphs) == graphs and (not graphs or sorted(engine._graphs) == [1, 2, 4])
            handles = []
            for r in reqs:
                handles.append(engine.submit(**r))
                time.sleep(0.01)  # later requests join a running batch
            got[graphs] = [h.result(120, decode_audio=False).codes for h in handles]
            assert engine.stats["batched_steps"] > 0
    for a, b in zip(got[True], got[False], strict=True):
        assert torch.equal(a, b)


def test_a_stream_read_late_keeps_its_codes_when_its_slot_is_reused(tts):
    """Stream chunks are copies: a stream read only after its slot went to the next request still gives the
    audio of its own result."""
    with BatchEngine(tts, max_slots=1, chunk_frames=8, first_chunk_frames=4) as engine:
        first = engine.submit(TEXTS[3], max_new_tokens=60, min_new_tokens=40, seed=5, stream=True)
        second = engine.submit(TEXTS[1], max_new_tokens=300, min_new_tokens=250, seed=6)
        deadline = time.monotonic() + 60
        while second._reqs[0].steps < 20 and time.monotonic() < deadline:  # the slot now holds `second`
            time.sleep(0.005)
        assert second._reqs[0].steps >= 20
        chunks = list(first)  # read only now
        want = first.result(60).audio
        second.cancel()
    np.testing.assert_allclose(np.concatenate(chunks), want, atol=1e-5)


def test_a_request_moved_to_a_lower_slot_keeps_its_codes_and_stream(tts):
    """When the requests in low slots finish, the ones left above are moved down so that the batch steps in a
    smaller bucket: their codes (greedy and sampled, voice prompt included) and streamed audio do not change."""
    reqs = _requests()
    short = [dict(r, max_new_tokens=20, min_new_tokens=0) for r in reqs[:3]]
    late = [dict(reqs[5], max_new_tokens=90, min_new_tokens=70), dict(reqs[6], max_new_tokens=80, min_new_tokens=60)]
    with BatchEngine(tts, max_slots=8, poll_every=2, chunk_frames=8, first_chunk_frames=4) as engine:
        handles = [engine.submit(**r) for r in short + late[:1]]
        streamed = engine.submit(**late[1], stream=True)  # slot 4: above every bucket that 2 requests need
        chunks = list(streamed)
        codes = [h.result(60, decode_audio=False).codes for h in handles]
        result = streamed.result(60)
        moves = engine.stats["moves"]
    assert moves >= 1
    for got, opts in zip(codes + [result.codes], short + late, strict=True):
        assert torch.equal(got, _solo(tts, opts))
    np.testing.assert_allclose(np.concatenate(chunks), result.audio, atol=1e-5)


def test_the_steps_thread_count_is_set_for_the_scheduler_thread_only(tts):
    """cpu_threads applies to the scheduler's thread (OpenMP's per-thread setting); the process-wide count and
    other threads keep theirs. Where the OpenMP runtime cannot be reached, the engine reports what it got."""
    from dia_fast.devices import set_thread_cpu_threads

    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def other() -> None:
        seen["ok"] = set_thread_cpu_threads(1)
        seen["inside"] = torch.get_num_threads()

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert torch.get_num_threads() == before
    if seen["ok"]:
        assert seen["inside"] == 1
    with pytest.raises(ValueError, match="cpu_threads"):
        BatchEngine(tts, cpu_threads=0)
    with BatchEngine(tts, max_slots=2, cpu_threads=1) as engine:
        engine.submit(TEXTS[2], max_new_tokens=20, seed=1).result(60, decode_audio=False)
        assert engine.cpu_threads == (1 if seen["ok"] else before)
    assert torch.get_num_threads() == before


def test_leaving_a_stream_early_cancels_it_and_a_failed_stream_fails_again(tts):
    """``break`` out of a stream (closing its iterator) cancels the request, so what waits behind it runs at once;
    iterating the cancelled stream again raises its error again instead of waiting forever."""
    with BatchEngine(tts, max_slots=1, chunk_frames=4, first_chunk_frames=2) as engine:
        handle = engine.submit(TEXTS[1], max_new_tokens=1000, min_new_tokens=900, seed=1, stream=True)
        chunks = iter(handle)
        assert next(chunks).size
        chunks.close()  # what leaving a for loop does once the generator is collected
        with pytest.raises(RequestCancelled):
            handle.result(30)
        behind = engine.submit(TEXTS[2], max_new_tokens=30, seed=2).result(60, decode_audio=False)
        assert behind.stats["queued_s"] < 30
        done = threading.Event()
        errors: list[BaseException] = []

        def again() -> None:
            try:
                list(handle)
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)
            done.set()

        threading.Thread(target=again, daemon=True).start()
        assert done.wait(30) and isinstance(errors[0], RequestCancelled)


def test_a_stream_that_has_ended_has_its_result(tts, monkeypatch):
    """The result is settled before the stream's end goes out: right after the iteration, ``result(0)`` answers
    (the server read it so and answered a finished stream as a 504 timeout). A slow scheduler is simulated between
    the two: a finished request's bookkeeping takes 0.3 s."""
    slow = engine_module.last_eos_position

    def slow_last_eos_position(*args):
        time.sleep(0.3)
        return slow(*args)

    monkeypatch.setattr(engine_module, "last_eos_position", slow_last_eos_position)
    with BatchEngine(tts, max_slots=1, chunk_frames=8) as engine:
        handle = engine.submit(TEXTS[0], max_new_tokens=40, seed=3, stream=True)
        audio = np.concatenate(list(handle))
        np.testing.assert_allclose(handle.result(0).audio, audio, atol=1e-5)


def test_asyncio_streams_wait_in_the_engines_own_threads(tts):
    """``engine.stream`` waits for its chunks in the engine's threads, not in the event loop's default executor
    (whose few threads every other ``to_thread`` of the program needs), and ``engine.generate`` submits off the
    loop (a prompt is encoded there)."""
    import concurrent.futures

    class Recording(concurrent.futures.ThreadPoolExecutor):
        def __init__(self) -> None:
            super().__init__(2)
            self.calls: list[object] = []

        def submit(self, fn, /, *args, **kwargs):  # noqa: ANN001, ANN202
            self.calls.append(getattr(fn, "func", fn))
            return super().submit(fn, *args, **kwargs)

    default = Recording()

    async def main() -> tuple[list[np.ndarray], object]:
        asyncio.get_running_loop().set_default_executor(default)
        with BatchEngine(tts, max_slots=2, chunk_frames=8) as engine:
            chunks = [c async for c in engine.stream(TEXTS[0], max_new_tokens=40, seed=4)]
            result = await engine.generate(TEXTS[0], max_new_tokens=40, seed=4)
        return chunks, result

    chunks, result = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(chunks), result.audio, atol=1e-5)
    assert next not in default.calls  # no chunk was waited for there
    assert BatchEngine.submit in [getattr(c, "__func__", c) for c in default.calls]  # submitted off the loop


def test_a_dropped_voice_pool_finishes_its_requests_then_stops(tts):
    """A VoicePool dropped without close(): its engine finishes the request it was given, then its scheduler
    thread ends (it kept the engine, caches and model alive until the process ended)."""
    import gc

    from dia_fast import VoicePool

    def submit() -> tuple[object, threading.Thread]:
        pool = VoicePool(tts, max_batch=1)
        return pool.submit(TEXTS[0], max_new_tokens=30, seed=5), pool.engine._thread

    handle, thread = submit()
    gc.collect()
    assert handle.result(60, decode_audio=False).codes.shape[0] > 0  # not failed by the pool's end
    thread.join(30)
    assert not thread.is_alive()


def test_an_asyncio_stream_of_a_closed_engine_ends_with_its_error(tts):
    """Closing the engine while an asyncio stream is read (its waiting threads shut down with it): the stream
    ends with EngineClosed, not with the executor's 'cannot schedule new futures'."""

    async def main() -> BaseException:
        engine = BatchEngine(tts, max_slots=1, chunk_frames=2, first_chunk_frames=2)
        try:
            async for _ in engine.stream(TEXTS[1], max_new_tokens=1000, min_new_tokens=900, seed=6):
                await asyncio.to_thread(engine.close)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            return exc
        raise AssertionError("the stream of a closed engine ended without an error")

    assert isinstance(asyncio.run(asyncio.wait_for(main(), 60)), EngineClosed)
    # a stream whose first wait comes after close() makes no pool that nobody would shut down
    engine = BatchEngine(tts, max_slots=1)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine._stream_waiters()
    assert engine._waiters is None


def test_an_engine_dropped_without_close_is_freed_once_its_requests_are_done(tts):
    """The scheduler holds the engine only while it has work: an engine nobody references (nor its handles) is
    collected once idle, and its thread ends (it kept the engine, its caches and the model alive for good)."""
    import gc
    import weakref

    engine = BatchEngine(tts, max_slots=2)
    thread, ref = engine._thread, weakref.ref(engine)
    engine.submit(TEXTS[0], max_new_tokens=30, seed=1).result(60, decode_audio=False)
    del engine
    gc.collect()
    thread.join(30)
    assert not thread.is_alive() and ref() is None
    # a request still running keeps its engine (through the scheduler) until it is done
    engine = BatchEngine(tts, max_slots=1)
    thread, ref = engine._thread, weakref.ref(engine)
    handle = engine.submit(TEXTS[1], max_new_tokens=60, min_new_tokens=40, seed=2)
    del engine
    gc.collect()
    assert handle.result(60, decode_audio=False).codes.shape[0] >= 40
    del handle
    gc.collect()
    thread.join(30)
    assert not thread.is_alive() and ref() is None


def test_the_scheduler_reads_each_rounds_state_back_without_stalling_the_device(tts, monkeypatch):
    """On a GPU a blocking read-back (``.tolist()`` of device state, a plain ``.cpu()``) waits for every queued step,
    and the device idles while the host does the round's bookkeeping. Simulated here on the CPU with a pinned pool
    whose copies complete only once a later step has been queued (a device one step behind the host): while requests
    run, the scheduler reads the slots' state and codes only through that pool, and never waits for a copy with
    nothing queued behind it. The codes (moves, a stream and a slot reused included) are those of the solo runs. The
    overlap is CUDA's (on the CPU copies are synchronous and a round's own state is read at once): forced on here, and
    a pooled copy holds garbage until it is waited for, as a copy still in flight would."""
    from dia_fast.memory import PinnedPool, PooledBuffer

    reqs = _requests()
    opts = [dict(reqs[i], max_new_tokens=20 + 9 * i, min_new_tokens=0) for i in (0, 3, 5, 6, 7)]
    want = [_solo(tts, o) for o in opts]
    queued = [0]  # decode steps queued by the scheduler
    stalls: list[int] = []  # steps queued when the host waited for a copy that nothing was queued behind
    running: list[BatchEngine] = []

    class LaggingEvent:
        def __init__(self) -> None:
            self.at = -1

        def record(self, stream: object = None) -> None:
            self.at = queued[0]

        def query(self) -> bool:
            return queued[0] > self.at

        def synchronize(self) -> None:
            if not self.query() and running and running[0].busy_slots:
                stalls.append(queued[0])

    class InFlightPool(PinnedPool):
        """Each copy lands only when it is waited for: until then its buffer holds garbage."""

        def copy_to_host(self, device_tensor, *, out=None):
            buf = super().copy_to_host(device_tensor, out=out)
            landing[buf.tensor.untyped_storage().data_ptr()] = buf.tensor.clone()
            buf.tensor.fill_(-12345)
            return buf

    landing: dict[int, torch.Tensor] = {}
    wait = PooledBuffer.wait

    def landing_wait(self):
        t = wait(self)
        value = landing.pop(t.untyped_storage().data_ptr(), None)
        if value is not None:
            t.copy_(value)
        return t

    monkeypatch.setattr(PooledBuffer, "wait", landing_wait)
    monkeypatch.setattr(engine_module, "overlaps_readback", lambda _device: True)
    pool = InFlightPool(event_factory=LaggingEvent)
    pooled: set[int] = set()  # the pool's host blocks
    copies = [0]
    acquire = pool.acquire

    def tracked_acquire(*args, **kwargs):
        buf = acquire(*args, **kwargs)
        pooled.add(buf.tensor.untyped_storage().data_ptr())
        copies[0] += 1
        return buf

    direct: list[tuple] = []  # host reads of tensors that are not pooled copies, in the scheduler thread
    tolist = torch.Tensor.tolist

    def watched_tolist(t: torch.Tensor):
        if threading.current_thread().name == "dia_fast-batch-engine" and t.untyped_storage().data_ptr() not in pooled:
            direct.append(tuple(t.shape))
        return tolist(t)

    step = BatchEngine._step

    def counted_step(self, n, view):
        step(self, n, view)
        queued[0] += 1

    monkeypatch.setattr(pool, "acquire", tracked_acquire)
    monkeypatch.setattr(engine_module, "default_pool", lambda: pool, raising=False)
    monkeypatch.setattr(torch.Tensor, "tolist", watched_tolist)
    monkeypatch.setattr(BatchEngine, "_step", counted_step)
    with BatchEngine(tts, max_slots=4, poll_every=2, chunk_frames=8, first_chunk_frames=4) as engine:
        running.append(engine)
        handles = [engine.submit(**o, stream=i == 3) for i, o in enumerate(opts)]  # the 5th waits for a slot
        chunks = list(handles[3])
        got = [h.result(60, decode_audio=False).codes for h in handles]
        stream_audio = handles[3].result(60).audio
        moves = engine.stats["moves"]
    assert queued[0] > 20 and copies[0] > 20 and moves >= 1
    assert direct == [] and stalls == []
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    np.testing.assert_allclose(np.concatenate(chunks), stream_audio, atol=1e-5)


def test_admission_copies_its_inputs_to_a_gpu_without_blocking():
    """A plain host-to-device copy from pageable memory waits for the running batch's queued steps: admission copies
    through pinned memory, without blocking (checked with a stand-in tensor, as this runs without a GPU)."""
    from dia_fast.serving import slots as slots_module

    calls: list[tuple] = []

    class HostTensor:
        device = torch.device("cpu")

        def pin_memory(self) -> HostTensor:
            calls.append(("pin_memory",))
            return self

        def to(self, device: torch.device, non_blocking: bool = False) -> str:
            calls.append(("to", device.type, non_blocking))
            return "on the device"

    assert slots_module._to_device(HostTensor(), torch.device("cuda", 0)) == "on the device"
    assert calls == [("pin_memory",), ("to", "cuda", True)]
    calls.clear()
    slots_module._to_device(HostTensor(), torch.device("cpu"))
    assert calls == [("to", "cpu", False)]


@pytest.mark.parametrize("where", ["codes copy", "codes wait"])
def test_a_failure_while_handing_results_over_fails_every_request_and_returns_the_buffers(tts, monkeypatch, where):
    """With the read-back lag (CUDA's, forced on): an error while the finished requests' codes are being copied (the
    pool cannot lend their buffer) or waited for (where a CUDA fault surfaces: the round's first host sync) fails
    every request, the finished ones included, and returns every pooled buffer. Before, the first made the engine's
    clean-up raise 'buffer already released' and every request waited forever; the second lost the finished
    requests and two buffers."""
    from dia_fast.memory import PinnedPool, PooledBuffer
    from dia_fast.serving import EngineFailed

    monkeypatch.setattr(engine_module, "overlaps_readback", lambda _device: True)
    pool = PinnedPool(1024) if where == "codes copy" else PinnedPool()  # 1 KiB: the state (3 x n int64) fits
    monkeypatch.setattr(engine_module, "default_pool", lambda: pool)
    if where == "codes wait":
        wait = PooledBuffer.wait

        def failing_wait(self):
            if sys._getframe(1).f_code.co_name == "_deliver":  # the engine waiting for a block of codes
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return wait(self)

        monkeypatch.setattr(PooledBuffer, "wait", failing_wait)
    engine = BatchEngine(tts, max_slots=2, poll_every=2)
    try:
        handles = [engine.submit("[S1] Hello there.", max_new_tokens=20 + 10 * i, seed=i) for i in range(3)]
        for h in handles:
            with pytest.raises(EngineFailed):
                h.result(30, decode_audio=False)
    finally:
        engine.close(timeout=30)
    assert pool.stats()["buffers_in_use"] == 0


def test_without_the_overlap_results_come_in_their_own_round_and_the_stats_are_the_same(tts, monkeypatch):
    """Off CUDA the copies are synchronous: a round's own state is read at once, so a finished request leaves after
    its round (the lag would hold its slot and its result two more rounds). Its codes and its own stats (steps,
    largest batch) are the same either way; only the engine's step count grows with the lag."""
    opts = [dict(r, min_new_tokens=0) for r in _requests()[:4]]
    runs = {}
    for overlap in (False, True):
        monkeypatch.setattr(engine_module, "overlaps_readback", lambda _device, on=overlap: on)
        with BatchEngine(tts, max_slots=4, poll_every=4) as engine:
            results = [h.result(60, decode_audio=False) for h in [engine.submit(**o) for o in opts]]
            runs[overlap] = (results, dict(engine.stats))
    (plain, plain_stats), (lagged, lagged_stats) = runs[False], runs[True]
    for a, b in zip(plain, lagged, strict=True):
        assert torch.equal(a.codes, b.codes)
        assert a.stats["steps"] == b.stats["steps"] and a.stats["batch_peak"] == b.stats["batch_peak"]
        # its steps cover its generation in whole rounds of 4, no more
        assert a.stats["steps"] - 4 < a.stats["eos_position"] + tts.config.data.max_delay < a.stats["steps"] + 4
    assert plain_stats["steps"] < lagged_stats["steps"]


def test_closing_hands_over_results_that_were_already_final(tts, monkeypatch):
    """close() (not draining) in the round of a request's last step: its codes are final on the device and on their
    way to the host; it gets its result, not EngineClosed (as before the read-back lag)."""
    monkeypatch.setattr(engine_module, "overlaps_readback", lambda _device: True)
    count = BatchEngine._count_steps

    def closing(self, live):
        count(self, live)
        if self.stats["steps"] == 20:  # the request's last step (prefix 1, 20 new tokens)
            self.close()  # from the scheduler thread: takes effect after this round

    monkeypatch.setattr(BatchEngine, "_count_steps", closing)
    engine = BatchEngine(tts, max_slots=2, poll_every=4)
    h = engine.submit("[S1] Hello there.", max_new_tokens=20, min_new_tokens=4, seed=1)
    result = h.result(60, decode_audio=False)
    assert result.codes.shape[0] > 0 and engine.stats["finished"] == 1
