"""Joining audio chunks (e.g. long-form text generated sentence by sentence) with crossfades."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np

from .resample import check_rate

__all__ = ["check_crossfade_ms", "crossfade_join"]

_CURVES = ("equal_power", "linear")


def _fades(n: int, curve: str) -> tuple[np.ndarray, np.ndarray]:
    """(fade_in, fade_out) of n samples, sampled at the centres of the overlap's samples."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    if curve == "linear":  # gains sum to 1: constant amplitude for correlated (similar) signals
        return t, 1.0 - t
    # equal power: squared gains sum to 1, constant loudness for uncorrelated signals (speech)
    return np.sin(t * (math.pi / 2)), np.cos(t * (math.pi / 2))


def check_crossfade_ms(crossfade_ms: object) -> float:
    """``crossfade_ms`` as a float: a real number (not a bool), finite and >= 0; else a TypeError / ValueError."""
    if isinstance(crossfade_ms, bool) or not isinstance(crossfade_ms, Real):
        raise TypeError(f"crossfade_ms must be a number, got {crossfade_ms!r}")
    value = float(crossfade_ms)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"crossfade_ms must be a finite number >= 0, got {crossfade_ms!r}")
    return value


def crossfade_join(
    chunks: Sequence[np.ndarray], sample_rate: int, crossfade_ms: float = 30.0, *, curve: str = "equal_power"
) -> np.ndarray:
    """Concatenate mono chunks [N_i], overlapping neighbours by a ``crossfade_ms`` crossfade.

    At each joint the last ``n`` samples of one chunk are mixed with the first ``n`` of the next,
    the first fading out and the second fading in (``curve``: ``"equal_power"`` sin/cos, or
    ``"linear"``), so the result has ``sum(N_i) - sum(n)`` samples and no step at the joints.
    ``n = round(crossfade_ms * sample_rate / 1000)``, shortened where a chunk is too short: an end chunk can
    give its whole length to its one joint, a middle chunk half of it to each side. Empty chunks
    are skipped; no chunks gives an empty array. Returns float32.
    """
    sr = check_rate(sample_rate, "sample_rate")
    crossfade_ms = check_crossfade_ms(crossfade_ms)
    if curve not in _CURVES:
        raise ValueError(f"curve must be one of {_CURVES}, got {curve!r}")
    arrays = [np.asarray(c) for c in chunks]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"crossfade_join expects 1-D chunks, chunk {i} has shape {a.shape}")
    arrays = [a.astype(np.float32, copy=False) for a in arrays if a.size > 0]
    if not arrays:
        return np.zeros(0, dtype=np.float32)

    fade_n = int(round(crossfade_ms * sr / 1000.0))
    last = len(arrays) - 1
    # how many samples chunk i may lend to its left / right joint
    left = [len(a) if i == last else len(a) // 2 for i, a in enumerate(arrays)]
    right = [len(a) if i == 0 else len(a) - len(a) // 2 for i, a in enumerate(arrays)]
    if len(arrays) > 1:
        right[last] = 0
        left[0] = 0
    overlaps = [min(fade_n, right[i], left[i + 1]) for i in range(last)]

    total = sum(len(a) for a in arrays) - sum(overlaps)
    out = np.zeros(total, dtype=np.float64)
    pos = 0
    for i, a in enumerate(arrays):
        seg = a.astype(np.float64)
        n_in = overlaps[i - 1] if i > 0 else 0
        n_out = overlaps[i] if i < last else 0
        if n_in:
            seg[:n_in] *= _fades(n_in, curve)[0]
        if n_out:
            seg[len(seg) - n_out :] *= _fades(n_out, curve)[1]
        out[pos : pos + len(seg)] += seg
        pos += len(seg) - n_out
    return out.astype(np.float32)
