"""End-to-end generation benchmarks: dia_fast (CUDA graphs and eager), transformers' Dia on the same
weights (eager, and compiled on CUDA), and streaming time to first audio. The tiny model runs on CPU
everywhere; Dia-1.6B shapes (random weights, bf16) only with a CUDA GPU.

Run::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_e2e.py --benchmark-columns=mean,stddev,rounds

``extra_info`` of each case holds decode steps/s, audio tokens/s, the realtime factor, prefill time
and the warm-up (first call, CUDA-graph capture included) time; ``python -m dia_fast.bench`` prints
the same numbers as one table.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("pytest_benchmark")

from dia_fast.api import DiaTTS  # noqa: E402
from dia_fast.bench import TEXTS  # noqa: E402
from dia_fast.bench.runners import Case, DiaFastCase, TransformersCase, build_transformers  # noqa: E402
from dia_fast.generation.sampling import SamplingConfig  # noqa: E402
from dia_fast.generation.stream import stream_generate  # noqa: E402

GREEDY = SamplingConfig(do_sample=False)
TINY_STEPS, FULL_STEPS = 64, 256


@pytest.fixture(scope="module")
def tiny() -> DiaTTS:
    return DiaTTS.random("tiny", seed=0, device="cpu")


@pytest.fixture(scope="module")
def full() -> DiaTTS:
    from dia_fast.codec.dac import DacCodec

    codec = DacCodec.random("44khz", seed=0).to("cuda")
    return DiaTTS.random("dia-1.6b", seed=0, device="cuda", dtype="bfloat16", codec=codec)


def _texts(batch: int) -> list[str]:
    return [TEXTS[i % len(TEXTS)] for i in range(batch)]


def _bench(benchmark: Any, case: Case, rounds: int, steps: int, width: int) -> None:
    """Warm-up (timed on its own), then ``rounds`` timed calls; the bench's numbers go to extra_info."""
    case.warm_up()
    benchmark.group = f"e2e width {width} batch {case.batch}"
    benchmark.pedantic(case.run, rounds=rounds, warmup_rounds=0)
    res = case.result()
    benchmark.extra_info.update(
        steps=res.steps,
        batch=res.batch,
        decode_steps_per_s=round(res.decode_steps_per_s, 2),
        audio_tokens_per_s=round(res.audio_tokens_per_s, 1),
        realtime_factor=round(res.realtime_factor, 3),
        prefill_ms=round(res.prefill_s * 1000, 3),
        warmup_s=round(res.warmup_s, 4),
        peak_memory_mib=round(res.peak_memory_bytes / 2**20, 1),
        notes=res.notes,
    )
    # transformers' first token comes out of its prefill forward: its decode window holds steps - 1 (docs/bench.md)
    timed = steps - 1 if case.engine.startswith("transformers") else steps
    assert res.steps == timed and res.decode_steps_per_s > 0


def _dia_fast(benchmark: Any, tts: DiaTTS, batch: int, steps: int, rounds: int, graphs: bool | None) -> None:
    engine = "dia_fast" if graphs is None else "dia_fast-eager"
    case = DiaFastCase(tts, _texts(batch), steps, GREEDY, graphs=graphs, engine=engine)
    _bench(benchmark, case, rounds, steps, tts.config.model.decoder.hidden_size)


def _transformers(benchmark: Any, tts: DiaTTS, batch: int, steps: int, rounds: int, compiled: bool = False) -> None:
    model, processor = build_transformers(tts)
    case = TransformersCase(
        model,
        processor,
        _texts(batch),
        steps,
        GREEDY,
        channels=tts.config.data.channels,
        frame_rate=tts.codec.frame_rate,
        compiled=compiled,  # transformers-compile: static cache + torch.compile, the warm-up call compiles
    )
    _bench(benchmark, case, rounds, steps, tts.config.model.decoder.hidden_size)


def _ttfa(benchmark: Any, tts: DiaTTS, steps: int, rounds: int) -> None:
    firsts: list[float] = []

    def run() -> None:
        with stream_generate(
            tts, TEXTS[0], chunk_frames=43, first_chunk_frames=16, max_new_tokens=steps, do_sample=False
        ) as s:
            chunk = next(s)
        firsts.append(s.stats.time_to_first_audio_s)
        assert chunk.shape[0] == 16 * tts.codec.hop_length

    run()  # warm-up: codec context measurement, allocator
    benchmark.group = "time to first audio"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    benchmark.extra_info["time_to_first_audio_ms"] = round(1000 * sorted(firsts[1:])[len(firsts[1:]) // 2], 3)


# ---------------------------------------------------------------------------------------------- tiny, CPU


@pytest.mark.parametrize("batch", [1, 4])
def test_e2e_tiny_cpu_dia_fast(benchmark, tiny, batch):
    _dia_fast(benchmark, tiny, batch, TINY_STEPS, rounds=3, graphs=None)


@pytest.mark.parametrize("batch", [1, 4])
def test_e2e_tiny_cpu_dia_fast_eager(benchmark, tiny, batch):
    _dia_fast(benchmark, tiny, batch, TINY_STEPS, rounds=3, graphs=False)


@pytest.mark.parametrize("batch", [1, 4])
def test_e2e_tiny_cpu_transformers(benchmark, tiny, batch):
    _transformers(benchmark, tiny, batch, TINY_STEPS, rounds=3)


def test_e2e_tiny_cpu_time_to_first_audio(benchmark, tiny):
    _ttfa(benchmark, tiny, TINY_STEPS, rounds=3)


# ---------------------------------------------------------------------------------------------- Dia-1.6B, CUDA


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_e2e_full_cuda_dia_fast(benchmark, full, batch):
    _dia_fast(benchmark, full, batch, FULL_STEPS, rounds=5, graphs=None)


@pytest.mark.gpu
@pytest.mark.slow
def test_e2e_full_cuda_dia_fast_eager(benchmark, full):
    _dia_fast(benchmark, full, 1, FULL_STEPS, rounds=3, graphs=False)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_e2e_full_cuda_transformers(benchmark, full, batch):
    _transformers(benchmark, full, batch, FULL_STEPS, rounds=3)


@pytest.mark.gpu
@pytest.mark.slow
def test_e2e_full_cuda_transformers_compile(benchmark, full):
    _transformers(benchmark, full, 1, FULL_STEPS, rounds=3, compiled=True)


@pytest.mark.gpu
@pytest.mark.slow
def test_e2e_full_cuda_time_to_first_audio(benchmark, full):
    _ttfa(benchmark, full, FULL_STEPS, rounds=5)
