"""Checks of the options users pass (ints, named errors), shared by every layer: an error names its option in
``param``, which the speech server answers as the error's ``param``."""

from __future__ import annotations

import numbers
from typing import Literal, TypeVar, overload

import numpy as np

E = TypeVar("E", bound=Exception)


def named(exc: E, param: str) -> E:
    """``exc`` with a ``param`` attribute: the option it is about (the speech server answers it as the error's
    ``param``)."""
    exc.param = param  # type: ignore[attr-defined]
    return exc


@overload
def check_int_option(
    name: str, value: object, *, minimum: int | None = None, optional: Literal[False] = False
) -> int: ...


@overload
def check_int_option(name: str, value: object, *, minimum: int | None = None, optional: bool) -> int | None: ...


def check_int_option(name: str, value: object, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a Python int: it must be an integer (``int`` or a NumPy integer, not a bool) >= ``minimum``
    (or None when ``optional``), else a TypeError or ValueError naming ``name`` (its ``param``)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        kind = "an int or None" if optional else "an int"
        raise named(TypeError(f"{name} must be {kind}, got {value!r}"), name)
    value = int(value)
    if minimum is not None and value < minimum:
        raise named(ValueError(f"{name} must be >= {minimum}, got {value}"), name)
    return value
