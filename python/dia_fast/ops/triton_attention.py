"""Triton attention kernels: FlashAttention-2 style prefill and split-KV flash decoding.

Semantics are those of :func:`dia_fast.ops.reference.attention` and
:func:`dia_fast.ops.reference.decode_attention`: GQA without materialising repeated K/V,
optional key padding mask, causal mask aligned to the end of the keys, fully masked query
rows return zeros, fp32 accumulation, output in q's dtype.

Both kernels run on CUDA and, for tests, on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).

Decode never synchronises with the host: ``kv_len`` may be a device tensor read inside the
kernel, and the number of KV splits depends only on shapes and the SM count, so a decode
step can be captured in a CUDA graph and replayed after ``kv_len`` is updated in place.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import reference

__all__ = ["attention", "decode_attention", "decode_num_splits"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# SM count assumed where there is no CUDA device (the interpreter): enough to exercise splitting.
_CPU_SM_COUNT = 4
# Upper bound on KV splits (the last split combines the partials of all of them in a loop).
_MAX_SPLITS = 128
# Largest head dim the kernels take (a whole head's tile in registers); larger ones run the reference.
_MAX_HEAD_DIM = 256


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _dim_mask(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which of the BLOCK_D (a power of two) lanes hold a real head-dim element. A constant
    all-true splat when nothing is padded, so loads stay vectorised along the head dim."""
    if BLOCK_D == HEAD_DIM:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    return d_ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, KM,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    skmb, skmn,
    Hq, Tq, Tk, qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _dim_mask(HEAD_DIM, BLOCK_D)
    row_ok = offs_m < Tq
    q_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if CAUSAL:
        # query i sees keys <= i + Tk - Tq; no row of this block sees a key past `hi`.
        last = offs_m + (Tk - Tq)
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + (Tk - Tq))
    else:
        hi = Tk

    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Tk
        k = tl.load(
            k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :] & d_ok[:, None], other=0.0
        )
        # log2-domain scores: softmax via exp2
        qk = tl.dot(q, k, input_precision=PREC) * qk_scale
        valid = col_ok[None, :]
        if HAS_MASK:
            km = tl.load(KM + b * skmb + cols * skmn, mask=col_ok, other=0)
            valid = valid & (km != 0)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= last[:, None])
        qk = tl.where(valid, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    denom = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where((l_i > 0.0)[:, None], acc / denom[:, None], 0.0)
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _decode_kernel(
    Q, K, V, KM, KVLEN, Out, Part, Sem,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    skmb, skmn,
    skvl, kv_len_int,
    sob, soh, sod,
    Hq, Hkv, L, n_splits, qk_scale,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_CHUNK: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    KVLEN_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """One program = one (batch row, KV head, split): all GROUP query heads of the KV head against
    keys [split * chunk, (split + 1) * chunk) ∩ [0, kv_len). K/V are read once.

    The valid keys (read on the device) are spread over the launched splits in whole blocks of at least
    MIN_CHUNK keys, so a short key range runs on one split, which writes the output directly (no
    splitting for short keys). With several working splits each stores its unnormalised partial
    (acc, max, sum) and takes a ticket from its (row, KV head)'s semaphore; the last to arrive
    combines the partials, writes the output and resets the semaphore to 0 (no second launch).
    Splits past the working ones do nothing. SPLIT=False (one split launched) compiles the direct path alone."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    s = tl.program_id(2)

    # KVLEN_MODE: 0 = all L keys, 1 = host int, 2 = device tensor (read here: no host sync)
    if KVLEN_MODE == 2:
        n_valid = tl.maximum(tl.minimum(tl.load(KVLEN + b * skvl).to(tl.int32), L), 0)
    elif KVLEN_MODE == 1:
        n_valid = tl.minimum(kv_len_int, L)
    else:
        n_valid = L
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n_valid, n_splits), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    n_work = tl.maximum(tl.cdiv(n_valid, chunk), 1)

    if s < n_work:
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = _dim_mask(HEAD_DIM, BLOCK_D)
        g_ok = offs_g < GROUP
        gd_ok = g_ok[:, None] & d_ok[None, :]
        heads = (hk * GROUP + offs_g).to(tl.int64)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, n_valid)

        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=gd_ok, other=0.0)
        k_base = K + b * skb + hk.to(tl.int64) * skh
        v_base = V + b * svb + hk.to(tl.int64) * svh

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < hi
            k = tl.load(
                k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :] & d_ok[:, None], other=0.0
            )
            qk = tl.dot(q, k, input_precision=PREC) * qk_scale
            valid = col_ok
            if HAS_MASK:
                km = tl.load(KM + b * skmb + cols * skmn, mask=col_ok, other=0)
                valid = valid & (km != 0)
            qk = tl.where(valid[None, :], qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None] & d_ok[None, :], other=0.0
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new

        out_ptr = Out + b * sob + heads[:, None] * soh + offs_d[None, :] * sod
        if SPLIT:
            if n_work == 1:
                _store_normalized(out_ptr, acc, l_i, gd_ok)
            else:
                head0 = b * Hq + hk * GROUP
                _combine_splits(Part, Sem + b * Hkv + hk, Out + b * sob + (hk * GROUP).to(tl.int64) * soh, soh, sod,
                                acc, m_i, l_i, (b * Hq + heads) * n_splits, head0 * n_splits, s, n_work, n_splits,
                                g_ok, gd_ok, offs_d, d_ok, HEAD_DIM, GROUP, BLOCK_D, BLOCK_S)  # fmt: skip
        else:
            _store_normalized(out_ptr, acc, l_i, gd_ok)


@triton.jit
def _store_normalized(out_ptr, acc, l_i, mask):
    """acc / l (rows that saw no key: zeros) -> the output's dtype."""
    denom = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where((l_i > 0.0)[:, None], acc / denom[:, None], 0.0)
    tl.store(out_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_splits(
    Part, sem, out_head0, soh, sod, acc, m_i, l_i, first_row, head0_row, s, n_work, n_splits, g_ok, gd_ok, offs_d, d_ok,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Store this split's partial and take a ticket; the last split of the (row, KV head) combines them all,
    head by head, BLOCK_S splits per load (one load wave for up to BLOCK_S splits, not one per split)."""
    # partials [B * Hq, n_splits, HEAD_DIM + 2] fp32: acc, then max, then sum
    row = (first_row + s) * (HEAD_DIM + 2)
    tl.store(Part + row[:, None] + offs_d[None, :], acc, mask=gd_ok)
    tl.store(Part + row + HEAD_DIM, m_i, mask=g_ok)
    tl.store(Part + row + HEAD_DIM + 1, l_i, mask=g_ok)
    tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
    ticket = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
    if ticket == n_work - 1:  # the last split of this (row, KV head): combine
        offs_s = tl.arange(0, BLOCK_S)
        for g in tl.static_range(GROUP):
            base = (head0_row + g * n_splits) * (HEAD_DIM + 2)
            m_tot = tl.full([1], float("-inf"), tl.float32)
            l_tot = tl.zeros([1], tl.float32)
            acc_tot = tl.zeros([BLOCK_D], tl.float32)
            for c0 in range(0, n_work, BLOCK_S):
                split = c0 + offs_s
                s_ok = split < n_work
                rows = base + split * (HEAD_DIM + 2)
                # .cg: read the other programs' partials from L2, never from a stale L1 line
                m_c = tl.load(Part + rows + HEAD_DIM, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
                l_c = tl.load(Part + rows + HEAD_DIM + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
                a_c = tl.load(
                    Part + rows[:, None] + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                m_new = tl.maximum(m_tot, tl.max(m_c, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                w_old = tl.exp2(m_tot - m_safe)
                w_c = tl.exp2(m_c - m_safe)  # splits that saw no key: m = -inf, weight 0
                l_tot = l_tot * w_old + tl.sum(l_c * w_c, axis=0)
                acc_tot = acc_tot * w_old + tl.sum(a_c * w_c[:, None], axis=0)
                m_tot = m_new
            out = tl.where(l_tot > 0.0, acc_tot / tl.where(l_tot > 0.0, l_tot, 1.0), 0.0)
            tl.store(out_head0 + g * soh + offs_d * sod, out.to(out_head0.dtype.element_ty), mask=d_ok)
        tl.atomic_xchg(sem, 0)  # ready for the next launch


# --- host side ------------------------------------------------------------------------------


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"Triton attention runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}"
    )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_device(q)
    return B, Hq, Tq, D, Hkv, Tk


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels cover these (valid) inputs: one dtype among fp32 / fp16 / bf16 and a head dim in
    [1, 256]. Other inputs run the reference, as in the C++ and Metal backends."""
    return q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and 1 <= q.shape[-1] <= _MAX_HEAD_DIM


def _mask_arg(key_mask: torch.Tensor | None, B: int, T: int, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, batch stride, key stride) of a [B, T] key mask as bytes; a dummy when None."""
    if key_mask is None:
        return like, 0, 0
    if key_mask.ndim != 2 or key_mask.shape[0] not in (1, B) or key_mask.shape[1] != T:
        raise ValueError(f"key_mask must be [B={B}, T={T}], got {tuple(key_mask.shape)}")
    km = key_mask.to(device=like.device)
    km = km.view(torch.uint8) if km.dtype == torch.bool else (km != 0).view(torch.uint8)
    sb = km.stride(0) if km.shape[0] == B else 0
    return km, sb, km.stride(1)


def _block_d(D: int) -> int:
    """Head-dim tile: the next power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(D))


def _is_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _prefill_config(D: int, dtype: torch.dtype, Tq: int, interp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel."""
    if interp:
        # small blocks: cheap in numpy and they exercise multi-block loops in tests
        bm, bn, warps, stages = 32, 32, 4, 1
    elif dtype == torch.float32:
        bm = 64 if D <= 64 else 32
        bn = 32 if D <= 128 else 16
        warps, stages = 4, (2 if D <= 128 else 1)
    elif D <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif D <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:  # 8 warps: with 4 a [64, 256] fp32 accumulator spills on sm_90a (docs/kernels-compile-report.md)
        bm, bn, warps, stages = 64, 32, 8, 2
    # short query blocks (cross-attention of a few steps): do not waste a 128-row tile
    bm = max(16, min(bm, triton.next_power_of_2(max(Tq, 1))))
    if bm < 64:
        warps = min(warps, 4)
    return bm, bn, warps, stages


def _decode_config(D: int, dtype: torch.dtype, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the split-KV decode kernel."""
    if interp:
        return 32, 4, 1
    if dtype == torch.float32:  # 16-key tiles above D = 64: 32 fp32 keys of D = 128 spill on sm_90a
        return (32 if D <= 64 else 16), 4, 2
    if D <= 128:
        return 64, 4, 3
    return 32, 4, 2


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def decode_num_splits(
    batch: int, kv_heads: int, cache_len: int, block_n: int, sm_count: int, num_splits: int | None = None
) -> int:
    """Number of KV splits launched for split-KV decoding: enough that ``batch * kv_heads * n_splits``
    programs fill about two waves of ``sm_count`` SMs, at most one per ``MIN_CHUNK`` keys of the cache
    (so short caches, e.g. cross-attention over a short text, are never split) and at most 128. Depends on
    shapes only, never on ``kv_len``, so a decode step stays CUDA-graph capturable; the kernel spreads the
    current ``kv_len`` keys over the splits (blocks of ``block_n``, at least ``MIN_CHUNK`` keys each) and
    the splits left without keys return at once. ``num_splits`` forces a count (same bounds)."""
    n_chunks = max(1, cache_len // max(block_n, _min_chunk(sm_count)))
    if num_splits is None:
        num_splits = triton.cdiv(2 * sm_count, max(1, batch * kv_heads))
    return max(1, min(num_splits, n_chunks, _MAX_SPLITS))


def _min_chunk(sm_count: int) -> int:
    """Fewest keys a split works on: 128 on a GPU; 32 in the interpreter, so tests exercise splitting."""
    return 32 if sm_count == _CPU_SM_COUNT else 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over whole sequences (encoder, decoder prefill, cross-attention), Triton.

    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] with ``Hq % Hkv == 0`` (query head ``h`` reads KV
    head ``h // (Hq // Hkv)``); ``key_mask`` [B, Tk] (True = attend) or None; ``causal``
    aligns queries to the end of the keys (query ``i`` sees keys ``<= i + Tk - Tq``). Rows
    seeing no key return zeros. fp32 / fp16 / bf16, any head_dim up to 256,
    any strides. Returns a contiguous [B, Hq, Tq, D] tensor in q's dtype. Other dtypes (or mixed ones),
    larger head dims and more than 65535 ``B * Hq`` run :func:`dia_fast.ops.reference.attention`.
    """
    B, Hq, Tq, D, Hkv, Tk = _check_qkv(q, k, v)
    km, skmb, skmn = _mask_arg(key_mask, B, Tk, q)
    if not _kernel_takes(q, k, v) or B * Hq > 65535:  # (65535: the largest CUDA grid's y dimension)
        return reference.attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    out = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Tk == 0:
        return out.zero_()
    interp = _is_interpreter(q)
    bm, bn, warps, stages = _prefill_config(D, q.dtype, Tq, interp)
    grid = (triton.cdiv(Tq, bm), B * Hq)
    _attn_fwd_kernel[grid](
        q, k, v, out, km,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        skmb, skmn,
        Hq, Tq, Tk, float(scale) * _LOG2E,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=bool(causal), HAS_MASK=key_mask is not None, PREC="ieee",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float = 1.0,
    kv_len: torch.Tensor | int | None = None,
    key_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    semaphores: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step against a static KV cache: split-KV flash decoding in one Triton launch.

    q [B, Hq, 1, D]; k_cache, v_cache [B, Hkv, L, D]. Keys ``[0, kv_len)`` are attended:
    ``kv_len`` None (all L), an int, or a 0-d / [B] integer tensor that is read inside the
    kernel (put it on q's device: nothing then syncs with the host and the call can be
    captured in a CUDA graph). ``key_mask`` [B, L] (True = attend) further restricts keys.
    The query heads sharing a KV head run in one program, so each K/V tile is read once.
    ``num_splits`` overrides the automatic split count (see :func:`decode_num_splits`). The splits'
    partials are combined inside the kernel by the last split to finish, which a per-(row, KV head)
    semaphore tells: ``semaphores`` is a contiguous int32 tensor of at least ``B * Hkv`` zeros that the
    kernel leaves at zero (keep one per decode state and reuse it for every layer; calls that may run at
    the same time on different streams need their own). Without it a zeroed one is made per call.
    Returns [B, Hq, 1, D] in q's dtype. Inputs the kernel does not take (see :func:`attention`) run
    :func:`dia_fast.ops.reference.decode_attention`.
    """
    B, Hq, Tq, D, Hkv, L = _check_qkv(q, k_cache, v_cache)
    if Tq != 1:
        raise ValueError(f"decode_attention takes one query step, q is {tuple(q.shape)}")
    kvlen_t, skvl, kv_len_int = q, 0, 0
    if kv_len is None:
        mode = 0
    elif isinstance(kv_len, torch.Tensor):
        if kv_len.dtype.is_floating_point or kv_len.dtype.is_complex or kv_len.dtype == torch.bool:
            raise ValueError(f"kv_len must be an integer tensor, got {kv_len.dtype}")
        if kv_len.numel() not in (1, B) or kv_len.ndim > 1:
            raise ValueError(f"kv_len must be 0-d or [B={B}], got shape {tuple(kv_len.shape)}")
        mode = 2
        kvlen_t = kv_len if kv_len.device == q.device else kv_len.to(q.device)
        skvl = kvlen_t.stride(0) if kvlen_t.ndim == 1 and kvlen_t.numel() == B and B > 1 else 0
    else:
        mode = 1
        kv_len_int = max(0, min(int(kv_len), L))

    km, skmb, skmn = _mask_arg(key_mask, B, L, q)
    if not _kernel_takes(q, k_cache, v_cache):
        return reference.decode_attention(q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_mask=key_mask)
    out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if L == 0:
        return out.zero_()
    interp = _is_interpreter(q)
    block_n, warps, stages = _decode_config(D, q.dtype, interp)
    sm_count = _device_sm_count(q.device)
    n_splits = decode_num_splits(B, Hkv, L, block_n, sm_count, num_splits)
    min_chunk = max(block_n, _min_chunk(sm_count))
    group = Hq // Hkv
    if n_splits == 1:
        part = sem = out  # never touched: one split writes the output itself
    else:
        part = torch.empty((B * Hq * n_splits * (D + 2),), dtype=torch.float32, device=q.device)
        if semaphores is None:
            sem = torch.zeros((B * Hkv,), dtype=torch.int32, device=q.device)
        elif semaphores.dtype != torch.int32 or semaphores.numel() < B * Hkv or not semaphores.is_contiguous():
            raise ValueError(f"semaphores must be a contiguous int32 tensor of >= {B * Hkv} zeros")
        else:
            sem = semaphores
    sq = q.stride()
    so = out.stride()
    _decode_kernel[(B, Hkv, n_splits)](
        q, k_cache, v_cache, km, kvlen_t, out, part, sem,
        sq[0], sq[1], sq[3],
        *k_cache.stride(), *v_cache.stride(),
        skmb, skmn,
        skvl, kv_len_int,
        so[0], so[1], so[3],
        Hq, Hkv, L, n_splits, float(scale) * _LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_N=block_n,
        MIN_CHUNK=min_chunk, SPLIT=n_splits > 1, BLOCK_S=min(32, max(2, triton.next_power_of_2(n_splits))),
        KVLEN_MODE=mode, HAS_MASK=key_mask is not None, PREC="ieee",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
