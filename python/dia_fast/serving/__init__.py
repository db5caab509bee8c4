"""Serving many requests on one loaded model: continuous batching (:class:`BatchEngine`)."""

from .engine import (
    BatchEngine,
    EngineBusy,
    EngineClosed,
    EngineFailed,
    EngineResult,
    RequestCancelled,
    RequestHandle,
    default_max_slots,
)

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
