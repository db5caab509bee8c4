"""``BatchEngine``: continuous batching over one loaded model. Requests join and leave a running batch at any
decode step, each with its own text, voice prompt, length limits, sampling settings and seed.

One scheduler thread owns the device state (:mod:`dia_fast.serving.slots`). Between decode steps it admits
queued requests into free slots (FIFO; each is prefilled on its own rows), frees the slots of finished,
cancelled or timed-out requests, and steps the smallest batch bucket (a power of two) holding every live
slot; on CUDA each bucket's step is a CUDA graph captured when the engine starts. Every ``poll_every`` steps
it reads the slots' positions and completion flags back and hands each request its final frames (streams
get them as they become final). Audio is decoded in the caller's thread, never in the scheduler's.

The read-backs never stall the device: each round's state (and the codes it makes final) is copied into pinned
host memory without blocking and read one round later, once the next round is queued behind it, as
``generate`` reads its completion flag; admission copies its inputs to the device the same way.

A request's codes do not depend on what runs beside it or on when it joined: it starts at position 0 of its
slot, its prefill and steps compute on its own rows, and its draws come from Philox keyed by its seed at its
own positions.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import ops
from ..audio import check_crossfade_ms, crossfade_join
from ..devices import set_thread_cpu_threads
from ..generation.engine import bucket_batch, capture_cuda_graph, default_sampler, using_device
from ..generation.generate import check_step_budget
from ..generation.sampling import SamplingConfig
from ..generation.stream import ChunkedDecoder, StreamStats, check_stream_frames, codec_context_frames
from ..longform import PromptTooLong
from ..memory import PinnedPool, PooledBuffer, default_pool
from ..ops.cpu_graph import CpuGraphStep
from ..ops.reference import last_eos_position
from ..options import check_int_option, named
from ..text import check_prompted_text, encode_batch, prompted_text
from .slots import SlotState, admit, allocate_slots, slot_step, undelayed_codes

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = [
    "BatchEngine",
    "EngineBusy",
    "EngineClosed",
    "EngineFailed",
    "EngineResult",
    "RequestCancelled",
    "RequestHandle",
    "default_max_slots",
]

_DEFAULT_SLOTS = {"cuda": 16, "mps": 4, "cpu": 8}
log = logging.getLogger("dia_fast.serving")
_ENGINES: weakref.WeakSet[BatchEngine] = weakref.WeakSet()


def _wake(cv: threading.Condition) -> None:
    """An engine was collected: its scheduler thread, waiting for work, wakes up to end."""
    with cv:
        cv.notify_all()


def _schedule(ref: weakref.ref[BatchEngine], cv: threading.Condition) -> None:
    """The scheduler thread of the engine ``ref``: works while there are requests, waits on ``cv`` (the engine's)
    holding no reference to the engine, and ends when it is closed (after draining, if asked) or collected."""
    engine = ref()
    if engine is None:
        return
    if engine.cpu_threads is not None and not set_thread_cpu_threads(engine.cpu_threads):
        engine.cpu_threads = torch.get_num_threads()  # what the steps really run on
    device = engine.tts.model.device
    try:
        with using_device(device), torch.inference_mode():
            while True:
                with cv:
                    while True:
                        if engine is None:
                            engine = ref()
                            if engine is None:
                                return  # collected while idle: nothing was left to run
                        if engine._should_stop():
                            return
                        if not engine._idle():
                            break
                        engine = None  # idle: the engine may be collected meanwhile (its finalizer wakes us)
                        if ref() is None:
                            return
                        cv.wait()
                engine._work()
    except BaseException as exc:  # noqa: BLE001 - a broken step fails every request, never hangs one
        if engine is not None:
            engine._error = exc
        log.error("the batching engine failed: every running and queued request fails", exc_info=exc)
    finally:
        if engine is not None:
            engine._fail_all(engine._error)


@atexit.register
def _close_engines() -> None:
    """Stop every engine's scheduler before the interpreter tears torch down under it."""
    for engine in list(_ENGINES):
        engine.close(timeout=5.0)


def overlaps_readback(device: torch.device) -> bool:
    """Whether the scheduler reads a round's state back one round later (docs/serving.md): on CUDA, where the copy is
    asynchronous and the device runs the next round meanwhile. Elsewhere copies are synchronous, so there is nothing
    to overlap and a round's own state is read at once (the lag would only delay results)."""
    return device.type == "cuda"


def default_max_slots(device: torch.device | str) -> int:
    """Slots of a :class:`BatchEngine` by default: 16 on CUDA, 4 on Apple GPUs, 8 on the CPU."""
    return _DEFAULT_SLOTS.get(torch.device(device).type, 8)


class EngineBusy(RuntimeError):
    """The engine's queue is full: try again later (a server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished (or was submitted after)."""


class EngineFailed(EngineClosed):
    """The engine stopped because a step failed (its error is logged once, and is this exception's cause)."""


class RequestCancelled(RuntimeError):
    """The request was cancelled (its handle's ``cancel()``)."""


@dataclass
class EngineResult:
    """One request's output: new codec codes ``[T, C]`` (int64, CPU), float32 mono PCM (empty when not decoded)
    and timings: ``queued_s`` (submit to admission), ``prefill_s``, ``decode_s`` (admission end to finish),
    ``steps`` (decode steps it took part in), ``batch_peak`` (most live requests in one of its steps).
    ``truncated``: ``max_new_tokens`` ended the speech (of a piece) before the model did."""

    codes: torch.Tensor
    audio: np.ndarray
    sample_rate: int
    stats: dict[str, float] = field(default_factory=dict)
    truncated: bool = False

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def _running_future() -> concurrent.futures.Future:
    """A future that only the engine settles: marked running, so that ``Future.cancel()`` (which
    ``asyncio.wrap_future`` calls when the awaiting task is cancelled) cannot settle it behind the engine's
    back and leave the request in its slot; :meth:`RequestHandle.cancel` is the way to cancel."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    return future


@dataclass
class _Request:
    id: int
    group: int  # the id of the request's first piece: the pieces of one text share it
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    prompt: torch.Tensor | None
    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingConfig
    seed: int
    deadline: float | None
    submitted: float
    future: concurrent.futures.Future = field(default_factory=_running_future)
    chunks: queue.Queue | None = None  # delayed positions for a stream, ("codes", t) / ("end", n) / ("error", e)
    cancelled: bool = False
    slot: int = -1
    prefix: int = 0
    sent: int = 0  # delayed positions sent to the stream
    admitted: float = 0.0
    prefill_s: float = 0.0
    steps: int = 0
    batch_peak: int = 0


@dataclass
class _Readback:
    """A round's slot state (positions, finished flags, EOS positions of its first slots), being copied to the host,
    and the requests that held those slots when it was queued."""

    buf: PooledBuffer
    owners: list[_Request | None]
    # their step counts and largest batches then: a finished request's own (the engine counts the round it runs on in
    # its slot until this is read as the round after)
    steps: list[int]
    peaks: list[int]


@dataclass
class _Delivery:
    """Delayed codes ``out[:rows, lo:hi]`` being copied to the host, and what to hand over once they are there:
    (request, its slot, kind, start, end, EOS position) with kind "codes" (a stream's positions ``[start, end)``)
    or "result" (the finished request's positions ``[start, end)``: its prefix to EOS + the largest delay)."""

    buf: PooledBuffer
    lo: int
    items: list[tuple[_Request, int, str, int, int, int]]


class RequestHandle:
    """A submitted request: ``result(timeout)`` waits for its :class:`EngineResult` (audio decoded in the
    calling thread), iterating yields float32 PCM chunks as the frames become final (when submitted with
    ``stream=True``), ``cancel()`` frees its slot at the next step boundary.

    A text over one generation's budget is spoken as several generations (``pieces``, split as
    :func:`dia_fast.longform.generate_long` splits, or given as a list of texts): they run side by side,
    ``results()`` gives each one's result, ``result()`` joins their codes and crossfades their audio, and a
    stream yields them in order, crossfaded as ``result()`` joins them (the joined stream equals its audio when
    every piece is longer than twice the crossfade)."""

    def __init__(
        self,
        engine: BatchEngine,
        requests: list[_Request],
        decoders: list[ChunkedDecoder] | None,
        crossfade_ms: float,
    ) -> None:
        self._engine = engine
        self._reqs = requests
        self._decoders = decoders
        self._crossfade_ms = crossfade_ms
        self.stats = decoders[0].stats if decoders else StreamStats()

    @property
    def id(self) -> int:
        return self._reqs[0].id

    @property
    def pieces(self) -> int:
        """Generations this request runs as (1 unless its text was over one generation's budget)."""
        return len(self._reqs)

    def done(self) -> bool:
        return all(r.future.done() for r in self._reqs)

    def cancel(self) -> bool:
        """Cancel the request (a queued one never runs; a running one leaves its slot within one step). True
        unless it had finished already."""
        return any([self._engine._cancel(r) for r in self._reqs])

    @property
    def truncated(self) -> bool:
        """Whether ``max_new_tokens`` ended the speech of a piece before the model did (False until done)."""
        return any(r.future.done() and r.future.exception() is None and r.future.result().truncated
                   for r in self._reqs)  # fmt: skip

    def results(self, timeout: float | None = None, *, decode_audio: bool = True) -> list[EngineResult]:
        """Each piece's codes and audio, in order (one result unless the request runs as several pieces); raises
        as :meth:`result` does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[EngineResult] = []
        for req in self._reqs:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                parts.append(req.future.result(left))
            except concurrent.futures.TimeoutError:
                raise  # (not the request's failure: it runs on, and can be waited for again)
            except BaseException:
                self.cancel()  # a piece failed: the request has failed, its other pieces need not run
                raise
        if decode_audio:
            for res in parts:
                if res.audio.size == 0 and res.codes.shape[0]:
                    res.audio = self._engine.tts.decode(res.codes)
        return parts

    def result(self, timeout: float | None = None, *, decode_audio: bool = True) -> EngineResult:
        """The request's codes and audio; raises its error (``RequestCancelled``, ``TimeoutError``, an
        invalid-input error, ...) or ``concurrent.futures.TimeoutError`` when ``timeout`` passes first."""
        parts = self.results(timeout, decode_audio=decode_audio)
        if len(parts) == 1:
            return parts[0]
        rate = parts[0].sample_rate
        audio = crossfade_join([r.audio for r in parts], rate, self._crossfade_ms) if decode_audio else None
        stats = {k: float(sum(r.stats.get(k, 0.0) for r in parts)) for k in ("steps", "frames")}
        stats.update(pieces=float(len(parts)), batch_peak=float(max(r.stats["batch_peak"] for r in parts)))
        return EngineResult(
            torch.cat([r.codes for r in parts]),
            audio if audio is not None else np.zeros(0, np.float32),
            rate,
            stats,
            truncated=any(r.truncated for r in parts),
        )

    async def _settled(self) -> None:
        """Wait for every piece; cancelling the awaiting task cancels the request, as a piece's failure does."""
        try:
            for req in self._reqs:
                await asyncio.wrap_future(req.future)
        except BaseException:  # cancelled, or a piece failed: the other pieces need not run
            self.cancel()
            raise

    async def result_async(self, *, decode_audio: bool = True) -> EngineResult:
        """:meth:`result` for asyncio (the audio is decoded in a worker thread); cancelling the awaiting task
        cancels the request."""
        await self._settled()
        return await asyncio.to_thread(self.result, 0, decode_audio=decode_audio)

    async def results_async(self, *, decode_audio: bool = True) -> list[EngineResult]:
        """:meth:`results` for asyncio (the audio is decoded in a worker thread); cancelling the awaiting task
        cancels the request."""
        await self._settled()
        return await asyncio.to_thread(self.results, 0, decode_audio=decode_audio)

    def __iter__(self) -> Iterator[np.ndarray]:
        """PCM chunks (float32, ``sample_rate``) as frames become final; the joined chunks equal the audio of
        :meth:`result` (for several pieces: when each is longer than twice the crossfade, as the end of each piece
        is held back to crossfade it with the start of the next). Needs ``stream=True`` at submit."""
        if self._decoders is None:
            raise RuntimeError("submit(..., stream=True) to iterate over audio chunks")
        try:
            yield from self._chunks()
        except BaseException:  # left early (break, close(), an error): the request need not run on
            self.cancel()
            raise

    def _chunks(self) -> Iterator[np.ndarray]:
        rate = self._engine.tts.sample_rate
        fade_n = int(round(self._crossfade_ms * rate / 1000.0))
        last = len(self._reqs) - 1
        tail = np.zeros(0, np.float32)  # held-back end of the previous piece
        for k in range(len(self._reqs)):
            keep = 0 if k == last else fade_n
            pending = np.zeros(0, np.float32)
            for pcm in self._piece_chunks(k):
                pending = np.concatenate([pending, pcm])
                if tail.size:
                    if pending.size < tail.size:
                        continue
                    n = tail.size
                    yield crossfade_join([tail, pending[:n]], rate, self._crossfade_ms)
                    tail, pending = tail[:0], pending[n:]
                if pending.size > keep:
                    yield pending[: pending.size - keep]
                    pending = pending[pending.size - keep :]
            if tail.size:  # this piece was shorter than the crossfade: mix what there is
                n = min(tail.size, pending.size)
                mixed = crossfade_join([tail[tail.size - n :], pending[:n]], rate, self._crossfade_ms)
                pending = np.concatenate([tail[: tail.size - n], mixed, pending[n:]])
            tail = pending if keep else np.zeros(0, np.float32)
            if not keep and pending.size:
                yield pending

    def _piece_chunks(self, k: int) -> Iterator[np.ndarray]:
        """Piece ``k``'s PCM chunks as its frames become final."""
        assert self._decoders is not None
        req, dec = self._reqs[k], self._decoders[k]
        assert req.chunks is not None
        while True:
            pcm = dec.next_chunk()
            if pcm is not None:
                yield pcm
                continue
            if dec.done:
                return
            if req.future.done() and req.future.exception() is not None and req.chunks.empty():
                raise req.future.exception()  # (its message was taken by an earlier iteration)
            kind, payload = req.chunks.get()
            if kind == "error":
                raise payload
            if kind == "end":
                dec.end(payload)
            else:
                dec.push(payload)


@dataclass
class _Options:
    max_new_tokens: int | None
    min_new_tokens: int
    sampling: SamplingConfig
    seed: int | None


class BatchEngine:
    """Continuous batching of Dia generations over one loaded :class:`~dia_fast.DiaTTS` on one device.

    ``max_slots``: requests decoded together at most (a power of two; default :func:`default_max_slots`).
    ``max_queue``: requests waiting for a slot at most (a full queue raises :class:`EngineBusy`).
    ``cuda_graphs``: capture one CUDA graph per batch bucket at start (default: on CUDA). ``cpu_graphs``: on the
    CPU, record the first step of each batch bucket as a CPU graph and replay it (:mod:`dia_fast.ops.cpu_graph`;
    default: on; :attr:`cpu_graph_notes` says why a bucket steps eagerly). ``poll_every``:
    decode steps between reads of the slots' state (finished requests leave at those points).

    ``submit()`` is thread-safe and returns a :class:`RequestHandle`; ``await generate()`` and
    ``async for chunk in stream()`` are the asyncio forms. ``close()`` (or ``with``) stops the scheduler after
    failing what is still queued or running with :class:`EngineClosed`; ``drain=True`` waits for them instead.
    ``stats``: requests, steps, steps that ran more than one request, the largest batch.
    """

    def __init__(
        self,
        tts: DiaTTS,
        *,
        max_slots: int | None = None,
        max_queue: int = 64,
        cuda_graphs: bool | None = None,
        cpu_graphs: bool | None = None,
        poll_every: int = 4,
        chunk_frames: int = 43,
        first_chunk_frames: int | None = 16,
        crossfade_ms: float = 40.0,
        cpu_threads: int | None = None,
    ) -> None:
        self.tts = tts
        model = tts.model
        dev = model.device
        slots = check_int_option("max_slots", max_slots, minimum=1, optional=True)
        slots = default_max_slots(dev) if slots is None else slots
        if slots & (slots - 1):
            raise named(ValueError(f"max_slots must be a power of two >= 1, got {max_slots}"), "max_slots")
        max_queue = check_int_option("max_queue", max_queue, minimum=1)
        poll_every = check_int_option("poll_every", poll_every, minimum=1)
        cpu_threads = check_int_option("cpu_threads", cpu_threads, minimum=1, optional=True)
        check_stream_frames(chunk_frames, first_chunk_frames)
        self.cpu_threads: int | None = None  # the steps' intra-op threads on the CPU
        if dev.type == "cpu":
            # by default one of torch's threads is left to the callers, who decode audio (docs/serving.md)
            self.cpu_threads = max(1, torch.get_num_threads() - 1) if cpu_threads is None else cpu_threads
        data = tts.config.data
        self.max_slots, self.max_queue, self.poll_every = slots, max_queue, poll_every
        self.chunk_frames, self.first_chunk_frames = chunk_frames, first_chunk_frames
        self.crossfade_ms = check_crossfade_ms(crossfade_ms)
        self.stats = {
            "requests": 0,
            "finished": 0,
            "failed": 0,
            "steps": 0,
            "batched_steps": 0,
            "largest_batch": 0,
            "moves": 0,
        }
        self._sampler = default_sampler(dev)
        self._slots: SlotState = allocate_slots(model, slots, data.audio_length, data.text_length)
        self._views: dict[int, SlotState] = {}  # bucket -> views of the first slots (same memory)
        self._owner: list[_Request | None] = [None] * slots
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._drain = False
        self._error: BaseException | None = None
        self._waiters: concurrent.futures.ThreadPoolExecutor | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._use_graphs = dev.type == "cuda" and (cuda_graphs is None or bool(cuda_graphs))
        self._use_cpu_graphs = dev.type == "cpu" and (cpu_graphs is None or bool(cpu_graphs))
        self._cpu_steps: dict[int, CpuGraphStep] = {}  # bucket -> its step (eager, or replayed from a CPU graph)
        self._dispatch_generation = ops.dispatch_generation()
        # read-backs in flight (docs/serving.md): the last round's state, and codes on their way to their requests
        self._pool: PinnedPool = default_pool()
        self._overlap = overlaps_readback(dev)
        self._readback: _Readback | None = None
        self._deliveries: deque[_Delivery] = deque()
        if self._use_graphs:
            self._capture_all()
        # the scheduler holds the engine only while it has work: an engine dropped without close() is freed (its
        # caches with it) once idle, and the finalizer wakes the thread to end
        self._thread = threading.Thread(
            target=_schedule, args=(weakref.ref(self), self._cv), name="dia_fast-batch-engine", daemon=True
        )
        weakref.finalize(self, _wake, self._cv)
        self._thread.start()
        _ENGINES.add(self)

    # ------------------------------------------------------------------------------ public API
    def submit(
        self,
        text: str | Sequence[str],
        *,
        audio_prompt: Any = None,
        audio_prompt_text: str | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        cfg_scale: float = 3.0,
        temperature: float = 1.2,
        top_p: float = 0.95,
        cfg_filter_top_k: int | None = 45,
        do_sample: bool = True,
        seed: int | None = None,
        timeout: float | None = None,
        stream: bool = False,
        chunk_frames: int | None = None,
        first_chunk_frames: int | None = None,
        crossfade_ms: float | None = None,
    ) -> RequestHandle:
        """Queue one text; returns at once. Bad input raises here (in the caller), a full queue raises
        :class:`EngineBusy`. ``seed``: any int (None: drawn from torch's global generator); the request's codes
        depend on it and on its inputs only. ``timeout`` seconds from now (queueing included): the request then
        fails with ``TimeoutError``. ``stream=True``: the handle yields audio chunks as frames become final,
        ``chunk_frames`` codec frames each after a first of ``first_chunk_frames`` (default: the engine's).

        A text over one generation's budget runs as several pieces (:func:`dia_fast.longform.pieces`); a list of
        texts is spoken as the given pieces, in order, each within one generation (as ``Conversation`` splits
        with its own settings). Piece ``i`` draws with seed ``seed + i``; the pieces count once against
        ``max_queue`` and are joined with a ``crossfade_ms`` crossfade (default: the engine's)."""
        if isinstance(text, str):
            texts = None
        elif isinstance(text, Sequence) and text and all(isinstance(t, str) and t.strip() for t in text):
            texts = list(text)
        else:
            raise named(TypeError(f"text must be a str or a non-empty list of texts, got {text!r:.80}"), "text")
        opts = self._options(max_new_tokens, min_new_tokens, cfg_scale, temperature, top_p, cfg_filter_top_k,
                             do_sample, seed)  # fmt: skip
        if audio_prompt_text and audio_prompt is None:
            raise named(ValueError("audio_prompt_text was given without an audio_prompt"), "audio_prompt_text")
        if texts is not None and audio_prompt is not None:  # given pieces with the transcript: before the prompt
            for piece in texts:
                try:
                    check_prompted_text(piece, audio_prompt_text, self.tts.config.data.text_length)
                except ValueError as exc:
                    raise named(exc, "text") from None
        prompt = None if audio_prompt is None else self.tts.encode_prompt(audio_prompt)
        if timeout is not None and not timeout > 0:
            raise named(ValueError(f"timeout must be > 0 seconds, got {timeout}"), "timeout")
        chunk = self.chunk_frames if chunk_frames is None else chunk_frames
        first = self.first_chunk_frames if first_chunk_frames is None else first_chunk_frames
        check_stream_frames(chunk, first)
        try:
            fade = check_crossfade_ms(self.crossfade_ms if crossfade_ms is None else crossfade_ms)
        except (TypeError, ValueError) as exc:
            raise named(exc, "crossfade_ms") from None
        data = self.tts.config.data
        P0 = 1 + (0 if prompt is None else int(prompt.shape[0]))
        max_new = self.check_lengths(P0 - 1, opts.max_new_tokens, opts.min_new_tokens)
        transcript = audio_prompt_text if prompt is not None else None
        try:
            pieces = self._pieces(text, transcript, P0 - 1) if texts is None else texts
        except (TypeError, ValueError) as exc:
            raise named(exc, "audio_prompt" if isinstance(exc, PromptTooLong) else "text") from None
        base_seed = int(torch.randint(0, 2**62, (1,)).item()) if opts.seed is None else opts.seed
        now = time.monotonic()
        reqs: list[_Request] = []
        for i, piece in enumerate(pieces):
            try:
                ids, mask = encode_batch([prompted_text(piece, transcript)], data.text_length)
            except (TypeError, ValueError) as exc:
                raise named(exc, "text") from None
            rid = next(self._ids)
            reqs.append(
                _Request(
                    id=rid,
                    group=reqs[0].id if reqs else rid,
                    text_ids=ids,
                    text_mask=mask,
                    prompt=prompt,
                    max_new_tokens=max_new,
                    min_new_tokens=opts.min_new_tokens,
                    sampling=opts.sampling,
                    seed=ops.seed_from_int(base_seed + i),
                    deadline=None if timeout is None else now + timeout,
                    submitted=now,
                    chunks=queue.Queue() if stream else None,
                )
            )
        decoders = [self._chunked_decoder(chunk, first) for _ in reqs] if stream else None
        with self._cv:
            if self._error is not None:
                raise EngineFailed(f"the engine failed: {self._error!r}") from self._error
            if self._closing:
                raise EngineClosed("the engine is closed")
            if self._waiting(extra=reqs) > self.max_queue:
                waiting = self._waiting(extra=[])
                raise EngineBusy(f"the queue is full ({waiting} of {self.max_queue} waiting): try again later")
            self._queue.extend(reqs)
            self.stats["requests"] += 1
            self._cv.notify()
        return RequestHandle(self, reqs, decoders, fade)

    def check_lengths(self, prompt_frames: int, max_new_tokens: int | None, min_new_tokens: int) -> int:
        """The decode steps a request may take after a voice prompt of ``prompt_frames`` frames
        (:func:`~dia_fast.generation.generate.check_step_budget`: an error naming the option when out of range)."""
        return check_step_budget(self.tts.config.data, prompt_frames, max_new_tokens, min_new_tokens)

    def _pieces(self, text: str, transcript: str | None, prompt_frames: int) -> list[str]:
        """The generations a text takes (:func:`dia_fast.longform.pieces`: itself unless it does not fit one)."""
        from ..longform import pieces

        return pieces(self.tts, text, prompt_text=transcript, prompt_frames=prompt_frames)

    async def _submit_async(self, text: str | Sequence[str], **options: Any) -> RequestHandle:
        """:meth:`submit` in a worker thread (it may encode an audio prompt and split a long text: not on the event
        loop); a request whose awaiting task is cancelled meanwhile is cancelled once it is queued."""
        submitted = asyncio.get_running_loop().run_in_executor(None, functools.partial(self.submit, text, **options))
        try:
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
            raise

    async def generate(self, text: str | Sequence[str], **options: Any) -> EngineResult:
        """``await`` one request (keywords of :meth:`submit`); cancelling the awaiting task cancels it."""
        return await (await self._submit_async(text, **options)).result_async()

    async def stream(self, text: str | Sequence[str], **options: Any) -> AsyncIterator[np.ndarray]:
        """``async for chunk in engine.stream(text, ...)``: PCM chunks as frames become final (each waited for and
        decoded in a thread of the engine's own, so open streams never hold the event loop's default executor);
        leaving the loop early cancels the request."""
        handle = await self._submit_async(text, stream=True, **options)
        it = iter(handle)
        done = object()
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    waiting = loop.run_in_executor(self._stream_waiters(), next, it, done)
                except RuntimeError:  # the engine was closed (its threads with it): the end or error comes at once
                    waiting = asyncio.ensure_future(asyncio.to_thread(next, it, done))
                chunk = await waiting
                if chunk is done:
                    return
                yield chunk
        finally:
            handle.cancel()

    def _stream_waiters(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads that wait for :meth:`stream`'s chunks (one per open stream at most; made when first used)."""
        with self._cv:
            if self._closing:  # (close() shuts the pool down: one made now would be left running)
                raise RuntimeError("the engine is closed")
            if self._waiters is None:
                self._waiters = concurrent.futures.ThreadPoolExecutor(
                    self.max_slots + self.max_queue, thread_name_prefix="dia_fast-stream"
                )
            return self._waiters

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the scheduler. ``drain=True``: let queued and running requests finish first (new ones are
        refused); else they fail with :class:`EngineClosed`."""
        with self._cv:
            self._closing = True
            self._drain = drain
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._cv:
            waiters = self._waiters
        if waiters is not None:  # (their streams got their end or error: the threads are free or freeing)
            waiters.shutdown(wait=False)

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the scheduler (None while it runs, and after a plain close)."""
        return self._error

    @property
    def running(self) -> bool:
        """Whether the scheduler runs and takes requests (False once closing, closed or stopped by an error)."""
        return self._thread.is_alive() and not self._closing and self._error is None

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self._owner)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (a long text's waiting pieces count once)."""
        return len({req.group for req in list(self._queue)})

    def _waiting(self, extra: list[_Request]) -> int:
        """Requests that would still wait for a slot with ``extra`` queued too, once the scheduler has moved the
        queue's first pieces into the slots free now (first come first served): the count ``max_queue`` bounds."""
        free = self.max_slots - self.busy_slots
        return len({req.group for req in [*self._queue, *extra][free:]})

    # ------------------------------------------------------------------------------ caller-side helpers
    def _options(
        self,
        max_new_tokens: int | None,
        min_new_tokens: int,
        cfg_scale: float,
        temperature: float,
        top_p: float,
        cfg_filter_top_k: int | None,
        do_sample: bool,
        seed: int | None,
    ) -> _Options:
        # cfg_scale 0 makes the guided logits the conditional ones: the engine runs both rows all the same
        sampling = SamplingConfig(cfg_scale, temperature, top_p, cfg_filter_top_k, do_sample)
        return _Options(
            check_int_option("max_new_tokens", max_new_tokens, minimum=1, optional=True),
            check_int_option("min_new_tokens", min_new_tokens, minimum=0),
            sampling,
            check_int_option("seed", seed, optional=True),
        )

    def _chunked_decoder(self, chunk_frames: int, first_chunk_frames: int | None) -> ChunkedDecoder:
        left, right = codec_context_frames(self.tts.codec, self.tts.device)
        return ChunkedDecoder(
            self.tts,
            chunk_frames=chunk_frames,
            first_chunk_frames=first_chunk_frames,
            left_context_frames=left,
            lookahead_frames=right,
            stats=StreamStats(),
            start_time=time.perf_counter(),
        )

    def _cancel(self, req: _Request) -> bool:
        with self._cv:
            if req.future.done():
                return False
            req.cancelled = True
            if req in self._queue:
                self._queue.remove(req)
                self._settle(req, exc=RequestCancelled(f"request {req.id} was cancelled"))
            self._cv.notify()
            return True

    # ------------------------------------------------------------------------------ scheduler
    def _capture_all(self) -> None:
        """Warm up and capture one CUDA graph per bucket on the empty state (no slot is live: the warm-up steps
        change nothing that a request will read)."""
        model, dev = self.tts.model, self.tts.model.device
        with torch.inference_mode():
            n = 1
            while n <= self.max_slots:
                view = self._slots.view(n)
                self._graphs[n] = capture_cuda_graph(dev, lambda v=view: slot_step(model, v, self._sampler), 2)
                n *= 2

    def _idle(self) -> bool:
        return not self._queue and not any(self._owner) and self._readback is None and not self._deliveries

    def _should_stop(self) -> bool:
        """Closing, and (unless draining) nothing left to finish (call holding ``_cv``)."""
        return self._closing and (not self._drain or self._idle())

    def _work(self) -> None:
        """One round of the scheduler: expire and admit requests, queue ``poll_every`` steps of the live slots'
        bucket and the read-back of their state, then handle the previous round's read-back (finished requests
        leave, streams get their frames) while this round runs: the host never waits for the work it has just
        queued, so the device is not idle while the host does the round's bookkeeping."""
        self._expire()
        self._admit()
        live = [s for s, r in enumerate(self._owner) if r is not None]
        readback = None
        if live:
            n = bucket_batch(max(live) + 1)
            view = self._views.get(n) or self._views.setdefault(n, self._slots.view(n))
            if self._graphs and self._dispatch_generation != ops.dispatch_generation():
                # ops.set_backend since the capture: the graphs would call the old kernels, and a new capture's
                # warm-up would step the live slots: the engine steps eagerly from here on
                log.warning("the op backends changed: this engine's CUDA graphs are dropped (eager steps)")
                self._graphs.clear()
            for _ in range(self.poll_every):
                if n in self._graphs:
                    self._graphs[n].replay()
                else:
                    self._step(n, view)
            self._count_steps(live)
            readback = self._read_state(n)
        if not self._overlap:  # synchronous copies: this round's own state, at once
            if readback is not None:
                self._collect(readback)
            self._deliver()
            self._compact()
            return
        # tracked before anything below can raise, so that _fail_all finds it (and releases its buffer once)
        previous, self._readback = self._readback, readback
        try:
            self._deliver()  # codes copied while this round was queued (ready once the previous round is done)
        except BaseException:
            if previous is not None:  # its requests are still running ones: _fail_all settles them
                previous.buf.release()
            raise
        if previous is not None:
            self._collect(previous)  # (releases its buffer, whatever happens)
        if readback is None:
            self._deliver()  # nothing runs: what the last read-back finished is handed over now
        self._compact()

    def _step(self, n: int, view: SlotState) -> None:
        """One step of bucket ``n`` on the CPU or MPS, or on CUDA once its graphs were dropped; on the CPU its first
        one records a CPU graph that the later ones replay (a bucket whose step cannot be recorded steps eagerly:
        :attr:`cpu_graph_notes`)."""
        if self._dispatch_generation != ops.dispatch_generation():  # ops.set_backend: the graphs call old kernels
            self._dispatch_generation = ops.dispatch_generation()
            self._cpu_steps.clear()
        step = self._cpu_steps.get(n)
        if step is None:
            model, sampler = self.tts.model, self._sampler
            step = CpuGraphStep(lambda: slot_step(model, view, sampler), enabled=self._use_cpu_graphs)
            self._cpu_steps[n] = step
        step()

    @property
    def cpu_graph_notes(self) -> dict[int, str]:
        """Batch bucket -> why its steps run eagerly ("off", or the op that stopped its capture); buckets that replay
        a CPU graph, or have not stepped yet, are not listed."""
        return {n: step.note for n, step in list(self._cpu_steps.items()) if step.graph is None and step.note}

    @property
    def cpu_graphed_buckets(self) -> list[int]:
        """The batch buckets whose steps replay a CPU graph."""
        return sorted(n for n, step in list(self._cpu_steps.items()) if step.graph is not None)

    def _count_steps(self, live: list[int]) -> None:
        st = self.stats
        st["steps"] += self.poll_every
        if len(live) > 1:
            st["batched_steps"] += self.poll_every
        st["largest_batch"] = max(st["largest_batch"], len(live))
        for s in live:
            req = self._owner[s]
            if req is not None:
                req.steps += self.poll_every
                req.batch_peak = max(req.batch_peak, len(live))

    def _expire(self) -> None:
        """Cancelled and timed-out requests leave (their slots are freed)."""
        now = time.monotonic()
        with self._cv:
            for req in list(self._queue):
                if req.deadline is not None and now > req.deadline:
                    self._queue.remove(req)
                    self._settle(req, exc=TimeoutError(f"request {req.id} timed out while queued"))
        for s, req in enumerate(self._owner):
            if req is None:
                continue
            if req.cancelled:
                self._free(s)
                self._settle(req, exc=RequestCancelled(f"request {req.id} was cancelled"))
            elif req.deadline is not None and now > req.deadline:
                self._free(s)
                self._settle(req, exc=TimeoutError(f"request {req.id} timed out after {req.steps} decode steps"))

    def _admit(self) -> None:
        """Queued requests into free slots, first come first served (lowest slots first)."""
        model = self.tts.model
        for s in range(self.max_slots):
            if self._owner[s] is not None:
                continue
            with self._cv:
                if not self._queue:
                    return
                req = self._queue.popleft()
            t0 = time.monotonic()
            try:
                req.prefix = admit(
                    model,
                    self._slots,
                    s,
                    req.text_ids,
                    req.text_mask,
                    req.prompt,
                    req.max_new_tokens,
                    req.min_new_tokens,
                    req.sampling,
                    req.seed,
                )
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._slots.active[s] = False
                self._settle(req, exc=exc)
                continue
            req.slot, req.sent, req.admitted = s, req.prefix, t0
            req.prefill_s = time.monotonic() - t0
            self._owner[s] = req

    def _compact(self) -> None:
        """With nothing queued, move the requests in the highest slots into free lower ones when that lets the
        running batch step in a smaller bucket."""
        live = [s for s, r in enumerate(self._owner) if r is not None]
        if not live or self._queue:
            return
        target = bucket_batch(len(live))
        if bucket_batch(max(live) + 1) <= target:
            return
        free = [s for s in range(target) if self._owner[s] is None]
        for src in (s for s in live if s >= target):
            dst = free.pop(0)
            req = self._owner[src]
            assert req is not None
            # its position is at most prefix + steps (one per step at most): its cache is written below that + 1
            self._slots.move(src, dst, req.prefix + req.steps + 1)
            self._owner[dst], self._owner[src], req.slot = req, None, dst
            self.stats["moves"] += 1

    def _read_state(self, n: int) -> _Readback:
        """Queue the copy of the first ``n`` slots' positions, finished flags and EOS positions to the host (on CUDA
        a non-blocking copy into pinned memory: no host sync)."""
        sl = self._slots
        state = torch.stack([sl.pos[:n], sl.finished[:n].long(), sl.eos_pos[:n]])
        owners = list(self._owner[:n])
        steps = [r.steps if r is not None else 0 for r in owners]
        peaks = [r.batch_peak if r is not None else 0 for r in owners]
        return _Readback(self._pool.copy_to_host(state), owners, steps, peaks)

    def _collect(self, rb: _Readback) -> None:
        """A round's read-back (waited for one round later: the device has the next round queued meanwhile): the
        finished requests leave their slots, and the copy of their codes and of the streams' newly final positions
        is queued (handed over by :meth:`_deliver`)."""
        try:
            pos, finished, eos = rb.buf.wait().tolist()
        finally:
            rb.buf.release()
        md = self.tts.config.data.max_delay
        items: list[tuple[_Request, int, str, int, int, int]] = []
        for s, req in enumerate(rb.owners):
            if req is None or req.slot < 0:  # it left since (finished, cancelled, timed out)
                continue
            # positions below pos[s] are written (pos[s] too once finished): streams get [sent, end); a request
            # moved to a lower slot since has the same state there, and its codes are read from where it is now
            end = pos[s] + 1 if finished[s] else pos[s]
            if req.chunks is not None and end > req.sent:
                items.append((req, req.slot, "codes", req.sent, end, -1))
                req.sent = end
            if finished[s]:
                items.append((req, req.slot, "result", req.prefix, max(eos[s], req.prefix) + md, eos[s]))
                req.steps, req.batch_peak = rb.steps[s], rb.peaks[s]  # not the round it ran on after finishing
        if not items:
            return
        lo, hi = min(i[3] for i in items), min(max(i[4] for i in items), self._slots.out.shape[1])
        block = self._slots.out[: max(i[1] for i in items) + 1, lo:hi]
        if block.device.type == "cuda":  # the pool copies on its own stream: a copy that a later admit cannot overwrite
            block = block.clone()
        self._deliveries.append(_Delivery(self._pool.copy_to_host(block), lo, items))
        # only now do the finished requests leave their slots: until their codes are on their way, a failure above
        # still finds them among the running requests (_fail_all settles them)
        for _req, slot, kind, *_ in items:
            if kind == "result":
                self._free(slot)

    def _deliver(self) -> None:
        """Hand the copied codes over: stream frames, and the results of the finished requests (with the end of their
        stream after the result, so that a stream that has ended can take it at once)."""
        while self._deliveries:
            d = self._deliveries[0]  # left queued until handed over: a failure meanwhile still finds its requests
            host = d.buf.wait()
            for req, s, kind, start, end, eos in d.items:
                row = host[s, start - d.lo : end - d.lo]
                if kind == "codes":
                    req.chunks.put(("codes", row.clone()))  # (the pooled buffer is reused)
                    continue
                codes = undelayed_codes(self.tts.model, row, eos - start, 0)
                stats = {
                    "queued_s": req.admitted - req.submitted,
                    "prefill_s": req.prefill_s,
                    "decode_s": time.monotonic() - req.admitted - req.prefill_s,
                    "steps": float(req.steps),
                    "batch_peak": float(req.batch_peak),
                    "frames": float(codes.shape[0]),
                    "prefix_length": float(req.prefix),
                    "eos_position": float(eos),
                }
                self.stats["finished"] += 1
                limit = last_eos_position(req.prefix + req.max_new_tokens, self.tts.config.data.max_delay)
                result = EngineResult(codes, np.zeros(0, np.float32), self.tts.sample_rate, stats, eos >= limit)
                self._settle(req, result=result)
                if req.chunks is not None:  # after the result: a stream that has ended can take it at once
                    req.chunks.put(("end", max(eos - req.prefix, 0)))
            self._deliveries.popleft()
            d.buf.release()

    def _free(self, s: int) -> None:
        req = self._owner[s]
        if req is not None:
            req.slot = -1
        self._slots.active[s] = False
        self._owner[s] = None

    def _settle(self, req: _Request, *, result: EngineResult | None = None, exc: BaseException | None = None) -> None:
        if req.future.done():
            return
        # the future first, then the stream's message: a stream that has ended can take the result at once
        if exc is not None:
            self.stats["failed"] += 1
            req.future.set_exception(exc)
            if req.chunks is not None:
                req.chunks.put(("error", exc))
        else:
            req.future.set_result(result)

    def _fail_all(self, error: BaseException | None) -> None:
        exc = EngineClosed("the engine was closed") if error is None else EngineFailed(f"the engine failed: {error!r}")
        exc.__cause__ = error
        with self._cv:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
        if error is None and self._overlap:  # closed, not broken: what is already final is handed over, not failed
            try:
                previous, self._readback = self._readback, None
                if previous is not None:
                    self._collect(previous)
                self._deliver()
            except Exception as late:  # noqa: BLE001 - the rest fails below, as it would have
                log.warning("handing over final results at close failed: %r", late)
        for s, req in enumerate(self._owner):
            if req is not None:
                self._owner[s] = None
                pending.append(req)
        # finished on the device, their codes not handed over yet
        pending += [item[0] for d in self._deliveries for item in d.items if item[2] == "result"]
        for buf in [d.buf for d in self._deliveries] + ([self._readback.buf] if self._readback else []):
            if not buf.released:  # (the pool keeps a block until its copy is done)
                buf.release()
        self._deliveries.clear()
        self._readback = None
        for req in pending:
            self._settle(req, exc=exc)

    def __repr__(self) -> str:
        return f"BatchEngine({self.tts!r}, max_slots={self.max_slots}, busy={self.busy_slots}, queued={self.queued})"
