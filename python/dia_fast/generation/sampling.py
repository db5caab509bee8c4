"""Sampling settings of Dia generation (the draw itself is :func:`dia_fast.ops.cfg_sample`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..options import check_int_option, named

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_INT32_MAX = 2**31 - 1
# The smallest sampled temperature: logits of size up to 1e30 divided by it stay finite in float32 (at 1e-38, a logit of
# 4 already overflows to inf, and the draw then picks the lowest id among the infinities, not the most likely code).
MIN_TEMPERATURE = 1e-6


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
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow float32 to inf (and pick ids by order)
            raise named(
                ValueError(
                    f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature:g}: "
                    "below that, dividing the logits overflows float32"
                ),
                "temperature",
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
