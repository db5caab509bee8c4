"""The speech server as a Ray Serve application: each replica runs the same FastAPI app
(:func:`dia_fast.serve.create_app`) with its own model and continuous-batching engine; Ray Serve's proxy spreads
requests over the replicas (streaming responses pass through) and scales them between bounds.

``python -m dia_fast.serve --ray --replicas N`` runs it; ``serve run dia_fast.serve.ray_app:app_builder
model=/models/Dia-1.6B replicas=2`` (or a Serve config file naming ``dia_fast.serve.ray_app:app_builder``) deploys
it on an existing cluster (docs/server.md)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import signal
import threading
import time
import typing
from pathlib import Path
from typing import Any

from .settings import ServerSettings

__all__ = ["app_builder", "build_application", "deployment_options", "replica_settings", "run_ray"]

log = logging.getLogger("dia_fast.serve")

APP_NAME = "dia_fast"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Requests Ray sends a replica beyond its engine's slots + queue: /health, /metrics and the like, and the requests a
# full engine refuses at once (its JSON 429). The engine, not Ray, decides what runs, waits or is refused: it also
# counts the slots a long input's pieces take, which Ray sees as one request.
RAY_HEADROOM = 16
# Requests that wait in each Ray proxy while every replica is at its limit; past it Ray answers 429 itself
# (plain text; 503 on a Ray without backpressure_config).
PROXY_QUEUE = 16


def replica_settings(settings: ServerSettings, gpus_per_replica: float) -> ServerSettings:
    """The settings each replica runs, with its device and slots pinned so that Ray's limits and its engine agree:
    the device (default: ``cuda`` with GPUs, else ``cpu``) and ``max_batch`` (default: the device's, as the engine
    picks it). A CUDA device without a GPU reserved is an error: Ray does not hide a node's GPUs from replicas that
    reserve none (Ray 2.60), so every such replica would share the first GPU unaccounted."""
    import torch

    from ..serving import default_max_slots

    if not gpus_per_replica >= 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus_per_replica}")
    device = settings.device
    if device is None or device.lower() == "auto":
        device = "cuda" if gpus_per_replica > 0 else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if kind == "cuda" and gpus_per_replica == 0:
        raise ValueError(
            f"device {device!r} needs gpus_per_replica > 0 (--gpus-per-replica): Ray reserves no GPU for a replica "
            "without, and does not hide the node's GPUs from it (a fraction such as 0.5 shares one GPU)"
        )
    slots = settings.max_batch or default_max_slots(device)
    return dataclasses.replace(settings, device=device, max_batch=slots)


def deployment_options(
    settings: ServerSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
    name: str = "DiaSpeech",
) -> dict[str, Any]:
    """``serve.deployment``'s options for replicas running ``settings`` (as :func:`replica_settings` pins them)."""
    from ray import serve

    settings = replica_settings(settings, gpus_per_replica)  # (pinned already: the same)
    slots = typing.cast(int, settings.max_batch)
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": slots + settings.max_queue + RAY_HEADROOM,
        "max_queued_requests": PROXY_QUEUE,
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        # Serve lets a stopping replica's requests run this long, then kills it (docs/server.md)
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
    }
    if "backpressure_config" in inspect.signature(serve.deployment).parameters:  # (newer Ray)
        options["backpressure_config"] = {"status_code": 429, "retry_after_s": 1}
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": slots,
        }
    else:
        options["num_replicas"] = replicas
    return options


