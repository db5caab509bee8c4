"""The speech server's audio out (dia_fast.serve.audio_out): the ``speed`` time-stretch keeps the whole input, from
a few samples to a second, fed at once or piece by piece, and the encoders get all of it."""

from __future__ import annotations

import io

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("soxr")

from dia_fast.serve.audio_out import AudioPipeline, _TimeStretch  # noqa: E402

RATE = 24000
SPEEDS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)


def _tone(n: int, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / RATE)).astype(np.float32)


def _stretch(x: np.ndarray, speed: float, piece: int) -> np.ndarray:
    ts = _TimeStretch(RATE, speed)
    parts = [ts.feed(x[i : i + piece]) for i in range(0, len(x), piece)]
    return np.concatenate([*parts, ts.finish()])


@pytest.mark.parametrize("speed", SPEEDS)
def test_time_stretch_gives_the_whole_input_stretched(speed):
    for n in (1, 100, 512, 2048, 12288, RATE):
        x = _tone(n)
        for piece in (n, 300, 7):  # at once, in engine-sized pieces, in tiny ones
            y = _stretch(x, speed, piece)
            assert abs(len(y) - n / speed) <= 1, (n, piece, len(y))


@pytest.mark.parametrize("speed", SPEEDS)
def test_time_stretch_keeps_the_pitch_and_the_end_of_the_input(speed):
    """A 1 s 440 Hz tone stays a 440 Hz tone, as loud at its end as at its start (nothing of the input's end is
    dropped or replaced by silence)."""
    y = _stretch(_tone(RATE), speed, 2048)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * RATE / len(y) - 440.0) < 5.0
    rms = 0.5 / np.sqrt(2)
    tail = y[-len(y) // 20 :]  # the last 5 %
    assert abs(np.sqrt(np.mean(tail**2)) - rms) < 0.1 * rms


@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "flac", "opus", "aac"])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_short_input_at_another_speed_is_encoded(fmt, streaming):
    """512 samples (one codec frame) at 2x: the encoders get ~256 samples, never nothing."""
    pipe = AudioPipeline(fmt, 44100, 44100 if fmt not in ("pcm", "opus") else 48000, speed=2.0, streaming=streaming)
    data = pipe.feed(_tone(512)) + pipe.finish()
    if fmt == "pcm":
        n, rate = len(data) // 2, pipe.sample_rate
    else:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            n, rate = sum(f.samples for f in container.decode(stream)), stream.rate
    want = 256 * rate / 44100
    # lossy encoders add up to a frame or two of padding (AAC and Opus 1024+ samples)
    assert want - 2 <= n <= want + (2 if fmt in ("pcm", "wav", "flac") else 2200), (fmt, n, want)
