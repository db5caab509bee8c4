"""Serving many requests on one loaded model: continuous batching (:class:`BatchEngine`)."""

from .engine import (
    BatchEngine,
    EngineBusy,
    EngineClosed,
    EngineResult,
    RequestCancelled,
    RequestHandle,
    default_max_slots,
)

__all__ = [
    "BatchEngine",
    "EngineBusy",
    "EngineClosed",
    "EngineResult",
    "RequestCancelled",
    "RequestHandle",
    "default_max_slots",
]
