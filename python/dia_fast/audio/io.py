"""Reading audio files and prompt arrays; writing audio (and any file) atomically."""

from __future__ import annotations

import io
import math
import numbers
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from .pcm import float_to_pcm16
from .resample import check_rate, resample

__all__ = ["AudioFormatError", "AudioTooLongError", "load_prompt_audio", "read_audio", "write_wav"]

PathLike = str | os.PathLike


class AudioFormatError(ValueError):
    """An audio file that cannot be decoded (corrupt, unsupported, empty) or holds NaN/inf samples."""


class AudioTooLongError(AudioFormatError):
    """An audio file over :func:`read_audio`'s ``max_seconds``. ``seconds``: its duration when its header says it
    (None for a stream that does not say its length), ``limit``: the ``max_seconds`` it is over."""

    def __init__(self, name: str, seconds: float | None, limit: float) -> None:
        told = "lasts more than" if seconds is None else f"lasts {seconds:.2f} s, over"
        super().__init__(f"audio file {name} {told} the limit of {limit:g} s")
        self.seconds, self.limit = seconds, limit


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def _mixdown(data: np.ndarray, mono: bool) -> np.ndarray:
    """[N, channels] float32 -> [N] (mean of channels) when ``mono``, else unchanged."""
    if not mono:
        return data
    if data.shape[1] <= 1:  # (no channels: an empty [0] the callers reject)
        return data.reshape(-1)
    return data.mean(axis=1, dtype=np.float64).astype(np.float32)


