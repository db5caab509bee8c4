"""``python -m dia_fast.serve``: an OpenAI-compatible speech server on the continuous-batching engine
(``pip install "dia-fast[server]"``; docs/server.md).

:func:`create_app` builds the ASGI app (FastAPI) for uvicorn or any ASGI server; :mod:`dia_fast.serve.ray_app`
runs it as Ray Serve replicas. The web stack is imported only when an app is built, so ``ServerSettings``
imports without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..api import DiaTTS

__all__ = ["ServerSettings", "create_app", "missing_server_packages"]

_SERVER_PACKAGES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus_client",
    "multipart": "python-multipart",
    "av": "av",
}


def missing_server_packages() -> list[str]:
    """The packages of the ``server`` extra that are not installed (pip names)."""
    import importlib.util

    return [pip for mod, pip in _SERVER_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def create_app(settings: ServerSettings | None = None, *, tts: DiaTTS | None = None, **kw: Any) -> FastAPI:
    """The speech server's ASGI app (see :func:`dia_fast.serve.app.create_app`)."""
    missing = missing_server_packages()
    if missing:
        raise ImportError(f'the server needs {", ".join(missing)}: pip install "dia-fast[server]"')
    from .app import create_app as _create

    return _create(settings, tts=tts, **kw)
