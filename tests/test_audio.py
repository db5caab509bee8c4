"""dia_fast.audio: file reading, soxr resampling, BS.1770 loudness, atomic WAV writing, crossfades."""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch
from scipy.signal import butter, sosfilt

from dia_fast.audio import (
    AudioFormatError,
    crossfade_join,
    integrated_loudness,
    load_prompt_audio,
    loudness_gain,
    normalize_loudness,
    read_audio,
    resample,
    write_wav,
)
from dia_fast.audio.io import AudioTooLongError

CODEC_RATE = 44_100


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


def _speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Band-limited noise (300-3400 Hz) with a 4 Hz syllable-like envelope and pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    noise = sosfilt(butter(4, [300, 3400], btype="band", fs=rate, output="sos"), rng.standard_normal(n))
    t = np.arange(n) / rate
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    return (0.1 * noise * envelope).astype(np.float32)


def _reference_lufs(x: np.ndarray, rate: int) -> float:
    return pyloudnorm.Meter(rate).integrated_loudness(x.astype(np.float64))


# ------------------------------------------------------------------------------------------ reading
def test_stereo_48k_sine_resampled_to_codec_rate_keeps_frequency(tmp_path):
    rate = 48_000
    left, right = _sine(1000.0, rate, 1.0), _sine(1000.0, rate, 1.0, amp=0.3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="PCM_16")

    audio, out_rate = read_audio(path, target_rate=CODEC_RATE)
    assert out_rate == CODEC_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - CODEC_RATE) <= 2
    assert abs(_peak_hz(audio, CODEC_RATE) - 1000.0) < 2.0
    # mono mix = mean of channels: amplitude (0.5 + 0.3) / 2, away from the resampler's edges
    mid = audio[CODEC_RATE // 4 : 3 * CODEC_RATE // 4]
    assert np.max(np.abs(mid)) == pytest.approx(0.4, abs=2e-3)


def test_resample_matches_sine_at_target_rate():
    x = _sine(440.0, 16_000, 0.5)
    y = resample(x, 16_000, CODEC_RATE, quality="VHQ")
    expected = _sine(440.0, CODEC_RATE, 0.5)
    n = min(len(y), len(expected))
    inner = slice(2000, n - 2000)  # skip the filter's edge transients
    np.testing.assert_allclose(y[inner], expected[inner], atol=2e-3)
    assert resample(x, 16_000, 16_000) is x  # identity without a copy
    with pytest.raises(ValueError, match="quality"):
        resample(x, 16_000, CODEC_RATE, quality="LQ")
    with pytest.raises(ValueError):
        resample(x, 0, CODEC_RATE)


def test_resample_takes_time_first_and_refuses_channels_first():
    """[N, channels] is resampled per channel; a [channels, N] array (torch's layout) is an error, not N channels."""
    left, right = _sine(440.0, 16_000, 0.5), _sine(660.0, 16_000, 0.5, amp=0.3)
    y = resample(np.stack([left, right], axis=1), 16_000, 8_000)
    assert y.shape == (4_000, 2)
    np.testing.assert_array_equal(y[:, 1], resample(right, 16_000, 8_000))
    with pytest.raises(ValueError, match=r"got shape \(2, 8000\): more channels than samples.*pass x\.T"):
        resample(np.stack([left, right]), 16_000, 8_000)
    assert resample(np.zeros((0, 2), np.float32), 16_000, 8_000).shape == (0, 2)  # empty stereo is fine


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_pcm16_seed_is_any_int_modulo_2_64_on_both_backends(backend):
    """Both backends take the same seeds: any int, -1 meaning 2**64 - 1; a seed that is not an int is a TypeError."""
    from dia_fast.audio import cpp_pcm_available, float_to_pcm16

    if backend == "cpp" and cpp_pcm_available():
        pytest.skip(cpp_pcm_available())
    x = _sine(440.0, 16_000, 0.05)
    a = float_to_pcm16(x, dither=True, seed=-1, backend=backend)
    np.testing.assert_array_equal(a, float_to_pcm16(x, dither=True, seed=2**64 - 1, backend=backend))
    np.testing.assert_array_equal(a, float_to_pcm16(x, dither=True, seed=np.int64(-1), backend=backend))
    assert not np.array_equal(a, float_to_pcm16(x, dither=True, seed=1, backend=backend))
    for bad in (1.5, "1", True):
        with pytest.raises(TypeError, match="seed must be an int or None"):
            float_to_pcm16(x, dither=True, seed=bad, backend=backend)


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"),
    [("WAV", "PCM_16", 1 / 32767), ("WAV", "PCM_24", 1e-6), ("WAV", "FLOAT", 0.0), ("FLAC", "PCM_16", 1 / 32767)],
)
def test_read_formats_as_mono_float32(tmp_path, fmt, subtype, atol):
    x = _sine(300.0, 22_050, 0.3)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, 22_050, format=fmt, subtype=subtype)
    audio, rate = read_audio(path)
    assert rate == 22_050 and audio.dtype == np.float32 and audio.shape == x.shape
    np.testing.assert_allclose(audio, x, atol=atol + 1e-7)


