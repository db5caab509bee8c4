"""The speech server as a Ray Serve application: each replica runs the same FastAPI app
(:func:`dia_fast.serve.create_app`) with its own model and continuous-batching engine; Ray Serve's proxy spreads
requests over the replicas (streaming responses pass through) and scales them between bounds.

``python -m dia_fast.serve --ray --replicas N`` runs it; ``serve run dia_fast.serve.ray_app:app_builder
model=/models/Dia-1.6B replicas=2`` (or a Serve config file naming ``dia_fast.serve.ray_app:app_builder``) deploys
it on an existing cluster (docs/server.md)."""

from __future__ import annotations

import dataclasses
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


_INT, _FLOAT = {"max_batch", "max_queue", "max_input_chars", "demo_seed"}, {"request_timeout_s"}


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run dia_fast.serve.ray_app:app_builder key=value ...`` and Serve config files: ``args`` are
    :class:`ServerSettings` fields plus ``replicas``, ``max_replicas``, ``gpus_per_replica``."""
    args = dict(args)
    deploy = {k: args.pop(k) for k in ("replicas", "max_replicas", "gpus_per_replica") if k in args}
    names = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"unknown server settings {unknown}; known: {sorted(names)}")
    kw: dict[str, Any] = {}
    for k, v in args.items():
        kw[k] = int(v) if k in _INT else float(v) if k in _FLOAT else Path(v) if k == "voices_dir" else v
    return build_application(
        ServerSettings(**kw),
        replicas=int(deploy.get("replicas", 1)),
        max_replicas=int(deploy["max_replicas"]) if "max_replicas" in deploy else None,
        gpus_per_replica=float(deploy.get("gpus_per_replica", 0.0)),
    )


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
