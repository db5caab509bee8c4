"""``VoicePool``: one loaded model + codec per device, and a small async scheduler that batches requests.

Requests awaited from many asyncio tasks are collected for a short window (up to ``max_batch``),
grouped by their generation settings and run as one batched ``DiaTTS.generate`` call in a
worker thread, so the event loop stays free while the model runs. Each caller gets its own
result or its own error.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..text import encode_text, prompted_text

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["GenerationOptions", "PoolResult", "VoicePool", "default_max_batch"]

_DEFAULT_MAX_BATCH = {"cuda": 8, "mps": 4, "cpu": 1}


def default_max_batch(device: torch.device | str) -> int:
    """Requests per batched call by default: 8 on CUDA, 4 on Apple GPUs, 1 on the CPU (no gain there)."""
    return _DEFAULT_MAX_BATCH.get(torch.device(device).type, 1)


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings of a request (the arguments of :meth:`DiaTTS.generate`).

    Only requests with equal options share a batch: hashable on purpose. With sampling, the
    random stream of a batch differs from that of single runs even with the same ``seed``.
    """

    max_new_tokens: int | None = None
    cfg_scale: float = 3.0
    temperature: float = 1.2
    top_p: float = 0.95
    cfg_filter_top_k: int | None = 45
    do_sample: bool = True
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PoolResult:
    """One request's output: codes ``[T, C]`` (prompt excluded) and float32 mono PCM."""

    codes: torch.Tensor
    audio: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class _Request:
    text: str
    prompt: torch.Tensor | None
    prompt_text: str | None
    options: GenerationOptions
    future: asyncio.Future | None = field(default=None, repr=False)  # None: a synchronous call


@dataclass
class _LoopState:
    queue: asyncio.Queue
    task: asyncio.Task


