"""The measured runs: dia_fast's decode loop (with and without CUDA graphs), its streaming time to
first audio, and transformers' ``DiaForConditionalGeneration.generate`` on the same weights."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..generation.generate import generate_codes
from ..generation.sampling import SamplingConfig
from ..text import encode_batch
from .measure import PeakMemory, now, weight_bytes

if TYPE_CHECKING:
    from ..api import DiaTTS

Log = Callable[[str], None]


@dataclass
class RunResult:
    """One engine at one batch size. Rates count decode steps (one frame of all 9 codebooks for
    every item of the batch); times in seconds; ``peak_memory_bytes`` as described by ``memory_kind``."""

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
    speedup: dict[str, float] = field(default_factory=dict)
    speedup_end_to_end: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(
    engine: str,
    batch: int,
    steps: int,
    prefill: float,
    decode: float,
    total: float,
    warmup: float,
    mem: PeakMemory,
    weights: int,
    channels: int,
    frame_rate: float,
) -> RunResult:
    rate = steps / max(decode, 1e-12)
    return RunResult(
        engine=engine,
        batch=batch,
        steps=steps,
        decode_steps_per_s=rate,
        audio_tokens_per_s=rate * channels * batch,
        realtime_factor=rate / frame_rate,
        prefill_s=prefill,
        decode_s=decode,
        total_s=total,
        warmup_s=warmup,
        peak_memory_bytes=mem.peak_bytes + weights,
        memory_kind=mem.kind,
    )


def _free_engine_caches(model: torch.nn.Module) -> None:
    """Drop the static decode buffers / graphs cached for earlier batch sizes, so that each
    configuration's peak memory is its own."""
    try:
        from ..generation.engine import engine_for
    except ImportError:
        return
    try:
        engine_for(model).clear()  # type: ignore[arg-type]
    except (AttributeError, TypeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_dia_fast(
    tts: DiaTTS,
    texts: list[str],
    steps: int,
    sampling: SamplingConfig,
    *,
    repeat: int,
    cuda_graphs: bool | None,
    engine: str,
    log: Log,
) -> RunResult:
    """Warm-up call (includes CUDA-graph capture where used), then ``repeat`` timed calls; the fastest
    decode is kept. Peak memory covers warm-up and timed calls."""
    device = tts.device
    ids, mask = encode_batch(texts, tts.config.data.text_length)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=steps, sampling=sampling, progress=False, frame_rate=tts.codec.frame_rate
    )
    if "cuda_graphs" in inspect.signature(generate_codes).parameters:
        kwargs["cuda_graphs"] = cuda_graphs

    def call() -> tuple[Any, float]:
        gen = torch.Generator(device=device).manual_seed(0)
        t = now(device)
        out = generate_codes(tts.model, ids, mask, generator=gen, **kwargs)
        return out, now(device) - t

    _free_engine_caches(tts.model)
    with PeakMemory(device) as mem:
        log(f"{engine} batch {len(texts)}: warm-up")
        out, warm = call()
        best = None
        for r in range(repeat):
            log(f"{engine} batch {len(texts)}: run {r + 1}/{repeat}")
            out, total = call()
            if best is None or out.decode_seconds < best[0].decode_seconds:
                best = (out, total)
    assert best is not None
    out, total = best
    res = _result(
        engine,
        len(texts),
        out.steps,
        out.prefill_seconds,
        out.decode_seconds,
        total,
        warm,
        mem,
        weight_bytes(tts.model),
        tts.config.data.channels,
        tts.codec.frame_rate,
    )
    graphs = getattr(out, "cuda_graphs", None)
    if graphs is not None:
        res.notes.append(f"cuda_graphs={bool(graphs)}")
    capture = getattr(out, "warmup_seconds", 0.0)
    if capture:
        res.notes.append(f"graph capture in the warm-up call: {capture:.3f} s")
    return res


def time_to_first_audio(
    tts: DiaTTS, text: str, steps: int, sampling: SamplingConfig, *, chunk_frames: int, first_chunk_frames: int
) -> float | None:
    """Seconds from starting a stream to its first audio chunk (batch 1; the stream is then closed)."""
    from ..generation.stream import stream_generate

    stream = stream_generate(
        tts,
        text,
        chunk_frames=chunk_frames,
        first_chunk_frames=first_chunk_frames,
        max_new_tokens=steps,
        cfg_scale=sampling.cfg_scale,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        cfg_filter_top_k=sampling.cfg_filter_top_k,
        do_sample=sampling.do_sample,
        seed=0,
    )
    with stream:
        for _ in stream:
            break
    return stream.stats.time_to_first_audio_s


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


def run_transformers(
    model: Any,
    processor: Any,
    texts: list[str],
    steps: int,
    sampling: SamplingConfig,
    *,
    repeat: int,
    channels: int,
    frame_rate: float,
    log: Log,
) -> RunResult:
    """``generate(**processor(text), max_new_tokens=steps, guidance_scale=...)`` timed from outside; a
    forward hook on the decoder marks the end of prefill (encoder + first decoder forward)."""
    device = next(model.parameters()).device
    with warnings.catch_warnings():  # the processor warns that max_length is unused with padding=True
        warnings.simplefilter("ignore")
        inputs = {k: v.to(device) for k, v in processor(text=texts, padding=True).items()}
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=steps, guidance_scale=sampling.cfg_scale, top_k=sampling.cfg_filter_top_k
    )
    if sampling.greedy:
        gen_kwargs["do_sample"] = False
    else:
        gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    marks: list[float] = []
    hook = model.model.decoder.register_forward_hook(lambda *_: marks.append(now(device)))

    def call() -> tuple[float, float, int]:
        marks.clear()
        torch.manual_seed(0)
        t = now(device)
        with _quiet_transformers():
            model.generate(**inputs, **gen_kwargs)
        end = now(device)
        return marks[0] - t, end - t, len(marks)

    try:
        with PeakMemory(device) as mem:
            log(f"transformers batch {len(texts)}: warm-up")
            _, warm, _ = call()
            best = None
            for r in range(repeat):
                log(f"transformers batch {len(texts)}: run {r + 1}/{repeat}")
                prefill, total, n = call()
                if best is None or total - prefill < best[1] - best[0]:
                    best = (prefill, total, n)
    finally:
        hook.remove()
    assert best is not None
    prefill, total, n = best
    return _result(
        "transformers",
        len(texts),
        n,
        prefill,
        total - prefill,
        total,
        warm,
        mem,
        weight_bytes(model),
        channels,
        frame_rate,
    )
