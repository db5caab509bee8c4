"""Sampling settings of Dia generation (the draw itself is :func:`dia_fast.ops.cfg_sample`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, TypeVar, overload

import numpy as np
import torch

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT32_MAX = 2**31 - 1

E = TypeVar("E", bound=Exception)


def named(exc: E, param: str) -> E:
    """``exc`` with a ``param`` attribute: the option it is about (the speech server answers it as the error's
    ``param``)."""
    exc.param = param  # type: ignore[attr-defined]
    return exc


@dataclass(frozen=True)
class SamplingConfig:
    """How the next codes are picked from the logits.

    ``cfg_scale``: classifier-free guidance, guided = cond + cfg_scale * (cond - uncond); 0 turns
    CFG off (no unconditional rows are run). ``cfg_filter_top_k``: keep the conditional logits at
    the top-k ids of the guided logits (None: no filter, the guided logits themselves are sampled, as
    transformers does). ``do_sample=False`` (or temperature 0) is greedy.
    """

    cfg_scale: float = 3.0
    temperature: float = 1.2
    top_p: float = 0.95
    cfg_filter_top_k: int | None = 45
    do_sample: bool = True

    def __post_init__(self) -> None:
        for name in ("cfg_scale", "temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise named(TypeError(f"{name} must be a number, got {value!r}"), name)
        # the settings live in float32 tensors on the device: larger values would overflow there
        for name in ("cfg_scale", "temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= _FLOAT32_MAX:
                raise named(
                    ValueError(f"{name} must be a finite number >= 0 (at most {_FLOAT32_MAX:.3g}), got {value}"), name
                )
        if not (0.0 < self.top_p <= 1.0):
            raise named(ValueError(f"top_p must be in (0, 1], got {self.top_p}"), "top_p")
        top_k = check_int_option("cfg_filter_top_k", self.cfg_filter_top_k, minimum=1, optional=True)
        # a top-k at or above the vocabulary keeps every id; the kernels hold it in int32
        object.__setattr__(self, "cfg_filter_top_k", None if top_k is None else min(top_k, _INT32_MAX))
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise named(TypeError(f"do_sample must be a bool, got {self.do_sample!r}"), "do_sample")
        object.__setattr__(self, "do_sample", bool(self.do_sample))

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


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
