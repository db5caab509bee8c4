"""The speech server (python -m dia_fast.serve) on 127.0.0.1, started inside each test, answered by real clients:
the official openai package and httpx. Tiny random model, fp32, CPU; every loop is bounded in count and time."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
sf = pytest.importorskip("soundfile")

from dia_fast.api import DiaTTS  # noqa: E402
from dia_fast.audio import float_to_pcm16  # noqa: E402
from dia_fast.config import DiaConfig  # noqa: E402
from dia_fast.model import DiaModel  # noqa: E402
from dia_fast.serve import ServerSettings, create_app  # noqa: E402
from dia_fast.serve.audio_out import FORMATS, encode_audio  # noqa: E402
from dia_fast.serve.local import serve_in_thread  # noqa: E402
from dia_fast.serving import BatchEngine  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 40}


def _tts() -> DiaTTS:
    """Tiny random Dia whose EOS logit sits just above a common token's, so requests stop on their own."""
    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny")).eval()
    with torch.no_grad():
        w = model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[613]
    return DiaTTS(model, DiaTTS.random("tiny").codec)


@pytest.fixture(scope="module")
def tts() -> DiaTTS:
    return _tts()


@contextlib.contextmanager
def serve(tts: DiaTTS, **settings) -> Iterator[str]:
    """A server on 127.0.0.1 (a free port) in a thread; yields its base URL and stops it (draining) after."""
    with serve_in_thread(create_app(ServerSettings(**settings), tts=tts), start_timeout=60) as local:
        yield local.url


@pytest.fixture(scope="module")
def base(tts: DiaTTS, tmp_path_factory) -> Iterator[str]:
    with serve(tts, max_batch=4, max_queue=64, voices_dir=tmp_path_factory.mktemp("voices")) as url:
        yield url


def _client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key=kw.pop("api_key", "unused"), base_url=f"{base}/v1", max_retries=0, timeout=120, **kw)


