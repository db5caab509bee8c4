"""``dia_fast.info()``: what this installation runs on."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from . import _ext, ops
from ._version import __version__


def _version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_device() -> torch.device:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _extension() -> dict[str, Any]:
    build = _ext.build_info()
    build.pop("loaded", None)
    return {
        "loaded": _ext.loaded(),
        "reason": _ext.why_not() or "ok",
        "build": build if _ext.loaded() else None,  # compiler, OpenMP, arch, kernels, ...
    }


def _quantize() -> dict[str, Any]:
    from .quantize import CPU_MODES, CUDA_INT8_KERNEL, QUANT_MODES

    return {"cpu": list(CPU_MODES), "cuda": list(QUANT_MODES), "cuda_int8_kernel": CUDA_INT8_KERNEL}


def info() -> dict[str, Any]:
    """Version, extension status, backend per op per device, library versions, devices found."""
    dev = default_device()
    devices = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": dev.type == "mps"}
    return {
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "transformers": _version_of("transformers"),
        "torchao": _version_of("torchao"),  # quantize= on CUDA (docs/quantization.md)
        "quantize": _quantize(),
        "extension": _extension(),
        "device": str(dev),
        "cuda_device": torch.cuda.get_device_name(0) if devices["cuda"] else None,
        "devices": devices,
        "backends": ops.table(),
        "backend_availability": {
            b: {d: ops.backend_available(b, d)[1] for d in ("cpu", "cuda", "mps")} for b in ops.BACKENDS
        },
    }
