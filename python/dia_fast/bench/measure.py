"""Timing and peak-memory measurement for the bench (CUDA allocator stats, or the peak RSS on CPU and MPS)."""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    sync(device)
    return time.perf_counter()


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    """The process's peak resident set so far, from ``getrusage``: in bytes on macOS, in KiB on Linux and the BSDs."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library or OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere), so that memory
    freed earlier in the process counts again in the resident set when it is used again."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory used while the ``with`` block runs, above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache). CPU: the
    process's peak resident set (Linux VmHWM, reset on entry through ``/proc/self/clear_refs``, after the C heap's
    free pages are handed back by :func:`release_free_heap`, so that reused freed memory is counted;
    ``ru_maxrss`` elsewhere, which cannot be reset and may then under-report). MPS has no peak counter: it is
    measured as the CPU is (on macOS ``ru_maxrss``). ``kind`` says which.
    ``after_bytes``: what is still in use at the end, above the same start (CUDA: allocated; CPU: VmRSS, 0 where
    there is none).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.after_bytes = 0
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        release_free_heap()
        if _reset_peak_rss() and _status_kib("VmHWM") is not None:
            self.kind = "cpu_peak_rss_vmhwm"
            self._base = (_status_kib("VmRSS") or 0) * 1024
        else:
            self.kind = "cpu_peak_rss_ru_maxrss"
            self._base = _ru_maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.kind == "cuda_max_memory_allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
            after = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_vmhwm":
            peak = (_status_kib("VmHWM") or 0) * 1024
            after = (_status_kib("VmRSS") or 0) * 1024
        else:
            peak = _ru_maxrss_bytes()
            after = (_status_kib("VmRSS") or 0) * 1024
        self.peak_bytes = max(int(peak - self._base), 0)
        self.after_bytes = max(int(after - self._base), 0)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (int8 layers hold their weights and scales as buffers; a torchao
    weight counts the tensors inside it, not its full-precision shape)."""
    from ..quantize import stored_bytes

    return sum(stored_bytes(t) for t in list(module.parameters()) + list(module.buffers()))
