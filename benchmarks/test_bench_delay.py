"""Delay / undelay / code-embedding microbenchmarks: Triton kernels vs the PyTorch reference vs a copy.

Run on a CUDA machine::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_delay.py --benchmark-columns=mean,stddev,rounds

Each timed round replays a CUDA graph of ``N_CALLS`` launches (no Python launch overhead); the
reference ops synchronise with the host, so they run ``N_CALLS`` eager calls instead (``mode``).
``extra_info`` holds the time per call, the achieved GB/s (bytes read + written once) and, for the
delay ops, ``fraction_of_copy``: achieved GB/s over the GB/s of ``clone()`` of the same codes,
measured in the same test. On CPU only a tiny interpreter smoke case runs (its time is meaningless).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from _cuda_timing import eager, graphed  # noqa: E402

from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_delay as td  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
N_CALLS = 20
DIA_PATTERN = [0, 8, 9, 10, 11, 12, 13, 14, 15]
BOS, PAD = 1026, 1025


def _seconds_per_call(fn: Callable[[], object], reps: int = 20) -> float:
    """Median time per call of ``fn`` replayed from a CUDA graph (CUDA events)."""
    run = graphed(fn, N_CALLS)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / N_CALLS)
    return sorted(times)[len(times) // 2]


def _report(benchmark, nbytes: float, copy_seconds: float | None = None, n_calls: int = N_CALLS) -> None:
    seconds = benchmark.stats.stats.mean / n_calls
    benchmark.extra_info["us_per_call"] = round(seconds * 1e6, 2)
    benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 2)
    if copy_seconds is not None:
        # the op moves as many bytes as the copy (or fewer, for undelay): ratio of bandwidths
        copy_bw = nbytes / copy_seconds if copy_seconds > 0 else float("nan")
        benchmark.extra_info["copy_us"] = round(copy_seconds * 1e6, 2)
        benchmark.extra_info["fraction_of_copy"] = round((nbytes / seconds) / copy_bw, 3)


# (batch, frames): a prompt-sized and a whole-generation-sized [B, T, 9] code tensor
SHAPES = {"b1-t1024": (1, 1024), "b1-t3072": (1, 3072), "b8-t3072": (8, 3072), "b64-t3072": (64, 3072)}


@gpu
@pytest.mark.parametrize("impl", ["triton", "reference", "copy"])
@pytest.mark.parametrize("op", ["apply_delay", "undelay_codes"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_delay(benchmark, shape: str, dtype: torch.dtype, op: str, impl: str) -> None:
    B, T = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(0, 1027, (B, T, 9), device="cuda", generator=gen).to(dtype)
    if impl == "copy":
        fn: Callable[[], object] = codes.clone
    elif op == "apply_delay":
        mod = td if impl == "triton" else ref
        fn = lambda: mod.apply_delay(codes, DIA_PATTERN, BOS, PAD)  # noqa: E731
    else:
        mod = td if impl == "triton" else ref
        fn = lambda: mod.undelay_codes(codes, DIA_PATTERN, 1024)  # noqa: E731
    benchmark.group = f"{op} {shape} {str(dtype)[6:]}"
    benchmark.extra_info["mode"] = "eager" if impl == "reference" else "cuda-graph"
    benchmark.pedantic((eager if impl == "reference" else graphed)(fn, N_CALLS), rounds=20, warmup_rounds=2)
    if op == "apply_delay" or impl == "copy":
        nbytes = 2 * codes.numel() * codes.element_size()
    else:  # reads T frames, writes T - 15 int64 frames
        nbytes = codes.numel() * codes.element_size() + B * max(T - 15, 0) * 9 * 8
    _report(benchmark, nbytes, None if impl == "copy" else _seconds_per_call(codes.clone))


@gpu
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("rows,T", [(2, 1), (16, 1), (2, 1024)], ids=["decode-b1-cfg", "decode-b8-cfg", "prefill-1024"])
def test_bench_embed(benchmark, rows: int, T: int, impl: str) -> None:
    """The decoder input: 9 embedding rows of width 2048 summed per position (bf16 table)."""
    V, D = 1028, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(9 * V, D, device="cuda", generator=gen).bfloat16()
    codes = torch.randint(0, V, (rows, T, 9), device="cuda", generator=gen)
    mod = td if impl == "triton" else ref
    benchmark.group = f"embed_codes rows={rows} T={T}"
    benchmark.extra_info["mode"] = "cuda-graph"
    benchmark.pedantic(graphed(lambda: mod.embed_codes(codes, table, V), N_CALLS), rounds=30, warmup_rounds=2)
    _report(benchmark, rows * T * (9 * D * 2 + D * 2 + 9 * 8))


# --- CPU: interpreter smoke -----------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the GPU benchmarks above cover this")
def test_bench_delay_interpreter_smoke(benchmark) -> None:
    """One small undelay call in the Triton interpreter: the harness runs and the result is right
    (the time says nothing about the kernel)."""
    codes = torch.randint(-1, 1027, (2, 40, 9), generator=torch.Generator().manual_seed(0))
    out = benchmark.pedantic(lambda: td.undelay_codes(codes, DIA_PATTERN), rounds=1)
    assert torch.equal(out, ref.undelay_codes(codes, DIA_PATTERN))
    _report(benchmark, codes.numel() * 8 + out.numel() * 8, n_calls=1)
    assert benchmark.extra_info["us_per_call"] > 0
