"""The op dispatch table: for every op, which backends implement it and which one runs.

A backend implementation is registered as ``"module:function"`` and imported on first use,
so ``import dia_fast`` never imports Triton or compiles a shader. Selection, per op and
device type, in order:

1. the ``backend=`` argument of the call;
2. an override set with :func:`set_backend` (or the ``DIA_FAST_BACKEND`` environment
   variable, read once: ``torch``, ``triton``, ``cpp`` or ``metal``);
3. the default for the device: the first *available* backend in ``DEFAULT_ORDER``.

The choice is remembered per (op, device type) until a registration or override changes, the
extension is reloaded, or :func:`invalidate` is called (availability read from the environment,
such as ``TRITON_INTERPRET``, is read when the choice is made): a decode step on a CPU dispatches
~30 ops, and asking every backend's availability each time was a measurable part of the step.

An override naming a backend that does not implement an op (or is unavailable) falls back
to ``torch`` for that op, so ``DIA_FAST_BACKEND=triton`` on a machine without Triton still
runs; an explicit ``backend=`` argument that cannot run raises instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("torch", "triton", "cpp", "metal")
# Preferred backends per device type, best first. "torch" always works.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpp", "torch"),
    "mps": ("metal", "torch"),
}

# op -> backend -> "module:function" (or an already imported callable)
_REGISTRY: dict[str, dict[str, str | Callable[..., Any]]] = {}
# backend -> callable(device_type) -> (available: bool, reason: str)
_AVAILABILITY: dict[str, Callable[[str], tuple[bool, str]]] = {}
_RESOLVED: dict[tuple[str, str], Callable[..., Any]] = {}
_OVERRIDE: dict[str | None, str] = {}
# (op, device type) -> the backend select_backend chose
_SELECTED: dict[tuple[str, str], str] = {}
_GENERATION = 0  # bumped whenever the choices may change: captured step graphs key on it


_SELECTED_LOCK = threading.Lock()  # a choice made before an invalidate() must not be stored after it


def invalidate() -> None:
    """Forget the remembered choices (after something that changes a backend's availability)."""
    global _GENERATION
    with _SELECTED_LOCK:
        _SELECTED.clear()
        _GENERATION += 1


def generation() -> int:
    """A number that changes whenever the backend choices may have changed (a captured step graph recorded the
    kernels chosen before: :class:`~dia_fast.generation.engine.DecodeEngine` keys its runners on it)."""
    return _GENERATION


def register(op: str, backend: str, impl: str | Callable[..., Any]) -> None:
    """Register ``impl`` (a callable or ``"module:function"``) as ``backend``'s version of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = impl
    _RESOLVED.pop((op, backend), None)
    invalidate()


def register_availability(backend: str, check: Callable[[str], tuple[bool, str]]) -> None:
    """Register the function telling whether ``backend`` can run on a device type."""
    _AVAILABILITY[backend] = check
    invalidate()


def backend_available(backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for ``backend`` on ``device_type`` (``"cpu"``, ``"cuda"``, ``"mps"``)."""
    if backend == "torch":
        return True, "always available"
    check = _AVAILABILITY.get(backend)
    if check is None:
        return False, "no availability check registered"
    try:
        return check(device_type)
    except Exception as exc:  # a broken optional backend must never break the package
        return False, f"{type(exc).__name__}: {exc}"


def set_backend(backend: str | None, op: str | None = None) -> None:
    """Force ``backend`` for ``op`` (or for every op when ``op`` is None); None clears it."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend is None:
        _OVERRIDE.pop(op, None)
    else:
        _OVERRIDE[op] = backend
    invalidate()


def _env_override() -> None:
    value = os.environ.get("DIA_FAST_BACKEND", "").strip().lower()
    if value:
        if value not in BACKENDS:  # (at import: a warning, never a broken import)
            warnings.warn(f"DIA_FAST_BACKEND={value!r} is not one of {BACKENDS}: ignored", UserWarning, stacklevel=2)
            return
        _OVERRIDE.setdefault(None, value)


def ops() -> list[str]:
    """Names of all registered ops."""
    return sorted(_REGISTRY)


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def select_backend(op: str, device: torch.device | str | None) -> str:
    """The backend that runs ``op`` on ``device`` when no ``backend=`` argument is given."""
    dtype_ = _device_type(device)
    key = (op, dtype_)
    chosen = _SELECTED.get(key)
    if chosen is None:
        before = _GENERATION
        chosen = _select(op, dtype_)  # (not under the lock: it may import a backend)
        with _SELECTED_LOCK:
            if _GENERATION == before:  # else set_backend() ran meanwhile: this choice may be stale, don't keep it
                _SELECTED[key] = chosen
    return chosen


def _select(op: str, dtype_: str) -> str:
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}; registered: {ops()}")
    forced = _OVERRIDE.get(op, _OVERRIDE.get(None))
    if forced is not None:
        if forced in impls and backend_available(forced, dtype_)[0]:
            return forced
        return "torch"
    for name in DEFAULT_ORDER.get(dtype_, ("torch",)):
        if name in impls and backend_available(name, dtype_)[0]:
            return name
    return "torch"


def on_tensors_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the CUDA device of its first argument made current.

    Triton launches on the *current* device, not on the tensors' device: without this, an op on a
    model that lives on ``cuda:1`` would launch on ``cuda:0``. Costs one comparison otherwise.
    """

    @functools.wraps(fn)
    def guarded(first: Any, *args: Any, **kwargs: Any) -> Any:
        device = getattr(first, "device", None)
        if device is not None and device.type == "cuda" and device.index is not None:
            if device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return guarded


def _resolve(op: str, backend: str) -> Callable[..., Any]:
    key = (op, backend)
    fn = _RESOLVED.get(key)
    if fn is None:
        impl = _REGISTRY[op][backend]
        if isinstance(impl, str):
            module, _, name = impl.partition(":")
            fn = getattr(importlib.import_module(module), name)
        else:
            fn = impl
        if backend == "triton":
            fn = on_tensors_device(fn)
        _RESOLVED[key] = fn
    return fn


def get_impl(op: str, device: torch.device | str | None, backend: str | None = None) -> Callable[..., Any]:
    """The implementation of ``op`` to run on ``device`` (``backend`` forces one, or raises)."""
    if backend is None:
        backend = select_backend(op, device)
    else:
        impls = _REGISTRY.get(op, {})
        if backend not in impls:
            raise ValueError(f"op {op!r} has no {backend!r} backend (has: {sorted(impls)})")
        ok, why = backend_available(backend, _device_type(device))
        if not ok:
            raise RuntimeError(f"backend {backend!r} cannot run {op!r} on {_device_type(device)}: {why}")
    return _resolve(op, backend)


def table(device_types: tuple[str, ...] = ("cpu", "cuda", "mps")) -> dict[str, dict[str, str]]:
    """{op: {device_type: backend}} as it would be selected now (used by ``dia_fast.info()``)."""
    return {op: {d: select_backend(op, d) for d in device_types} for op in ops()}


_env_override()