def test_read_int16_scaling(tmp_path):
    ints = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    path = tmp_path / "ints.wav"
    sf.write(path, ints, 8000, subtype="PCM_16")
    audio, _ = read_audio(path)
    np.testing.assert_allclose(audio, ints / 32768.0, atol=0)


def test_read_ogg_vorbis(tmp_path):
    x = _sine(700.0, 44_100, 0.5, amp=0.4)
    path = tmp_path / "a.ogg"
    sf.write(path, x, 44_100, format="OGG", subtype="VORBIS")
    audio, rate = read_audio(path, target_rate=24_000)
    assert rate == 24_000 and audio.dtype == np.float32
    assert abs(_peak_hz(audio, 24_000) - 700.0) < 3.0


def test_read_stereo_without_mixdown(tmp_path):
    data = np.stack([_sine(200.0, 8000, 0.1), np.zeros(800, np.float32)], axis=1)
    path = tmp_path / "st.wav"
    sf.write(path, data, 8000, subtype="FLOAT")
    audio, _ = read_audio(path, mono=False)
    assert audio.shape == (800, 2)
    np.testing.assert_array_equal(audio, data)


def test_corrupt_missing_and_empty_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEthis is not audio at all" * 3)
    with pytest.raises(AudioFormatError, match="bad.wav"):
        read_audio(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AudioFormatError, match="cannot decode"):
        read_audio(text)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 8000)
    with pytest.raises(AudioFormatError, match="no samples"):
        read_audio(empty)


def _flac(x: np.ndarray, rate: int, *, length_told: bool = True) -> bytes:
    """16-bit FLAC bytes of ``x``; with ``length_told=False`` its STREAMINFO says no length (total_samples 0), as a
    streamed FLAC's does (the encoder cannot go back to write it)."""
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first: 4-byte header, then 34 bytes
    if not length_told:  # total_samples: the low 36 bits of STREAMINFO's bytes 10-17
        word = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
        data[18:26] = word.to_bytes(8, "big")
    return bytes(data)


def _count_frames_read(monkeypatch) -> list[int]:
    """Frames soundfile decodes from now on (sf.read reads through SoundFile.read too)."""
    counted, real = [0], sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        out = real(self, frames, *args, **kwargs)
        counted[0] += len(out)
        return out

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return counted


def test_max_seconds_refuses_long_audio_without_decoding_it_whole(monkeypatch):
    """A small upload of long silence (FLAC compresses it ~1000x) is refused from its header with nothing decoded,
    or, when its header does not say its length, after at most max_seconds and one frame of it."""
    rate, limit = 8000, 20
    silence = np.zeros(60 * rate, np.float32)
    told, untold = _flac(silence, rate), _flac(silence, rate, length_told=False)
    assert len(told) < 60 * rate * 4 / 100  # (the bomb: over 100x smaller than its decoded samples)
    with sf.SoundFile(io.BytesIO(untold)) as f:
        assert f.frames == 2**63 - 1  # libsndfile's "unknown"
    frames = _count_frames_read(monkeypatch)
    with pytest.raises(AudioTooLongError, match="lasts 60.00 s, over the limit of 20 s") as info:
        read_audio(io.BytesIO(told), max_seconds=limit)
    assert info.value.seconds == 60.0 and frames[0] == 0
    with pytest.raises(AudioTooLongError, match="lasts more than the limit of 20 s") as info:
        read_audio(io.BytesIO(untold), max_seconds=limit)
    assert info.value.seconds is None and 0 < frames[0] <= limit * rate + 1
    # the limit itself is fine, one frame more is not
    exact = np.zeros(limit * rate, np.float32)
    assert read_audio(io.BytesIO(_flac(exact, rate, length_told=False)), max_seconds=limit)[0].shape == (limit * rate,)
    with pytest.raises(AudioTooLongError):
        read_audio(
            io.BytesIO(_flac(np.zeros(limit * rate + 1, np.float32), rate, length_told=False)), max_seconds=limit
        )
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="max_seconds"):
            read_audio(io.BytesIO(told), max_seconds=bad)


