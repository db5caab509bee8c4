"""Loads the optional compiled extension ``dia_fast._C``; never raises on import.

The wheel ships ``_C`` where it could be built. Where it is missing (built with
``DIA_FAST_BUILD_EXT=OFF``), built for another platform or Python, or stale (an ABI older than
this Python code expects), every feature runs on the PyTorch path and :func:`why_not` says why.
Set ``DIA_FAST_DISABLE_EXT=1`` to ignore an installed extension.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

# The ABI of _C this Python code was written against (csrc/module.cpp: kAbiVersion).
ABI_VERSION = 6

_module: ModuleType | None = None
_error: str = ""
_on_reload: list[Callable[[], None]] = []


def _load() -> None:
    global _module, _error
    _module, _error = None, ""
    if os.environ.get("DIA_FAST_DISABLE_EXT") == "1":
        _error = "disabled by DIA_FAST_DISABLE_EXT=1"
        return
    name = f"{__package__}._C"
    try:
        if importlib.util.find_spec(name) is None:
            _error = "not built: this installation has no compiled extension (built with DIA_FAST_NO_EXT=1?)"
            return
        _C = importlib.import_module(name)
    except Exception as exc:  # ImportError / OSError for a binary built for another platform or Python
        _error = f"{type(exc).__name__}: {exc}"
        return
    try:
        abi = int(_C.abi_version())
    except Exception as exc:
        _error = f"unusable extension ({type(exc).__name__}: {exc})"
        return
    if abi != ABI_VERSION:
        _error = f"stale extension: ABI {abi}, this dia_fast expects {ABI_VERSION} (rebuild it)"
        return
    _module = _C


def loaded() -> bool:
    """True when the compiled extension is importable and enabled."""
    return _module is not None


def module() -> ModuleType:
    """The extension module; raises RuntimeError (with the reason) when it is not loaded."""
    if _module is None:
        raise RuntimeError(f"dia_fast._C is not available: {_error}")
    return _module


def why_not() -> str:
    """Why the extension is not loaded ("" when it is)."""
    return _error


def reload() -> bool:
    """Try to load the extension again (after building it in place, or changing
    ``DIA_FAST_DISABLE_EXT``); returns :func:`loaded`."""
    _load()
    for listener in _on_reload:
        listener()
    return loaded()


def on_reload(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after every :func:`reload` (the op dispatch forgets the backends it chose)."""
    _on_reload.append(listener)


def build_info() -> dict[str, Any]:
    """How the loaded extension was built: ``version``, ``abi_version``, ``compiler``, ``build_type``,
    ``openmp`` (bool), ``openmp_version``, ``openmp_max_threads``, ``arch``, ``pybind11`` and
    ``kernels``; ``{"loaded": False, "reason": ...}`` when it is not loaded."""
    if _module is None:
        return {"loaded": False, "reason": _error}
    try:
        info = dict(_module.build_info())
    except Exception as exc:  # never let introspection break dia_fast.info()
        return {"loaded": True, "reason": f"build_info() failed: {type(exc).__name__}: {exc}"}
    return {"loaded": True, **info}


_load()