def read_audio(
    path_or_file: PathLike | BinaryIO,
    *,
    target_rate: int | None = None,
    mono: bool = True,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """Read an audio file (WAV, FLAC, OGG/Vorbis/Opus, MP3, ... whatever libsndfile decodes).

    Any sample rate, channel count and integer or float sample format is accepted; integer
    formats are scaled to [-1, 1). With ``mono`` (default) channels are mixed to their mean and
    the result is float32 [N]; with ``mono=False`` it is float32 [N, channels] (time first, as
    soundfile returns it). With ``target_rate`` the audio is resampled (soxr "HQ") to that rate.

    ``max_seconds`` bounds what is decoded, for files from untrusted sources (a few MB of FLAC
    silence decode to GBs): a file whose header says it is longer is refused before any decoding,
    and one that does not say its length (a streamed FLAC) is decoded in blocks, at most
    ``max_seconds`` and one frame of it (so such a stream is read, as it is not without a limit).

    Returns ``(samples, rate)`` where ``rate`` is ``target_rate`` if given, else the file's rate.

    Raises ``FileNotFoundError`` for a missing path, ``AudioFormatError`` (a ``ValueError``)
    naming the file for data libsndfile cannot decode, for audio with no samples and for
    NaN/inf samples, and ``AudioTooLongError`` (an ``AudioFormatError``) for audio over
    ``max_seconds``.
    """
    name = _describe(path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        if not os.path.exists(path_or_file):
            raise FileNotFoundError(f"audio file not found: {name}")
        if os.path.isdir(path_or_file):
            raise IsADirectoryError(f"expected an audio file, got a directory: {name}")
    if target_rate is not None:
        target_rate = check_rate(target_rate, "target_rate")
    if max_seconds is not None and (
        isinstance(max_seconds, bool) or not isinstance(max_seconds, numbers.Real) or not 0 < max_seconds < math.inf
    ):
        raise ValueError(f"max_seconds must be a positive finite number, got {max_seconds!r}")
    try:
        if max_seconds is None:
            data, rate = sf.read(path_or_file, dtype="float32", always_2d=True)
        else:
            data, rate = _read_at_most(path_or_file, max_seconds, name, mono)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        # LibsndfileError (a RuntimeError) carries libsndfile's reason; TypeError is raised for
        # headerless (RAW) data, which needs a rate and format nobody gave.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise AudioFormatError(f"cannot decode audio file {name}: {reason}") from exc
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioFormatError(f"audio file {name} has no samples")
    if not np.isfinite(data).all():
        raise AudioFormatError(f"audio file {name} contains NaN or infinite samples")
    out = _mixdown(data, mono)
    if target_rate is not None and target_rate != rate:
        out = resample(out, rate, target_rate, time_first=True)  # (soundfile's layout: a short file is no doubt)
        rate = target_rate
        if out.shape[0] == 0:  # a few samples resampled to a lower rate: none left
            raise AudioFormatError(f"audio file {name} has no samples at {target_rate} Hz")
    return np.ascontiguousarray(out), int(rate)


_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count of a stream that does not say its length (streamed FLAC)
_BLOCK_SAMPLES = 1 << 20  # samples (frames x channels) decoded at a time by a bounded read: 4 MiB
_SEEK_FAILED = 39  # libsndfile's "Internal psf_fseek() failed": how a read past the end of such a stream ends


def _read_at_most(src: PathLike | BinaryIO, max_seconds: float, name: str, mono: bool) -> tuple[np.ndarray, int]:
    """:func:`read_audio`'s bounded read: float32 [N, channels] ([N, 1] already mixed down when ``mono``, so that
    only one channel is kept) and the rate; AudioTooLongError past ``max_seconds``."""
    with sf.SoundFile(src) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        limit = math.ceil(max_seconds * rate)
        told = frames != _UNKNOWN_FRAMES
        # an MPEG file's frame count is libsndfile's estimate from its size and bitrate without a Xing/Info header
        # (a streamed MP3, or an ID3 tag with cover art, makes it seconds too long): only decoding tells
        estimated = f.format == "MP3" or f.subtype.startswith("MPEG")
        if told and not estimated and frames > limit:  # the header says so: nothing is decoded
            raise AudioTooLongError(name, frames / rate, max_seconds)
        block = max(1, _BLOCK_SAMPLES // max(channels, 1))
        parts, total, end = [], 0, False
        while total <= limit and not end:  # (one frame past the limit tells a file over it)
            want = min(block, limit + 1 - total)
            out = np.full((want, channels), np.nan, np.float32)
            try:
                got = f.read(want, dtype="float32", always_2d=True, out=out)
            except RuntimeError as exc:
                if told or getattr(exc, "code", None) != _SEEK_FAILED:
                    raise  # (a decoding error: corrupt audio, not the end of the stream)
                # at the end of a stream of unknown length libsndfile reads its last frames, then soundfile's seek
                # to the new position fails: the frames read are the rows it filled (NaN rows never come from
                # integer formats, the only ones written this way; a float file's NaN is an error anyway)
                filled = ~np.isnan(out).all(axis=1)
                got = out[: want if filled.all() else int(filled.argmin())]
                end = True
            end = end or got.shape[0] < want
            if got.shape[0]:
                mix = mono and channels > 1
                parts.append(got.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32) if mix else got)
                total += got.shape[0]
        if total > limit:
            raise AudioTooLongError(name, None, max_seconds)
    data = np.concatenate(parts) if parts else np.zeros((0, 1 if mono else channels), np.float32)
    return data, rate


def _array_to_numpy(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # only present if the caller already uses torch
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _to_float(arr: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1) (soundfile's scaling); float stays as is."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype.kind == "i":
        return (arr.astype(np.float64) / float(2 ** (8 * arr.itemsize - 1))).astype(np.float32)
    raise TypeError(f"audio array must have a float or signed integer dtype, got {arr.dtype}")


def load_prompt_audio(
    path_or_array: PathLike | BinaryIO | np.ndarray | Any,
    sample_rate: int | None = None,
    *,
    target_rate: int,
) -> np.ndarray:
    """Load an audio prompt as mono float32 [N] at ``target_rate``.

    ``path_or_array`` is a path / binary file (read with :func:`read_audio`; then
    ``sample_rate`` must be left out, the file's own rate is used) or an array with its
    ``sample_rate``: a numpy array or a torch tensor (any device, float or integer PCM: int16
    and int32 are scaled by 2**15 / 2**31, uint8 is centred on 128). Array layout:

    * 1-D ``[N]``: mono.
    * 2-D: the *shorter* axis is the channel axis, so both torch's ``[channels, N]`` and
      soundfile's ``[N, channels]`` work; a square array is read as ``[channels, N]``.

    Channels are averaged. Raises ``ValueError`` for an empty array, NaN/inf samples, a missing
    or extra ``sample_rate``, or another rank.
    """
    target = check_rate(target_rate, "target_rate")
    if isinstance(path_or_array, (str, os.PathLike)) or hasattr(path_or_array, "read"):
        if sample_rate is not None:
            raise ValueError("sample_rate is only for arrays: a file is read at its own rate")
        samples, _ = read_audio(path_or_array, target_rate=target, mono=True)
        return samples
    if sample_rate is None:
        raise ValueError("sample_rate is required when the prompt is an array")
    rate = check_rate(sample_rate, "sample_rate")
    arr = _to_float(_array_to_numpy(path_or_array))
    if arr.ndim == 2:  # channel axis = the shorter one
        arr = _mixdown(arr.T if arr.shape[0] <= arr.shape[1] else arr, mono=True)
    elif arr.ndim != 1:
        raise ValueError(f"prompt audio must be [N], [channels, N] or [N, channels]; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("prompt audio is empty")
    if not np.isfinite(arr).all():
        raise ValueError("prompt audio contains NaN or infinite samples")
    return np.ascontiguousarray(resample(arr, rate, target))


_SUBTYPES = ("PCM_16", "FLOAT")

# output container by name (and file extension): (libsndfile format, subtype, sample rates it takes or None)
AUDIO_FORMATS: dict[str, tuple[str, str, tuple[int, ...] | None]] = {
    "wav": ("WAV", "PCM_16", None),
    "flac": ("FLAC", "PCM_16", None),
    "ogg": ("OGG", "VORBIS", None),
    "opus": ("OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
    "mp3": ("MP3", "MPEG_LAYER_III", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
}
# the highest sample rate each format with free rates takes: FLAC's header limit; libvorbis crashes the process
# above 200 kHz (192 kHz, the highest common rate, is the bound); WAV's header field
MAX_RATES = {"wav": 2**31 - 1, "flac": 655350, "ogg": 192000}


def audio_format_for(path: PathLike, format: str | None = None) -> str:
    """The output format of ``path``: ``format`` when given, else its extension (``.wav``, ``.flac``, ``.ogg``
    (Vorbis), ``.opus`` (Ogg Opus), ``.mp3``). Raises ``ValueError`` listing the supported ones."""
    name = (format or Path(os.fspath(path)).suffix.lstrip(".")).lower()
    if name not in AUDIO_FORMATS:
        what = f"format {format!r}" if format else f"the extension of {os.fspath(path)!r}"
        raise ValueError(f"cannot write audio with {what}: supported are {', '.join(AUDIO_FORMATS)}")
    return name


def write_audio(
    path: PathLike, samples: np.ndarray | Any, sample_rate: int, *, format: str | None = None, subtype: str = "PCM_16"
) -> Path:
    """Write mono float samples [N] atomically in the container that ``format`` or the file's extension names
    (:func:`audio_format_for`: WAV, FLAC, Ogg Vorbis, Ogg Opus, MP3, all through libsndfile); returns the path.

    ``subtype``: ``"PCM_16"`` (16-bit, clipped, never wrapped) or, for WAV only, ``"FLOAT"`` (32-bit float).
    Opus and MP3 take a few sample rates: other rates are resampled (soxr) to the nearest higher one they take
    (48 kHz at most). The data goes to a temporary file beside ``path`` that is then renamed over it, so a
    failure never leaves a partial file. Raises ``ValueError`` for no samples, NaN/inf samples, non-1-D input, an
    unknown format or subtype, or a bad rate (above :data:`MAX_RATES` for WAV, FLAC and Ogg Vorbis)."""
    rate = check_rate(sample_rate, "sample_rate")
    fmt = audio_format_for(path, format)
    if rate > MAX_RATES.get(fmt, rate):
        raise ValueError(f"{fmt} takes sample rates up to {MAX_RATES[fmt]} Hz, got {rate} (resample first)")
    container, default_subtype, _ = AUDIO_FORMATS[fmt]
    if subtype not in _SUBTYPES:
        raise ValueError(f"subtype must be one of {_SUBTYPES}, got {subtype!r}")
    if subtype == "FLOAT" and fmt != "wav":
        raise ValueError(f"32-bit float samples are written as WAV only, not {fmt}")
    arr = _array_to_numpy(samples)
    if arr.ndim != 1:
        raise ValueError(f"write_audio expects mono samples [N], got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"write_audio expects float samples, got dtype {arr.dtype}")
    if arr.size == 0:  # (FLAC, MP3 and Opus would write files that no reader opens)
        raise ValueError("refusing to write audio with no samples")
    if not np.isfinite(arr).all():
        raise ValueError("refusing to write audio with NaN or infinite samples")
    target = written_rate(rate, fmt)
    if target != rate:
        arr, rate = resample(arr, rate, target), target
        if arr.size == 0:  # a few samples at a higher rate than the format's: none left at its rate
            raise ValueError(f"refusing to write audio with no samples at {fmt}'s {target} Hz")
    if fmt == "wav":
        data = float_to_pcm16(arr) if subtype == "PCM_16" else arr.astype(np.float32, copy=False)
        sub = subtype
    else:  # libsndfile's encoders take float samples; keep them in range as the 16-bit path does
        data, sub = np.clip(arr, -1.0, 1.0).astype(np.float32, copy=False), default_subtype

    # encoded in memory, then written by write_file_bytes: libsndfile's own file writes report a full disk as a
    # failed assert or an exception inside a callback, and could not write to a pipe or a device
    encoded = io.BytesIO()
    sf.write(encoded, data, rate, subtype=sub, format=container)
    return write_file_bytes(path, encoded.getbuffer())


def written_rate(sample_rate: int, format: str) -> int:
    """The sample rate :func:`write_audio` writes ``format`` (a name of :data:`AUDIO_FORMATS`) at for samples at
    ``sample_rate``: the same, or for Opus and MP3 the nearest higher rate they take (48 kHz at most)."""
    rates = AUDIO_FORMATS[format][2]
    if rates is None or sample_rate in rates:
        return sample_rate
    return next((r for r in rates if r >= sample_rate), rates[-1])


def write_file_bytes(path: PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to the file ``path``; returns ``path``. A regular file (or a new one) is written atomically:
    a temporary file beside it, synced and renamed over it, so a failure (a full disk) never leaves it partial.
    A symbolic link is followed (its target is replaced, the link kept). A device or a pipe (``/dev/null``, a
    FIFO) is written to directly, never replaced by a regular file. Any failure is an ``OSError`` naming
    ``path``, with nothing left behind."""
    dest = Path(os.fspath(path))
    target = Path(os.path.realpath(dest))
    try:
        if target.exists() and not target.is_file() and not target.is_dir():  # a device, FIFO or socket
            with open(target, "wb", buffering=0) as fh:
                fh.write(data)
            return dest
        with atomic_output(target) as tmp:
            # O_EXCL on the fresh name: no clash with a concurrent writer; mode 0o666 lets the umask apply
            # as for any new file (mkstemp would force 0o600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:  # name the user's path, not the hidden temporary file
        raise type(exc)(exc.errno, f"cannot write {dest}: {exc.strerror or exc}") from None
    return dest


def write_wav(path: PathLike, samples: np.ndarray | Any, sample_rate: int, *, subtype: str = "PCM_16") -> Path:
    """:func:`write_audio` as WAV whatever the extension (16-bit PCM, or ``"FLOAT"``)."""
    return write_audio(path, samples, sample_rate, format="wav", subtype=subtype)


def _new_file_mode(directory: Path) -> int:
    """The permission bits a new file gets in ``directory`` under the process's umask (read from a file made
    there: ``os.umask`` can only be read by changing it, for every thread)."""
    probe = directory / f".{secrets.token_hex(6)}.mode"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to: renamed over ``path`` (``os.replace``) when
    the block succeeds, removed when it fails, so ``path`` is never left partial or truncated. A file replaced
    keeps its permission bits (a private file stays private); a second hard link to it keeps the old content."""
    dest = Path(os.fspath(path))
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(dest).st_mode)
        except OSError:  # a new file: the umask decides, as for any new file (a writer may have made it 0600)
            mode = _new_file_mode(dest.parent)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a failed clean-up never hides the error that caused it
        raise