def test_max_seconds_reads_audio_under_the_limit_as_a_plain_read_does():
    """Under the limit a bounded read returns what a plain read does (mixed down, resampled, or every channel), also
    for a stream that does not say its length (which soundfile cannot read whole: "array is too big")."""
    rate = 22050
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((int(3.3 * rate), 2))).astype(np.float32)  # (not a multiple of a block)
    told = _flac(stereo, rate)
    for kw in ({}, {"mono": False}, {"target_rate": 16000}):
        want, want_rate = read_audio(io.BytesIO(told), **kw)
        for length_told in (True, False):
            got, got_rate = read_audio(io.BytesIO(_flac(stereo, rate, length_told=length_told)), max_seconds=20, **kw)
            assert got_rate == want_rate and got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
    # and they are the samples written (16-bit: within one step)
    np.testing.assert_allclose(read_audio(io.BytesIO(told), mono=False, max_seconds=20)[0], stereo, atol=1 / 32767)


def test_max_seconds_decodes_an_mp3_whose_length_is_only_estimated():
    """An MP3 without a Xing/Info header (a streamed one, as the server writes it) has only libsndfile's estimate of
    its length, from its size and bitrate: an ID3 tag with cover art in front makes a 5 s file "30 s". Its length
    is what decoding finds, so it is read under a 20 s limit, not refused on the estimate."""
    from dia_fast.serve.audio_out import AudioPipeline

    rate = 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(5 * rate) / rate)).astype(np.float32)
    pipeline = AudioPipeline("mp3", rate, rate, streaming=True)
    mp3 = b"".join(pipeline.feed(part) for part in np.array_split(tone, 20)) + pipeline.finish()
    picture = b"\x00image/jpeg\x00\x03\x00\xff\xd8" + bytes(200_000)
    frame = b"APIC" + len(picture).to_bytes(4, "big") + b"\x00\x00" + picture
    size = len(frame)
    syncsafe = bytes([(size >> 21) & 127, (size >> 14) & 127, (size >> 7) & 127, size & 127])
    tagged = b"ID3\x03\x00\x00" + syncsafe + frame + mp3
    with sf.SoundFile(io.BytesIO(tagged)) as f:
        assert f.frames / rate > 20  # the estimate
    got, got_rate = read_audio(io.BytesIO(tagged), max_seconds=20)
    assert got_rate == rate and abs(got.shape[0] / rate - 5.0) < 0.1
    np.testing.assert_array_equal(got, read_audio(io.BytesIO(tagged))[0])


def test_max_seconds_reads_a_corrupt_stream_as_an_error_not_an_early_end():
    """In a stream that does not say its length, only the end of the stream ends the read: a decoding error part-way
    (a FLAC that lost sync) is an AudioFormatError, as in a file that says its length, not the audio before it."""
    rate = 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * rate) / rate)).astype(np.float32)
    for length_told in (True, False):
        data = bytearray(_flac(tone, rate, length_told=length_told))
        at = int(len(data) * 0.3)
        data[at : at + 4000] = bytes(4000)
        with pytest.raises(AudioFormatError, match="cannot decode audio file .*flac decoder"):
            read_audio(io.BytesIO(bytes(data)), max_seconds=20)
    for bad in ("20", [20], b"20"):
        with pytest.raises(ValueError, match="max_seconds must be a positive finite number"):
            read_audio(io.BytesIO(_flac(tone, rate)), max_seconds=bad)


