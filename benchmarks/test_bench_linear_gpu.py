"""The decoder's GEMMs at decode batch sizes on a GPU: bf16 ``F.linear`` (cuBLAS) against the weight-only int8
Triton kernel (``ops.triton_linear``), torchao's int8 weight-only linear (eager: it writes a bf16 copy of the
weight, then multiplies) and torchao's int4 (tinygemm), all on the same weights.

Run on a CUDA machine (``benchmarks/gpu_check.sh`` runs it as its ``gemm`` stage)::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_linear_gpu.py --benchmark-columns=mean,rounds

Rows: M activation rows (2 = batch 1 with CFG, 16 = batch 8; the prefill case: 1024, a voice prompt of about 6 s
with CFG, where the Triton kernel tiles rows by 64 and the alternative is the reference's fp32 copy of the weight).
Each timed round replays a CUDA graph of calls that cycle once over enough copies of the weights to hold
``L2_FLUSH`` times the L2 (at least ``N_CALLS`` calls), so each call reads its weights from HBM, as a decode step
does (18 layers of weights stream through the L2). ``extra_info``: microseconds per call and the weight bytes the
implementation reads per second (``GB/s``). On a CPU only an interpreter smoke case runs (its time says nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from _cuda_timing import graphed  # noqa: E402

from dia_fast.model.int8 import quantize_rows  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_linear  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
N_CALLS = 20
L2_FLUSH = 8
# (N, K) of Dia-1.6B's decoder GEMMs: QKV, gate+up, down, logits (the attention output and cross query, 2048 x 2048,
# are QKV's shape with fewer columns)
SHAPES = {"qkv": (3072, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
SHAPES["logits"] = (9 * 1028, 2048)
# the Triton kernel's launch settings timed beside what it picks per shape (config_for: measured on an H200, 2026-11-30)
TRITON_CONFIGS = {
    "int8-triton": None,  # what int8_linear picks for the shape (triton_linear.config_for)
    "int8-triton-n64k128": triton_linear.DEFAULT_CONFIG,
    "int8-triton-n32k256": triton_linear.Int8LinearConfig(block_n=32, block_k=256),
    "int8-triton-n128w8": triton_linear.Int8LinearConfig(block_n=128, num_warps=8),
    "int8-triton-k256s4": triton_linear.Int8LinearConfig(block_k=256, num_stages=4),
}
IMPLS = ("bf16", *TRITON_CONFIGS, "int8-torchao", "int4-torchao")
PREFILL_ROWS = 1024
PREFILL_IMPLS = ("bf16", "int8-triton", "int8-reference", "int8-torchao")


def _copies(weight_bytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 128 << 20
    return max(2, math.ceil(L2_FLUSH * l2 / weight_bytes))


def _torchao_linear(weight: torch.Tensor, kind: str) -> torch.nn.Linear:
    from dia_fast.quantize import torchao_quantized

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    return torchao_quantized(lin, kind)


def _calls(impl: str, N: int, K: int, x: torch.Tensor) -> tuple[Callable[[int], object], int, int]:
    """(call(i) on weight copy i, the copies, the weight bytes one call reads)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02  # noqa: E731
    if impl == "bf16":
        nbytes = N * K * 2
        weights = [make() for _ in range(_copies(nbytes))]
        return (lambda i: torch.nn.functional.linear(x, weights[i])), len(weights), nbytes
    if impl in TRITON_CONFIGS or impl == "int8-reference":
        nbytes = N * K + N * 4
        quant = [quantize_rows(make().float()) for _ in range(_copies(nbytes))]
        if impl == "int8-reference":  # dequantize to fp32, multiply in fp32 (what ran before the row blocks)
            return (lambda i: ref.int8_linear(x, quant[i][0], quant[i][1])), len(quant), nbytes
        config = TRITON_CONFIGS[impl]
        return (lambda i: triton_linear.int8_linear(x, quant[i][0], quant[i][1], config=config)), len(quant), nbytes
    pytest.importorskip("torchao")
    kind = impl.split("-")[0]
    nbytes = N * K if kind == "int8" else N * K // 2
    layers = [_torchao_linear(make(), kind) for _ in range(_copies(nbytes))]
    return (lambda i: layers[i](x)), len(layers), nbytes


@gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [2, 16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_bench_decode_gemm(benchmark, name: str, M: int, impl: str) -> None:
    _bench(benchmark, name, M, impl)


@gpu
@pytest.mark.parametrize("impl", PREFILL_IMPLS)
@pytest.mark.parametrize("name", ["gate_up", "down"])
def test_bench_prefill_gemm(benchmark, name: str, impl: str) -> None:
    _bench(benchmark, name, PREFILL_ROWS, impl)
    N, K = SHAPES[name]
    benchmark.extra_info["TFLOPs"] = round(2 * PREFILL_ROWS * N * K / (benchmark.extra_info["us_per_call"] * 1e6), 1)


def _bench(benchmark, name: str, M: int, impl: str) -> None:  # noqa: ANN001 - pytest-benchmark's fixture
    N, K = SHAPES[name]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    call, n, nbytes = _calls(impl, N, K, x)
    state = {"i": 0}

    def fn() -> object:
        i, state["i"] = state["i"], (state["i"] + 1) % n
        return call(i)

    calls = max(n, N_CALLS)  # one replay reads every copy: together L2_FLUSH times the L2, so calls read from HBM
    benchmark.pedantic(graphed(fn, calls), rounds=5, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min / calls
    benchmark.extra_info.update(us_per_call=round(seconds * 1e6, 2), GBps=round(nbytes / seconds / 1e9, 1))
    benchmark.extra_info.update(weight_bytes=nbytes, distinct_weights=n, calls_per_replay=calls)


@pytest.mark.skipif(CUDA, reason="the GPU benchmarks above cover this")
def test_bench_interpreter_smoke(benchmark) -> None:
    """One small int8 call in the Triton interpreter: the harness runs and the result is right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, generator=g)
    q, s = quantize_rows(torch.randn(96, 256, generator=g))
    out = benchmark.pedantic(lambda: triton_linear.int8_linear(x, q, s), rounds=1)
    torch.testing.assert_close(out, ref.int8_linear(x, q, s), rtol=1e-5, atol=1e-5)
