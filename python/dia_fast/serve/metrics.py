"""Prometheus metrics of one server (its own registry, so that several apps in one process never mix):
queue depth, busy slots, frames and frames/s, request latency and time to first audio, errors by kind."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from ..serving import BatchEngine

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class ServerMetrics:
    """The server's metrics; ``engine`` is read when scraped (queue depth, busy slots)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.engine: BatchEngine | None = None
        self.requests = Counter(
            "dia_fast_requests",
            "Speech requests answered, by format and outcome",
            ["format", "stream", "status"],
            registry=r,
        )
        self.errors = Counter("dia_fast_errors", "Failed requests by kind", ["kind"], registry=r)
        self.cancelled = Counter(
            "dia_fast_cancelled_requests", "Requests cancelled because the client left", registry=r
        )
        self.frames = Counter("dia_fast_frames", "Codec frames generated", registry=r)
        self.latency = Histogram(
            "dia_fast_request_seconds",
            "Request latency, arrival to last byte",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfa = Histogram(
            "dia_fast_time_to_first_audio_seconds",
            "Arrival to the first audio bytes sent",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        Gauge("dia_fast_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: 0 if self.engine is None else self.engine.queued
        )
        Gauge("dia_fast_busy_slots", "Slots running a request", registry=r).set_function(
            lambda: 0 if self.engine is None else self.engine.busy_slots
        )
        Gauge("dia_fast_max_slots", "Slots of the engine", registry=r).set_function(
            lambda: 0 if self.engine is None else self.engine.max_slots
        )
        Gauge(
            "dia_fast_frames_per_second", f"Codec frames per second over the last {window_s:g} s", registry=r
        ).set_function(self._frames_per_s)
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add_frames(self, n: int) -> None:
        if n <= 0:
            return
        self.frames.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._expire(now)  # also here: a server that nobody scrapes keeps only the window

    def _expire(self, now: float) -> None:
        cutoff = now - self._window_s
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def _frames_per_s(self) -> float:
        with self._lock:
            self._expire(time.monotonic())
            return sum(n for _, n in self._recent) / self._window_s

    def render(self) -> bytes:
        return generate_latest(self.registry)
