"""C++ CPU kernels (dia_fast._C) vs the PyTorch / numpy references at Dia's shapes, on the CPU.

Run::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_native.py --benchmark-columns=min,mean,rounds
    PYTHONPATH=python python benchmarks/test_bench_native.py      # a markdown table of speed-ups

The layer ops of a decode step (add + RMSNorm, SwiGLU, the code embedding, RoPE + cache write, decode
attention) run at Dia-1.6B's decoder shapes with warm caches; inside a decode step they run between GEMMs that
have flushed the caches, where both sides are several times slower (docs/native.md).

pytest-benchmark times the C++ call; every test also measures the reference and the C++ call
in the same process, interleaved, best of ``ROUNDS`` (``extra_info``: ``ref_us``, ``cpp_us``,
``speedup``), and checks that both give the same result. The CFG-sampling cases cycle through
16 different logit sets, as decoding does: timing one set over and over lets the CPU's branch
predictor learn it and flatters branchy code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from dia_fast import _ext
from dia_fast.audio import pcm
from dia_fast.ops import cpp, reference

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"dia_fast._C not loaded: {_ext.why_not()}")

DIA_PATTERN = [0, 8, 9, 10, 11, 12, 13, 14, 15]
ROUNDS = 7
N_SETS = 16


def _best_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def compare(ref: Callable[[], object], fast: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """Best-of-ROUNDS time per call of both, interleaved so that load changes hit both alike."""
    ref(), fast()
    r, f = [], []
    for _ in range(ROUNDS):
        r.append(_best_us(ref, calls))
        f.append(_best_us(fast, calls))
    return {"ref_us": round(min(r), 1), "cpp_us": round(min(f), 1), "speedup": round(min(r) / min(f), 2)}


def _delay_case(op: str, B: int, T: int):
    codes = torch.randint(0, 1024, (B, T, 9))
    args = {
        "apply_delay": (DIA_PATTERN, 1026, 1025),
        "revert_delay": (DIA_PATTERN,),
        "undelay_codes": (DIA_PATTERN, 1024),
    }
    a = args[op]
    return (lambda: getattr(reference, op)(codes, *a)), (lambda: getattr(cpp, op)(codes, *a))


def _sample_case(B: int, do_sample: bool):
    sets = [torch.randn(2 * B, 9, 1028) * 3 for _ in range(N_SETS)]
    kw = {"cfg_scale": 3.0, "temperature": 1.2, "top_p": 0.95, "top_k": 45, "eos_id": 1024, "do_sample": do_sample}

    def run(fn):
        state = {"i": 0}  # one counter per callable: the first calls of both see the same set

        def call():
            lg = sets[state["i"] % N_SETS]
            state["i"] += 1
            return fn(lg[:B], lg[B:], **kw)

        return call

    return run(reference.cfg_sample), run(cpp.cfg_sample)


def _pcm_case(dither: bool):
    x = (np.random.default_rng(0).standard_normal(44100 * 10) * 0.3).astype(np.float32)  # 10 s
    return (
        lambda: pcm.float_to_pcm16(x, dither=dither, seed=1, backend="numpy"),
        lambda: pcm.float_to_pcm16(x, dither=dither, seed=1, backend="cpp"),
    )


def _layer_case(op: str, n: int):
    """A decode step's layer op at Dia-1.6B's decoder shapes (2 rows: one item with CFG); ``n``: keys attended."""
    R, D = 2, 2048
    h, d, w = torch.randn(R, 1, D), torch.randn(R, 1, D), torch.randn(D)
    gu = torch.randn(R, 1, 2 * 8192)
    qkv = torch.randn(R, 1, (16 + 2 * 4) * 128)
    cos, sin = torch.randn(3072, 64), torch.randn(3072, 64)
    kc, vc = torch.randn(R, 4, 3072, 128), torch.randn(R, 4, 3072, 128)
    q = torch.randn(R, 16, 1, 128)
    ck, cv, cm = torch.randn(R, 16, n, 128), torch.randn(R, 16, n, 128), torch.ones(R, n, dtype=torch.bool)
    codes, table = torch.randint(0, 1028, (R, 1, 9)), torch.randn(9 * 1028, D)
    pos, lens = torch.tensor([n - 1]), torch.tensor([n, n])
    calls = {
        "add_rmsnorm": lambda m: m.add_rmsnorm(h, d, w, 1e-5),
        "swiglu": lambda m: m.swiglu(gu),
        "embed_codes": lambda m: m.embed_codes(codes, table, 1028),
        "rope_kv_write": lambda m: m.rope_kv_write(qkv, pos, cos, sin, kc, vc, 16, 4),
        "decode_attention self": lambda m: m.decode_attention(q, kc, vc, kv_len=pos + 1),
        "decode_attention cross": lambda m: m.decode_attention(q, ck, cv, kv_len=lens, key_mask=cm),
    }
    call = calls[op]
    return (lambda: call(reference)), (lambda: call(cpp))


CASES: dict[str, Callable[[], tuple]] = {}
for _op in ("add_rmsnorm", "swiglu", "embed_codes", "rope_kv_write"):
    CASES[_op] = lambda op=_op: _layer_case(op, 64)
for _n in (64, 1024, 3072):
    CASES[f"decode_attention self n={_n}"] = lambda n=_n: _layer_case("decode_attention self", n)
CASES["decode_attention cross n=64"] = lambda: _layer_case("decode_attention cross", 64)
for _op in ("apply_delay", "revert_delay", "undelay_codes"):
    for _B, _T in ((1, 86), (8, 86), (1, 3072), (8, 3072)):
        CASES[f"{_op} B={_B} T={_T}"] = lambda op=_op, B=_B, T=_T: _delay_case(op, B, T)
for _B in (1, 2, 8):
    for _s in (False, True):
        CASES[f"cfg_sample B={_B} {'sample' if _s else 'greedy'}"] = lambda B=_B, s=_s: _sample_case(B, s)
for _d in (False, True):
    CASES[f"float_to_pcm16 10s dither={_d}"] = lambda d=_d: _pcm_case(d)


LAYER_OPS = ("add_rmsnorm", "swiglu", "embed_codes", "rope_kv_write")


@pytest.mark.parametrize("case", list(CASES))
def test_native_vs_reference(benchmark, case):
    ref, fast = CASES[case]()
    if case in LAYER_OPS or case.startswith("decode_attention"):  # floating point: to rounding
        a, b = ref(), fast()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    elif not case.startswith("cfg_sample B") or "greedy" in case:
        a, b = ref(), fast()
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif "dither=False" in case:
            np.testing.assert_array_equal(a, b)
    benchmark.extra_info.update(compare(ref, fast, calls=3 if "pcm" in case or "3072" in case else 10))
    benchmark(fast)


if __name__ == "__main__":
    print("| case | reference (us) | C++ (us) | speed-up |\n|---|---:|---:|---:|")
    for name, make in CASES.items():
        r = compare(*make(), calls=3 if "pcm" in name or "3072" in name else 10)
        print(f"| {name} | {r['ref_us']} | {r['cpp_us']} | {r['speedup']}x |", flush=True)
