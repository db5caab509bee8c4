"""CFG sampling microbenchmarks: the fused Triton kernel vs the PyTorch sampler and the reference.

Run on a CUDA machine::

    PYTHONPATH=python python -m pytest benchmarks/test_bench_sampling.py --benchmark-columns=mean,stddev,rounds

One call picks the next codes of a decode step from the ``[2B, 9, 1028]`` logits (B conditional rows,
B unconditional rows). Implementations:

- ``triton``: :func:`dia_fast.ops.triton_sampling.cfg_sample` as a decode step calls it (per-row settings,
  seeds and the step offset as device tensors: one launch), replayed from a CUDA graph of ``N_CALLS`` calls;
- ``torch``: :func:`dia_fast.ops.reference.cfg_sample` with the same device tensors (the seeded Philox draw:
  graph-safe, what the torch backend decodes with), from a CUDA graph too;
- ``reference``: :func:`dia_fast.ops.reference.cfg_sample` with numbers and a generator (``multinomial``
  syncs with the host), ``N_CALLS`` eager calls.

``extra_info``: time per call and GB/s of logits read. On CPU only a tiny interpreter smoke case runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from _cuda_timing import eager, graphed  # noqa: E402

from dia_fast.generation.sampling import SamplingConfig  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_sampling as ts  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
N_CALLS = 50
C, V, EOS = 9, 1028, 1024


def _report(benchmark, nbytes: float, n_calls: int = N_CALLS) -> None:
    seconds = benchmark.stats.stats.mean / n_calls
    benchmark.extra_info["us_per_call"] = round(seconds * 1e6, 2)
    benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 2)


@gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_bench_cfg_sample(benchmark, batch: int, greedy: bool, impl: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(2 * batch, C, V, device="cuda", generator=gen) * 3).bfloat16()
    cond, uncond = logits[:batch], logits[batch:]
    sampling = SamplingConfig(do_sample=not greedy)  # Dia's defaults: cfg 3, top-k 45, T 1.2, top-p 0.95
    kw = dict(
        cfg_scale=sampling.cfg_scale,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.cfg_filter_top_k,
        eos_id=EOS,
        do_sample=not greedy,
    )
    # what a decode step passes: per-row settings, seeds and the position, all on the device
    rows = dict(
        cfg_scale=torch.full((batch,), sampling.cfg_scale, device="cuda"),
        temperature=torch.full((batch,), 0.0 if greedy else sampling.temperature, device="cuda"),
        top_p=torch.full((batch,), sampling.top_p, device="cuda"),
        top_k=torch.full((batch,), sampling.cfg_filter_top_k, dtype=torch.int32, device="cuda"),
        seed=torch.arange(batch, device="cuda"),
        offset=torch.zeros(1, dtype=torch.long, device="cuda"),
        eos_id=EOS,
    )
    if impl == "triton":
        run = graphed(lambda: ts.cfg_sample(cond, uncond, **rows), N_CALLS)
    elif impl == "torch":
        run = graphed(lambda: ref.cfg_sample(cond, uncond, **rows), N_CALLS)
    else:
        run = eager(lambda: ref.cfg_sample(cond, uncond, **kw), N_CALLS)
    benchmark.group = f"cfg_sample batch={batch} {'greedy' if greedy else 'sample'}"
    benchmark.extra_info["mode"] = "eager" if impl == "reference" else "cuda-graph"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    _report(benchmark, logits.numel() * logits.element_size())


# --- CPU: interpreter smoke -----------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the GPU benchmarks above cover this")
def test_bench_sampling_interpreter_smoke(benchmark) -> None:
    """One greedy call on Dia's shapes in the Triton interpreter: the harness runs and the result is
    right (the time says nothing about the kernel)."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 1, C, V, generator=gen) * 3
    out = benchmark.pedantic(lambda: ts.cfg_sample(cond, uncond, do_sample=False), rounds=1)
    assert torch.equal(out, ref.cfg_sample(cond, uncond, do_sample=False))
    _report(benchmark, 2 * cond.numel() * 4, n_calls=1)
    assert benchmark.extra_info["us_per_call"] > 0
