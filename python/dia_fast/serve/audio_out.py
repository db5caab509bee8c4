"""Audio out of the server: the response formats of OpenAI's speech API, each as a pipeline that takes float32
PCM at the model's rate piece by piece (streams) or at once, and gives encoded bytes.

Stages: a real time-stretch for ``speed`` (ffmpeg's ``atempo`` through PyAV: pitch kept), band-limited resampling
to the output rate (soxr's streaming resampler), then the encoder: 16-bit WAV / headerless PCM here, FLAC, MP3,
Ogg Opus and AAC (ADTS) through PyAV (ffmpeg's libmp3lame, libopus, aac and flac encoders)."""

from __future__ import annotations

import fractions
import io
import struct
from dataclasses import dataclass

import numpy as np
import soxr

from ..audio import float_to_pcm16

__all__ = ["FORMATS", "AudioPipeline", "OutputFormat", "encode_audio", "output_rate"]

_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MIN_RATE, MAX_RATE = 8000, 192000
MIN_SPEED, MAX_SPEED = 0.25, 4.0


@dataclass(frozen=True)
class OutputFormat:
    """One ``response_format``: its media type, the output rates it allows (None: any in 8-192 kHz), the rate it
    uses when none is asked for (None: the model's), and its PyAV container and encoder (None: written here)."""

    name: str
    media_type: str
    rates: tuple[int, ...] | None = None
    default_rate: int | None = None
    container: str | None = None
    codecs: tuple[str, ...] = ()


FORMATS: dict[str, OutputFormat] = {
    f.name: f
    for f in (
        OutputFormat("mp3", "audio/mpeg", _MP3_RATES, None, "mp3", ("libmp3lame", "mp3")),
        OutputFormat("opus", "audio/ogg", _OPUS_RATES, 48000, "ogg", ("libopus", "opus")),
        OutputFormat("aac", "audio/aac", _AAC_RATES, None, "adts", ("aac",)),
        OutputFormat("flac", "audio/flac", None, None, "flac", ("flac",)),
        OutputFormat("wav", "audio/wav"),
        # OpenAI's pcm: headerless 16-bit little-endian mono at 24 kHz (what its clients play)
        OutputFormat("pcm", "audio/pcm", None, 24000),
    )
}


