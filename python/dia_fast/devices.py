"""Device and dtype resolution shared by the API, the CLI and the bench."""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .info import default_device

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto" -> cuda > mps > cpu; otherwise the named device, checked to exist."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' requested but no Apple GPU is available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device type {dev.type!r} (use cpu, cuda or mps)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None / "auto" -> bf16 on CUDA, f16 on MPS, f32 on CPU; otherwise the named float dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype} (use float32, bfloat16 or float16)")
        return dtype
    if dtype is None or dtype.lower() == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)") from None


def _omp_set_num_threads() -> Callable[[int], None] | None:
    """OpenMP's ``omp_set_num_threads`` of the runtime torch uses (loaded globally with torch), or None."""
    candidates = [None, *sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*.so*")))]
    for path in candidates:
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError, TypeError):  # (TypeError: no process handle from None on Windows)
            continue
    return None


def set_thread_cpu_threads(n: int) -> bool:
    """Run torch's CPU ops in the calling thread on ``n`` intra-op threads, leaving every other thread and
    torch's process-wide default (``torch.set_num_threads``) as they are (OpenMP keeps this setting per thread).
    Returns whether it took effect (torch then reports ``n`` in this thread); False where torch's CPU threads are
    not OpenMP's or the runtime cannot be reached, and nothing changed.

    Used by :class:`dia_fast.serving.BatchEngine`: on this project's 2-core test machine, torch's 2 threads in a
    thread other than the main one made the tiny model's steps ~1.5x slower than 1 thread (OpenMP's fork and
    join cost more there than the small ops gain), and 1 thread leaves the other core to decode audio."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if torch.get_num_threads() == n:  # (this also makes torch initialise the thread's setting first)
        return True
    setter = _omp_set_num_threads()
    if setter is None:
        return False
    before = torch.get_num_threads()
    setter(int(n))
    if torch.get_num_threads() == n:
        return True
    setter(before)
    return False


SMALL_MODEL_HIDDEN = 256  # decoder width up to which one CPU thread is the default of the CLI and the bench


def default_cpu_threads(decoder_hidden_size: int) -> int | None:
    """torch CPU threads the command-line tools use when none is given: 1 for small models (decoder width up
    to 256, e.g. the tiny demo), else None (torch's default, one per core).

    Measured on the 2-core test machine (``python -m dia_fast.bench``, one process per setting): the tiny model
    stepped at 348 steps/s on 1 thread and 319 on 2 while the machine was quiet, and at 359 vs 73 with one core
    busy; at Dia-1.6B's width (2 layers) 2 threads gave 30.8 steps/s and 1 gave 17.7."""
    return 1 if decoder_hidden_size <= SMALL_MODEL_HIDDEN else None


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's CPU thread count when the block ends (a command's ``--threads`` applies to its run only)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def use_default_cpu_threads(device: torch.device, decoder_hidden_size: int) -> int | None:
    """On the CPU, set torch's threads to :func:`default_cpu_threads`; returns the count set (None: left as is)."""
    n = default_cpu_threads(decoder_hidden_size) if device.type == "cpu" else None
    if n is not None:
        torch.set_num_threads(n)
    return n


def release_host_memory() -> None:
    """Hand memory that was freed back to the operating system where the C library allows it (glibc's
    ``malloc_trim``; elsewhere nothing): loading frees gigabytes of temporaries that would otherwise stay in the
    process's resident set."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        pass
