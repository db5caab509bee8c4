"""The weight-only int8 linear (``ops.int8_linear``, C++) at Dia-1.6B's decoder GEMM shapes, on the CPU (and the int4
one, ``ops.int4_linear``, groups of 128 columns), against
fp32 ``F.linear`` on the same weights, PyTorch's dynamic int8 linear (fbgemm / oneDNN, W8A8: activations rounded
to 8 bits; dia_fast's CPU int8 before the C++ kernel), ``torch._weight_int8pack_mm`` (PyTorch's own weight-only
int8 kernel) and the dequantizing reference.

Run::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_int8.py --benchmark-columns=min,mean,rounds
    PYTHONPATH=python python benchmarks/test_bench_int8.py      # a markdown table

Rows: M activation rows (2 = batch 1 with CFG). Every engine is timed in the same process, interleaved, best of
``ROUNDS``; weights bigger than the last-level cache are cycled over ``COPIES`` copies so that each call reads
them from memory, as a decode step does.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import pytest
import torch

from dia_fast import _ext
from dia_fast.model.int4 import quantize_groups
from dia_fast.model.int8 import quantize_rows
from dia_fast.ops import cpp, reference

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"dia_fast._C not loaded: {_ext.why_not()}")

ROUNDS = 5
COPIES = 4
# (N, K) of the decoder's GEMMs at Dia-1.6B widths: QKV, attention output / cross query, gate+up, down, logits
SHAPES = {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
SHAPES["logits"] = (9 * 1028, 2048)


def _engines(N: int, K: int, M: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(N, K, generator=g) * 0.02 for _ in range(COPIES)]
    x = torch.randn(M, K, generator=g)
    quant = [quantize_rows(w) for w in weights]
    quant4 = [quantize_groups(w, 128) for w in weights]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        dynamic = []
        for w in weights:
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.data = w
            lin.qconfig = per_channel_dynamic_qconfig
            dynamic.append(DynamicLinear.from_float(lin))

    def cycle(fn: Callable[[int], object]) -> Callable[[], object]:
        state = {"i": 0}

        def call() -> object:
            state["i"] += 1
            return fn(state["i"] % COPIES)

        return call

    return {
        "fp32": cycle(lambda i: torch.nn.functional.linear(x, weights[i])),
        "int8_cpp": cycle(lambda i: cpp.int8_linear(x, *quant[i])),
        "int4_cpp": cycle(lambda i: cpp.int4_linear(x, *quant4[i])),
        "dynamic_w8a8": cycle(lambda i: dynamic[i](x)),
        "int8pack_mm": cycle(lambda i: torch._weight_int8pack_mm(x, *quant[i])),
        "reference": cycle(lambda i: reference.int8_linear(x, *quant[i])),
    }


def _us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def compare(engines: dict[str, Callable[[], object]], calls: int = 8) -> dict[str, float]:
    """Best-of-ROUNDS microseconds per call of every engine, interleaved."""
    best = {k: float("inf") for k in engines}
    for fn in engines.values():
        fn()
    for _ in range(ROUNDS):
        for k, fn in engines.items():
            best[k] = min(best[k], _us(fn, 1 if k in ("int8pack_mm", "reference") else calls))
    return {k: round(v, 1) for k, v in best.items()}


CASES = {f"{name} M={M}": (N, K, M) for name, (N, K) in SHAPES.items() for M in (2, 16)}


@pytest.mark.parametrize("case", list(CASES))
def test_int8_linear_vs_fp32_and_torch(benchmark, case):
    N, K, M = CASES[case]
    engines = _engines(N, K, M)
    times = compare(engines)
    benchmark.extra_info.update(times)
    benchmark.extra_info["speedup_vs_fp32"] = round(times["fp32"] / times["int8_cpp"], 2)
    benchmark.extra_info["speedup_vs_dynamic_w8a8"] = round(times["dynamic_w8a8"] / times["int8_cpp"], 2)
    benchmark.extra_info["int4_speedup_vs_int8"] = round(times["int8_cpp"] / times["int4_cpp"], 2)
    benchmark(engines["int8_cpp"])


if __name__ == "__main__":
    cols = ["fp32", "int8_cpp", "int4_cpp", "dynamic_w8a8", "int8pack_mm", "reference"]
    print(f"torch threads {torch.get_num_threads()}")
    print("| GEMM | " + " | ".join(f"{c} (us)" for c in cols) + " | C++ vs fp32 | C++ vs W8A8 | int4 vs int8 |")
    print("|---|" + "---:|" * (len(cols) + 3))
    for name, (N, K, M) in CASES.items():
        t = compare(_engines(N, K, M))
        print(
            f"| {name} ({N}x{K}) | "
            + " | ".join(str(t[c]) for c in cols)
            + f" | {t['fp32'] / t['int8_cpp']:.2f}x | {t['dynamic_w8a8'] / t['int8_cpp']:.2f}x"
            + f" | {t['int8_cpp'] / t['int4_cpp']:.2f}x |",
            flush=True,
        )