def output_rate(fmt: str, model_rate: int, requested: int | None) -> int:
    """The rate a response is encoded at: ``requested`` (checked against the format), else the format's
    default, else the model's rate (or the nearest rate the format allows). Raises ValueError naming the
    rates that work."""
    spec = FORMATS[fmt]
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or not MIN_RATE <= requested <= MAX_RATE:
            raise ValueError(f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {requested!r}")
        if spec.rates is not None and requested not in spec.rates:
            raise ValueError(
                f"{fmt} cannot be encoded at {requested} Hz; it supports {', '.join(map(str, spec.rates))}"
            )
        return requested
    if spec.default_rate is not None:
        return spec.default_rate
    if spec.rates is None or model_rate in spec.rates:
        return model_rate
    return min(spec.rates, key=lambda r: (abs(r - model_rate), -r))


class _TimeStretch:
    """Tempo change without a pitch change: ffmpeg's ``atempo`` (chained below 0.5x), fed piece by piece.

    atempo drops up to a window of its input's end when it is flushed (all of an input shorter than a window), so
    ``finish`` pushes the input's end, mirrored, after it and cuts the output at ``round(n_in / speed)`` samples:
    the whole input, stretched."""

    def __init__(self, rate: int, speed: float) -> None:
        import av
        from av.filter import Graph

        self._av = av
        self.rate, self.speed = rate, speed
        self.graph = Graph()
        tb = fractions.Fraction(1, rate)
        self.src = self.graph.add_abuffer(format="flt", sample_rate=rate, layout="mono", time_base=tb)
        nodes = [self.src]
        left = speed
        while left < 0.5:  # atempo takes 0.5..100 per instance
            nodes.append(self.graph.add("atempo", "0.5"))
            left /= 0.5
        nodes.append(self.graph.add("atempo", repr(float(left))))
        self.sink = self.graph.add("abuffersink")
        nodes.append(self.sink)
        for a, b in zip(nodes, nodes[1:], strict=False):
            a.link_to(b)
        self.graph.configure()
        self.pts = 0  # samples pushed
        self.out = 0  # samples out
        self.held = np.zeros(0, np.float32)
        self.last = np.zeros(0, np.float32)  # the input's last 250 ms

    def _drain(self) -> np.ndarray:
        out = []
        while True:
            try:
                frame = self.sink.pull()
            except (BlockingIOError, self._av.error.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _push(self, pcm: np.ndarray) -> None:
        frame = self._av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pts, fractions.Fraction(1, self.rate)
        self.pts += pcm.size
        self.src.push(frame)

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        # tiny frames are held back: atempo fails (ENOMEM) on a 1-sample frame above 2x
        self.held = np.concatenate([self.held, pcm]) if self.held.size else pcm
        self.last = np.concatenate([self.last, pcm])[-(self.rate // 4) :]
        if self.held.size >= 256:
            self._push(self.held)
            self.held = np.zeros(0, np.float32)
        y = self._drain()
        self.out += y.size
        return y

    def finish(self) -> np.ndarray:
        n_in = self.pts + self.held.size
        if n_in:  # the input's end mirrored pushes the kept tail out (~42 ms per atempo window; 250 ms is ample)
            pad = np.pad(self.last, (0, self.rate // 4), mode="symmetric")[self.last.size :]
            self._push(np.concatenate([self.held, pad]))
        self.src.push(None)
        want = round(n_in / self.speed) - self.out  # what the input still owes
        y = self._drain()[: max(want, 0)]
        self.out += y.size
        return y


class _Resample:
    def __init__(self, src: int, dst: int) -> None:
        self.stream = soxr.ResampleStream(src, dst, 1, dtype="float32", quality="HQ")

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        return self.stream.resample_chunk(pcm, last=False)

    def finish(self) -> np.ndarray:
        return self.stream.resample_chunk(np.zeros(0, np.float32), last=True)


def _pcm16(pcm: np.ndarray) -> bytes:
    return float_to_pcm16(pcm).astype("<i2", copy=False).tobytes()


def _wav_header(rate: int, data_bytes: int | None) -> bytes:
    """RIFF/WAVE header of 16-bit mono PCM; ``data_bytes`` None = unknown length (a stream: sizes 0xFFFFFFFF)."""
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    data = 0xFFFFFFFF if data_bytes is None else data_bytes
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data)
    )


class _RawEncoder:
    """``pcm`` (no header) and ``wav`` (a header first: exact for a whole file, open-ended for a stream)."""

    def __init__(self, wav: bool, rate: int, streaming: bool) -> None:
        self.wav, self.rate, self.streaming = wav, rate, streaming
        self.started = False
        self.held: list[bytes] = []  # a whole WAV file waits for its length

    def feed(self, pcm: np.ndarray) -> bytes:
        data = _pcm16(pcm)
        if self.wav and not self.streaming:
            self.held.append(data)
            return b""
        if self.wav and not self.started:
            self.started = True
            return _wav_header(self.rate, None) + data
        return data

    def finish(self) -> bytes:
        if not self.wav:
            return b""
        if self.streaming:
            return b"" if self.started else _wav_header(self.rate, None)
        body = b"".join(self.held)
        return _wav_header(self.rate, len(body)) + body


class _Sink:
    """A write-only, unseekable file for PyAV: the muxer writes each packet as it goes (a stream)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class _AvEncoder:
    """FLAC, MP3, Ogg Opus and AAC (ADTS) through PyAV; a whole file is written seekable (so FLAC's header is
    complete), a stream to an unseekable sink."""

    def __init__(self, spec: OutputFormat, rate: int, streaming: bool) -> None:
        import av

        self._av = av
        self.rate, self.streaming = rate, streaming
        self.file: _Sink | io.BytesIO = _Sink() if streaming else io.BytesIO()
        # Ogg pages of 100 ms in a stream (the muxer's default holds a second)
        options = {"page_duration": "100000"} if spec.container == "ogg" and streaming else {}
        self.container = av.open(self.file, mode="w", format=spec.container, options=options)
        codec = next((c for c in spec.codecs if c in av.codecs_available), None)
        if codec is None:
            raise RuntimeError(f"this PyAV/ffmpeg build has no encoder for {spec.name} ({', '.join(spec.codecs)})")
        self.stream = self.container.add_stream(codec, rate=rate, layout="mono")
        self.pts = 0

    def _mux(self, frame: object) -> None:
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def _take(self) -> bytes:
        return self.file.take() if isinstance(self.file, _Sink) else b""

    def feed(self, pcm: np.ndarray) -> bytes:
        if pcm.size:
            frame = self._av.AudioFrame.from_ndarray(np.clip(pcm, -1.0, 1.0)[None, :], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pts, fractions.Fraction(1, self.rate)
            self.pts += pcm.size
            self._mux(frame)
        return self._take()

    def finish(self) -> bytes:
        self._mux(None)
        self.container.close()
        if isinstance(self.file, _Sink):
            return self.file.take()
        return self.file.getvalue()


class AudioPipeline:
    """float32 mono PCM at ``in_rate`` -> ``fmt`` bytes at ``out_rate``, ``speed`` times as fast (pitch kept).

    ``feed(pcm)`` returns the bytes that are ready (a stream sends them at once), ``finish()`` the rest.
    ``streaming=False`` makes one complete file (exact WAV length, FLAC header) returned by ``finish``."""

    def __init__(self, fmt: str, in_rate: int, out_rate: int, *, speed: float = 1.0, streaming: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unsupported response_format {fmt!r}; supported: {', '.join(FORMATS)}")
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be from {MIN_SPEED} to {MAX_SPEED}, got {speed}")
        spec = FORMATS[fmt]
        self.format, self.media_type, self.sample_rate = fmt, spec.media_type, out_rate
        self.stages: list[_TimeStretch | _Resample] = []
        if speed != 1.0:
            self.stages.append(_TimeStretch(in_rate, speed))
        if out_rate != in_rate:
            self.stages.append(_Resample(in_rate, out_rate))
        self.encoder: _RawEncoder | _AvEncoder = (
            _AvEncoder(spec, out_rate, streaming) if spec.container else _RawEncoder(fmt == "wav", out_rate, streaming)
        )

    def feed(self, pcm: np.ndarray) -> bytes:
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        for stage in self.stages:
            x = stage.feed(x)
        return self.encoder.feed(x)

    def finish(self) -> bytes:
        x = np.zeros(0, np.float32)
        for stage in self.stages:  # what a stage flushes goes through the later ones before they flush
            x = np.concatenate([stage.feed(x), stage.finish()])
        return self.encoder.feed(x) + self.encoder.finish()


def encode_audio(pcm: np.ndarray, in_rate: int, fmt: str, out_rate: int, *, speed: float = 1.0) -> bytes:
    """One complete file of ``pcm`` (float32 mono at ``in_rate``) in ``fmt`` at ``out_rate``."""
    pipe = AudioPipeline(fmt, in_rate, out_rate, speed=speed)
    return pipe.feed(pcm) + pipe.finish()
