"""What a speech server serves and its limits (:class:`ServerSettings`), shared by the app, the CLI and Ray Serve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerSettings"]


@dataclass
class ServerSettings:
    """Settings of ``python -m dia_fast.serve`` (each is a command-line flag of the same name).

    ``model``: checkpoint path or hub id; None serves the random-weight tiny demo model (not speech), and the
    server says so in its log, ``/v1/models`` and ``/health``. ``max_batch``: requests decoded together (the
    engine's slots; default: the device's). ``max_queue``: requests waiting at most (then 429).
    ``voices_dir``: where ``POST /v1/audio/voices`` stores voices (None: voices cannot be stored).
    ``api_key``: when set, ``/v1/*`` needs ``Authorization: Bearer <key>``."""

    model: str | None = None
    codec: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # int8 / fp8 / int4 (dia_fast.quantize)
    max_batch: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    voices_dir: Path | None = None
    demo_seed: int = 0
    model_id: str | None = None  # the id /v1/models lists (default: the checkpoint's folder name, or dia-demo)
    max_input_chars: int = 4096
    max_body_bytes: int = 1 << 20  # JSON requests
    max_voice_bytes: int = 16 << 20  # voice uploads (multipart)
    max_voice_seconds: float = 20.0
    min_voice_seconds: float = 1.0
    request_timeout_s: float | None = 600.0
    chunk_frames: int = 43
    first_chunk_frames: int = 16
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.voices_dir is not None:
            self.voices_dir = Path(self.voices_dir)
        positive = (
            "max_queue",
            "max_input_chars",
            "max_body_bytes",
            "max_voice_bytes",
            "chunk_frames",
            "first_chunk_frames",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        numbers = ("max_voice_seconds", "min_voice_seconds", "shutdown_timeout_s", "request_timeout_s", "max_batch")
        for name in numbers:
            value, kind = getattr(self, name), int if name == "max_batch" else (int, float)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'}, got {value!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        for name in ("model", "codec", "device", "dtype", "quantize", "api_key", "model_id"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.max_batch is not None and (self.max_batch < 1 or self.max_batch & (self.max_batch - 1)):
            raise ValueError(f"max_batch must be a power of two >= 1, got {self.max_batch}")
        if not 0 < self.min_voice_seconds <= self.max_voice_seconds:
            raise ValueError("need 0 < min_voice_seconds <= max_voice_seconds")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {self.request_timeout_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")
        if self.quantize is not None and self.quantize not in ("int8", "fp8", "int4"):
            raise ValueError(f"quantize must be int8, fp8 or int4, got {self.quantize!r}")

    @property
    def demo(self) -> bool:
        return self.model is None

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.model is None:
            return "dia-demo"
        return Path(self.model.rstrip("/")).name or self.model
