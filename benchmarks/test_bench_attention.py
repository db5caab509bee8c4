"""Attention microbenchmarks: Triton kernels vs the PyTorch reference vs ``scaled_dot_product_attention``.

Run on a CUDA machine::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_attention.py --benchmark-columns=mean,stddev,rounds

Each timed round replays a CUDA graph of launches, so Python launch overhead is not measured (the
decode loop runs under CUDA graphs too); ``extra_info`` holds the time per call and the achieved
TFLOP/s (prefill) or GB/s of K/V read (decode). On CPU only a tiny interpreter smoke case runs (its
time is meaningless).

Decode cases read each layer's own K/V cache, as Dia-1.6B's 18 decoder layers do: one cache (12.6 MB
at 3072 positions, batch 1 with CFG) fits in an H100/H200's 50-60 MB L2, so replaying one cache would
time L2, not HBM. Each call of a round reads the next of ``n`` distinct caches (call ``i`` reads cache
``i % n``), with ``n`` >= 18 and large enough that the caches together are ``L2_FLUSH`` times the
L2 (in the real step the layers' weights stream through L2 between two reads of one cache); the GB/s
are K/V bytes read per call over the time per call. Prefill cases replay one set of inputs: in the
model q/k/v are written by the projection right before (as L2-warm as here) and the kernel is
compute-bound (TFLOP/s).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from _cuda_timing import graphed  # noqa: E402

from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_attention as ta  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
N_CALLS = 20
IMPLS = ("triton", "sdpa", "reference")
N_LAYERS = 18  # Dia-1.6B's decoder layers: one self-attention and one cross-attention cache each
L2_FLUSH = 8  # the distinct caches of a round hold at least this many times the GPU's L2


def _n_caches(bytes_per_call: int) -> int:
    """Distinct K/V caches for a decode round: >= N_LAYERS and >= L2_FLUSH x the L2 in bytes read."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 128 << 20
    return max(N_LAYERS, math.ceil(L2_FLUSH * l2 / bytes_per_call))


def _cycling(call: Callable[[int], object], n: int) -> Callable[[], object]:
    """``fn()`` that runs ``call(i)`` for i = 0, 1, ..., n-1, 0, ... on successive calls (a CUDA graph of
    ``n`` calls then reads every cache once per replay)."""
    state = {"i": 0}

    def fn() -> object:
        i, state["i"] = state["i"], (state["i"] + 1) % n
        return call(i)

    return fn


def _report(benchmark, per_call: str, value: float, unit: str, n_calls: int = N_CALLS) -> None:
    """Store the time per call and ``value`` (the work of one call) per second in ``extra_info``."""
    seconds = benchmark.stats.stats.mean / n_calls
    benchmark.extra_info["us_per_call"] = round(seconds * 1e6, 2)
    benchmark.extra_info[unit] = round(value / seconds, 2)
    benchmark.extra_info["what"] = per_call


# --- prefill --------------------------------------------------------------------------------

# name: (rows, Hq, Hkv, Tq, Tk, D, causal) -- rows = 2 x batch with CFG
PREFILL = {
    "encoder-b1": (2, 16, 16, 512, 512, 128, False),
    "encoder-b8": (16, 16, 16, 512, 512, 128, False),
    "decoder-prompt-b1": (2, 16, 4, 1024, 1024, 128, True),
    "decoder-prompt-b8": (16, 16, 4, 1024, 1024, 128, True),
    "cross-prompt-b1": (2, 16, 16, 1024, 512, 128, False),
}


@gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(PREFILL))
def test_bench_prefill(benchmark, name: str, dtype: torch.dtype, impl: str) -> None:
    B, Hq, Hkv, Tq, Tk, D, causal = PREFILL[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, generator=gen)
    # text padding: row 0 full, the others 3/4 long; a causal prompt has no padding here
    lens = torch.tensor([Tk] + [Tk * 3 // 4] * (B - 1), device="cuda")[:, None]
    key_mask = None if causal else torch.arange(Tk, device="cuda")[None, :] < lens
    scale = D**-0.5
    if impl == "triton":
        fn = lambda: ta.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)  # noqa: E731
    elif impl == "reference":
        fn = lambda: ref.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)  # noqa: E731
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=Hq != Hkv
        )
    benchmark.group = f"prefill {name} {str(dtype)[6:]}"
    benchmark.pedantic(graphed(fn, N_CALLS), rounds=20, warmup_rounds=2)
    flops = 4.0 * B * Hq * Tq * Tk * D * (0.5 if causal else 1.0)
    _report(benchmark, "QK^T + PV flops (causal: half)", flops / 1e12, "TFLOP/s")


