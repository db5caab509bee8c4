"""Metal backend for Apple GPUs (mps). Filled in by the native-backend work."""

from __future__ import annotations


def available() -> tuple[bool, str]:
    """(available, reason) for the Metal kernels on this machine."""
    return False, "Metal kernels are not implemented yet"
