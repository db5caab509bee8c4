"""A server in a thread of this process (uvicorn on a free port of 127.0.0.1 by default): for tests, benchmarks and
embedding the API in another program."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["LocalServer", "serve_in_thread"]


@dataclass
class LocalServer:
    """A running server: its ``url`` (``http://host:port``) and the ``uvicorn.Server`` (``stop()`` asks it to shut
    down gracefully: open requests finish, then the engine drains)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 300.0, log_level: str = "warning"
) -> Iterator[LocalServer]:
    """Run ``app`` (an ASGI app, e.g. :func:`dia_fast.serve.create_app`'s) with uvicorn in a daemon thread; yields
    once it accepts connections and stops it on exit. ``port=0`` takes a free port."""
    from .graceful import graceful_server

    server = graceful_server(app, host=host, port=port, log_level=log_level)
    thread = threading.Thread(target=server.run, name="dia_fast-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"the server did not start within {start_timeout:g} s")
    bound = server.servers[0].sockets[0].getsockname()
    local = LocalServer(f"http://{bound[0]}:{bound[1]}", server, thread)
    try:
        yield local
    finally:
        local.stop()