def test_load_prompt_audio_arrays_and_layouts(tmp_path):
    rate = 22_050
    mono = _sine(500.0, rate, 0.2)
    ref = resample(mono, rate, CODEC_RATE)
    # torch [channels, N], numpy [N, channels], int16 PCM: all the same mono signal
    both = torch.from_numpy(np.stack([mono, mono]))
    np.testing.assert_allclose(load_prompt_audio(both, rate, target_rate=CODEC_RATE), ref, atol=1e-6)
    np.testing.assert_allclose(load_prompt_audio(both.T.numpy(), rate, target_rate=CODEC_RATE), ref, atol=1e-6)
    ints = np.round(mono * 32767).astype(np.int16)
    np.testing.assert_allclose(load_prompt_audio(ints, rate, target_rate=CODEC_RATE), ref, atol=1e-4)
    path = tmp_path / "p.wav"
    sf.write(path, mono, rate, subtype="FLOAT")
    np.testing.assert_allclose(load_prompt_audio(path, target_rate=CODEC_RATE), ref, atol=1e-6)
    with pytest.raises(ValueError, match="sample_rate is required"):
        load_prompt_audio(mono, target_rate=CODEC_RATE)
    with pytest.raises(ValueError, match="only for arrays"):
        load_prompt_audio(path, rate, target_rate=CODEC_RATE)
    with pytest.raises(ValueError, match="empty"):
        load_prompt_audio(np.zeros(0, np.float32), rate, target_rate=CODEC_RATE)
    with pytest.raises(ValueError, match="NaN"):
        load_prompt_audio(np.array([0.0, np.nan], np.float32), rate, target_rate=CODEC_RATE)


# ------------------------------------------------------------------------------------------ writing
def test_write_wav_round_trip_and_clipping(tmp_path):
    x = _sine(440.0, CODEC_RATE, 0.2, amp=0.9)
    pcm = write_wav(tmp_path / "pcm.wav", x, CODEC_RATE)
    back, rate = sf.read(pcm, dtype="int16")
    assert rate == CODEC_RATE and sf.info(pcm).subtype == "PCM_16"
    np.testing.assert_array_equal(back, np.rint(x.astype(np.float64) * 32767).astype(np.int16))

    flt = write_wav(tmp_path / "flt.wav", x, CODEC_RATE, subtype="FLOAT")
    back, _ = sf.read(flt, dtype="float32")
    np.testing.assert_array_equal(back, x)

    loud = np.array([0.0, 1.5, -1.5, 1.0, -1.0, 0.5], dtype=np.float32)
    clipped = write_wav(tmp_path / "clip.wav", loud, 8000)
    back, _ = sf.read(clipped, dtype="int16")
    np.testing.assert_array_equal(back, [0, 32767, -32768, 32767, -32767, 16384])  # saturated, not wrapped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav", "flt.wav", "pcm.wav"]  # no temp files


def test_write_wav_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "out.wav"
    write_wav(dest, _sine(100.0, 8000, 0.1), 8000)
    before = dest.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the data is written, then the disk says it had no room for it
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match=f"cannot write {dest}: No space left on device"):
            write_wav(dest, _sine(200.0, 8000, 0.5), 8000)
    assert dest.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["out.wav"]  # and the temp file is gone
    with pytest.raises(ValueError, match="NaN"):
        write_wav(dest, np.array([np.nan], np.float32), 8000)
    with pytest.raises(ValueError, match="mono"):
        write_wav(dest, np.zeros((10, 2), np.float32), 8000)


def test_writes_follow_links_and_never_replace_devices_or_pipes(tmp_path):
    """A symbolic link keeps pointing at its target, which gets the audio; a FIFO (like /dev/null, a device) is
    written to, not replaced by a regular file."""
    import threading

    target, link = tmp_path / "target.wav", tmp_path / "link.wav"
    target.write_bytes(b"old")
    link.symlink_to(target)
    write_wav(link, _sine(100.0, 8000, 0.1), 8000)
    assert link.is_symlink() and target.read_bytes()[:4] == b"RIFF"
    assert sorted(os.listdir(tmp_path)) == ["link.wav", "target.wav"]

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_wav(fifo, _sine(100.0, 8000, 0.1), 8000)
    reader.join(30)
    assert got and got[0][:4] == b"RIFF" and len(got[0]) == 44 + 2 * 800
    assert fifo.is_fifo()


