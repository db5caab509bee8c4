"""Weight-only int8 linear in Triton, made for decode steps: :func:`dia_fast.ops.reference.int8_linear`.

A decode step multiplies a few rows of activations (2 per request with CFG) by every weight of the decoder, so
its speed is the speed of reading the weights. Here each weight is read once, as one int8 byte, converted to the
activations' dtype in registers and multiplied on the tensor cores (``tl.dot``, fp32 accumulation); each output
column is then scaled by its row scale. torchao's eager int8 weight-only linear instead writes a bf16 copy of the
whole weight and reads it back (five bytes moved per weight against bf16's two): the GPU check
(``benchmarks/test_bench_linear_gpu.py``) compares the three.

Rows are tiled by 16 (the smallest ``tl.dot`` operand), 32 or :data:`MAX_BLOCK_M` (the fewest that hold them), and
more rows than that (a prefill, a long voice prompt) by several blocks of :data:`MAX_BLOCK_M`, each reading the
weights again: a plain tiled GEMM, there to spare the prefill the reference's fp32 copy of every weight. When the
output columns alone make too few programs to fill the GPU, the columns' sums are split along K into a workspace and
summed in a fixed order by a second launch: deterministic, and with no host sync, so a decode step with it can be
captured in a CUDA graph. Runs on CUDA and, for tests, on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1``), where fp32 and fp16 ``tl.dot`` are exact and bf16 is not: bf16 is tested on a GPU. Every
load and store is masked, so any M, N and K work (empty shapes and K = 0 return the reference's empty or zero result
without a launch). The sums ``x @ weight.T`` are scaled after they are summed (scaled weights would round to the
activations' dtype in ``tl.dot``): fp32 / bf16 activations so large that a sum overflows fp32 (|x| above about
3e38 / (128 K)) give inf where the reference, which dequantizes first, can be finite."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_BLOCK_M",
    "WIDE_CONFIG",
    "Int8LinearConfig",
    "config_for",
    "int8_linear",
    "int8_linear_splits",
]

MAX_BLOCK_M = 64  # activation rows per program at most: more rows make more row blocks
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_SM_COUNT = 4  # the interpreter's assumed SMs: enough to exercise the split


@dataclass(frozen=True)
class Int8LinearConfig:
    """Launch settings of :func:`int8_linear` (:func:`config_for` picks them per shape). The GPU check's ``gemm``
    stage (benchmarks/test_bench_linear_gpu.py) times others beside them."""

    block_n: int = 64  # output columns per program
    block_k: int = 128  # columns of K per step (bytes of each weight row read per step)
    num_warps: int = 4
    num_stages: int | None = None  # Triton's default
    max_splits: int = 16  # of K, when the columns make too few programs


DEFAULT_CONFIG = Int8LinearConfig()
#: for wide GEMMs at decode rows: on an H200 (2026-11-30, 2 and 16 rows) 7-15% faster than the default on the MLP's
#: gate/up (16384 columns) and the logits head (9252), and slower on QKV (3072) and down (2048)
WIDE_CONFIG = Int8LinearConfig(block_n=32, block_k=256)
_WIDE_N = 8192
_WIDE_MAX_M = 16  # the rows it was measured at (2 and 16: one row block of 16)


def config_for(m: int, n: int) -> Int8LinearConfig:
    """The launch settings :func:`int8_linear` uses for ``m`` rows and ``n`` output columns: :data:`WIDE_CONFIG` for
    up to 16 rows (batch 8 with CFG) and at least 8192 columns, else :data:`DEFAULT_CONFIG` (more rows were measured
    with the default only)."""
    return WIDE_CONFIG if m <= _WIDE_MAX_M and n >= _WIDE_N else DEFAULT_CONFIG


@triton.jit
def _int8_linear_kernel(
    X, W, S, Y, Part,
    M, N, K, k_per_split,
    s_xm, s_wn, s_ym,
    SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of ``x @ w.T`` over one split of K: scaled into Y, or (SPLIT > 1) its fp32
    partial sums into Part [SPLIT, M, N]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rm64[:, None] * s_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn64[:, None] * s_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if IEEE_FP32:
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        scale = tl.load(S + rn, mask=n_ok, other=0.0)
        y = acc * scale[None, :]
        tl.store(Y + rm64[:, None] * s_ym + rn[None, :], y.to(Y.dtype.element_ty), mask=out_ok)
    else:
        tl.store(Part + (split * M + rm64[:, None]) * N + rn[None, :], acc, mask=out_ok)


@triton.jit
def _split_sum_kernel(Part, S, Y, M, N, s_ym, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m, n] = (sum over the splits, in order) * scale[n]."""
    m = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(Part + (s * M + m) * N + rn, mask=n_ok, other=0.0)
    scale = tl.load(S + rn, mask=n_ok, other=0.0)
    tl.store(Y + m * s_ym + rn, (acc * scale).to(Y.dtype.element_ty), mask=n_ok)