def _decode(data: bytes, fmt: str, rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode a response with another library than the one that wrote it where one exists (soundfile for WAV and
    FLAC), else ffmpeg through PyAV; pcm is read as 16-bit little-endian mono."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767.0, int(rate or 24000)
    if fmt in ("wav", "flac"):
        x, r = sf.read(io.BytesIO(data), dtype="float32")
        return x, r
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        return np.concatenate(frames), stream.rate


def _solo_audio(tts: DiaTTS, text: str, **options) -> np.ndarray:
    with BatchEngine(tts, max_slots=1) as engine:
        return engine.submit(text, **options).result(120).audio


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _wait_for_metric(base: str, name: str, minimum: float = 1, timeout: float = 60) -> None:
    """Poll /metrics until ``name`` reaches ``minimum`` (bounded by ``timeout`` seconds: then the test fails, since
    what it goes on to check assumes that state)."""
    deadline = time.monotonic() + timeout
    while _metric(base, name) < minimum and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(base, name) >= minimum, f"{name} stayed below {minimum} for {timeout} s"


def test_openai_client_gets_valid_audio_in_every_format(tts, base):
    """client.audio.speech.create answers every format with audio of the generation's length at the format's
    rate; WAV is exactly the solo run's audio in 16 bits."""
    client = _client(base)
    want = _solo_audio(tts, "[S1] Hello there.", do_sample=False, max_new_tokens=40)
    seconds = len(want) / tts.sample_rate
    for fmt in FORMATS:
        resp = client.audio.speech.create(
            model="tts-1", voice="S1", input="Hello there.", response_format=fmt, extra_body=GREEDY
        )
        assert resp.response.headers["content-type"].startswith(FORMATS[fmt].media_type), fmt
        audio, rate = _decode(resp.content, fmt)
        assert rate == {"pcm": 24000, "opus": 48000}.get(fmt, tts.sample_rate), fmt
        # lossy encoders pad by up to a frame or two; the length is the generation's
        assert abs(len(audio) / rate - seconds) < 0.08, (fmt, len(audio) / rate, seconds)
        if fmt == "wav":  # 16-bit samples: the solo run's, converted as every dia_fast WAV is (float_to_pcm16)
            pcm16, _ = sf.read(io.BytesIO(resp.content), dtype="int16")
            np.testing.assert_array_equal(pcm16, float_to_pcm16(want))


def test_stream_arrives_in_chunks_before_the_generation_ends_and_equals_the_whole(tts, base):
    client = _client(base)
    kw = dict(model="tts-1", voice="S2", input="A streamed sentence.", response_format="pcm")
    extra = {"temperature": 0, "max_new_tokens": 200, "min_new_tokens": 150}
    arrivals, parts = [], []
    t0 = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(**kw, stream_format="audio", extra_body=extra) as resp:
        assert resp.headers["content-type"].startswith("audio/pcm")
        for part in resp.iter_bytes():
            arrivals.append(time.perf_counter() - t0)
            parts.append(part)
    whole = client.audio.speech.create(**kw, extra_body=extra).content
    assert len(parts) >= 3
    assert arrivals[0] < 0.7 * arrivals[-1]  # the first audio came well before the end
    streamed = np.frombuffer(b"".join(parts), "<i2").astype(np.int32)
    ref = np.frombuffer(whole, "<i2").astype(np.int32)
    assert len(streamed) == len(ref)
    assert np.abs(streamed - ref).max() <= 2  # chunked decoding + streaming resampler vs whole: rounding only


def test_sse_events_parse_and_carry_the_audio(base):
    with httpx.stream(
        "POST",
        f"{base}/v1/audio/speech",
        json={
            "model": "tts-1",
            "voice": "S1",
            "input": "Events.",
            "response_format": "wav",
            "stream_format": "sse",
            **GREEDY,
        },
        timeout=120,
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 2
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert data[:4] == b"RIFF"
    usage = events[-1]["usage"]
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio, rate = _decode(data, "pcm")  # header-less read of the streamed WAV's samples (after its 44 bytes)
    assert len(audio) > 0 and rate


def _wav_bytes(seconds: float, rate: int = 22050, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_voices_round_trip(tts, base):
    files = {"file": ("voice.wav", _wav_bytes(2.0), "audio/wav")}
    form = {"name": "narrator_1", "transcript": "The words of the prompt."}
    r = httpx.post(f"{base}/v1/audio/voices", data=form, files=files, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "narrator_1" and abs(r.json()["duration_s"] - 2.0) < 0.1
    again = httpx.post(f"{base}/v1/audio/voices", data=form, files=files, timeout=60)
    assert again.status_code == 409 and again.json()["error"]["code"] == "voice_exists"
    replaced = httpx.post(f"{base}/v1/audio/voices", data={**form, "overwrite": "true"}, files=files, timeout=60)
    assert replaced.status_code == 201
    listed = httpx.get(f"{base}/v1/audio/voices", timeout=10).json()["data"]
    assert {"S1", "S2", "dialogue", "narrator_1"} <= {v["id"] for v in listed}
    one = httpx.get(f"{base}/v1/audio/voices/narrator_1", timeout=10)
    assert one.status_code == 200 and one.json() == next(v for v in listed if v["id"] == "narrator_1")
    assert httpx.get(f"{base}/v1/audio/voices/s2", timeout=10).json() == {"id": "S2", "object": "voice",
                                                                           "type": "builtin"}  # fmt: skip
    missing = httpx.get(f"{base}/v1/audio/voices/nobody", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert missing.json()["error"]["code"] == "voice_not_found" and missing.json()["error"]["param"] == "voice_id"
    # the stored voice speaks: as a string and as OpenAI's {"id": ...} object, equal to a solo run with its prompt
    client = _client(base)
    got = client.audio.speech.create(
        model="tts-1", voice="narrator_1", input="New words.", response_format="wav", extra_body=GREEDY
    )
    got2 = client.audio.speech.create(
        model="tts-1", voice={"id": "narrator_1"}, input="New words.", response_format="wav", extra_body=GREEDY
    )
    assert got.content == got2.content
    from dia_fast.voice import CustomSpeaker

    speaker = CustomSpeaker.from_audio(io.BytesIO(_wav_bytes(2.0)), form["transcript"], tts)
    want = _solo_audio(
        tts,
        "[S1] New words.",
        audio_prompt=speaker.codes,
        audio_prompt_text=speaker.tagged_transcript(0),
        do_sample=False,
        max_new_tokens=40,
    )
    assert got.content == encode_audio(want, tts.sample_rate, "wav", tts.sample_rate)
    # bad uploads
    short = httpx.post(
        f"{base}/v1/audio/voices",
        data={**form, "name": "short"},
        files={"file": ("v.wav", _wav_bytes(0.3), "audio/wav")},
        timeout=60,
    )
    assert short.status_code == 400 and "1-20 s" in short.json()["error"]["message"]
    for bad_id in ("../escape", "a/b", ".hidden", "S1", "x" * 65, "nl\n", "S1\n"):
        r = httpx.post(f"{base}/v1/audio/voices", data={**form, "name": bad_id}, files=files, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", bad_id
    untold = httpx.post(f"{base}/v1/audio/voices", data={**form, "transcript": " "}, files=files, timeout=60)
    assert untold.status_code == 400 and untold.json()["error"]["param"] == "transcript"
    # a transcript over the text budget would make every use of the voice fail: refused at upload
    wordy = httpx.post(f"{base}/v1/audio/voices", data={**form, "name": "wordy", "transcript": "word " * 2000},
                       files=files, timeout=60)  # fmt: skip
    assert wordy.status_code == 400 and wordy.json()["error"]["param"] == "transcript", wordy.text
    assert "transcript is too long" in wordy.json()["error"]["message"]
    junk = httpx.post(
        f"{base}/v1/audio/voices",
        data={**form, "name": "junk"},
        files={"file": ("v.wav", b"not audio at all", "audio/wav")},
        timeout=60,
    )
    assert junk.status_code == 400 and "cannot be read" in junk.json()["error"]["message"]
    assert httpx.delete(f"{base}/v1/audio/voices/narrator_1", timeout=10).status_code == 200
    deleted_twice = httpx.delete(f"{base}/v1/audio/voices/narrator_1", timeout=10)
    assert deleted_twice.status_code == 404 and deleted_twice.json()["error"]["type"] == "not_found_error"
    assert httpx.delete(f"{base}/v1/audio/voices/..%2Fescape", timeout=10).status_code in (400, 404)
    gone = httpx.post(f"{base}/v1/audio/speech", json={"model": "tts-1", "voice": "narrator_1", "input": "x"})
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "voice"


def test_a_voices_directory_that_fails_is_a_named_500(tts, tmp_path):
    """The directory itself failing (here: replaced by a file while the server runs) answers a 500 that names
    the OS error without the server's path; listing leaves it out, and the server keeps serving."""
    voices = tmp_path / "voices"
    files = {"file": ("voice.wav", _wav_bytes(2.0), "audio/wav")}
    form = {"name": "narrator", "transcript": "The words of the prompt."}
    with serve(tts, max_batch=1, voices_dir=voices) as url:
        voices.rmdir()
        voices.write_bytes(b"not a directory")
        r = httpx.post(f"{url}/v1/audio/voices", data=form, files=files, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 500 and err["code"] == "voice_storage_error" and err["type"] == "server_error"
        assert "Not a directory" in err["message"] and str(tmp_path) not in err["message"], err
        removed = httpx.delete(f"{url}/v1/audio/voices/narrator", timeout=10)
        assert removed.status_code == 500 and removed.json()["error"]["code"] == "voice_storage_error"
        assert [v["type"] for v in httpx.get(f"{url}/v1/audio/voices", timeout=10).json()["data"]] == ["builtin"] * 3
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


LOAD_TEXTS = [
    "[S1] One.",
    "[S2] Two words here.",
    "[S1] A third, longer sentence (laughs).",
    "[S1] Four. [S2] Five.",
    "[S2] Six is a number.",
    "[S1] Seven ate nine.",
    "[S2] Eight.",
]


def test_bounded_load_gives_every_answer_and_solo_codes(tts, base):
    """32 concurrent requests, 4 malformed: 28 valid WAVs, each exactly its solo run's audio (greedy), 4 clean
    errors, nothing lost. Each request is bounded by a 120 s timeout, the whole by the pool's 300 s."""
    valid = [
        {
            "model": "tts-1",
            "voice": "dialogue",
            "input": LOAD_TEXTS[i % 7],
            "response_format": "wav",
            "temperature": 0,
            "max_new_tokens": 30 + 5 * (i % 7),
        }
        for i in range(28)
    ]
    malformed = [
        {"model": "tts-1", "voice": "S1", "input": ""},
        {"model": "tts-1", "voice": "S1", "input": "x", "response_format": "ogg"},
        {"model": "tts-1", "voice": "S1", "input": "x", "max_new_tokens": 5},
        {"model": "tts-1", "input": "x"},
    ]
    bodies = valid[:14] + malformed + valid[14:]

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{base}/v1/audio/speech", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(post, b) for b in bodies]
        answers = [f.result(timeout=300) for f in futures]
    assert len(answers) == 32
    errors = [a for a in answers if a.status_code != 200]
    assert len(errors) == 4 and all(a.status_code == 400 and "error" in a.json() for a in errors)
    assert all("Traceback" not in a.text for a in errors)
    solo = {}
    for body, answer in zip(bodies, answers, strict=True):
        if body in malformed:
            continue
        key = (body["input"], body["max_new_tokens"])
        if key not in solo:
            audio = _solo_audio(tts, body["input"], do_sample=False, max_new_tokens=body["max_new_tokens"])
            solo[key] = encode_audio(audio, tts.sample_rate, "wav", tts.sample_rate)
        assert answer.content == solo[key], key


def test_full_queue_is_429_with_retry_after_and_a_disconnect_frees_the_slot(tts):
    long = {
        "model": "tts-1",
        "voice": "S1",
        "input": "Long.",
        "response_format": "pcm",
        "stream_format": "audio",
        "max_new_tokens": 2000,
        "min_new_tokens": 1900,
    }
    with serve(tts, max_batch=1, max_queue=1) as url, httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/audio/speech", json=long) as running:
            assert running.status_code == 200
            chunks = running.iter_bytes()  # (kept: a dropped iterator would close the stream)
            next(chunks)  # it runs: the slot is busy
            with client.stream("POST", f"{url}/v1/audio/speech", json=long) as queued:
                assert queued.status_code == 200  # (headers come once it is queued)
                busy = client.post(f"{url}/v1/audio/speech", json=long)
                assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
                assert busy.json()["error"]["type"] == "rate_limit_error"
        # both clients left mid-stream: their slots and queue places free up, and /metrics says so
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            _metric(url, "dia_fast_busy_slots") or _metric(url, "dia_fast_queue_depth")
        ):
            time.sleep(0.05)
        assert _metric(url, "dia_fast_busy_slots") == 0 and _metric(url, "dia_fast_queue_depth") == 0
        assert _metric(url, "dia_fast_cancelled_requests_total") >= 1
        ok = client.post(
            f"{url}/v1/audio/speech", json={**long, "stream_format": None, "max_new_tokens": 30, "min_new_tokens": 0}
        )
        assert ok.status_code == 200


def test_errors_are_openai_json_without_tracebacks(base):
    speak = {"model": "tts-1", "voice": "S1", "input": "x"}
    cases = [
        (b"{not json", 400, None),
        (json.dumps([1, 2]).encode(), 400, None),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "bogus": 1}).encode(), 400, "bogus"),
        (json.dumps({"model": "nope", "voice": "S1", "input": "x"}).encode(), 404, "model"),
        (json.dumps({"model": "tts-1", "voice": "alloy", "input": "x"}).encode(), 400, "voice"),
        (json.dumps({"model": "tts-1", "voice": 5, "input": "x"}).encode(), 400, "voice"),
        (json.dumps({"model": "tts-1", "voice": {"id": "S1", "x": 1}, "input": "x"}).encode(), 400, "voice.x"),
        (json.dumps({"model": "tts-1", "voice": {"name": "S1"}, "input": "x"}).encode(), 400, "voice.id"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "speed": 5}).encode(), 400, "speed"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "speed": "2"}).encode(), 400, "speed"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "seed": True}).encode(), 400, "seed"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "max_new_tokens": 30.5}).encode(), 400, None),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({**speak, "temperature": 1e-30}).encode(), 400, "temperature"),
        (b'{"model": "tts-1", "voice": "S1", "input": "x", "top_p": NaN}', 400, "top_p"),
        (
            json.dumps(
                {"model": "tts-1", "voice": "S1", "input": "x", "response_format": "opus", "sample_rate": 44100}
            ).encode(),
            400,
            "sample_rate",
        ),
        (
            json.dumps({"model": "tts-1", "voice": "S1", "input": "x", "instructions": "calm"}).encode(),
            400,
            "instructions",
        ),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x" * 4097}).encode(), 400, "input"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x" * 2_000_000}).encode(), 413, None),
        # text that cannot be spoken: a lone surrogate, a word too long for one generation
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "\ud800 hi"}).encode(), 400, "input"),
        (json.dumps({"model": "tts-1", "voice": "S1", "input": "x" * 4096}).encode(), 400, "input"),
        # integers out of range, checked here or by the engine: each names its field
        *[
            (json.dumps({**speak, field: value}).encode(), 400, field)
            for field, value in (
                ("max_new_tokens", 5),
                ("max_new_tokens", 2**64),
                ("min_new_tokens", 2**63),
                ("cfg_filter_top_k", 0),
                ("cfg_filter_top_k", 2**31),
                ("cfg_filter_top_k", 2**63),
            )
        ],
        (json.dumps({**speak, "max_new_tokens": 40, "min_new_tokens": 39}).encode(), 400, "min_new_tokens"),
    ]
    for body, status, param in cases:
        r = httpx.post(f"{base}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert param is None or err["param"] == param, (body[:80], err)
        assert "Traceback" not in r.text
    assert httpx.get(f"{base}/v1/nothing").json()["error"]["message"]
    # the model ids a request may name: the served id and its aliases
    served = httpx.get(f"{base}/v1/models").json()["data"][0]
    for model_id in (served["id"], *served["aliases"]):
        assert httpx.get(f"{base}/v1/models/{model_id}").json()["id"] == served["id"], model_id
    assert httpx.get(f"{base}/v1/models/nope").status_code == 404


def test_bodies_json_cannot_read_are_400_without_a_traceback(base, caplog):
    """Valid-looking JSON that Python's parser refuses (an integer over its 4,300-digit limit, arrays nested past
    its recursion limit) is invalid JSON, answered as such; nothing is logged as an unexpected error."""
    fields = '"model": "tts-1", "voice": "S1", "input": "x", "response_format": "wav"'
    bodies = [
        "{" + fields + ', "seed": ' + "9" * 5000 + "}",
        "{" + fields + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ]
    with caplog.at_level(logging.WARNING, logger="dia_fast"):
        for body in bodies:
            r = httpx.post(f"{base}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["message"].startswith("the body is not valid JSON") and err["param"] is None, err
    assert not [rec for rec in caplog.records if rec.exc_info], caplog.text


def test_a_top_k_above_the_vocabulary_keeps_every_token(base):
    """cfg_filter_top_k up to 2**31-1 is accepted; any k from the vocabulary size (1028) up gives the same audio."""
    body = {"model": "tts-1", "voice": "S1", "input": "Top k.", "response_format": "wav", "seed": 3, "temperature": 1.0}
    answers = [
        httpx.post(f"{base}/v1/audio/speech", json={**body, "max_new_tokens": 30, "cfg_filter_top_k": k}, timeout=120)
        for k in (1028, 5000, 2**31 - 1)
    ]
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
    assert answers[0].content[:4] == b"RIFF" and answers[0].content == answers[1].content == answers[2].content


def _labeled(base: str, name: str, **labels: str) -> float:
    """A labeled sample of /metrics (0 when it has not been counted yet)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # (prometheus_client sorts them)
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_speech_requests_by_format_and_other_errors_by_kind(base):
    flac_400 = dict(format="flac", stream="none", status="400")
    before = _labeled(base, "dia_fast_requests_total", **flac_400)
    bad_voice = {"model": "tts-1", "voice": "alloy", "input": "x", "response_format": "flac"}
    assert httpx.post(f"{base}/v1/audio/speech", json=bad_voice).status_code == 400
    assert _labeled(base, "dia_fast_requests_total", **flac_400) == before + 1
    unread = dict(format="-", stream="-", status="404")
    missing = _labeled(base, "dia_fast_errors_total", kind="model_not_found")
    requests_404 = _labeled(base, "dia_fast_requests_total", **unread)
    assert httpx.get(f"{base}/v1/models/nope").status_code == 404  # not a speech request
    assert _labeled(base, "dia_fast_errors_total", kind="model_not_found") == missing + 1
    assert _labeled(base, "dia_fast_requests_total", **unread) == requests_404


def _errors_total(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^dia_fast_errors_total\{[^}]*\} (\S+)$", text, re.M))


def test_metrics_count_every_error_answer_with_bounded_labels(base, monkeypatch):
    """Every error answer counts in errors_total (unknown route, wrong method, too large by its length or while
    it arrives, invalid JSON, an internal error), a speech request's also in requests_total: with its body's format
    and stream once the body was read and is a JSON object, else "-"; a format or stream the server does not
    know is labelled "invalid", so clients cannot add series."""
    url = f"{base}/v1/audio/speech"
    json_type = {"content-type": "application/json"}
    unread = dict(format="-", stream="-")
    body = {"model": "tts-1", "voice": "S1", "input": "x", **GREEDY}
    before_errors = _errors_total(base)
    before_413 = _labeled(base, "dia_fast_requests_total", **unread, status="413")
    before_400 = _labeled(base, "dia_fast_requests_total", **unread, status="400")
    before_500 = _labeled(base, "dia_fast_requests_total", format="wav", stream="none", status="500")

    def chunked_body() -> Iterator[bytes]:
        yield b'{"input": "'
        for _ in range(3):
            yield b"x" * (1 << 19)

    assert httpx.get(f"{base}/v1/nothing").status_code == 404
    assert httpx.get(url).status_code == 405
    assert httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", headers=json_type).status_code == 413
    assert httpx.post(url, content=chunked_body(), headers=json_type).status_code == 413
    assert httpx.post(url, content=b"{not json", headers=json_type).status_code == 400

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("dia_fast.serve.service.AudioPipeline", broken)
    r = httpx.post(url, json={**body, "response_format": "wav"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and "a bug" not in r.text
    monkeypatch.undo()
    assert _errors_total(base) == before_errors + 6
    assert _labeled(base, "dia_fast_requests_total", **unread, status="413") == before_413 + 2
    assert _labeled(base, "dia_fast_requests_total", **unread, status="400") == before_400 + 1
    assert _labeled(base, "dia_fast_requests_total", format="wav", stream="none", status="500") == before_500 + 1

    # failing validation after the body was read: the body's (valid) format and stream
    wav_audio_400 = dict(format="wav", stream="audio", status="400")
    before = _labeled(base, "dia_fast_requests_total", **wav_audio_400)
    bad_speed = {**body, "response_format": "wav", "stream_format": "audio", "speed": "2"}
    assert httpx.post(url, json=bad_speed).status_code == 400
    assert _labeled(base, "dia_fast_requests_total", **wav_audio_400) == before + 1

    # unknown formats and streams: one label, however many there are
    invalid = dict(format="invalid", stream="none", status="400")
    before = _labeled(base, "dia_fast_requests_total", **invalid)
    before_streams = _labeled(base, "dia_fast_requests_total", format="mp3", stream="invalid", status="400")
    for i in range(5):
        assert httpx.post(url, json={**body, "response_format": f"fmt-{i}"}).status_code == 400
    assert httpx.post(url, json={**body, "stream_format": "stream-0"}).status_code == 400
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert "fmt-" not in text and "stream-0" not in text
    assert _labeled(base, "dia_fast_requests_total", **invalid) == before + 5
    assert _labeled(base, "dia_fast_requests_total", format="mp3", stream="invalid", status="400") == before_streams + 1


def test_speed_and_sample_rate(tts, base):
    client = _client(base)
    normal, rate = _decode(
        client.audio.speech.create(
            model="tts-1", voice="S1", input="Speed.", response_format="wav", extra_body=GREEDY
        ).content,
        "wav",
    )
    fast, _ = _decode(
        client.audio.speech.create(
            model="tts-1", voice="S1", input="Speed.", response_format="wav", speed=2.0, extra_body=GREEDY
        ).content,
        "wav",
    )
    assert abs(len(fast) / len(normal) - 0.5) < 0.05
    low, low_rate = _decode(
        client.audio.speech.create(
            model="tts-1",
            voice="S1",
            input="Speed.",
            response_format="flac",
            extra_body={**GREEDY, "sample_rate": 16000},
        ).content,
        "flac",
    )
    assert low_rate == 16000 and abs(len(low) / 16000 - len(normal) / rate) < 0.01


def test_speed_keeps_all_of_a_short_generation_whole_and_streamed(base):
    """One codec frame of audio (512 samples) at 0.5x and 2x: 1024 and 256 samples, in a whole file and in a
    stream (headerless PCM at the model's rate: the samples are the body)."""
    body = {"model": "tts-1", "voice": "S1", "input": "Hi.", "response_format": "pcm", "sample_rate": 44100}
    body |= {"temperature": 0, "max_new_tokens": 17, "min_new_tokens": 1}  # exactly one frame
    url = f"{base}/v1/audio/speech"
    normal = httpx.post(url, json=body, timeout=120)
    assert normal.status_code == 200 and len(normal.content) == 2 * 512
    for speed in (0.5, 2.0):
        whole = httpx.post(url, json={**body, "speed": speed}, timeout=120)
        streamed = httpx.post(url, json={**body, "speed": speed, "stream_format": "audio"}, timeout=120)
        for r in (whole, streamed):
            assert r.status_code == 200 and len(r.content) == 2 * round(512 / speed), (speed, len(r.content))
    mp3 = httpx.post(url, json={**body, "speed": 2.0, "response_format": "mp3", "stream_format": "audio"}, timeout=120)
    audio, rate = _decode(mp3.content, "mp3")
    assert rate == 44100 and 256 <= len(audio) <= 256 + 2 * 1152 + 1105  # LAME's delay and padding, a frame or two


def test_api_key_is_required_when_set(tts):
    with serve(tts, max_batch=2, api_key="s3cret") as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["data"][0]["demo"] is True
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            _client(url, api_key="wrong").audio.speech.create(model="tts-1", voice="S1", input="x")
        ok = _client(url, api_key="s3cret").audio.speech.create(
            model="tts-1", voice="S1", input="x", response_format="wav", extra_body=GREEDY
        )
        assert ok.content[:4] == b"RIFF"
        # this server has no --voices-dir: an upload is refused before its body is read
        auth = {"Authorization": "Bearer s3cret"}
        files = {"file": ("v.wav", b"x" * 1000, "audio/wav")}
        r = httpx.post(f"{url}/v1/audio/voices", data={"name": "v", "transcript": "t"}, files=files, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"


def test_shutdown_drains_a_running_request(tts):
    """Stopping the server lets a request that runs finish (uvicorn's graceful shutdown, then the engine drains)."""
    body = {
        "model": "tts-1",
        "voice": "S1",
        "input": "Drain me.",
        "response_format": "wav",
        "temperature": 0,
        "max_new_tokens": 300,
        "min_new_tokens": 250,
    }
    with serve_in_thread(create_app(ServerSettings(max_batch=2), tts=tts), start_timeout=60) as local:
        url = local.url
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/audio/speech", json=body, timeout=120)
            _wait_for_metric(url, "dia_fast_busy_slots")
            local.stop()
            r = answer.result(timeout=120)
        thread = local.thread
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    assert not thread.is_alive()


def _sse_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_requests_still_running_at_the_shutdown_limit_get_their_error_answers(tts):
    """At the shutdown limit, uvicorn would cancel what still runs (a bare 500, a silently closed stream): the engine
    is closed a little before it, so a running whole-file request gets 503 JSON and a queued SSE stream an error
    event, in time."""
    body = {"model": "tts-1", "voice": "S1", "input": "Long.", "response_format": "wav", "temperature": 0}
    long = {**body, "max_new_tokens": 3000, "min_new_tokens": 2950}  # many seconds on the CPU
    settings = ServerSettings(max_batch=1, shutdown_timeout_s=2.0)
    with serve_in_thread(create_app(settings, tts=tts), start_timeout=60) as local:
        url = local.url
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, f"{url}/v1/audio/speech", json=long, timeout=120)
            _wait_for_metric(url, "dia_fast_busy_slots")
            stream = pool.submit(_sse_events, url, long)
            _wait_for_metric(url, "dia_fast_queue_depth")
            t0 = time.monotonic()
            local.stop()
            r, events = whole.result(timeout=60), stream.result(timeout=60)
        stopped_s = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
    assert events and events[-1]["type"] == "error" and events[-1]["error"]["code"] == "unavailable", events
    assert stopped_s < 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_the_demo_model_and_stops_on_sigterm(tmp_path):
    """python -m dia_fast.serve (no --model): the demo model, named so in /v1/models; SIGTERM stops it cleanly."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dia_fast.serve", "--port", str(port), "--max-batch", "2", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "dia-demo" and models[0]["demo"] is True
        r = _client(url).audio.speech.create(
            model="dia-demo", voice="S1", input="Hi.", response_format="wav", extra_body=GREEDY
        )
        assert r.content[:4] == b"RIFF"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn re-raises the signal it caught once it has shut down, so the exit says SIGTERM ended it
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "demo model" in out and "server stopped" in out and "Traceback" not in out


def test_bad_flags_are_one_line_errors(tmp_path):
    a_file = tmp_path / "voices"
    a_file.write_text("not a directory")
    bad = (
        ["--port", "70000"],
        ["--max-batch", "3"],
        ["--max-queue", "0"],
        ["--replicas", "0"],
        ["--quantize", "fp8", "--device", "cpu"],
        ["--device", "tpu"],
        ["--dtype", "int3"],
        ["--model", "/no/such/checkpoint"],
        ["--codec", "/no/such/codec"],
        ["--voices-dir", str(a_file)],
    )
    for args in bad:
        r = subprocess.run([sys.executable, "-m", "dia_fast.serve", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_long_input_is_spoken_as_several_generations(base):
    """An input over one generation's 1024 text bytes is split as generate_long splits it (not cut, not refused)."""
    sentence = "[S1] This sentence is one of many in a text that is too long for a single generation. "
    text = sentence * 14  # ~1,200 characters
    r = httpx.post(
        f"{base}/v1/audio/speech",
        json={"model": "tts-1", "voice": "dialogue", "input": text, "response_format": "wav", **GREEDY},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    audio, rate = _decode(r.content, "wav")
    assert len(audio) / rate > 2 * (40 - 16) * 512 / 44100  # more than one generation's frames


def test_the_server_load_benchmark_measures_the_server(base):
    from dia_fast.bench.server_load import run_server_load

    res = run_server_load(base, requests=4, concurrency=2, max_new_tokens=30)
    assert res["ok"] == 4 and not res["errors"] and res["requests_per_s"] > 0
    assert 0 < res["ttfb_p50_s"] <= res["latency_p95_s"]


def test_the_server_can_serve_an_int8_model():
    from dia_fast.quantize import quantized_mode
    from dia_fast.serve.service import load_tts

    tts = load_tts(ServerSettings(quantize="int8", device="cpu"))
    assert quantized_mode(tts.model) == "int8"
    with serve(tts, max_batch=2) as url:
        r = _client(url).audio.speech.create(
            model="tts-1", voice="S1", input="Quantized.", response_format="wav", extra_body=GREEDY
        )
        assert r.content[:4] == b"RIFF"


def test_an_engine_failure_is_a_500_with_its_cause_in_the_log(tts, monkeypatch, caplog):
    """A step that raises stops the engine: the request running is answered 500 internal_error (not "shutting
    down"), so are later ones, /health says 503, and the error is logged once with its traceback."""
    import logging

    from dia_fast.serving import engine as engine_module

    real_step, calls = engine_module.BatchEngine._step, [0]

    def failing_step(self, n, view):
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("planted device-side assert")
        return real_step(self, n, view)

    monkeypatch.setattr(engine_module.BatchEngine, "_step", failing_step)
    caplog.set_level(logging.ERROR, logger="dia_fast.serving")
    body = {"model": "tts-1", "input": "[S1] Hello there.", "voice": "S1", "response_format": "wav",
            "max_new_tokens": 200, "min_new_tokens": 150}  # fmt: skip
    with serve(tts, max_batch=1) as url:
        first = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
        later = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
        health = httpx.get(f"{url}/health", timeout=10)
    for r in (first, later):
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert "engine failed" in r.json()["error"]["message"]
    assert health.status_code == 503
    failures = [rec for rec in caplog.records if "batching engine failed" in rec.getMessage()]
    assert len(failures) == 1 and "planted device-side assert" in str(failures[0].exc_info[1])


def test_serve_config_arguments_are_converted_by_their_setting_type():
    """``serve run dia_fast.serve.ray_app:app_builder key=value`` and YAML configs: each value becomes its setting's
    type, and a bad one is an error naming the key (checked without Ray: the conversion comes first)."""
    import pathlib
    import typing

    from dia_fast.serve.ray_app import _convert, app_builder

    hints = typing.get_type_hints(ServerSettings)
    given = {"chunk_frames": "20", "max_voice_seconds": "15", "shutdown_timeout_s": "10", "request_timeout_s": "none",
             "api_key": 12345, "voices_dir": "v", "max_body_bytes": 2048}  # fmt: skip
    converted = {k: _convert(k, v, hints[k]) for k, v in given.items()}
    assert converted == {"chunk_frames": 20, "max_voice_seconds": 15.0, "shutdown_timeout_s": 10.0,
                         "request_timeout_s": None, "api_key": "12345", "voices_dir": pathlib.Path("v"),
                         "max_body_bytes": 2048}  # fmt: skip
    assert ServerSettings(**converted).shutdown_timeout_s == 10.0
    for args, match in (
        ({"max_batch": True}, "max_batch must be an int, got True"),
        ({"chunk_frames": "x"}, "chunk_frames must be an int, got 'x'"),
        ({"max_queue": "none"}, "max_queue must be an int, got 'none'"),
        ({"replicas": "two"}, "replicas must be an int, got 'two'"),
        ({"replicas": "2", "max_replicas": "1"}, "max_replicas >= replicas"),
        ({"nonsense": "1"}, "unknown server settings"),
    ):
        with pytest.raises(ValueError, match=match):
            app_builder(args)
    with pytest.raises(ValueError, match="shutdown_timeout_s must be a number"):
        ServerSettings(shutdown_timeout_s="10")  # type: ignore[arg-type]


def test_a_stream_whose_bytes_all_come_at_the_end_has_a_time_to_first_audio(tts):
    """A one-frame mp3 stream's bytes all come from the encoder's tail: its time to first audio is observed too."""
    body = {"model": "tts-1", "input": "[S1] Hi there.", "voice": "S1", "response_format": "mp3",
            "stream_format": "audio", "max_new_tokens": 17}  # fmt: skip
    with serve(tts, max_batch=2) as url:
        for _ in range(2):
            r = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
            assert r.status_code == 200 and r.content
        assert _metric(url, 'dia_fast_time_to_first_audio_seconds_count{stream="audio"}') == 2


def test_the_frames_window_keeps_only_its_window_when_nobody_scrapes(monkeypatch):
    """frames/s counts the last window_s seconds; the requests older than that are dropped as new ones come, not
    only when /metrics is scraped (an unscraped server kept every request's entry for its whole life)."""
    from dia_fast.serve import metrics as metrics_module

    now = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    m = metrics_module.ServerMetrics(window_s=10.0)
    for _ in range(500):
        m.add_frames(86)
        now[0] += 0.5
    assert len(m._recent) <= 21  # 10 s of entries, one every 0.5 s
    assert m._frames_per_s() == pytest.approx(86 * len(m._recent) / 10.0)


def test_the_voice_cache_forgets_voices_deleted_elsewhere_and_is_bounded(tts, tmp_path, monkeypatch):
    """Two stores on one directory (Ray replicas): a voice deleted through one is dropped from the other's cache at
    its next use (404), and the cache holds at most _CACHED_VOICES voices (the files stay the truth)."""
    from dia_fast.serve import voices as voices_module
    from dia_fast.serve.voices import VoiceError, VoiceStore

    a, b = VoiceStore(tmp_path, tts), VoiceStore(tmp_path, tts)
    wav = _wav_bytes(1.5)
    a.create("narrator", wav, "[S1] The words.", overwrite=False, min_s=1.0, max_s=20.0)
    assert a.get("narrator").frames > 0 and "narrator" in a._cache
    b.delete("narrator")
    with pytest.raises(VoiceError, match="not found"):
        a.get("narrator")
    assert "narrator" not in a._cache
    monkeypatch.setattr(voices_module, "_CACHED_VOICES", 2)
    for name in ("v1", "v2", "v3"):
        a.create(name, wav, "[S1] The words.", overwrite=False, min_s=1.0, max_s=20.0)
        a.get(name)
    assert list(a._cache) == ["v2", "v3"] and a.get("v1").frames > 0  # v1 read from its file again


def test_a_voice_deleted_while_it_is_described_is_a_404(tts, tmp_path, monkeypatch):
    """GET /v1/audio/voices/{id} racing a delete (here: the file gone between reading the voice and describing it):
    a 404 VoiceError, not an escaped FileNotFoundError (a 500)."""
    from dia_fast.serve.voices import VoiceError, VoiceStore

    store = VoiceStore(tmp_path, tts)
    store.create("narrator", _wav_bytes(1.5), "[S1] The words.", overwrite=False, min_s=1.0, max_s=20.0)
    real_info = store._info

    def deleted_first(voice_id, speaker, path):  # noqa: ANN001, ANN202
        path.unlink()
        return real_info(voice_id, speaker, path)

    monkeypatch.setattr(store, "_info", deleted_first)
    with pytest.raises(VoiceError, match="not found") as info:
        store.info("narrator")
    assert info.value.status == 404


def _frames_decoded(monkeypatch) -> list[int]:
    """Frames soundfile decodes from now on, in any thread (sf.read reads through SoundFile.read too)."""
    counted, real = [0], sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):  # noqa: ANN001, ANN202
        out = real(self, frames, *args, **kwargs)
        counted[0] += len(out)
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return counted


def test_a_voice_upload_of_long_compressed_silence_is_refused_before_it_is_decoded(tts, base, monkeypatch):
    """FLAC compresses silence ~1000x, so a voice upload under the 16 MiB limit could decode to tens of GB: a file
    over the 20 s limit is refused from its header with nothing decoded, and a stream that does not say its length
    (the server's own streamed FLAC) after at most 20 s of it. Such a stream within the limit is a fine voice."""
    from dia_fast.serve.audio_out import AudioPipeline

    rate = tts.sample_rate
    form = {"transcript": "The words of the prompt."}

    def streamed_flac(x: np.ndarray) -> bytes:
        pipeline = AudioPipeline("flac", rate, rate, streaming=True)
        data = b"".join(pipeline.feed(x[i : i + rate]) for i in range(0, len(x), rate)) + pipeline.finish()
        with sf.SoundFile(io.BytesIO(data)) as f:
            assert f.frames == 2**63 - 1  # (libsndfile: length unknown)
        return data

    told = io.BytesIO()
    sf.write(told, np.zeros(60 * rate, np.float32), rate, format="FLAC", subtype="PCM_16")
    untold = streamed_flac(np.zeros(60 * rate, np.float32))
    frames = _frames_decoded(monkeypatch)
    r = httpx.post(f"{base}/v1/audio/voices", data={**form, "name": "bomb"},
                   files={"file": ("v.flac", told.getvalue(), "audio/flac")}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["message"] == "the voice audio must last 1-20 s, got 60.00 s"
    assert frames[0] == 0
    r = httpx.post(f"{base}/v1/audio/voices", data={**form, "name": "bomb"},
                   files={"file": ("v.flac", untold, "audio/flac")}, timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "the voice audio must last 1-20 s, got more than 20 s"
    assert 0 < frames[0] <= 20 * rate + 1
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate)).astype(np.float32)
    r = httpx.post(f"{base}/v1/audio/voices", data={**form, "name": "from_a_stream"},
                   files={"file": ("v.flac", streamed_flac(tone), "audio/flac")}, timeout=60)  # fmt: skip
    assert r.status_code == 201 and abs(r.json()["duration_s"] - 2.0) < 0.05, r.text
    assert httpx.delete(f"{base}/v1/audio/voices/from_a_stream", timeout=10).status_code == 200


def test_unknown_fields_are_named_whatever_their_names(base):
    """An unknown field is named as sent, also when capitalised or named like a type (pydantic's names for the
    members of the voice union are only left out right after "voice")."""
    speak = {"model": "tts-1", "voice": "S1", "input": "x"}
    cases = [
        ({"Voice": "S1"}, "Voice"),
        ({"Speed": 1.0}, "Speed"),
        ({"str": 1}, "str"),
        ({"VoiceRef": 1}, "VoiceRef"),
        ({"body": 1}, "body"),
        ({"voice": {"id": "S1", "Name": "x"}}, "voice.Name"),
        ({"voice": {"id": "S1", "str": "x"}}, "voice.str"),
        ({"voice": {"id": "S1", "VoiceRef": "x"}}, "voice.VoiceRef"),
    ]
    for extra, param in cases:
        r = httpx.post(f"{base}/v1/audio/speech", json={**speak, **extra}, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param, (extra, err)
        assert err["message"] == f"unknown parameter {param!r}", (extra, err)


def test_a_client_that_leaves_mid_body_is_a_cancel_and_a_500_is_logged_once(tts, tmp_path, monkeypatch, caplog):
    """A client hanging up while its body arrives is counted as a cancel (499), with one info line and no
    traceback; an unexpected error is answered 500 and logged once with its traceback (not again by uvicorn)."""
    caplog.set_level(logging.INFO, logger="dia_fast")
    uvicorn_log = logging.getLogger("uvicorn.error")
    with serve(tts, max_batch=1, voices_dir=tmp_path) as url:
        uvicorn_log.addHandler(caplog.handler)  # (uvicorn's loggers do not reach the root logger)
        try:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            starts = {  # the first bytes of 100,000 promised
                "/v1/audio/speech": ("application/json", b'{"model": "tts-1", '),
                "/v1/audio/voices": ("multipart/form-data; boundary=XX", b"--XX\r\nContent-Disposition: form-data; "),
            }
            for path, (ctype, start) in starts.items():
                with socket.create_connection((host, int(port))) as sock:
                    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n"
                    sock.sendall(head.encode() + start)
                    time.sleep(0.3)
            _wait_for_metric(url, "dia_fast_cancelled_requests_total", 2, timeout=30)
            assert _metric(url, "dia_fast_cancelled_requests_total") == 2
            assert _labeled(url, "dia_fast_errors_total", kind="cancelled") == 2
            assert _labeled(url, "dia_fast_errors_total", kind="internal_error") == 0
            assert _labeled(url, "dia_fast_requests_total", format="-", stream="-", status="499") == 1  # (speech)
            left = [rec for rec in caplog.records if "left while sending its body" in rec.getMessage()]
            assert [rec.levelno for rec in left] == [logging.INFO] * 2
            assert not [rec for rec in caplog.records if rec.exc_info], caplog.text

            def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                raise RuntimeError("a planted bug")

            monkeypatch.setattr("dia_fast.serve.service.AudioPipeline", broken)
            r = httpx.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "voice": "S1", "input": "x"}, timeout=30)
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            time.sleep(0.3)  # (uvicorn would log after the answer went out)
            traced = [rec for rec in caplog.records if rec.exc_info]
            assert len(traced) == 1 and "a planted bug" in str(traced[0].exc_info[1]), caplog.text
        finally:
            uvicorn_log.removeHandler(caplog.handler)


def _literals(t: object) -> list[str]:
    """The values of a Literal, also inside a Union (openai's SpeechModel is one or the other across versions)."""
    if typing.get_origin(t) is typing.Literal:
        return list(typing.get_args(t))
    return [v for arg in typing.get_args(t) for v in _literals(arg)]


def test_every_speech_model_id_of_the_openai_package_is_accepted(base):
    from openai.types.audio.speech_model import SpeechModel

    ids = _literals(SpeechModel)
    assert "tts-1" in ids
    client = _client(base)
    for model_id in ids:
        assert httpx.get(f"{base}/v1/models/{model_id}", timeout=10).status_code == 200, model_id
        audio = client.audio.speech.create(
            model=model_id, voice="S1", input="Hi.", response_format="wav", extra_body=GREEDY
        )
        assert audio.content[:4] == b"RIFF", model_id


def test_the_openai_client_creates_and_deletes_a_voice(base):
    """openai's client.audio.voices.create sends audio_sample, consent and name: the audio is taken, the consent id
    ignored, Dia's transcript comes in extra_body; voices from a prompt are refused."""
    client = _client(base)
    sample = ("narrator.wav", _wav_bytes(2.0), "audio/wav")
    voice = client.audio.voices.create(
        audio_sample=sample, consent="cons_1234", name="openai_voice", extra_body={"transcript": "The words."}
    )
    assert voice.id == "openai_voice" and voice.name == "openai_voice"
    listed = {v["id"] for v in httpx.get(f"{base}/v1/audio/voices", timeout=10).json()["data"]}
    assert "openai_voice" in listed
    spoken = client.audio.speech.create(
        model="tts-1", voice="openai_voice", input="Hi.", response_format="wav", extra_body=GREEDY
    )
    assert spoken.content[:4] == b"RIFF"
    with pytest.raises(openai.BadRequestError) as untold:
        client.audio.voices.create(audio_sample=sample, consent="cons_1234", name="no_transcript")
    assert untold.value.body["param"] == "transcript"
    with pytest.raises(openai.BadRequestError) as prompt:
        client.audio.voices.create(name="described", prompt="a warm, low voice", type="prompt")
    assert prompt.value.body["param"] == "type"
    assert client.audio.voices.delete("openai_voice").deleted is True
    assert httpx.get(f"{base}/v1/audio/voices/openai_voice", timeout=10).status_code == 404
