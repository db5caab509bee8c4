"""The speech server as a Ray Serve application: each replica runs the same FastAPI app
(:func:`dia_fast.serve.create_app`) with its own model and continuous-batching engine; Ray Serve's proxy spreads
requests over the replicas (streaming responses pass through) and scales them between bounds.

``python -m dia_fast.serve --ray --replicas N`` runs it; ``serve run dia_fast.serve.ray_app:app_builder
model=/models/Dia-1.6B replicas=2`` (or a Serve config file naming ``dia_fast.serve.ray_app:app_builder``) deploys
it on an existing cluster (docs/server.md)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from .settings import ServerSettings

__all__ = ["app_builder", "build_application", "run_ray"]


def build_application(
    settings: ServerSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
    name: str = "DiaSpeech",
) -> Any:
    """A Ray Serve application of the speech server. ``max_replicas`` > ``replicas`` turns on autoscaling on
    ongoing requests (a replica's target: its engine's slots, so that a queue forms only when all are busy)."""
    from ray import serve

    def build_app() -> Any:  # runs on each replica: its own model and engine
        from . import create_app

        return create_app(settings)

    slots = settings.max_batch or (16 if gpus_per_replica > 0 else 8)
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": slots + settings.max_queue,
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
    }
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": slots,
        }
    else:
        options["num_replicas"] = replicas
    ingress = serve.ingress(build_app)

    @serve.deployment(**options)
    @ingress
    class DiaSpeech:
        """One replica of the speech server."""

    return DiaSpeech.bind()


def _convert(key: str, value: Any, hint: Any) -> Any:
    """A ``key=value`` argument (a string from ``serve run``, or a YAML value from a config file) as the type its
    setting has (``hint``: the field's annotation); "none"/"null" is None where the setting may be None."""
    text = str(value).strip()
    optional = type(None) in typing.get_args(hint)
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    kind = kinds[0] if kinds else str
    if value is None or (optional and text.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{key} cannot be None")
    what = {int: "an int", float: "a number"}.get(kind, "a string")
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key} must be {what}, got {value!r}")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{key} must be {what}, got {value!r}") from None
    if kind is Path:
        return Path(text)
    return str(value)


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run dia_fast.serve.ray_app:app_builder key=value ...`` and Serve config files: ``args`` are
    :class:`ServerSettings` fields plus ``replicas``, ``max_replicas``, ``gpus_per_replica``; each is converted to
    its setting's type (an error names the key)."""
    args = dict(args)
    deploy = {k: args.pop(k) for k in ("replicas", "max_replicas", "gpus_per_replica") if k in args}
    hints = typing.get_type_hints(ServerSettings)
    names = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"unknown server settings {unknown}; known: {sorted(names)}")
    kw = {k: _convert(k, v, hints[k]) for k, v in args.items()}
    replicas = _convert("replicas", deploy.get("replicas", 1), int)
    max_replicas = _convert("max_replicas", deploy["max_replicas"], int) if "max_replicas" in deploy else None
    gpus = _convert("gpus_per_replica", deploy.get("gpus_per_replica", 0.0), float)
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas) or gpus < 0:
        raise ValueError("replicas must be >= 1, max_replicas >= replicas and gpus_per_replica >= 0")
    return build_application(ServerSettings(**kw), replicas=replicas, max_replicas=max_replicas, gpus_per_replica=gpus)


def run_ray(
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_replicas: int | None = None,
    gpus_per_replica: float = 0.0,
    address: str | None = None,
) -> None:
    """Start (or join, with ``address``) a Ray cluster, serve the app on ``host:port`` and block until Ctrl-C."""
    import ray
    from ray import serve

    ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    app = build_application(settings, replicas=replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica)
    serve.run(app, name="dia_fast", route_prefix="/", blocking=True)
