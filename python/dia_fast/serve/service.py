"""The speech service behind the HTTP routes: one loaded model, its continuous-batching engine, the stored voices
and the metrics. It turns a checked :class:`SpeechRequest` into engine requests and audio bytes (whole or as a
stream), independent of the web framework."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..serving import BatchEngine, EngineBusy, EngineClosed, EngineFailed, RequestCancelled, RequestHandle
from .audio_out import FORMATS, MAX_SPEED, MIN_SPEED, AudioPipeline, output_rate
from .metrics import ServerMetrics
from .settings import ServerSettings
from .voices import VoiceError, VoiceStore, resolve_voice

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["ApiError", "SpeechRequest", "SpeechService", "load_tts", "metric_labels"]

log = logging.getLogger("dia_fast.serve")

# names OpenAI clients send (every id of openai's SpeechModel, as of openai 3.57), then Dia's; each means the one
# model this server runs
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15", "dia", "dia-1.6b")
_INT32_MAX = 2**31 - 1  # the bound of the integer options that count steps or tokens
# the engine's names for the request's fields, where they differ
_ENGINE_PARAMS = {"text": "input", "audio_prompt": "voice", "audio_prompt_text": "voice"}


_STATUS_KIND = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``. The
    ``type`` (``kind``) follows the status unless given: ``authentication_error`` (401), ``not_found_error`` (404),
    ``rate_limit_error`` (429), ``server_error`` (5xx), else ``invalid_request_error``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if kind is None:
            kind = _STATUS_KIND.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's fields, then Dia's."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: str | VoiceRef
    response_format: str = "mp3"
    # numbers are strict: "2", true or 2.5 for an integer are errors, not converted (an int is a float)
    speed: float = Field(1.0, allow_inf_nan=False, strict=True)
    stream_format: Literal["audio", "sse"] | None = None
    instructions: str | None = None
    # Dia's options
    sample_rate: int | None = Field(None, strict=True)
    seed: int | None = Field(None, strict=True)
    temperature: float = Field(1.2, ge=0.0, allow_inf_nan=False, strict=True)  # 0 = greedy
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    cfg_scale: float = Field(3.0, ge=0.0, allow_inf_nan=False, strict=True)
    # null = no CFG filter; a k at or above the vocabulary size (1028 for Dia) acts as that size (every token kept)
    cfg_filter_top_k: int | None = Field(45, ge=1, le=_INT32_MAX, strict=True)
    max_new_tokens: int | None = Field(None, ge=1, le=_INT32_MAX, strict=True)
    min_new_tokens: int = Field(0, ge=0, le=_INT32_MAX, strict=True)


def metric_labels(body: dict[str, Any]) -> tuple[str, str]:
    """The ``format`` and ``stream`` labels of a speech request's JSON body: its values where they are valid (the
    defaults where absent), else ``"invalid"`` (a client's strings never become label values)."""
    fmt = body.get("response_format", "mp3")
    stream = body.get("stream_format")
    fmt_label = fmt if isinstance(fmt, str) and fmt in FORMATS else "invalid"
    stream_label = "none" if stream is None else stream if stream in ("audio", "sse") else "invalid"
    return fmt_label, stream_label


@dataclass
class _Job:
    handle: RequestHandle
    pipeline: AudioPipeline
    started: float
    stream: str
    input_bytes: int


def engine_failed() -> ApiError:
    """The answer while the batching engine is stopped by an error (logged once, with its traceback, by the engine)."""
    return ApiError(500, "the speech engine failed (see the server log)", code="internal_error")


def _param(exc: BaseException) -> str | None:
    """The request field an engine or sampling error names (its ``param`` attribute), in the request's terms."""
    param = getattr(exc, "param", None)
    return _ENGINE_PARAMS.get(param, param) if isinstance(param, str) else None


def load_tts(settings: ServerSettings) -> DiaTTS:
    """The model the settings name (the random tiny demo model without ``model``)."""
    from ..api import DiaTTS

    kw = dict(device=settings.device, dtype=settings.dtype, codec=settings.codec, quantize=settings.quantize)
    if settings.model is None:
        return DiaTTS.random("tiny", seed=settings.demo_seed, **kw)
    return DiaTTS.from_pretrained(settings.model, **kw)


def _cancel_submitted(future: asyncio.Future) -> None:
    """Cancel the request of a submission whose caller was cancelled while it ran (nothing to do if it failed)."""
    if not future.cancelled() and future.exception() is None:
        future.result().handle.cancel()


class SpeechService:
    """Serves speech requests on one model (see the module doc). ``close(drain=True)`` lets running requests end."""

    def __init__(self, tts: DiaTTS, settings: ServerSettings) -> None:
        self.tts, self.settings = tts, settings
        self.engine = BatchEngine(
            tts,
            max_slots=settings.max_batch,
            max_queue=settings.max_queue,
            chunk_frames=settings.chunk_frames,
            first_chunk_frames=settings.first_chunk_frames,
        )
        self.voices = VoiceStore(settings.voices_dir, tts)
        self.metrics = ServerMetrics()
        self.metrics.engine = self.engine
        # threads that wait for a stream's next chunk and decode and encode it (they mostly wait): one per
        # request that can be in the engine, so that waiting streams never hold up the others
        self.workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.engine.max_slots + settings.max_queue + 4, thread_name_prefix="dia_fast-serve"
        )
        self.model_id = settings.served_model_id
        self.created = int(time.time())
        self.stopping = False
        self._stop_timer: threading.Timer | None = None

    def begin_shutdown(self, fail_after_s: float | None) -> None:
        """The server has stopped taking connections (:mod:`dia_fast.serve.graceful`): ``/health`` says "stopping",
        and requests that still run ``fail_after_s`` seconds from now fail with :class:`EngineClosed` (answered 503,
        an SSE ``error`` event, a cut stream with a log line), before the server's own limit would cancel them
        without an answer. None: they may run until they end."""
        self.stopping = True
        if fail_after_s is not None and self._stop_timer is None:
            self._stop_timer = threading.Timer(fail_after_s, self.engine.close)
            self._stop_timer.daemon = True
            self._stop_timer.start()

    def close(self, *, drain: bool = True) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.engine.close(drain=drain, timeout=self.settings.shutdown_timeout_s)
        self.workers.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def _count_task_cancel(self, req: SpeechRequest, stream: str = "none") -> None:
        """Count a request whose task was cancelled (the client left, under Ray Serve; uvicorn lets the task run and
        :meth:`speech` sees the disconnect instead) as that cancel: no error answer follows."""
        self.metrics.cancelled.inc()
        self.count_error(ApiError(499, "the request was cancelled", code="cancelled"), req.response_format, stream)

    async def _submit_job(self, req: SpeechRequest) -> _Job:
        """:meth:`_submit` in a worker thread. If this task is cancelled meanwhile (a client that left, under Ray
        Serve), the submission still completes in its thread: its request is then cancelled, not left running in a
        slot with nobody to take its audio."""
        future = asyncio.get_running_loop().run_in_executor(self.workers, self._submit, req)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_cancel_submitted)
            raise

    # ------------------------------------------------------------------------------ requests
    def model_card(self) -> dict[str, Any]:
        card = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "dia_fast",
            "demo": self.settings.demo,
            "sample_rate": self.tts.sample_rate,
            "aliases": list(MODEL_ALIASES),
        }
        if self.settings.demo:
            card["description"] = "random-weight tiny demo model: the pipeline runs, the audio is not speech"
        return card

    def _submit(self, req: SpeechRequest) -> _Job:
        s = self.settings
        if req.model != self.model_id and req.model not in MODEL_ALIASES:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; this server runs {self.model_id!r} "
                f"(or use one of {', '.join(MODEL_ALIASES)})",
                param="model",
                code="model_not_found",
            )
        text = req.input
        if not text.strip():
            raise ApiError(400, "input is empty: give some text to speak", param="input")
        try:
            input_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"): valid JSON, not text
            raise ApiError(
                400, f"input is not valid Unicode text: {exc.reason} at character {exc.start}", param="input"
            ) from None
        if len(text) > s.max_input_chars:
            raise ApiError(
                400,
                f"input is {len(text)} characters, over this server's limit of {s.max_input_chars}",
                param="input",
                code="string_above_max_length",
            )
        if req.instructions:
            raise ApiError(
                400,
                "instructions are not supported by Dia: choose a voice (S1, S2, dialogue or a stored "
                "voice) and write speaker tags and (laughs)-style cues into the input",
                param="instructions",
            )
        fmt = req.response_format
        if fmt not in FORMATS:
            raise ApiError(
                400, f"unsupported response_format {fmt!r}; supported: {', '.join(FORMATS)}", param="response_format"
            )
        if not MIN_SPEED <= req.speed <= MAX_SPEED:
            raise ApiError(400, f"speed must be from {MIN_SPEED} to {MAX_SPEED}, got {req.speed}", param="speed")
        try:
            rate = output_rate(fmt, self.tts.sample_rate, req.sample_rate)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="sample_rate") from None
        voice = req.voice.id if isinstance(req.voice, VoiceRef) else req.voice
        try:
            spoken = resolve_voice(voice, text, self.voices)
        except VoiceError as exc:
            raise ApiError(
                exc.status,
                str(exc),
                param="voice",
                code=exc.code,
            ) from None
        options = dict(
            cfg_scale=req.cfg_scale,
            temperature=req.temperature if req.temperature > 0 else 1.0,
            do_sample=req.temperature > 0,
            top_p=req.top_p,
            cfg_filter_top_k=req.cfg_filter_top_k,
            max_new_tokens=req.max_new_tokens,
            min_new_tokens=req.min_new_tokens,
            seed=req.seed,
            timeout=s.request_timeout_s,
        )
        streaming = req.stream_format is not None
        # the encoder first: nothing is submitted that could not be answered
        pipeline = AudioPipeline(fmt, self.tts.sample_rate, rate, speed=req.speed, streaming=streaming)
        try:
            handle = self.engine.submit(**spoken, **options, stream=streaming)
        except EngineBusy as exc:
            raise ApiError(
                429,
                f"the server is busy: {exc}",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self._retry_after())},
            ) from None
        except EngineFailed:
            raise engine_failed() from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", code="unavailable") from None
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), param=_param(exc), code="invalid_value") from None
        return _Job(handle, pipeline, time.perf_counter(), req.stream_format or "none", input_bytes)

    def _retry_after(self) -> int:
        """Seconds a client should wait after a 429: about one request's decode (at least 1)."""
        return 1 if self.engine.busy_slots == 0 else 2

    async def speech(self, req: SpeechRequest, is_disconnected: Callable[[], Awaitable[bool]]) -> bytes:
        """The whole audio file of one request. Cancels it when the client leaves while it runs."""
        try:
            job = await self._submit_job(req)
        except asyncio.CancelledError:
            self._count_task_cancel(req)
            raise
        handle = job.handle
        waiting = asyncio.ensure_future(handle.result_async(decode_audio=False))
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.25)
                if not waiting.done() and await is_disconnected():
                    self.metrics.cancelled.inc()
                    raise RequestCancelled("the client left")
            result = waiting.result()
            audio = await self._run(lambda: handle.result(0).audio)
            data = await self._run(lambda: job.pipeline.feed(audio) + job.pipeline.finish())
        except asyncio.CancelledError:
            # the client left and the server cancelled this task (as Ray Serve's replicas do; uvicorn lets it run,
            # and is_disconnected above counts the cancel): counted as that one, since no error answer follows
            handle.cancel()
            waiting.cancel()
            self._count_task_cancel(req)
            raise
        except Exception as exc:
            handle.cancel()
            waiting.cancel()
            raise self._api_error(exc) from None
        self.metrics.add_frames(result.codes.shape[0])
        elapsed = time.perf_counter() - job.started
        self.metrics.latency.labels("none").observe(elapsed)
        self.metrics.ttfa.labels("none").observe(elapsed)
        self.metrics.requests.labels(req.response_format, "none", "200").inc()
        return data

    async def open_stream(self, req: SpeechRequest) -> tuple[_Job, AsyncIterator[bytes]]:
        """Submit a streamed request (errors before any audio raise :class:`ApiError`) and return its body."""
        try:
            job = await self._submit_job(req)
        except asyncio.CancelledError:
            self._count_task_cancel(req, req.stream_format or "none")
            raise
        body = self._sse(job, req) if req.stream_format == "sse" else self._audio(job, req)
        return job, body

    def _next_bytes(self, it: Any, pipeline: AudioPipeline) -> bytes | None:
        """Wait for the next chunk of PCM, encode it; None at the end (then the encoder's tail follows)."""
        pcm = next(it, None)
        return None if pcm is None else pipeline.feed(pcm)

    async def _chunks(self, job: _Job, req: SpeechRequest) -> AsyncIterator[bytes]:
        it = iter(job.handle)
        first = True
        try:
            while True:
                data = await self._run(self._next_bytes, it, job.pipeline)
                if data is None:
                    break
                if data:
                    if first:
                        self.metrics.ttfa.labels(job.stream).observe(time.perf_counter() - job.started)
                        first = False
                    yield data
            tail = await self._run(job.pipeline.finish)
            if tail:
                if first:  # all of a short output's bytes can come from the encoder's tail
                    self.metrics.ttfa.labels(job.stream).observe(time.perf_counter() - job.started)
                yield tail
            result = job.handle.result(0, decode_audio=False)
            self.metrics.add_frames(result.codes.shape[0])
            self.metrics.latency.labels(job.stream).observe(time.perf_counter() - job.started)
            self.metrics.requests.labels(req.response_format, job.stream, "200").inc()
        except (asyncio.CancelledError, GeneratorExit):  # the client left: counted as whole-file cancels are
            self.metrics.cancelled.inc()
            left = ApiError(499, "the request was cancelled", code="cancelled")
            self.count_error(left, req.response_format, job.stream)
            raise
        finally:
            job.handle.cancel()

    async def _audio(self, job: _Job, req: SpeechRequest) -> AsyncIterator[bytes]:
        try:
            async with aclosing(self._chunks(job, req)) as chunks:
                async for data in chunks:
                    yield data
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent: the stream ends early, the log says why
            err = self._api_error(exc)
            self.count_error(err, req.response_format, job.stream)
            log.warning("stream of request %s ended early: %s", job.handle.id, err.message)

    async def _sse(self, job: _Job, req: SpeechRequest) -> AsyncIterator[bytes]:
        frames = 0
        try:
            async with aclosing(self._chunks(job, req)) as chunks:
                async for data in chunks:
                    event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                    yield f"data: {json.dumps(event)}\n\n".encode()
            frames = int(job.handle.result(0, decode_audio=False).codes.shape[0])
            usage = {"input_tokens": job.input_bytes, "output_tokens": frames, "total_tokens": job.input_bytes + frames}
            yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - reported as an SSE error event
            err = self._api_error(exc)
            self.count_error(err, req.response_format, job.stream)
            yield f"data: {json.dumps({'type': 'error', **err.body()})}\n\n".encode()

    def _api_error(self, exc: BaseException) -> ApiError:
        """The ApiError a failure answers with (counted by kind; unexpected ones are logged with their traceback
        and answered without it)."""
        if isinstance(exc, ApiError):
            err = exc
        elif isinstance(exc, RequestCancelled | asyncio.CancelledError):
            err = ApiError(499, "the request was cancelled", code="cancelled")
        elif isinstance(exc, TimeoutError):
            err = ApiError(
                504,
                f"the request took longer than {self.settings.request_timeout_s:g} s",
                code="timeout",
            )
        elif isinstance(exc, EngineFailed):
            err = engine_failed()
        elif isinstance(exc, EngineClosed):
            err = ApiError(503, "the server is shutting down", code="unavailable")
        elif isinstance(exc, ValueError):
            err = ApiError(422, str(exc), param=_param(exc), code="unprocessable")
        else:
            log.error("request failed", exc_info=(type(exc), exc, exc.__traceback__))
            err = ApiError(
                500,
                "internal error while generating speech (see the server log)",
                code="internal_error",
            )
        return err

    def count_error(self, err: ApiError, fmt: str = "-", stream: str = "-", *, request: bool = True) -> None:
        """Count a failure (every error answer and every stream that ended early) by kind and, for a speech request
        (``request``), among the requests by format and stream (:func:`metric_labels`; ``"-"``: its body was not
        read or not a JSON object) and status."""
        self.metrics.errors.labels(err.code or f"http_{err.status}").inc()
        if request:
            self.metrics.requests.labels(fmt, stream, str(err.status)).inc()

    def health(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "status": "stopping" if self.stopping else "ok" if engine.running else "unavailable",
            "model": self.model_id,
            "demo": self.settings.demo,
            "device": str(self.tts.device),
            "max_slots": engine.max_slots,
            "busy_slots": engine.busy_slots,
            "queued": engine.queued,
            "pid": os.getpid(),  # which process (a Ray Serve replica) answered
        }