def configure_replica_logging(level: str) -> None:
    """dia_fast's log lines at ``level`` on a replica's stderr (which Ray shows in the driver's output and keeps in
    the worker's ``.err`` log): Ray configures only its own loggers in a replica, so without this dia_fast's INFO
    lines are dropped and ``--log-level`` is not applied."""
    logger = logging.getLogger("dia_fast")
    logger.setLevel(level.upper())
    if not any(getattr(h, "dia_fast_replica", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.dia_fast_replica = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # (a handler on the root logger would print each line again)


def check_replica(app: Any) -> None:
    """Serve's health check of a replica: raises once its engine has failed or stopped (when ``/health`` answers
    503), so that Serve replaces the replica instead of leaving it to answer 500 to every request."""
    service = getattr(getattr(app, "state", None), "service", None)
    if service is None:  # (not started yet)
        return
    engine = service.engine
    if engine.failed is not None:
        raise RuntimeError(f"the speech engine failed: {engine.failed!r}")
    if not engine.running and not service.stopping:
        raise RuntimeError("the speech engine stopped")


def build_application(
    settings: ServerSettings,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    gpus_per_replica: float = 0.0,
    cpus_per_replica: float = 1.0,
    name: str = "DiaSpeech",
    log_level: str | None = None,
) -> Any:
    """A Ray Serve application of the speech server. ``max_replicas`` > ``replicas`` turns on autoscaling on
    ongoing requests (a replica's target: its engine's slots, so that a queue forms only when all are busy).
    ``log_level``: dia_fast's log level in the replicas (None: their logging is left as Ray sets it up)."""
    from ray import serve

    settings = replica_settings(settings, gpus_per_replica)

    def build_app() -> Any:  # runs on each replica: its own model and engine
        from . import create_app

        if log_level is not None:
            configure_replica_logging(log_level)
        return create_app(settings)

    options = deployment_options(
        settings,
        replicas=replicas,
        max_replicas=max_replicas,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        name=name,
    )
    ingress = serve.ingress(build_app)

    @serve.deployment(**options)
    @ingress
    class DiaSpeech:
        """One replica of the speech server."""

        def check_health(self) -> None:
            check_replica(self.app)  # type: ignore[attr-defined]  # (the ingress wrapper's ASGI app)

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
    :class:`ServerSettings` fields plus ``replicas``, ``max_replicas``, ``gpus_per_replica`` and ``log_level``
    (dia_fast's in the replicas, default info); each is converted to its setting's type (an error names the key)."""
    args = dict(args)
    deploy = {k: args.pop(k) for k in ("replicas", "max_replicas", "gpus_per_replica", "log_level") if k in args}
    hints = typing.get_type_hints(ServerSettings)
    names = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"unknown server settings {unknown}; known: {sorted(names)}")
    kw = {k: _convert(k, v, hints[k]) for k, v in args.items()}
    replicas = _convert("replicas", deploy.get("replicas", 1), int)
    max_replicas = _convert("max_replicas", deploy["max_replicas"], int) if "max_replicas" in deploy else None
    gpus = _convert("gpus_per_replica", deploy.get("gpus_per_replica", 0.0), float)
    log_level = _convert("log_level", deploy.get("log_level", "info"), str).lower()
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas) or not gpus >= 0:
        raise ValueError("replicas must be >= 1, max_replicas >= replicas and gpus_per_replica >= 0")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"log_level must be debug, info, warning or error, got {log_level!r}")
    return build_application(
        ServerSettings(**kw), replicas=replicas, max_replicas=max_replicas, gpus_per_replica=gpus, log_level=log_level
    )


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server as Ctrl-C does (ray.init's own handler exits mid-call, and the process aborts)."""
    raise KeyboardInterrupt


def run_ray(
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_replicas: int | None = None,
    gpus_per_replica: float = 0.0,
    address: str | None = None,
    log_level: str | None = None,
) -> None:
    """Start (or join, with ``address``) a Ray cluster and serve the app on ``host:port`` until Ctrl-C or SIGTERM;
    then stop gracefully: the replicas' running requests finish (up to ``settings.shutdown_timeout_s``) and the
    application is deleted, then Serve and Ray stop (with ``address``: the cluster and its Serve keep running)."""
    import ray
    from ray import serve

    app = build_application(
        settings, replicas=replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica, log_level=log_level
    )
    joined = bool(address or os.environ.get("RAY_ADDRESS"))  # (ray.init joins the cluster RAY_ADDRESS names)
    ray.init(address=address)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # (replaces ray.init's)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d (Ctrl-C to stop)", host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: running requests may take up to %g s to finish", settings.shutdown_timeout_s)
    finally:
        try:
            serve.delete(APP_NAME)  # (waits while the replicas drain)
            if not joined:
                serve.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            log.warning("stopping without waiting for running requests")
        except Exception as exc:  # noqa: BLE001 - Ray goes down below all the same
            log.warning("Serve did not stop cleanly: %s", exc)
        finally:
            ray.shutdown()
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
