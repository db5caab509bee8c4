"""Streaming generation: audio chunks while the decoder is still running.

The decode loop runs in a worker thread; its ``on_step`` hook hands finished delayed positions to
the caller's thread through a queue. A frame at position ``t`` is final once step
``t + max_delay`` is done. The caller undelays the frames and decodes them with the codec in
windows that carry ``left_context_frames`` frames before the chunk and ``lookahead_frames`` after
it (the codec's receptive field; DAC's convolutions are not causal), so that the joined chunks
equal the one-shot decode of all frames up to float rounding. Batch 1 only.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import ops
from ..codec.base import AudioCodec
from ..options import check_int_option
from .engine import using_device
from .generate import DecodeOutput, generate_codes

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = [
    "AudioStream",
    "ChunkedDecoder",
    "StreamStats",
    "check_engine_options",
    "check_stream_frames",
    "codec_context_frames",
    "codec_min_window_frames",
    "stream_generate",
]

_CONTEXT_MARGIN = 2  # frames added to the measured receptive field (transposed-conv edge effects)


def _codec_device(codec: AudioCodec, device: torch.device | str | None) -> torch.device | str:
    """``device``, or where the codec's parameters are (the CPU for a codec without parameters)."""
    if device is not None:
        return device
    params = getattr(codec, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else "cpu"


_context_cache: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


_MAX_PROBE_FRAMES = 1024  # the longest probe codec_context_frames decodes (twice)


@torch.inference_mode()
def codec_context_frames(codec: AudioCodec, device: torch.device | str | None = None) -> tuple[int, int]:
    """(left, right) frames of context the codec decoder needs around a frame for exact audio.

    Uses ``codec.context_frames`` (an int for both sides, or a pair) when the codec declares it
    (as :class:`~dia_fast.codec.dac.DacCodec` does); otherwise it is measured once per
    codec (and cached): decode random codes, change one frame, and see how far the audio changes.
    A margin of two frames is added to the measurement.
    """
    declared = getattr(codec, "context_frames", None)
    if declared is not None:  # an int (both sides) or a (left, right) pair
        left, right = (declared, declared) if isinstance(declared, int) else declared
        return int(left), int(right)
    try:
        return _context_cache[codec]
    except (KeyError, TypeError):
        pass
    device = _codec_device(codec, device)
    gen = torch.Generator().manual_seed(0)
    hop, n_cb, size = codec.hop_length, codec.n_codebooks, codec.codebook_size
    frames = 32
    while True:
        codes = torch.randint(0, size, (1, frames, n_cb), generator=gen)
        mid = frames // 2
        changed = codes.clone()
        changed[0, mid] = (codes[0, mid] + 1 + torch.randint(0, size - 1, (n_cb,), generator=gen)) % size
        a = codec.decode(codes.to(device))[0].float().cpu()
        b = codec.decode(changed.to(device))[0].float().cpu()
        diff = (a - b).abs() > 1e-6 * max(float(a.abs().max()), float(b.abs().max()), 1e-12)
        idx = diff.nonzero().flatten()
        if idx.numel() == 0:  # the frame has no effect at all: no context needed
            result = (0, 0)
            break
        s0, s1 = int(idx[0]), int(idx[-1])
        if (s0 > 0 and s1 < frames * hop - 1) or frames >= _MAX_PROBE_FRAMES:
            if not (s0 > 0 and s1 < frames * hop - 1):
                warnings.warn(
                    f"{type(codec).__name__}: one frame still changes the audio {_MAX_PROBE_FRAMES // 2} frames away "
                    "(the longest probe): streamed audio may differ from the one-shot decode at chunk joins; declare "
                    "the codec's context_frames to stream it exactly",
                    RuntimeWarning,
                    stacklevel=2,
                )
            reach_left = mid - s0 // hop  # output frames before `mid` that it changes
            reach_right = s1 // hop - mid
            # output frame j depends on inputs j - reach_right .. j + reach_left
            result = (reach_right + _CONTEXT_MARGIN, reach_left + _CONTEXT_MARGIN)
            break
        frames *= 2
    try:
        _context_cache[codec] = result
    except TypeError:
        pass
    return result


_window_cache: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


@torch.inference_mode()
def codec_min_window_frames(codec: AudioCodec, device: torch.device | str | None = None) -> int:
    """The fewest frames a decode window that starts at the first frame needs for exact audio (past the lookahead).

    A codec may declare it (``min_window_frames``, as :class:`~dia_fast.codec.dac.DacCodec` does: 1); otherwise it
    is measured once per codec (and cached): windows ``[0, n)`` of random codes are decoded and compared with the
    whole decode over their first ``n - lookahead`` frames. EnCodec needs 7: its reflect padding extends a shorter
    input with zeros first, so a stream's small first chunk decoded alone came out wrong."""
    declared = getattr(codec, "min_window_frames", None)
    if declared is not None:
        return int(declared)
    try:
        return _window_cache[codec]
    except (KeyError, TypeError):
        pass
    _, right = codec_context_frames(codec, device)
    device = _codec_device(codec, device)
    hop, limit = codec.hop_length, right + 64
    codes = torch.randint(
        0, codec.codebook_size, (1, limit, codec.n_codebooks), generator=torch.Generator().manual_seed(1)
    )
    whole = codec.decode(codes.to(device))[0].float().cpu()
    scale = max(float(whole.abs().max()), 1e-12)
    result, exact_run = 1, 0
    for n in range(right + 1, limit):
        k = (n - right) * hop
        part = codec.decode(codes[:, :n].to(device))[0].float().cpu()
        if float((part[:k] - whole[:k]).abs().max()) > 1e-4 * scale:  # (chunked decodes differ by rounding only)
            result, exact_run = n + 1, 0
        else:
            exact_run += 1
            if exact_run == 4:
                break
    try:
        _window_cache[codec] = result
    except TypeError:
        pass
    return result


@dataclass
class StreamStats:
    """Timings of one stream (seconds; wall clock from the :meth:`DiaTTS.generate_stream` call, after the
    one-time measurement of the codec's context).

    ``time_to_first_audio_s`` is None until the first chunk has been returned. ``prefill_s``,
    ``decode_s`` and ``steps`` are filled in when generation finishes.
    """

    time_to_first_audio_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    steps: int = 0
    codec_s: float = 0.0
    chunks: int = 0
    frames: int = 0
    samples: int = 0
    total_s: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


class _Cancelled(Exception):
    """Raised inside ``on_step`` to stop the worker after :meth:`AudioStream.close`."""


_CODES, _DONE, _ERROR = "codes", "done", "error"
_ENGINE_OPTIONS = ("cuda_graphs", "cpu_graphs", "sync_every")


def _worker(
    out_queue: queue.Queue[tuple[str, Any]],
    cancel: threading.Event,
    tts: DiaTTS,
    kw: dict[str, Any],
    first_need: int,
    chunk: int,
    chunk_need: int,
) -> None:
    """Run the decode loop (``kw``: :func:`generate_codes`' checked arguments); send final delayed positions
    whenever the consumer can use them: ``first_need`` new frames for its first chunk, then ``chunk`` more each
    after ``chunk_need`` (the first chunk and its lookahead: ``first_need`` may be more, the codec's shortest
    exact window)."""
    try:
        md = tts.config.data.max_delay
        first = sent = -1  # first generated position (the prefix length), first position not yet sent
        need = first_need  # new frames the consumer needs for its next chunk

        def on_step(out: torch.Tensor, p: int) -> None:
            nonlocal first, sent, need, chunk_need
            if cancel.is_set():
                raise _Cancelled
            if first < 0:
                first = sent = p
            if p - md - first + 1 >= need:  # new frames that are final after this step
                out_queue.put((_CODES, out[0, sent : p + 1].clone()))
                sent = p + 1
                chunk_need += chunk
                need = chunk_need

        result = generate_codes(tts.model, frame_rate=tts.codec.frame_rate, on_step=on_step, **kw)
        out_queue.put((_DONE, result))
    except _Cancelled:
        out_queue.put((_DONE, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, raised there
        out_queue.put((_ERROR, exc))


def check_stream_frames(
    chunk_frames: object,
    first_chunk_frames: object = None,
    left_context_frames: object = None,
    lookahead_frames: object = None,
) -> None:
    """A stream's chunk sizes (ints >= 1; ``first_chunk_frames`` may be None) and codec context (ints >= 0, or
    None for the codec's own): a TypeError / ValueError naming the option otherwise."""
    check_int_option("chunk_frames", chunk_frames, minimum=1)
    check_int_option("first_chunk_frames", first_chunk_frames, minimum=1, optional=True)
    check_int_option("left_context_frames", left_context_frames, minimum=0, optional=True)
    check_int_option("lookahead_frames", lookahead_frames, minimum=0, optional=True)


def check_engine_options(options: dict[str, Any]) -> None:
    """The :func:`generate_codes` options a stream passes on (``cuda_graphs``, ``cpu_graphs``: bool or None;
    ``sync_every``: an int >= 1); any other name is a TypeError, as an unknown keyword is."""
    for name, value in options.items():
        if name not in _ENGINE_OPTIONS:
            hint = " (a stream always yields audio)" if name == "decode_audio" else ""
            raise TypeError(
                f"generate_stream() got an unexpected keyword argument {name!r}{hint}; it takes generate()'s options "
                f"and {', '.join(_ENGINE_OPTIONS)}"
            )
        if name == "sync_every":
            check_int_option(name, value, minimum=1)
        elif value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")


class ChunkedDecoder:
    """Exact audio chunks from the delayed decoder positions of one item, pushed in order as they become final.

    A new frame ``t`` is final once delayed position ``t + max_delay`` is; its audio is exact once the codec
    also has ``lookahead_frames`` final frames after it (and ``left_context_frames`` before it). Chunks are
    ``first_chunk_frames`` then ``chunk_frames`` frames; the last one ends where the item's EOS says.
    :meth:`push` takes delayed positions (the first one is the first generated position), :meth:`end` says
    that no more will come (with the number of new frames when it is known from elsewhere), and
    :meth:`next_chunk` returns float32 PCM, or None when the next chunk is not ready yet. Timings and counts
    go to ``stats``.
    """

    def __init__(
        self,
        tts: DiaTTS,
        *,
        chunk_frames: int,
        first_chunk_frames: int | None,
        left_context_frames: int,
        lookahead_frames: int,
        stats: StreamStats,
        start_time: float,
    ) -> None:
        check_stream_frames(chunk_frames, first_chunk_frames)
        check_int_option("left_context_frames", left_context_frames, minimum=0)
        check_int_option("lookahead_frames", lookahead_frames, minimum=0)
        self.stats = stats
        self._t0 = start_time
        self._codec = tts.codec
        self._device = tts.device
        data = tts.config.data
        self._delays = data.delay_pattern
        self._max_delay = data.max_delay
        self._eos = data.audio_eos_value
        self._codebook_size = tts.config.codebook_size
        self._hop = tts.codec.hop_length
        self.chunk = chunk_frames
        self.first = chunk_frames if first_chunk_frames is None else first_chunk_frames
        self._left = left_context_frames
        self.lookahead = lookahead_frames
        self._min_window = codec_min_window_frames(tts.codec, tts.device)
        self._delayed: list[torch.Tensor] = []  # delayed positions received, in arrival order
        self._positions = 0  # delayed positions received
        self._total: int | None = None  # number of new frames, once known (EOS seen or generation done)
        self._emitted = 0  # frames whose audio has been returned
        self._ended = False

    @property
    def positions(self) -> int:
        """Delayed positions received so far."""
        return self._positions

    @property
    def first_need(self) -> int:
        """New frames whose codes must be final before the first chunk can be decoded."""
        return max(self.first + self.lookahead, self._min_window)

    @property
    def done(self) -> bool:
        """Every frame's audio has been returned (after :meth:`end`)."""
        return self._ended and self._total is not None and self._emitted >= self._total

    def push(self, codes: torch.Tensor) -> None:
        """Delayed positions [n, C] that follow the ones pushed before."""
        if codes.shape[0] == 0:
            return
        self._delayed.append(codes)
        self._positions += codes.shape[0]
        if self._total is None:
            # channel 0 has no delay: its EOS marks the end of the audio
            hits = (codes[:, 0] == self._eos).nonzero()
            if hits.numel():
                self._total = self._positions - codes.shape[0] + int(hits[0, 0])

    def end(self, total_frames: int | None = None) -> None:
        """No more positions will come; ``total_frames``: the item's number of new frames, if known."""
        self._ended = True
        if total_frames is not None:
            self._total = total_frames
        elif self._total is None:  # no EOS seen: every frame whose codes are complete
            self._total = max(self._positions - self._max_delay, 0)

    def _ready(self) -> int:
        """New frames whose codes are final."""
        n = max(self._positions - self._max_delay, 0)
        return n if self._total is None else min(n, self._total)

    def next_chunk(self) -> np.ndarray | None:
        """The next chunk's PCM, or None when it is not ready (or everything was returned)."""
        ready = self._ready()
        if self._total is not None and (self._ended or self._positions >= self._total + self._max_delay):
            end = self._total  # the last window ends where the one-shot decode ends
            if end <= self._emitted:
                return None
            stop = end
            start = max(self._emitted - self._left, 0)
        else:
            size = self.first if self._emitted == 0 else self.chunk
            end = self._emitted + size
            start = max(self._emitted - self._left, 0)
            stop = max(end + self.lookahead, start + self._min_window)  # (a window shorter than that is not exact)
            if ready < stop:
                return None
        return self._decode(start, self._emitted, end, stop)

    def _decode(self, start: int, emit_from: int, emit_to: int, stop: int) -> np.ndarray:
        t = time.perf_counter()
        delayed = torch.cat(self._delayed) if len(self._delayed) > 1 else self._delayed[0]
        self._delayed = [delayed]
        window = delayed[start : stop + self._max_delay][None].to(self._device)
        # the caller's thread: its current device need not be the model's (undelay_codes may be a Triton kernel)
        with using_device(self._device), torch.inference_mode():
            codes = ops.undelay_codes(window, self._delays, self._codebook_size)[0, : stop - start]
            wav = self._codec.decode(codes[None].to(self._device))[0]
        a = (emit_from - start) * self._hop
        pcm = wav[a : a + (emit_to - emit_from) * self._hop].float().cpu().numpy()
        self._emitted = emit_to
        now = time.perf_counter()
        st = self.stats
        st.codec_s += now - t
        st.chunks += 1
        st.frames = emit_to
        st.samples += int(pcm.shape[0])
        if st.time_to_first_audio_s is None:
            st.time_to_first_audio_s = now - self._t0
        return pcm


class AudioStream(Iterator[np.ndarray]):
    """Iterator of float32 PCM chunks (at ``sample_rate``) for one text; see :meth:`DiaTTS.generate_stream`.

    ``generate_kwargs`` are :func:`generate_codes`' arguments, already checked (the stream's worker thread makes no
    checks of its own). Generation starts as soon as the stream is created. ``close()`` (or leaving a ``with`` block,
    or dropping the iterator) stops the worker thread. Exceptions in generation are raised from
    ``next()``. Timings are in :attr:`stats`.
    """

    def __init__(
        self,
        tts: DiaTTS,
        *,
        chunk_frames: int,
        first_chunk_frames: int | None,
        left_context_frames: int,
        lookahead_frames: int,
        generate_kwargs: dict[str, Any],
        start_time: float | None = None,
    ) -> None:
        self._t0 = time.perf_counter() if start_time is None else start_time
        self.stats = StreamStats()
        self.sample_rate = tts.sample_rate
        self._chunks = ChunkedDecoder(
            tts,
            chunk_frames=chunk_frames,
            first_chunk_frames=first_chunk_frames,
            left_context_frames=left_context_frames,
            lookahead_frames=lookahead_frames,
            stats=self.stats,
            start_time=self._t0,
        )
        self._device = tts.device
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._closed = False
        self._finished = False
        # the worker holds no reference to the stream, so dropping the stream can stop it
        first_need = self._chunks.first_need
        self._thread = threading.Thread(
            target=_worker,
            args=(
                self._queue,
                self._cancel,
                tts,
                generate_kwargs,
                first_need,
                chunk_frames,
                self._chunks.first + self._chunks.lookahead,
            ),  # fmt: skip
            name="dia_fast-stream",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------------------ consumer side
    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> np.ndarray:
        if self._closed:
            raise StopIteration
        try:
            while True:
                chunk = self._chunks.next_chunk()
                if chunk is not None:
                    return chunk
                if self._finished:
                    self.stats.total_s = time.perf_counter() - self._t0
                    self._closed = True
                    self._join()
                    raise StopIteration
                self._receive(self._queue.get())
        except StopIteration:
            raise
        except BaseException:
            self.close()  # a codec error or Ctrl-C here must not leave the decoder running
            raise

    def _receive(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == _ERROR:
            self._finished = True
            self._closed = True
            self._join()
            raise payload
        if kind == _DONE:
            self._finish(payload)
            return
        codes = payload
        if codes.is_cuda:
            # Made on the worker thread's (default) stream; this thread may be on another one: wait for the copy,
            # and keep the allocator from handing its memory to the worker while this stream still reads it.
            here = torch.cuda.current_stream(codes.device)
            here.wait_stream(torch.cuda.default_stream(codes.device))
            codes.record_stream(here)
        self._chunks.push(codes)

    def _finish(self, result: DecodeOutput | None) -> None:
        self._finished = True
        if result is None:
            self._chunks.end()
            return
        self.stats.prefill_s = result.prefill_seconds
        self.stats.decode_s = result.decode_seconds
        self.stats.steps = result.steps
        P0 = result.prefix_length
        # the worker sent device tensors; the result is on the CPU
        rest = result.delayed[0, P0 + self._chunks.positions :].to(self._device)
        self._chunks.push(rest)
        eos = int(result.eos_pos[0])
        # no EOS (the loop cannot end so, but be safe): every frame whose codes are complete
        self._chunks.end(max(eos - P0, 0) if eos >= 0 else None)

    # ------------------------------------------------------------------------------ lifecycle
    def _join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self) -> None:
        """Stop generation (at the next decode step) and wait for the worker thread to end."""
        if self._closed:
            return
        self._closed = True
        self._cancel.set()
        self._join()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def stream_generate(tts: DiaTTS, text: str, **kwargs: Any) -> AudioStream:
    """:meth:`DiaTTS.generate_stream` of ``tts``: ``text`` as a stream of float32 PCM chunks (batch 1).

    The keywords (chunk sizes, codec context, ``max_new_tokens``, sampling, ``seed``, ``audio_prompt``, ...) are
    checked when this is called, before any work. Time to first audio and the generation timings are in the
    returned stream's ``stats``.
    """
    return tts.generate_stream(text, **kwargs)
