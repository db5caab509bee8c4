"""The HTTP API (FastAPI): OpenAI's ``POST /v1/audio/speech`` with streaming, stored voices, models, health and
Prometheus metrics, API-key auth, body limits and OpenAI-style errors. :func:`create_app` builds it; uvicorn
(``python -m dia_fast.serve``) or Ray Serve (:mod:`dia_fast.serve.ray_app`) runs it."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from .._version import __version__
from .audio_out import FORMATS
from .metrics import CONTENT_TYPE_LATEST
from .service import (
    MODEL_ALIASES,
    ApiError,
    SpeechRequest,
    SpeechService,
    VoiceRef,
    engine_failed,
    load_tts,
    metric_labels,
)
from .settings import ServerSettings
from .voices import BUILTIN_VOICES, VoiceError, builtin_voice_json

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["create_app"]

log = logging.getLogger("dia_fast.serve")


def _answer(scope: Scope, err: ApiError) -> JSONResponse:
    """The JSON answer of an error, counted: every one by kind, a speech request's also among the requests (with
    its body's format and stream once it was read, else ``-``)."""
    service: SpeechService | None = getattr(getattr(scope.get("app"), "state", None), "service", None)
    if service is not None:
        speech = scope.get("method") == "POST" and scope.get("path") == "/v1/audio/speech"
        labels = (scope.get("state") or {}).get("speech_labels", ("-", "-"))
        service.count_error(err, *labels, request=speech)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodyLimit:
    """ASGI middleware: a request body over its route's limit is a 413 (by its Content-Length before anything is
    read, or while it is read when it comes chunked)."""

    def __init__(self, app: Any, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                await _answer(scope, ApiError(400, "the Content-Length header is not a number"))(scope, receive, send)
                return
            if too_big:
                err = ApiError(
                    413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large"
                )
                await _answer(scope, err)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class CatchAll:
    """ASGI middleware: an unexpected exception is logged once, with its traceback, and answered 500 internal_error.
    (Starlette's handler for ``Exception`` re-raises it after answering, so that the ASGI server logs it again.)
    Once a response has started it can only be cut: the exception goes on to the ASGI server, which logs it and
    closes the connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
            err = ApiError(500, "internal server error (see the server log)", code="internal_error")
            await _answer(scope, err)(scope, receive, send)


class _CancellableStream(StreamingResponse):
    """A streamed body that stops (and so cancels its request) as soon as the client leaves, and is always closed,
    whatever the ASGI server's spec version."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_iterator

        async def until_disconnect(cancel: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    cancel.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_disconnect, tg.cancel_scope)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client left while we sent
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


def create_app(settings: ServerSettings | None = None, *, tts: DiaTTS | None = None) -> FastAPI:
    """The speech server's ASGI app. ``tts``: an already loaded model (default: what ``settings`` name, loaded at
    start-up). The engine starts with the app and drains running requests when it stops."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = tts if tts is not None else await anyio.to_thread.run_sync(load_tts, settings)
        service = SpeechService(model, settings)
        app.state.service = service
        if settings.demo:
            log.warning(
                "serving %r: a random-weight demo model (the audio is not speech); pass --model for Dia",
                service.model_id,
            )
        log.info(
            "dia_fast %s serving %r on %s, %d slots",
            __version__,
            service.model_id,
            model.device,
            service.engine.max_slots,
        )
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(lambda: service.close(drain=True))
            log.info("dia_fast server stopped (%d requests served)", service.engine.stats["finished"])

    app = FastAPI(title="dia_fast speech server", version=__version__, lifespan=lifespan)
    app.state.settings = settings  # (dia_fast.serve.graceful reads its shutdown limit)

    def limit_for(path: str) -> int:
        return settings.max_voice_bytes if path.startswith("/v1/audio/voices") else settings.max_body_bytes

    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, limit_for=limit_for)  # (outside CatchAll: it answers its own errors)

    # ------------------------------------------------------------------------------ errors (each counted)
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _answer(request.scope, exc)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        msg = f"the request body is over this server's limit of {exc.limit} bytes"
        return _answer(request.scope, ApiError(413, msg, code="request_too_large"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # (FastAPI's locations start with where the value was: "body", "query", "path", ...)
        errors = [{**e, "loc": tuple(e.get("loc", ()))[1:]} for e in exc.errors()]
        return _answer(request.scope, _validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
        return _answer(request.scope, err)

    @app.exception_handler(ClientDisconnect)
    async def _left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client hung up while its body arrived: a cancel, counted as the server counts the others (the
        # answer goes nowhere)
        service: SpeechService | None = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.cancelled.inc()
        log.info("%s %s: the client left while sending its body", request.method, request.url.path)
        return _answer(request.scope, ApiError(499, "the request was cancelled", code="cancelled"))

    # ------------------------------------------------------------------------------ auth
    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.api_key.encode())
        if not ok:
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def service_of(request: Request) -> SpeechService:
        service: SpeechService | None = getattr(request.app.state, "service", None)
        if service is not None and service.engine.failed is not None:
            raise engine_failed()
        if service is None or not service.engine.running:
            raise ApiError(503, "the server is starting or shutting down", code="unavailable")
        return service

    v1 = [Depends(authorize)]

    # ------------------------------------------------------------------------------ routes
    @app.post("/v1/audio/speech", dependencies=v1)
    async def speech(request: Request) -> Response:
        service = service_of(request)
        data = _parse_json(await request.body())
        request.state.speech_labels = metric_labels(data)  # (errors from here on are counted with them)
        req = _parse_speech(data)
        if req.stream_format is None:
            data = await service.speech(req, request.is_disconnected)
            return Response(data, media_type=_media_type(req))
        _, body = await service.open_stream(req)
        if req.stream_format == "sse":
            return _CancellableStream(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return _CancellableStream(body, media_type=_media_type(req))

    @app.get("/v1/models", dependencies=v1)
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [service_of(request).model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=v1)
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        service = service_of(request)
        if model_id != service.model_id and model_id not in MODEL_ALIASES:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return service.model_card()

    @app.get("/v1/audio/voices", dependencies=v1)
    async def list_voices(request: Request) -> dict[str, Any]:
        service = service_of(request)
        builtin = [builtin_voice_json(v) for v in BUILTIN_VOICES]
        stored = await anyio.to_thread.run_sync(service.voices.list)
        return {"object": "list", "data": builtin + [v.as_json() for v in stored]}

    @app.post("/v1/audio/voices", dependencies=v1, status_code=201)
    async def create_voice(request: Request) -> dict[str, Any]:
        service = service_of(request)
        s = settings
        if service.voices.directory is None:  # before reading an upload that could not be stored
            raise ApiError(404, "this server stores no voices (start it with --voices-dir)", code="voice_not_found")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except (_BodyTooLarge, ClientDisconnect):
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed upload is the client's error
            raise ApiError(400, f"expected a multipart form (file, name, transcript): {exc}") from None
        # the audio as "file" (or "audio"), or as OpenAI's clients send it: "audio_sample" (with a "consent"
        # recording id, which this server does not need and ignores)
        upload = form.get("file") or form.get("audio") or form.get("audio_sample")
        name, transcript = form.get("name"), form.get("transcript")
        if form.get("type", "audio_sample") != "audio_sample":
            raise ApiError(400, "only voices from an audio sample can be created here", param="type")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the form needs an audio file in the field 'file' (or 'audio_sample')", param="file")
        if not isinstance(name, str):
            raise ApiError(400, "the form needs the field 'name' (the voice id)", param="name")
        if not isinstance(transcript, str):  # (OpenAI's clients send it with extra_body={"transcript": ...})
            raise ApiError(
                400, "the form needs the field 'transcript' (the words spoken in the audio)", param="transcript"
            )
        overwrite = str(form.get("overwrite", "false")).lower() in ("1", "true", "yes")
        audio = await upload.read()
        try:
            info = await anyio.to_thread.run_sync(
                lambda: service.voices.create(
                    name, audio, transcript, overwrite=overwrite, min_s=s.min_voice_seconds, max_s=s.max_voice_seconds
                )
            )
        except VoiceError as exc:
            param = exc.param or ("file" if exc.status == 400 else "name")
            raise ApiError(exc.status, str(exc), param=param, code=exc.code) from None
        return info.as_json()

    @app.get("/v1/audio/voices/{voice_id}", dependencies=v1)
    async def get_voice(voice_id: str, request: Request) -> dict[str, Any]:
        service = service_of(request)
        if voice_id.lower() in BUILTIN_VOICES:
            return builtin_voice_json(voice_id.lower())
        try:
            info = await anyio.to_thread.run_sync(service.voices.info, voice_id)
        except VoiceError as exc:
            raise ApiError(exc.status, str(exc), param="voice_id", code=exc.code) from None
        return info.as_json()

    @app.delete("/v1/audio/voices/{voice_id}", dependencies=v1)
    async def delete_voice(voice_id: str, request: Request) -> dict[str, Any]:
        service = service_of(request)
        try:
            await anyio.to_thread.run_sync(service.voices.delete, voice_id)
        except VoiceError as exc:
            raise ApiError(exc.status, str(exc), param="voice_id", code=exc.code) from None
        return {"id": voice_id, "object": "voice", "deleted": True}

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        service: SpeechService | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        service: SpeechService | None = getattr(request.app.state, "service", None)
        data = b"" if service is None else service.metrics.render()
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return app


def _media_type(req: SpeechRequest) -> str:
    return FORMATS[req.response_format].media_type


# pydantic's tags for the members of the request's unions, which it puts right after the union field in an error's
# location (("voice", "VoiceRef", "id")); nowhere else is a part of a location a tag (a field may be named "str")
_UNION_MEMBERS = {"voice": ("str", VoiceRef.__name__)}


def _field_path(loc: Any) -> list[str]:
    """An error location as the request's field path: ``["voice", "id"]`` for ``("voice", "VoiceRef", "id")``."""
    path = [str(p) for p in loc or ()]
    if len(path) > 1 and path[1] in _UNION_MEMBERS.get(path[0], ()):
        del path[1]
    return path


def _validation_error(errors: list[Any]) -> ApiError:
    """The 400 of a body's validation errors (locations relative to the body)."""
    first = errors[0] if errors else {}

    # a union (voice: a name or {"id": ...}) fails once per member: report the member that got furthest
    def field(e: Any) -> tuple:
        return tuple(_field_path(e.get("loc")))[:1]

    same_field = [e for e in errors if field(e) == field(first)]
    first = max(same_field, key=lambda e: len(e.get("loc", ())), default=first)
    param = ".".join(_field_path(first.get("loc"))) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif first.get("type") == "missing":
        message = f"missing required parameter {param!r}"
    return ApiError(400, message, param=param, code="invalid_value")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError) as exc:  # bad JSON or bytes, an integer over 4300 digits, too deep
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _parse_speech(data: dict[str, Any]) -> SpeechRequest:
    try:
        return SpeechRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None
