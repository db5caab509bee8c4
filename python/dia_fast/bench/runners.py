"""The measured runs: dia_fast's decode loop (with and without CUDA graphs), its streaming time to
first audio, and transformers' ``DiaForConditionalGeneration.generate`` on the same weights, eager or
with transformers' own static cache + ``torch.compile`` path."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..generation.engine import engine_for
from ..generation.generate import generate_codes
from ..generation.sampling import SamplingConfig
from ..text import encode_batch
from .measure import PeakMemory, now, weight_bytes

if TYPE_CHECKING:
    from ..api import DiaTTS
    from ..model import DiaModel


@dataclass
class RunResult:
    """One engine at one batch size. Rates count decode steps (one frame of all 9 codebooks for
    every item of the batch) in the timed decode window, ``steps`` of them; times in seconds;
    ``peak_memory_bytes`` as described by ``memory_kind``; ``decode_steps_per_s`` is the fastest timed run,
    ``decode_steps_per_s_runs`` every timed run in order."""

    engine: str
    batch: int
    steps: int
    decode_steps_per_s: float
    audio_tokens_per_s: float
    realtime_factor: float
    prefill_s: float
    decode_s: float
    total_s: float
    warmup_s: float
    peak_memory_bytes: int
    memory_kind: str
    time_to_first_audio_s: float | None = None
    decode_steps_per_s_runs: list[float] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)
    speedup_end_to_end: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def free_engine_caches(model: DiaModel) -> None:
    """Drop the static decode buffers / graphs cached for earlier batch sizes, so that each batch
    size's peak memory is its own."""
    engine_for(model).clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Timing:
    prefill: float
    decode: float
    total: float
    steps: int


class Case:
    """One engine at one batch size: :meth:`warm_up` once (timed, with peak memory), then :meth:`run`
    any number of times (the bench interleaves the engines' runs, so that load changes on a shared
    machine hit them alike); :meth:`result` keeps the run with the fastest decode."""

    def __init__(
        self, engine: str, batch: int, device: torch.device, channels: int, frame_rate: float, weights: int
    ) -> None:
        self.engine, self.batch, self.device = engine, batch, device
        self._channels, self._rate, self._weights = channels, frame_rate, weights
        self._runs: list[_Timing] = []
        self._warm = 0.0
        self._mem: PeakMemory | None = None
        self.notes: list[str] = []

    def _call(self) -> _Timing:
        raise NotImplementedError

    def warm_up(self) -> None:
        with PeakMemory(self.device) as mem:
            self._warm = self._call().total
        self._mem = mem

    def prime(self) -> None:
        """One call that is neither timed nor measured (the bench's first-call pass: one-time costs)."""
        self._call()

    def run(self) -> None:
        self._runs.append(self._call())

    def result(self) -> RunResult:
        if not self._runs or self._mem is None:
            raise RuntimeError(f"{self.engine}: warm_up() and run() first")
        best = min(self._runs, key=lambda t: t.decode / max(t.steps, 1))
        rate = best.steps / max(best.decode, 1e-12)
        res = RunResult(
            engine=self.engine,
            batch=self.batch,
            steps=best.steps,
            decode_steps_per_s=rate,
            audio_tokens_per_s=rate * self._channels * self.batch,
            realtime_factor=rate / self._rate,
            prefill_s=best.prefill,
            decode_s=best.decode,
            total_s=best.total,
            warmup_s=self._warm,
            peak_memory_bytes=self._mem.peak_bytes + self._weights,
            memory_kind=self._mem.kind,
            decode_steps_per_s_runs=[t.steps / max(t.decode, 1e-12) for t in self._runs],
        )
        res.notes.extend(self.notes)
        return res


class DiaFastCase(Case):
    """dia_fast's ``generate_codes`` (``graphs=None``: CUDA graphs or CPU graphs where available; False: eager
    steps)."""

    def __init__(
        self,
        tts: DiaTTS,
        texts: list[str],
        steps: int,
        sampling: SamplingConfig,
        *,
        graphs: bool | None,
        engine: str,
    ) -> None:
        data = tts.config.data
        super().__init__(engine, len(texts), tts.device, data.channels, tts.codec.frame_rate, weight_bytes(tts.model))
        self._model = tts.model
        self._ids, self._mask = encode_batch(texts, data.text_length)
        self._kwargs: dict[str, Any] = dict(
            max_new_tokens=steps,
            sampling=sampling,
            progress=False,
            frame_rate=tts.codec.frame_rate,
            cuda_graphs=graphs,
            cpu_graphs=graphs,
        )
        self._last: Any = None

    def _call(self) -> _Timing:
        gen = torch.Generator(device=self.device).manual_seed(0)
        t = now(self.device)
        out = self._last = generate_codes(self._model, self._ids, self._mask, generator=gen, **self._kwargs)
        return _Timing(out.prefill_seconds, out.decode_seconds, now(self.device) - t, out.steps)

    def warm_up(self) -> None:
        super().warm_up()
        last = self._last
        self.notes.append(f"cuda_graphs={bool(last.cuda_graphs)}")
        if self.device.type == "cpu":
            why = "" if last.cpu_graph else f" ({last.cpu_graph_note})"
            self.notes.append(f"cpu_graph={bool(last.cpu_graph)}{why}")
        if self._last.warmup_seconds:
            self.notes.append(f"graph capture in the warm-up call: {self._last.warmup_seconds:.3f} s")