class VoicePool:
    """A loaded Dia model and codec on one device, shared by many callers.

    ``model``: a :class:`~dia_fast.DiaTTS`, or a checkpoint path / hub id loaded with
    ``DiaTTS.from_pretrained(model, device=device, dtype=dtype)``. ``max_batch``: the most
    requests per batched ``generate`` call (default :func:`default_max_batch` of the device).
    ``batch_window_ms``: how long the scheduler waits for more requests after the first one.

    Use ``await pool.generate(text, ...)`` from asyncio tasks (concurrent calls are batched) or
    ``pool.generate_sync(text, ...)`` from plain threads (one call at a time on the model).
    ``pool.stats`` counts requests and batches. ``close()`` (or ``with VoicePool(...)``) stops the
    worker thread.
    """

    def __init__(
        self,
        model: DiaTTS | str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch: int | None = None,
        *,
        batch_window_ms: float = 5.0,
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
        self.max_batch = default_max_batch(self.tts.device) if max_batch is None else int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {batch_window_ms}")
        self.batch_window_s = batch_window_ms / 1000.0
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._model_lock = threading.Lock()  # one generate call on the model at a time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dia-voicepool")
        # one scheduler per running event loop; a scheduler removes its entry when it stops (a weak-keyed
        # dict would not: the state's task holds its loop, so every finished asyncio.run() stayed here)
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._closed = False

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

    # ------------------------------------------------------------------------------ requests
    def _check(self, text: str, prompt_text: str | None) -> None:
        """Fail in the caller, before batching, on what would fail the whole batch."""
        if self._closed:
            raise RuntimeError("this VoicePool is closed")
        encode_text(prompted_text(text, prompt_text), self.tts.config.data.text_length)

    def _prompt_codes(self, audio_prompt: Any) -> torch.Tensor | None:
        return None if audio_prompt is None else self.tts.encode_prompt(audio_prompt)

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
        opts = GenerationOptions(**options)
        self._check(text, audio_prompt_text)
        if audio_prompt_text and audio_prompt is None:
            raise ValueError("audio_prompt_text was given without an audio_prompt")
        loop = asyncio.get_running_loop()
        prompt = None
        if audio_prompt is not None:
            prompt = await loop.run_in_executor(self._executor, self._prompt_codes, audio_prompt)
        future: asyncio.Future = loop.create_future()
        self._state(loop).queue.put_nowait(_Request(text, prompt, audio_prompt_text, opts, future))
        return await future

    def generate_sync(
        self,
        text: str,
        *,
        audio_prompt: Any = None,
        audio_prompt_text: str | None = None,
        **options: Any,
    ) -> PoolResult:
        """Blocking :meth:`generate` for one text (no batching); safe to call from several threads."""
        opts = GenerationOptions(**options)
        self._check(text, audio_prompt_text)
        if audio_prompt_text and audio_prompt is None:
            raise ValueError("audio_prompt_text was given without an audio_prompt")
        return self._run_batch([_Request(text, self._prompt_codes(audio_prompt), audio_prompt_text, opts)])[0]

    # ------------------------------------------------------------------------------ scheduler
    def _state(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        state = self._loops.get(loop)
        if state is None or state.task.done():
            queue: asyncio.Queue = asyncio.Queue()
            state = _LoopState(queue, loop.create_task(self._scheduler(queue), name="dia-voicepool-scheduler"))
            self._loops[loop] = state
        return state

    async def _scheduler(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        pending: list[_Request] = []
        try:
            while True:
                pending = [await queue.get()]
                if _gone(pending[0]):
                    continue
                if queue.qsize() < self.max_batch - 1 and self.batch_window_s > 0:
                    await asyncio.sleep(self.batch_window_s)  # let concurrent callers join the batch
                while len(pending) < self.max_batch and not queue.empty():
                    req = queue.get_nowait()
                    if not _gone(req):
                        pending.append(req)
                live = [r for r in pending if not _gone(r)]  # a caller may have given up meanwhile
                groups: dict[GenerationOptions, list[_Request]] = {}
                for req in live:
                    groups.setdefault(req.options, []).append(req)
                for group in groups.values():
                    await self._run_group(loop, group)
                pending = []
        finally:  # cancelled (pool closed, loop shutting down): nobody may wait forever
            if (state := self._loops.get(loop)) is not None and state.queue is queue:
                del self._loops[loop]
            while not queue.empty():
                pending.append(queue.get_nowait())
            for req in pending:
                _settle(req.future, exc=RuntimeError("the VoicePool scheduler stopped before this request ran"))

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[_Request]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, group)
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0].future, exc=exc)
                return
            # one bad request must not fail the others: run each alone to route the error
            for req in group:
                try:
                    (result,) = await loop.run_in_executor(self._executor, self._run_batch, [req])
                except Exception as single_exc:
                    _settle(req.future, exc=single_exc)
                else:
                    _settle(req.future, result=result)
            return
        for req, result in zip(group, results, strict=True):
            _settle(req.future, result=result)

    def _run_batch(self, group: list[_Request]) -> list[PoolResult]:
        """One batched ``DiaTTS.generate`` call (runs in the worker thread or the caller's)."""
        has_prompt = any(r.prompt is not None for r in group)
        with self._model_lock:
            out = self.tts.generate(
                [r.text for r in group],
                audio_prompt=[r.prompt for r in group] if has_prompt else None,
                audio_prompt_text=[r.prompt_text if r.prompt is not None else None for r in group]
                if has_prompt
                else None,
                progress=False,
                **group[0].options.kwargs(),
            )
            self.stats["requests"] += len(group)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        return [PoolResult(c, a, out.sample_rate) for c, a in zip(out.codes, out.audio, strict=True)]

    # ------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the worker thread (after the running batch). Later requests raise RuntimeError."""
        self._closed = True
        for state in list(self._loops.values()):
            loop = state.task.get_loop()
            if not state.task.done() and not loop.is_closed():
                loop.call_soon_threadsafe(state.task.cancel)
        self._executor.shutdown(wait=True)

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


def _gone(req: _Request) -> bool:
    """True when the caller no longer waits (its future was cancelled)."""
    return req.future is None or req.future.done()


def _settle(future: asyncio.Future | None, *, result: Any = None, exc: BaseException | None = None) -> None:
    if future is None or future.done():  # the caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