# --- decode ---------------------------------------------------------------------------------

CACHE_LEN = 3072 + 128  # Dia's audio length plus room for a prompt


@gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("context", [256, 1024, 3072])
@pytest.mark.parametrize("rows", [2, 16], ids=["b1-cfg", "b8-cfg"])
def test_bench_decode_self(benchmark, rows: int, context: int, impl: str) -> None:
    """Dia's decoder self-attention step: 16 query heads over 4 KV heads, head dim 128, bf16."""
    Hq, Hkv, D, dtype = 16, 4, 128, torch.bfloat16
    nbytes = 2 * rows * Hkv * context * D * dtype.itemsize  # K and V read by one call
    n = _n_caches(nbytes)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, Hq, 1, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(n, rows, Hkv, CACHE_LEN, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(n, rows, Hkv, CACHE_LEN, D, device="cuda", dtype=dtype, generator=gen)
    kv_len = torch.tensor([context], device="cuda")
    if impl == "triton":
        call = lambda i: ta.decode_attention(q, k[i], v[i], scale=1.0, kv_len=kv_len)  # noqa: E731
    elif impl == "reference":
        call = lambda i: ref.decode_attention(q, k[i], v[i], scale=1.0, kv_len=kv_len)  # noqa: E731
    else:  # SDPA needs the length on the host: it reads a slice of the cache
        ks, vs = k[:, :, :, :context], v[:, :, :, :context]
        call = lambda i: F.scaled_dot_product_attention(q, ks[i], vs[i], scale=1.0, enable_gqa=True)  # noqa: E731
    benchmark.group = f"decode self rows={rows} context={context}"
    benchmark.pedantic(graphed(_cycling(call, n), n), rounds=30, warmup_rounds=2)
    _report(benchmark, "K/V bytes read", nbytes / 1e9, "GB/s", n_calls=n)
    benchmark.extra_info["distinct_caches"] = n


@gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [2, 16], ids=["b1-cfg", "b8-cfg"])
def test_bench_decode_cross(benchmark, rows: int, impl: str) -> None:
    """Dia's cross-attention step: 16/16 heads over 300 cached text positions with a padding mask."""
    Hq, Hkv, D, Tenc, dtype = 16, 16, 128, 300, torch.bfloat16
    nbytes = 2 * rows * Hkv * Tenc * D * dtype.itemsize  # K and V read by one call (mask not counted)
    n = _n_caches(nbytes)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, Hq, 1, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(n, rows, Hkv, Tenc, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(n, rows, Hkv, Tenc, D, device="cuda", dtype=dtype, generator=gen)
    key_mask = torch.arange(Tenc, device="cuda")[None, :] < torch.randint(
        1, Tenc + 1, (rows, 1), device="cuda", generator=gen
    )  # the same text padding in every layer, as in the model
    if impl == "triton":
        call = lambda i: ta.decode_attention(q, k[i], v[i], scale=1.0, key_mask=key_mask)  # noqa: E731
    elif impl == "reference":
        call = lambda i: ref.decode_attention(q, k[i], v[i], scale=1.0, key_mask=key_mask)  # noqa: E731
    else:
        mask = key_mask[:, None, None, :]
        call = lambda i: F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask, scale=1.0)  # noqa: E731
    benchmark.group = f"decode cross rows={rows}"
    benchmark.pedantic(graphed(_cycling(call, n), n), rounds=30, warmup_rounds=2)
    _report(benchmark, "K/V bytes read", nbytes / 1e9, "GB/s", n_calls=n)
    benchmark.extra_info["distinct_caches"] = n


# --- CPU: interpreter smoke -----------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the GPU benchmarks above cover this")
def test_bench_interpreter_smoke(benchmark) -> None:
    """One tiny decode call in the Triton interpreter: the benchmark harness runs and the result
    is right (the time says nothing about the kernel)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 64, generator=gen)
    k = torch.randn(2, 2, 40, 64, generator=gen)
    v = torch.randn(2, 2, 40, 64, generator=gen)
    kv_len = torch.tensor([33])
    out = benchmark.pedantic(lambda: ta.decode_attention(q, k, v, scale=0.125, kv_len=kv_len), rounds=1)
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, scale=0.125, kv_len=kv_len), atol=2e-5, rtol=1e-5)
    _report(benchmark, "K/V bytes read", 2 * 2 * 2 * 33 * 64 * 4 / 1e9, "GB/s", n_calls=1)
    assert benchmark.extra_info["us_per_call"] > 0
