"""``VoicePool``: one loaded model + codec per device, shared by many callers through continuous batching.

Requests from asyncio tasks and threads go to a :class:`~dia_fast.serving.BatchEngine`: each joins the running
batch at the next decode step, whatever its settings or seed, and leaves it as soon as it is done. Each caller
gets its own result or its own error, and a seeded request's codes do not depend on what runs beside it.
"""

from __future__ import annotations

import asyncio
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..generation.sampling import SamplingConfig
from ..options import check_int_option
from ..serving import BatchEngine, RequestHandle, default_max_slots
from ..text import check_prompted_text, warn_doubtful_text

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["GenerationOptions", "PoolResult", "VoicePool", "default_max_batch"]


def default_max_batch(device: torch.device | str) -> int:
    """Requests decoded together by default: 16 on CUDA, 4 on Apple GPUs, 8 on the CPU
    (:func:`dia_fast.serving.default_max_slots`)."""
    return default_max_slots(device)


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings of a request (the arguments of :meth:`DiaTTS.generate`, and ``min_new_tokens``: no EOS
    before that many decoder steps). Requests with different options and seeds share decode steps."""

    max_new_tokens: int | None = None
    cfg_scale: float = 3.0
    temperature: float = 1.2
    top_p: float = 0.95
    cfg_filter_top_k: int | None = 45
    do_sample: bool = True
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        # checked when built (a Conversation or a request), not at generation; NumPy integers become ints
        sampling = SamplingConfig(self.cfg_scale, self.temperature, self.top_p, self.cfg_filter_top_k, self.do_sample)
        checked = {
            "cfg_filter_top_k": sampling.cfg_filter_top_k,
            "do_sample": sampling.do_sample,
            "max_new_tokens": check_int_option("max_new_tokens", self.max_new_tokens, minimum=1, optional=True),
            "min_new_tokens": check_int_option("min_new_tokens", self.min_new_tokens, minimum=0),
            "seed": check_int_option("seed", self.seed, optional=True),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PoolResult:
    """One request's output: codes ``[T, C]`` (prompt excluded) and float32 mono PCM. ``truncated``:
    ``max_new_tokens`` ended the speech before the model did."""

    codes: torch.Tensor
    audio: np.ndarray
    sample_rate: int
    truncated: bool = False

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


class VoicePool:
    """A loaded Dia model and codec on one device, shared by many callers.

    ``model``: a :class:`~dia_fast.DiaTTS`, or a checkpoint path / hub id loaded with
    ``DiaTTS.from_pretrained(model, device=device, dtype=dtype)``. ``max_batch``: requests decoded together at
    most (the engine's slots, rounded up to a power of two; default :func:`default_max_batch` of the device).
    ``batch_window_ms`` is deprecated and has no effect (a :class:`DeprecationWarning` says so when it is
    given): requests join a running batch at the next decode step, no window is needed.

    Use ``await pool.generate(text, ...)`` from asyncio tasks or ``pool.generate_sync(text, ...)`` from plain
    threads: both batch with everything else that runs. ``pool.engine`` is the
    :class:`~dia_fast.serving.BatchEngine`; ``pool.stats`` counts requests, decode steps, steps that ran more
    than one request and the largest batch. ``close()`` (or ``with VoicePool(...)``) stops the engine; a pool that
    is dropped without it lets its engine finish the requests it was given, then stop.
    """

    def __init__(
        self,
        model: DiaTTS | str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch: int | None = None,
        *,
        batch_window_ms: float | None = None,
    ) -> None:
        from ..api import DiaTTS

        if isinstance(model, DiaTTS):
            if device is not None and not _same_device(torch.device(device), model.device):
                raise ValueError(f"the model is on {model.device}, not on the requested device {device}")
            if dtype is not None:
                raise ValueError("dtype applies when the pool loads the model; this DiaTTS is already loaded")
            self.tts = model
        elif isinstance(model, (str, Path)):
            self.tts = DiaTTS.from_pretrained(model, device=device, dtype=dtype)
        else:
            raise TypeError(f"model must be a DiaTTS or a checkpoint path, got {type(model).__name__}")
        max_batch = check_int_option("max_batch", max_batch, minimum=1, optional=True)
        self.max_batch = default_max_batch(self.tts.device) if max_batch is None else max_batch
        if batch_window_ms is not None:
            warnings.warn(
                "VoicePool(batch_window_ms=...) has no effect and is deprecated: requests join the running batch "
                "at the next decode step",
                DeprecationWarning,
                stacklevel=2,
            )
        slots = 1 << (self.max_batch - 1).bit_length()
        self.engine = BatchEngine(self.tts, max_slots=slots, max_queue=max(64, 4 * slots))
        self._closed = False
        # a pool dropped without close(): its engine finishes what it was given, then stops (its thread would
        # otherwise keep the engine, its caches and the model alive until the process ends)
        weakref.finalize(self, self.engine.close, drain=True, timeout=0)

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.tts.device

    @property
    def sample_rate(self) -> int:
        return self.tts.sample_rate

    @property
    def codec(self) -> Any:
        return self.tts.codec

    @property
    def stats(self) -> dict[str, int]:
        """``requests``, ``steps``, ``batched_steps`` (steps that ran more than one request), ``largest_batch``."""
        st = self.engine.stats
        return {k: st[k] for k in ("requests", "steps", "batched_steps", "largest_batch")}

    # ------------------------------------------------------------------------------ requests
    def _submit_kwargs(
        self, text: str | Sequence[str], audio_prompt: Any, audio_prompt_text: str | None, options: dict
    ) -> dict:
        """Checks in the caller: a text is one generation (``Conversation`` splits long texts itself, and hands
        the pieces over as a list)."""
        if self._closed:
            raise RuntimeError("this VoicePool is closed")
        opts = GenerationOptions(**options)
        if audio_prompt_text and audio_prompt is None:
            raise ValueError("audio_prompt_text was given without an audio_prompt")
        for piece in [text] if isinstance(text, str) else text:
            check_prompted_text(piece, audio_prompt_text, self.tts.config.data.text_length)
        if isinstance(text, str):  # (a list of pieces comes from a Conversation, which warned about its text)
            warn_doubtful_text(text, stacklevel=4)
        return dict(text=text, audio_prompt=audio_prompt, audio_prompt_text=audio_prompt_text, **opts.kwargs())

    async def generate(
        self,
        text: str,
        *,
        audio_prompt: Any = None,
        audio_prompt_text: str | None = None,
        **options: Any,
    ) -> PoolResult:
        """Speak one text; concurrent calls are batched. ``options``: see :class:`GenerationOptions`.

        ``audio_prompt`` (codes ``[T, C]``, a path or samples at the codec rate) and its
        transcript ``audio_prompt_text`` clone a voice, as in :meth:`DiaTTS.generate`.
        """
        kw = self._submit_kwargs(text, audio_prompt, audio_prompt_text, options)
        if audio_prompt is not None and not isinstance(audio_prompt, torch.Tensor):  # encoding a file takes time
            kw["audio_prompt"] = await asyncio.to_thread(self.tts.encode_prompt, audio_prompt)
        res = await self.engine.generate(**kw)
        return PoolResult(res.codes, res.audio, res.sample_rate, res.truncated)

    def submit(
        self,
        text: str | Sequence[str],
        *,
        audio_prompt: Any = None,
        audio_prompt_text: str | None = None,
        stream: bool = False,
        chunk_frames: int | None = None,
        first_chunk_frames: int | None = None,
        crossfade_ms: float | None = None,
        **options: Any,
    ) -> RequestHandle:
        """Queue one text on the engine and return its :class:`~dia_fast.serving.RequestHandle` at once
        (``stream=True``: iterate it for audio chunks of ``chunk_frames`` codec frames). A list of texts is one
        request spoken as those pieces, joined with a ``crossfade_ms`` crossfade
        (:meth:`~dia_fast.serving.BatchEngine.submit`)."""
        kw = self._submit_kwargs(text, audio_prompt, audio_prompt_text, options)
        return self.engine.submit(
            **kw,
            stream=stream,
            chunk_frames=chunk_frames,
            first_chunk_frames=first_chunk_frames,
            crossfade_ms=crossfade_ms,
        )

    def generate_sync(
        self,
        text: str,
        *,
        audio_prompt: Any = None,
        audio_prompt_text: str | None = None,
        **options: Any,
    ) -> PoolResult:
        """Blocking :meth:`generate` for one text; safe to call from several threads (they batch together)."""
        res = self.engine.submit(**self._submit_kwargs(text, audio_prompt, audio_prompt_text, options)).result()
        return PoolResult(res.codes, res.audio, res.sample_rate, res.truncated)

    # ------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the engine; requests still running fail, later ones raise RuntimeError."""
        self._closed = True
        self.engine.close()

    def __enter__(self) -> VoicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VoicePool({self.tts!r}, max_batch={self.max_batch})"


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    """``"cuda"`` (no index) matches the model's ``cuda:0``; an explicit index must match."""
    if requested.type != actual.type:
        return False
    return requested.index is None or actual.index is None or requested.index == actual.index
