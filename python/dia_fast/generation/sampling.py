"""Sampling settings of Dia generation (the draw itself is :func:`dia_fast.ops.cfg_sample`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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
                raise TypeError(f"{name} must be a number, got {value!r}")
        # the settings live in float32 tensors on the device: larger values would overflow there
        for name in ("cfg_scale", "temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= _FLOAT32_MAX:
                raise ValueError(f"{name} must be a finite number >= 0 (at most {_FLOAT32_MAX:.3g}), got {value}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_int_option("cfg_filter_top_k", self.cfg_filter_top_k, minimum=1, optional=True)
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``: any Python int, reduced modulo 2**64 (so every int in
    torch's own range seeds as ``manual_seed`` does, and larger ones still work); None for None."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed % (1 << 64))


def check_int_option(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    """``value`` must be an int (not a bool) >= ``minimum`` (or None when ``optional``): else a TypeError or
    ValueError naming ``name``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
