"""Float PCM -> 16-bit integer PCM, with optional TPDF dither (numpy reference + optional C++)."""

from __future__ import annotations

import numbers

import numpy as np

from .. import _ext

__all__ = ["cpp_pcm_available", "float_to_pcm16"]

_SCALE = 32767.0
_BACKENDS = ("numpy", "cpp")


def cpp_pcm_available() -> str:
    """Empty string when the compiled ``float_to_pcm16`` can be used, else the reason it cannot."""
    if not _ext.loaded():
        return f"dia_fast._C is not loaded ({_ext.why_not()})"
    if not hasattr(_ext.module(), "float_to_pcm16"):
        return "dia_fast._C has no float_to_pcm16"
    return ""


def _numpy_pcm16(x: np.ndarray, dither: bool, seed: int | None) -> np.ndarray:
    # via float32 like the C++ path (same inputs -> same outputs), then exact float64 arithmetic:
    # a float32 times 32767 fits in a double's mantissa, so no rounding happens before np.rint
    y = x.astype(np.float32, copy=False).astype(np.float64)  # a new array, also for 0-d input
    y *= _SCALE
    if dither:
        rng = np.random.default_rng(seed)
        # TPDF: the sum of two independent uniform [-0.5, 0.5) LSB noises (triangular on (-1, 1))
        y += rng.random(y.shape) - 0.5
        y += rng.random(y.shape) - 0.5
    # round-half-to-even (np.rint, as C's lrint/nearbyint in the default mode); clipping after
    # rounding equals clipping before because the bounds are integers
    np.rint(y, out=y)
    np.clip(y, -32768.0, 32767.0, out=y)
    return y.astype(np.int16)


def _cpp_pcm16(x: np.ndarray, dither: bool, seed: int | None) -> np.ndarray:
    src = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    dst = np.empty(src.shape, dtype=np.int16)
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**63 - 1))
    _ext.module().float_to_pcm16(src, dst, bool(dither), int(seed))
    return dst.reshape(x.shape)


def float_to_pcm16(
    x: np.ndarray, *, dither: bool = False, seed: int | None = None, backend: str | None = None
) -> np.ndarray:
    """Convert float samples (nominal range [-1, 1]) to int16 PCM of the same shape.

    Each sample is scaled by 32767, optionally dithered, rounded to the nearest integer (ties to
    even) and clipped to [-32768, 32767], so out-of-range input saturates instead of wrapping.

    ``dither=True`` adds TPDF dither (the sum of two uniform [-0.5, 0.5) LSB noises) before
    rounding, which changes each sample by at most 1 LSB relative to plain rounding.
    ``seed`` makes the dither reproducible: any int (not a bool), reduced modulo 2**64 by both backends, so
    ``-1`` and ``2**64 - 1`` are the same seed; ``None`` draws fresh noise.

    ``backend``: ``"numpy"`` (the reference), ``"cpp"`` (``dia_fast._C.float_to_pcm16``; raises
    ``RuntimeError`` when it is not available) or ``None`` (the C++ one for dithered conversion
    when available, else numpy). The two agree exactly without dither; with dither they use
    different random streams.

    Raises ``ValueError`` for NaN/inf samples, ``TypeError`` for a seed that is not an int.
    """
    if backend not in (None, *_BACKENDS):
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    if seed is not None:
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        seed = int(seed) % (1 << 64)  # one seed space for both backends (the C++ one wraps the same way)
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"float_to_pcm16 expects float samples, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("cannot convert NaN or infinite samples to PCM")
    if backend is None:
        # measured (benchmarks/test_bench_native.py): the C++ kernel is much faster with dither
        # (numpy's generator dominates) and no faster than numpy's vectorised path without it
        backend = "cpp" if dither and not cpp_pcm_available() else "numpy"
    if backend == "cpp":
        reason = cpp_pcm_available()
        if reason:
            raise RuntimeError(f"float_to_pcm16 backend 'cpp' is unavailable: {reason}")
        return _cpp_pcm16(arr, dither, seed)
    return _numpy_pcm16(arr, dither, seed)