def _sm_count(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _CPU_SM_COUNT


def int8_linear_splits(m_blocks: int, n: int, k: int, sm_count: int, config: Int8LinearConfig = DEFAULT_CONFIG) -> int:
    """Splits of K: enough programs for about two waves of ``sm_count`` SMs, each split at least one K block,
    a power of two, at most ``config.max_splits``. Depends on shapes only (a captured step replays the same
    launches)."""
    programs = max(1, m_blocks * triton.cdiv(n, config.block_n))  # 0 for empty shapes (never launched)
    want = max(1, (2 * sm_count) // programs)
    splits = 1
    while splits * 2 <= min(want, config.max_splits, triton.cdiv(k, config.block_k)):
        splits *= 2
    return splits


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: Int8LinearConfig | None = None,
) -> torch.Tensor:
    """Weight-only int8 linear ``x @ (weight * scale[:, None]).T`` (int8 [N, K] weights, fp32 scale per row),
    result in ``x``'s dtype; the semantics of :func:`dia_fast.ops.reference.int8_linear` (here fp32 sums, then the
    scale: see the module's note on overflow), for any number of rows, columns and K. Activations other than fp32 /
    fp16 / bf16 run the reference. ``config``: launch settings (default: :func:`config_for` the shape)."""
    bad_weight = weight.dtype != torch.int8 or weight.ndim != 2 or scale.shape != weight.shape[:1]
    if bad_weight or x.shape[-1] != weight.shape[1]:
        return reference.int8_linear(x, weight, scale, out=out)  # raises its error
    N, K = weight.shape
    if x.dtype not in _DTYPES:  # e.g. fp64 activations: the reference's fp32 product, in x's dtype
        return reference.int8_linear(x, weight, scale, out=out)
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton int8_linear runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    if M == 0 or N == 0 or K == 0:
        return reference.int8_linear(x, weight, scale, out=out)  # nothing to launch: empty, or zeros (no columns)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    s = scale.float().contiguous()
    shape = (*x.shape[:-1], N)
    if out is not None:
        if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"int8_linear: out is {out.dtype} {tuple(out.shape)}, the result {x.dtype} {shape} on {x.device}"
            )
        # written directly only when out shares no storage with x: blocks of out written while other blocks still
        # read x would corrupt an in-place out=x
        direct = out.is_contiguous() and out.untyped_storage().data_ptr() != x2.untyped_storage().data_ptr()
        y = out.view(M, N) if direct else torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = config_for(M, N) if config is None else config
    block_m = min(max(16, triton.next_power_of_2(M)), MAX_BLOCK_M)
    m_blocks = triton.cdiv(M, block_m)
    splits = int8_linear_splits(m_blocks, N, K, _sm_count(x2), cfg)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = (triton.cdiv(N, cfg.block_n), splits, m_blocks)
    stages = {} if cfg.num_stages is None else {"num_stages": cfg.num_stages}
    _int8_linear_kernel[grid](
        x2, w, s, y, part,
        M, N, K, k_per_split,
        x2.stride(0), w.stride(0), y.stride(0),
        SPLIT=splits, IEEE_FP32=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, **stages,
    )  # fmt: skip
    if splits > 1:
        _split_sum_kernel[(M, triton.cdiv(N, 256))](part, s, y, M, N, y.stride(0), SPLIT=splits, BLOCK_N=256)
    result = y.view(shape)
    if out is None:
        return result
    if result.data_ptr() != out.data_ptr():  # a non-contiguous out
        out.copy_(result)
    return out
