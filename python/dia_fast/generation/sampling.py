"""Sampling settings of Dia generation (the draw itself is :func:`dia_fast.ops.cfg_sample`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_filter_top_k is not None and self.cfg_filter_top_k < 1:
            raise ValueError(f"cfg_filter_top_k must be >= 1 (or None), got {self.cfg_filter_top_k}")

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