def time_to_first_audio(
    tts: DiaTTS, text: str, steps: int, sampling: SamplingConfig, *, chunk_frames: int, first_chunk_frames: int
) -> float | None:
    """Seconds from starting a stream to its first audio chunk (batch 1; the stream is then closed), measured on a
    second stream: the first one pays the streaming path's one-time costs (the codec's first calls at the chunks'
    shapes, the stream's buffers), which on an H200 made a single cold measurement vary from 0.25 to 1.4 s."""
    from ..generation.stream import stream_generate

    seconds = None
    for _ in range(2):
        stream = stream_generate(
            tts,
            text,
            chunk_frames=chunk_frames,
            first_chunk_frames=first_chunk_frames,
            max_new_tokens=steps,
            seed=0,
            **asdict(sampling),  # the stream takes SamplingConfig's fields as keywords
        )
        with stream:
            for _ in stream:
                break
        seconds = stream.stats.time_to_first_audio_s
    return seconds


# ---------------------------------------------------------------------------------------------- transformers


def build_transformers(tts: DiaTTS) -> tuple[Any, Any]:
    """transformers' ``DiaForConditionalGeneration`` holding dia_fast's weights (same device and dtype,
    norms included, as transformers runs them), and a ``DiaProcessor`` for its inputs."""
    from transformers import (
        DacConfig,
        DacModel,
        DiaFeatureExtractor,
        DiaForConditionalGeneration,
        DiaProcessor,
        DiaTokenizer,
    )
    from transformers import DiaConfig as HFDiaConfig
    from transformers import initialization as hf_init

    from ..checkpoint import to_transformers

    with _quiet_transformers():  # deprecation notes about where transformers wants the special ids
        cfg = HFDiaConfig(**tts.config.to_dict())
    with hf_init.no_init_weights(), torch.device(tts.device):
        model = DiaForConditionalGeneration._from_config(cfg, dtype=tts.dtype)
    state = to_transformers({k: v.detach() for k, v in tts.model.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight conversion to transformers failed: missing {missing}, unexpected {unexpected}")
    model = model.to(device=tts.device, dtype=tts.dtype).eval()
    # The processor's codec only matters for audio prompts (none here): a small random DAC keeps it cheap.
    dac = DacModel(DacConfig(encoder_hidden_size=8, decoder_hidden_size=32, sampling_rate=44100)).eval()
    processor = DiaProcessor(DiaFeatureExtractor(sampling_rate=44100, hop_length=512), DiaTokenizer(), dac)
    return model, processor


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' generation-config warnings (e.g. ``top_k`` "not valid" in greedy mode, where Dia
    still uses it for the CFG filter) are noise in the bench output."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class _CompileEvents:
    """Counts torch.compile events while the ``with`` block runs: Dynamo compiles (first compiles and
    recompiles) and CUDA-graph recordings (``mode="reduce-overhead"`` on CUDA). Both stay ``None`` where
    this torch has no ``torch._dynamo.callback_handler`` with trigger types."""

    def __init__(self) -> None:
        self.dynamo: int | None = None
        self.cudagraph_records: int | None = None
        self._handler: Any = None

    def _on_start(self, args: Any) -> None:
        trigger = getattr(args, "callback_trigger", None)
        if trigger == self._trigger.DYNAMO:
            self.dynamo = (self.dynamo or 0) + 1
        elif trigger == self._trigger.CUDAGRAPH_RECORDING:
            self.cudagraph_records = (self.cudagraph_records or 0) + 1

    def __enter__(self) -> _CompileEvents:
        try:
            from torch._dynamo import callback_handler
            from torch._dynamo.callback import CallbackTrigger
        except ImportError:
            return self
        self._handler, self._trigger = callback_handler, CallbackTrigger
        self.dynamo = self.cudagraph_records = 0
        callback_handler.register_start_callback(self._on_start)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._on_start)


@functools.cache
def _step_marker_type() -> type:
    """A transformers ``StoppingCriteria`` that never stops. ``generate`` calls it once per generated
    token, outside the (possibly compiled) forward: it counts the steps, and its first call, after the
    prefill forward and the first token's logits processing, records the end of prefill (one sync)."""
    from transformers import StoppingCriteria

    class StepMarker(StoppingCriteria):
        def __init__(self, device: torch.device) -> None:
            self.device, self.steps, self.prefill_end = device, 0, 0.0

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            if self.steps == 0:
                self.prefill_end = now(self.device)
            self.steps += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepMarker


def transformers_guidance(cfg_scale: float) -> float | None:
    """transformers' ``guidance_scale`` for dia_fast's ``cfg_scale``: the same formula, cond + s * (cond - uncond),
    but transformers turns guidance off at exactly 1 (and refuses 0 < s < 1) where dia_fast turns it off at 0. So 0
    is None (no unconditional rows in either), and a scale in (0, 1] has no transformers equivalent: an error rather
    than a comparison of different work."""
    if cfg_scale == 0:
        return None
    if cfg_scale <= 1:
        raise ValueError(
            f"cfg_scale={cfg_scale:g} has no transformers equivalent (its guidance_scale is off at 1 and refuses "
            "0-1): compare at 0 (no CFG) or above 1"
        )
    return float(cfg_scale)


class TransformersCase(Case):
    """``generate(**processor(text), max_new_tokens=steps, guidance_scale=..., top_k=...)`` timed from
    outside; a never-stopping stopping criterion counts the steps and marks the end of prefill (the
    encoder and the first decoder forward, eager in both modes).

    ``compiled=True`` is transformers' own compiled decoding (engine ``transformers-compile``):
    ``cache_implementation="static"`` and a ``CompileConfig`` with transformers' defaults (inductor,
    ``mode="reduce-overhead"`` = CUDA graphs on CUDA, ``fullgraph=False``, ``dynamic=None``), with which
    ``generate`` runs every decode step through ``torch.compile(model.__call__)``. transformers compiles
    on its own only on CUDA/XPU/TPU/Neuron; elsewhere the config's ``_compile_all_devices`` flag
    (transformers' switch for that, used by its tests) asks for it. ``compile_backend``: another Dynamo
    backend (the tests use ``"aot_eager"``: the same path without inductor's slow CPU compile). The
    warm-up call pays the compile; the notes count compiles and CUDA-graph recordings in the warm-up and
    in the timed calls. ``last_output``: the codes ``generate`` returned last.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        texts: list[str],
        steps: int,
        sampling: SamplingConfig,
        *,
        channels: int,
        frame_rate: float,
        compiled: bool = False,
        compile_backend: str = "inductor",
        engine: str | None = None,
    ) -> None:
        device = next(model.parameters()).device
        engine = engine or ("transformers-compile" if compiled else "transformers")
        super().__init__(engine, len(texts), device, channels, frame_rate, weight_bytes(model))
        self._model = model
        with warnings.catch_warnings():  # the processor warns that max_length is unused with padding=True
            warnings.simplefilter("ignore")
            self._inputs = {k: v.to(device) for k, v in processor(text=texts, padding=True).items()}
        self._kwargs: dict[str, Any] = dict(
            max_new_tokens=steps,
            guidance_scale=transformers_guidance(sampling.cfg_scale),
            top_k=sampling.cfg_filter_top_k,
        )
        if sampling.greedy:
            self._kwargs["do_sample"] = False
        else:
            self._kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        self._compiled = compiled
        if compiled:
            from transformers import CompileConfig

            config = CompileConfig(backend=compile_backend)  # one instance: generate keeps its compiled call
            if device.type not in ("cuda", "xpu"):
                config._compile_all_devices = True
            self._kwargs.update(cache_implementation="static", compile_config=config)
        self._timed_events: list[_CompileEvents] = []
        self.last_output: torch.Tensor | None = None

    def _call(self) -> _Timing:
        from transformers import StoppingCriteriaList

        device = self.device
        marker = _step_marker_type()(device)
        torch.manual_seed(0)
        t = now(device)
        with _quiet_transformers():
            self.last_output = self._model.generate(
                **self._inputs, **self._kwargs, stopping_criteria=StoppingCriteriaList([marker])
            )
        total = now(device) - t
        prefill = marker.prefill_end - t
        # The first token comes out of the prefill forward (timed as prefill), so the decode window holds
        # one forward and one sampling fewer than the tokens generated: count those, as dia_fast's steps do.
        return _Timing(prefill, total - prefill, total, max(marker.steps - 1, 0))

    def _events_text(self, events: _CompileEvents) -> str:
        text = f"{events.dynamo} Dynamo compile(s)"
        return text + (f", {events.cudagraph_records} CUDA-graph recording(s)" if self.device.type == "cuda" else "")

    def warm_up(self) -> None:
        compiled_before = hasattr(self._model, "_compiled_call")  # an earlier batch size compiled already
        with _CompileEvents() as events:
            super().warm_up()
        if not self._compiled:
            return
        if not hasattr(self._model, "_compiled_call") or (not compiled_before and events.dynamo == 0):
            raise RuntimeError(
                "transformers-compile: generate() did not compile the decoder forward (its static-cache "
                "compile criteria were not met)"
            )
        if events.dynamo is not None:
            self.notes.append(f"warm-up call (not timed): {self._events_text(events)}")

    def run(self) -> None:
        with _CompileEvents() as events:
            super().run()
        self._timed_events.append(events)

    def result(self) -> RunResult:
        res = super().result()
        if self._compiled and self._timed_events and self._timed_events[0].dynamo is not None:
            total = _CompileEvents()
            total.dynamo = sum(e.dynamo or 0 for e in self._timed_events)
            total.cudagraph_records = sum(e.cudagraph_records or 0 for e in self._timed_events)
            res.notes.append(f"{len(self._timed_events)} timed call(s): {self._events_text(total)}")
        return res
