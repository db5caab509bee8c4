"""End-to-end generation benchmarks: dia_fast (CUDA graphs and eager), transformers' Dia on the same
weights, and streaming time to first audio. The tiny model runs on CPU everywhere; Dia-1.6B shapes
(random weights, bf16) only with a CUDA GPU.

Run::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_e2e.py --benchmark-columns=mean,stddev,rounds

``extra_info`` of each case holds decode steps/s, audio tokens/s, the realtime factor, prefill time
and the warm-up (first call, CUDA-graph capture included) time; ``python -m dia_fast.bench`` prints
the same numbers as one table.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from dia_fast.api import DiaTTS  # noqa: E402
from dia_fast.bench import TEXTS  # noqa: E402
from dia_fast.bench.measure import now, sync  # noqa: E402
from dia_fast.generation.generate import generate_codes  # noqa: E402
from dia_fast.generation.sampling import SamplingConfig  # noqa: E402
from dia_fast.generation.stream import stream_generate  # noqa: E402
from dia_fast.text import encode_batch  # noqa: E402

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


def _info(benchmark: Any, steps: int, batch: int, frame_rate: float, decode_s: float, prefill_s: float) -> None:
    rate = steps / decode_s
    benchmark.extra_info.update(
        steps=steps,
        batch=batch,
        decode_steps_per_s=round(rate, 2),
        audio_tokens_per_s=round(rate * 9 * batch, 1),
        realtime_factor=round(rate / frame_rate, 3),
        prefill_ms=round(prefill_s * 1000, 3),
    )


def _dia_fast(benchmark: Any, tts: DiaTTS, batch: int, steps: int, rounds: int, cuda_graphs: bool | None) -> None:
    ids, mask = encode_batch(_texts(batch), tts.config.data.text_length)
    outs = []

    def run() -> None:
        gen = torch.Generator(device=tts.device).manual_seed(0)
        outs.append(
            generate_codes(
                tts.model,
                ids,
                mask,
                max_new_tokens=steps,
                sampling=GREEDY,
                generator=gen,
                progress=False,
                cuda_graphs=cuda_graphs,
            )
        )
        sync(tts.device)

    t = time.perf_counter()
    run()  # warm-up (CUDA-graph capture where used), timed on its own
    benchmark.extra_info["warmup_s"] = round(time.perf_counter() - t, 4)
    benchmark.group = f"e2e {tts.config.model.decoder.hidden_size}d batch {batch}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    timed = outs[1:]
    decode = sorted(o.decode_seconds for o in timed)[len(timed) // 2]
    prefill = sorted(o.prefill_seconds for o in timed)[len(timed) // 2]
    _info(benchmark, timed[0].steps, batch, tts.codec.frame_rate, decode, prefill)
    benchmark.extra_info["cuda_graphs"] = bool(getattr(timed[0], "cuda_graphs", False))
    assert all(torch.equal(o.delayed, timed[0].delayed) for o in timed)  # greedy: every round the same codes


def _transformers(benchmark: Any, tts: DiaTTS, batch: int, steps: int, rounds: int) -> None:
    from dia_fast.bench.runners import _quiet_transformers, build_transformers

    model, processor = build_transformers(tts)
    with warnings.catch_warnings():  # "max_length is ignored when padding=True"
        warnings.simplefilter("ignore")
        inputs = {k: v.to(tts.device) for k, v in processor(text=_texts(batch), padding=True).items()}
    marks: list[float] = []
    hook = model.model.decoder.register_forward_hook(lambda *_: marks.append(now(tts.device)))
    spans: list[tuple[float, float, int]] = []

    def run() -> None:
        marks.clear()
        t = now(tts.device)
        with _quiet_transformers():
            model.generate(**inputs, max_new_tokens=steps, do_sample=False, guidance_scale=3.0, top_k=45)
        spans.append((marks[0] - t, now(tts.device) - t, len(marks)))

    try:
        t = time.perf_counter()
        run()
        benchmark.extra_info["warmup_s"] = round(time.perf_counter() - t, 4)
        benchmark.group = f"e2e {tts.config.model.decoder.hidden_size}d batch {batch}"
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    finally:
        hook.remove()
    timed = sorted(spans[1:], key=lambda s: s[1] - s[0])
    prefill, total, n = timed[len(timed) // 2]
    _info(benchmark, n, batch, tts.codec.frame_rate, total - prefill, prefill)
    assert n == steps


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
    _dia_fast(benchmark, tiny, batch, TINY_STEPS, rounds=3, cuda_graphs=None)


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
    _dia_fast(benchmark, full, batch, FULL_STEPS, rounds=5, cuda_graphs=None)


@pytest.mark.gpu
@pytest.mark.slow
def test_e2e_full_cuda_dia_fast_eager(benchmark, full):
    _dia_fast(benchmark, full, 1, FULL_STEPS, rounds=3, cuda_graphs=False)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_e2e_full_cuda_transformers(benchmark, full, batch):
    _transformers(benchmark, full, batch, FULL_STEPS, rounds=3)


@pytest.mark.gpu
@pytest.mark.slow
def test_e2e_full_cuda_time_to_first_audio(benchmark, full):
    _ttfa(benchmark, full, FULL_STEPS, rounds=5)
