"""Loads the optional compiled extension ``dia_fast._C``; never raises on import.

The wheel ships ``_C`` where it could be built. Where it is missing (or built for another
platform), every feature runs on the PyTorch path and :func:`why_not` says why.
Set ``DIA_FAST_DISABLE_EXT=1`` to ignore an installed extension.
"""

from __future__ import annotations

import os
from types import ModuleType

_module: ModuleType | None = None
_error: str = ""


def _load() -> None:
    global _module, _error
    if os.environ.get("DIA_FAST_DISABLE_EXT") == "1":
        _error = "disabled by DIA_FAST_DISABLE_EXT=1"
        return
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an OSError for a foreign binary
        _error = f"{type(exc).__name__}: {exc}"
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


_load()
