"""Integrated loudness (ITU-R BS.1770 via pyloudnorm) and loudness normalisation with a peak ceiling."""

from __future__ import annotations

import logging
import math
import warnings
from numbers import Real
from typing import NamedTuple

import numpy as np
import pyloudnorm

from .resample import check_rate

__all__ = ["LoudnessGain", "integrated_loudness", "loudness_gain", "normalize_loudness"]

log = logging.getLogger(__name__)

_BLOCK_S = 0.4  # BS.1770 gating block
ABSOLUTE_GATE_LUFS = -70.0


def _as_audio(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{what} expects float samples, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and not 1 <= arr.shape[1] <= 5):
        raise ValueError(f"{what} expects [N] or [N, channels<=5], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: audio contains NaN or infinite samples")
    return arr


def _measure(arr: np.ndarray, rate: int) -> float:
    """Loudness of validated audio; -inf for empty or all-zero input."""
    if arr.shape[0] == 0 or not np.any(arr):
        return -math.inf
    data = arr.astype(np.float64)
    block = int(math.ceil(_BLOCK_S * rate))
    if data.shape[0] <= block:
        # Shorter than one gating block: BS.1770 is undefined, pyloudnorm refuses. Loop the clip
        # to >= 2 blocks; a repeated signal has the same mean-square, so this measures the clip.
        reps = -(-2 * block // data.shape[0])
        data = np.tile(data, (reps,) + (1,) * (data.ndim - 1))
    # pyloudnorm takes log10 of silent blocks; keep its RuntimeWarnings from reaching callers
    # (np.errstate is thread-local; catch_warnings covers warnings it might emit itself).
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(pyloudnorm.Meter(rate, block_size=_BLOCK_S).integrated_loudness(data))
    return value if math.isfinite(value) else -math.inf


def integrated_loudness(x: np.ndarray, rate: int) -> float:
    """Integrated loudness of ``x`` in LUFS (ITU-R BS.1770-4, K-weighted, gated; pyloudnorm).

    ``x`` is float [N] or [N, channels] (up to 5). Returns ``-inf`` for empty or silent audio
    (nothing above the -70 LUFS absolute gate). Audio shorter than the 400 ms gating block is
    measured by looping it. Never warns; raises ``ValueError`` for NaN/inf samples.
    """
    return _measure(_as_audio(x, "integrated_loudness"), check_rate(rate, "rate"))


class LoudnessGain(NamedTuple):
    """The linear gain :func:`normalize_loudness` applies, and why."""

    gain: float  # linear factor (1.0 = unchanged: silent or too-short audio)
    measured_lufs: float  # loudness before the gain (-inf for silence)
    peak_limited: bool  # True when the gain was lowered so the peak sits at the ceiling
    reason: str = ""  # why the audio is left unchanged ("silent", "too short"), else ""


REASON_SILENT = "silent: nothing above the -70 LUFS absolute gate"
REASON_TOO_SHORT = "shorter than the 400 ms BS.1770 gating block: loudness undefined"


def _is_real(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_targets(target_lufs: float, peak_ceiling_db: float) -> None:
    # the comparisons are False for NaN, so NaN is refused too
    if not (_is_real(target_lufs) and -70.0 <= target_lufs <= 0.0):
        raise ValueError(f"target_lufs must be a finite value in [-70, 0], got {target_lufs!r}")
    if not (_is_real(peak_ceiling_db) and -60.0 <= peak_ceiling_db <= 0.0):
        raise ValueError(f"peak_ceiling_db must be a finite value in [-60, 0] dBFS, got {peak_ceiling_db!r}")


def _gain(arr: np.ndarray, rate: int, target_lufs: float, peak_ceiling_db: float) -> LoudnessGain:
    measured = _measure(arr, rate)
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    ceiling = 10.0 ** (peak_ceiling_db / 20.0)
    reason = ""
    if measured < ABSOLUTE_GATE_LUFS:  # silence, or -inf
        reason = REASON_SILENT
    elif arr.shape[0] < int(math.ceil(_BLOCK_S * rate)):
        # the looped measurement is fine for reporting, but a gain from a clip this short would be a guess
        reason = REASON_TOO_SHORT
    if reason:  # the level is kept, but the peak ceiling holds for every output
        return (
            LoudnessGain(ceiling / peak, measured, True, reason)
            if peak > ceiling
            else LoudnessGain(1.0, measured, False, reason)
        )
    gain = 10.0 ** ((target_lufs - measured) / 20.0)
    if peak * gain > ceiling:
        return LoudnessGain(ceiling / peak, measured, True)
    return LoudnessGain(gain, measured, False)


def loudness_gain(
    x: np.ndarray, rate: int, target_lufs: float = -23.0, *, peak_ceiling_db: float = -1.0
) -> LoudnessGain:
    """The gain that :func:`normalize_loudness` would apply to ``x`` (e.g. to reuse on later chunks).

    ``gain`` is 1.0 with a non-empty ``reason`` when the audio is left unchanged (silent, or
    shorter than the 400 ms gating block); then, if the peak is above the ceiling, ``gain`` lowers it to
    the ceiling (``peak_limited``).
    """
    _check_targets(target_lufs, peak_ceiling_db)
    return _gain(_as_audio(x, "loudness_gain"), check_rate(rate, "rate"), target_lufs, peak_ceiling_db)


def normalize_loudness(
    x: np.ndarray, rate: int, target_lufs: float = -23.0, *, peak_ceiling_db: float = -1.0
) -> np.ndarray:
    """Scale ``x`` to ``target_lufs`` integrated loudness without letting the peak pass the ceiling.

    One linear gain is applied to the whole signal: the one that reaches ``target_lufs`` (in
    [-70, 0]), lowered if the sample peak would then exceed ``peak_ceiling_db`` dBFS (in
    [-60, 0]) so that the peak sits at the ceiling; the output is then quieter than the target
    (logged at DEBUG level; :func:`loudness_gain` returns it as ``peak_limited``). The result
    never clips. Silent audio (all zeros, or below the -70 LUFS absolute gate) and audio shorter
    than the 400 ms gating block keep their level (gain 0 dB; :func:`loudness_gain` gives the
    reason), except that a peak above the ceiling is still lowered to it. Returns float32 of the
    input's shape; never warns.
    """
    _check_targets(target_lufs, peak_ceiling_db)
    arr = _as_audio(x, "normalize_loudness")
    g = _gain(arr, check_rate(rate, "rate"), target_lufs, peak_ceiling_db)
    if g.reason:
        log.debug("normalize_loudness: level kept (%s)%s", g.reason, "; peak-limited" if g.peak_limited else "")
        if not g.peak_limited:
            return arr.astype(np.float32, copy=True)
    elif g.peak_limited:
        log.debug(
            "normalize_loudness: peak-limited to %.1f dBFS; loudness %.2f LUFS instead of %.2f",
            peak_ceiling_db,
            g.measured_lufs + 20.0 * math.log10(g.gain),
            target_lufs,
        )
    out = (arr.astype(np.float64) * g.gain).astype(np.float32)
    if g.peak_limited:  # float32 rounding may land an ulp above the ceiling
        ceiling = np.float32(10.0 ** (peak_ceiling_db / 20.0))
        np.clip(out, -ceiling, ceiling, out=out)
    return out