# ----------------------------------------------------------------------------------------- loudness
@pytest.mark.parametrize("target", [-23.0, -20.0, -30.0])
def test_normalize_loudness_reaches_target_on_speech_like_noise(target):
    x = _speech_like(5.0, CODEC_RATE, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = normalize_loudness(x, CODEC_RATE, target)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert not loudness_gain(x, CODEC_RATE, target).peak_limited
    assert _reference_lufs(y, CODEC_RATE) == pytest.approx(target, abs=0.5)
    assert np.max(np.abs(y)) <= 10 ** (-1 / 20)
    assert integrated_loudness(x, CODEC_RATE) == pytest.approx(_reference_lufs(x, CODEC_RATE), abs=1e-6)


def test_peak_ceiling_limits_gain():
    # quiet noise with a few full-scale clicks: reaching -10 LUFS would push the clicks past -1 dBFS
    x = _speech_like(3.0, 24_000, seed=2)
    x[[1000, 30_000, 50_000]] = [0.9, -0.95, 0.9]
    g = loudness_gain(x, 24_000, -10.0, peak_ceiling_db=-1.0)
    assert g.peak_limited and not g.reason
    y = normalize_loudness(x, 24_000, -10.0, peak_ceiling_db=-1.0)
    assert np.max(np.abs(y)) <= np.float32(10 ** (-1 / 20))
    assert np.max(np.abs(y)) == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    assert _reference_lufs(y, 24_000) < -10.5  # quieter than asked, but not clipped


def test_silence_stays_silence_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silent = np.zeros(CODEC_RATE, np.float32)
        np.testing.assert_array_equal(normalize_loudness(silent, CODEC_RATE), silent)
        assert integrated_loudness(silent, CODEC_RATE) == -math.inf
        g = loudness_gain(silent, CODEC_RATE)
        assert g.gain == 1.0 and "silent" in g.reason
        # below the -70 LUFS absolute gate counts as silence too
        tiny = np.full(CODEC_RATE, 1e-6, np.float32)
        np.testing.assert_array_equal(normalize_loudness(tiny, CODEC_RATE), tiny)
        assert normalize_loudness(np.zeros(0, np.float32), CODEC_RATE).shape == (0,)


def test_short_audio_unchanged_no_nan_no_warnings():
    short = _sine(300.0, CODEC_RATE, 0.2, amp=0.2)  # 200 ms < one 400 ms gating block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = normalize_loudness(short, CODEC_RATE)
        lufs = integrated_loudness(short, CODEC_RATE)
        g = loudness_gain(short, CODEC_RATE)
    np.testing.assert_array_equal(y, short)
    assert math.isfinite(lufs)
    assert g.gain == 1.0 and "400 ms" in g.reason
    # a looped stationary clip measures like a long stretch of the same signal
    assert lufs == pytest.approx(_reference_lufs(_sine(300.0, CODEC_RATE, 2.0, amp=0.2), CODEC_RATE), abs=0.1)


def test_short_audio_keeps_its_level_but_not_a_peak_above_the_ceiling():
    """Below one gating block the level is kept, but the peak ceiling still holds."""
    ceiling = 10 ** (-1 / 20)
    loud = _sine(300.0, CODEC_RATE, 0.2, amp=0.99)  # 200 ms peaking at -0.09 dBFS
    y = normalize_loudness(loud, CODEC_RATE)
    g = loudness_gain(loud, CODEC_RATE)
    assert g.peak_limited and "400 ms" in g.reason and g.gain == pytest.approx(ceiling / np.abs(loud).max())
    assert np.abs(y).max() <= ceiling + 1e-7
    np.testing.assert_allclose(y, loud * g.gain, rtol=1e-6)  # one gain: the shape is kept


def test_loudness_rejects_bad_input():
    x = _speech_like(1.0, 16_000, seed=3)
    with pytest.raises(ValueError, match="target_lufs"):
        normalize_loudness(x, 16_000, 5.0)
    with pytest.raises(ValueError, match="peak_ceiling_db"):
        normalize_loudness(x, 16_000, peak_ceiling_db=3.0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_loudness(np.array([np.inf], np.float32), 16_000)
    with pytest.raises(TypeError):
        normalize_loudness(np.zeros(10, np.int16), 16_000)


# ----------------------------------------------------------------------------------------- crossfade
def test_crossfade_join_matches_explicit_mix():
    rng = np.random.default_rng(0)
    rate, fade_ms = 1000, 10.0  # 10-sample crossfade
    a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (50, 40, 30))
    out = crossfade_join([a, b, c], rate, fade_ms)
    assert out.dtype == np.float32 and len(out) == 50 + 40 + 30 - 2 * 10

    t = (np.arange(10) + 0.5) / 10
    fin, fout = np.sin(t * np.pi / 2), np.cos(t * np.pi / 2)
    expected = np.concatenate(
        [a[:40], a[40:] * fout + b[:10] * fin, b[10:30], b[30:] * fout + c[:10] * fin, c[10:]]
    ).astype(np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_crossfade_join_linear_keeps_constant_signal_constant():
    out = crossfade_join([np.ones(100, np.float32), np.ones(80, np.float32)], 1000, 20.0, curve="linear")
    assert len(out) == 160
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_crossfade_join_edge_cases():
    assert crossfade_join([], 44_100).shape == (0,)
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(crossfade_join([np.zeros(0, np.float32), x], 1000, 50.0), x)
    np.testing.assert_array_equal(
        crossfade_join([x, np.arange(3, dtype=np.float32)], 1000, 0.0), [0, 1, 2, 3, 4, 0, 1, 2]
    )
    # chunks shorter than the crossfade: the overlap shrinks, nothing is lost beyond it
    out = crossfade_join([np.ones(4, np.float32), np.ones(2, np.float32), np.ones(4, np.float32)], 1000, 100.0)
    assert len(out) == 4 + 2 + 4 - 1 - 1
    with pytest.raises(ValueError, match="crossfade_ms"):
        crossfade_join([x], 1000, -1.0)
    for bad in ("10", True, None):
        with pytest.raises(TypeError, match="crossfade_ms must be a number"):
            crossfade_join([x], 1000, bad)
    with pytest.raises(ValueError, match="1-D"):
        crossfade_join([np.zeros((2, 2), np.float32)], 1000)


def test_write_audio_refuses_what_no_reader_or_encoder_takes(tmp_path):
    """No samples (FLAC, MP3 and Opus would write unreadable files), and rates over a format's highest (libvorbis
    kills the process above 200 kHz): a ValueError before anything is written."""
    from dia_fast.audio import MAX_RATES, write_audio

    tone = np.zeros(1000, np.float32)
    for name, top in MAX_RATES.items():
        if name == "wav":
            continue  # (its bound is the header field's; a file that large is not a test's)
        with pytest.raises(ValueError, match=f"{name} takes sample rates up to {top} Hz"):
            write_audio(tmp_path / f"x.{name}", tone, top + 1)
        write_audio(tmp_path / f"ok.{name}", tone, top)  # the bound itself is written
    for name in ("wav", "flac", "ogg", "opus", "mp3"):
        with pytest.raises(ValueError, match="no samples"):
            write_audio(tmp_path / f"e.{name}", np.zeros(0, np.float32), 44100)
    for name in ("opus", "mp3"):  # one sample at 192 kHz is none at the format's rate (a 0-byte or broken file)
        with pytest.raises(ValueError, match="no samples at"):
            write_audio(tmp_path / f"one.{name}", np.full(1, 0.1, np.float32), 192000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.flac", "ok.ogg"]


def test_a_new_file_gets_the_umasks_permissions_whatever_its_writer_made(tmp_path):
    """safetensors creates its files 0600: a saved model was unreadable by the server's user; a new file now gets
    what the umask gives any new file."""
    import stat

    from dia_fast.audio.io import atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"weights")
            os.chmod(tmp, 0o600)  # as safetensors does
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # (no probe left behind)


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    import stat

    from dia_fast.audio import write_audio

    path = tmp_path / "private.wav"
    write_audio(path, np.zeros(100, np.float32), 16000)
    os.chmod(path, 0o600)
    write_audio(path, np.ones(100, np.float32) * 0.5, 16000)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_reading_a_few_samples_at_a_lower_rate_is_an_error_not_empty(tmp_path):
    from dia_fast.audio import AudioFormatError, read_audio

    path = tmp_path / "one.wav"
    sf.write(path, np.full(1, 0.5, np.float32), 48000)
    with pytest.raises(AudioFormatError, match="has no samples at 16000 Hz"):
        read_audio(path, target_rate=16000)
    samples, rate = read_audio(path)
    assert samples.shape == (1,) and rate == 48000
    # a short multichannel file (fewer samples than channels) resamples as what it is, [N, channels]
    sf.write(tmp_path / "six.wav", np.full((4, 6), 0.25, np.float32), 8000)
    samples, rate = read_audio(tmp_path / "six.wav", target_rate=16000, mono=False)
    assert samples.shape[1] == 6 and samples.shape[0] >= 4 and rate == 16000
