"""uvicorn's server, told when it begins to shut down.

uvicorn stops taking connections, waits up to ``timeout_graceful_shutdown`` seconds for the open requests and then
cancels them: a whole-file request gets a bare ``500 Internal Server Error`` and a stream is closed without a word.
This server tells the app's :class:`~dia_fast.serve.service.SpeechService` first, which closes the engine a little
before that limit, so that what still runs then fails as the API says it does: 503 JSON, an SSE ``error`` event,
or a cut audio stream with a line in the log.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn

__all__ = ["GracefulServer", "graceful_server"]


def graceful_server(app: Any, **config: Any) -> GracefulServer:
    """A uvicorn server for ``app`` (:func:`dia_fast.serve.create_app`'s); ``config``: ``uvicorn.Config``'s
    arguments. ``timeout_graceful_shutdown`` defaults to the app's ``ServerSettings.shutdown_timeout_s``."""
    settings = getattr(app.state, "settings", None)
    if settings is not None:
        config.setdefault("timeout_graceful_shutdown", settings.shutdown_timeout_s)
    return GracefulServer(uvicorn.Config(app, **config), app)


def fail_after(limit: float | None) -> float | None:
    """Seconds into a shutdown after which running requests are failed: a little before uvicorn's ``limit``
    (up to 2 s, at most a quarter of it), so that their answers still go out. None: no limit."""
    return None if limit is None else max(limit - min(2.0, limit / 4), 0.0)


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` that tells the app's speech service when it begins to shut down (see the module doc)."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = getattr(self._app.state, "service", None)
        if service is not None:
            service.begin_shutdown(fail_after(self.config.timeout_graceful_shutdown))
        await super().shutdown(sockets)
