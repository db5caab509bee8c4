"""Triton kernels of the fused decode-step ops: residual add + RMSNorm, RoPE + KV-cache write, SwiGLU.

Each is one launch and has the semantics of its reference in :mod:`dia_fast.ops.reference`
(:func:`~dia_fast.ops.reference.add_rmsnorm`, :func:`~dia_fast.ops.reference.rope_kv_write`,
:func:`~dia_fast.ops.reference.swiglu`), rounding included: fp32 math, results cast to the input dtype
at the points where the reference casts. Positions are read on the device, so the ops never sync with
the host and can be captured in a CUDA graph. They run on CUDA and, for tests, on CPU tensors in the
Triton interpreter (``TRITON_INTERPRET=1``). Every load and store is masked: any row count, width and
head dim (even ones) works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

__all__ = ["add_rmsnorm", "rope_kv_write", "swiglu"]


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _add_rmsnorm_kernel(
    Res, Delta, W, Normed, H,
    n_cols, s_res, s_delta, s_normed, s_h, s_w, eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: h = res + delta (rounded to the activation dtype, stored), normed = rmsnorm(h) * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(Res + row * s_res + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(Delta + row * s_delta + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * s_h + cols, h, mask=ok)
    hf = h.to(tl.float32)
    mean_sq = tl.sum(hf * hf, axis=0) / n_cols
    inv = 1.0 / tl.sqrt_rn(mean_sq + eps)
    w = tl.load(W + cols * s_w, mask=ok, other=0.0).to(tl.float32)
    tl.store(Normed + row * s_normed + cols, (hf * inv * w).to(Normed.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kv_write_kernel(
    QKV, Start, Cos, Sin, Q, KC, VC,
    T, L, n_pos,
    s_xr, s_xt, s_start,
    s_qr, s_qh, s_qt,
    s_kr, s_kh, s_kl,
    s_vr, s_vh, s_vl,
    s_cos,
    N_HEAD: tl.constexpr,
    N_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_START: tl.constexpr,
):  # fmt: skip
    """One token (row r, step t): rotate its q and k heads, write q out and k/v into the caches at its position."""
    pid = tl.program_id(0)
    r = (pid // T).to(tl.int64)
    t = pid % T
    pos = t.to(tl.int64)
    if HAS_START:
        pos += tl.load(Start + r * s_start).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    pos_d = tl.zeros([BLOCK_HALF], tl.int64) + pos  # masks built from full tiles (not scalar & tile)
    in_table = d_ok & (pos_d >= 0) & (pos_d < n_pos)
    c = tl.load(Cos + pos * s_cos + d, mask=in_table, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * s_cos + d, mask=in_table, other=0.0).to(tl.float32)[None, :]
    in_cache = (d_ok & (pos_d >= 0) & (pos_d < L))[None, :]
    h = tl.arange(0, BLOCK_H)
    base = QKV + r * s_xr + t.to(tl.int64) * s_xt
    cols = h[:, None] * (2 * HALF) + d[None, :]

    # q heads: [0, N_HEAD) of the projection
    qm = (h < N_HEAD)[:, None] & d_ok[None, :]
    x1 = tl.load(base + cols, mask=qm, other=0.0).to(tl.float32)
    x2 = tl.load(base + cols + HALF, mask=qm, other=0.0).to(tl.float32)
    q_out = Q + r * s_qr + h[:, None].to(tl.int64) * s_qh + t.to(tl.int64) * s_qt + d[None, :]
    tl.store(q_out, (x1 * c - x2 * s).to(Q.dtype.element_ty), mask=qm)
    tl.store(q_out + HALF, (x2 * c + x1 * s).to(Q.dtype.element_ty), mask=qm)

    # k heads: [N_HEAD, N_HEAD + N_KV), rotated; v heads after them, copied
    km = (h < N_KV)[:, None] & d_ok[None, :]
    wm = km & in_cache
    k_in = base + N_HEAD * 2 * HALF + cols
    x1 = tl.load(k_in, mask=km, other=0.0).to(tl.float32)
    x2 = tl.load(k_in + HALF, mask=km, other=0.0).to(tl.float32)
    k_out = KC + r * s_kr + h[:, None].to(tl.int64) * s_kh + pos * s_kl + d[None, :]
    tl.store(k_out, (x1 * c - x2 * s).to(KC.dtype.element_ty), mask=wm)
    tl.store(k_out + HALF, (x2 * c + x1 * s).to(KC.dtype.element_ty), mask=wm)
    v_in = k_in + N_KV * 2 * HALF
    v_out = VC + r * s_vr + h[:, None].to(tl.int64) * s_vh + pos * s_vl + d[None, :]
    tl.store(v_out, tl.load(v_in, mask=km, other=0.0).to(VC.dtype.element_ty), mask=wm)
    tl.store(v_out + HALF, tl.load(v_in + HALF, mask=km, other=0.0).to(VC.dtype.element_ty), mask=wm)


@triton.jit
def _swiglu_kernel(X, Out, H, s_x, s_o, BLOCK: tl.constexpr):
    """out[row, j] = silu(x[row, j]) * x[row, H + j], silu rounded to the dtype first (as torch)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    g = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * s_x + H + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * s_o + cols, (act * u).to(Out.dtype.element_ty), mask=ok)


# --- host side ------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute as the reference does


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """[..., D] as a [rows, D] view with a contiguous last dim (a copy only when no such view exists)."""
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _warps(width: int) -> int:
    """Warps for a row kernel over ``width`` elements: about 8-16 elements per thread."""
    return max(1, min(16, triton.next_power_of_2(width) // 256))


def add_rmsnorm(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dia_fast.ops.reference.add_rmsnorm` in one launch: returns ``(normed, residual + delta)``
    (``delta`` None: the residual itself is returned as the second value). [..., D] fp32 / fp16 / bf16 (a residual
    and delta of two dtypes give results in the promoted one, as the reference), weight [D] of any strides.
    Other shapes (a broadcast delta or weight) and dtypes run the reference (or raise its error)."""
    D = residual.shape[-1] if residual.ndim else 0
    if (
        residual.ndim == 0
        or residual.dtype not in _DTYPES
        or weight.shape != (D,)
        or (delta is not None and (delta.shape != residual.shape or delta.dtype not in _DTYPES))
    ):
        return reference.add_rmsnorm(residual, delta, weight, eps)
    # (promote_types only for mixed dtypes: the profiler counts it as an op, and the decode step's are never mixed)
    mixed = delta is not None and delta.dtype != residual.dtype
    dtype = torch.promote_types(residual.dtype, delta.dtype) if mixed else residual.dtype
    res2 = _rows(residual, "residual")
    normed = torch.empty(residual.shape, dtype=dtype, device=residual.device)
    h = residual if delta is None else torch.empty_like(normed)
    n = res2.shape[0]
    if n == 0 or D == 0:
        if delta is not None:
            h.copy_(residual + delta)
        return normed.zero_() if D == 0 else normed, h
    d2 = res2 if delta is None else _rows(delta, "delta")
    block = triton.next_power_of_2(D)
    _add_rmsnorm_kernel[(n,)](
        res2, d2, weight, normed, h,
        D, res2.stride(0), d2.stride(0), D, D, weight.stride(0), float(eps),
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=_warps(D),
    )  # fmt: skip
    return normed, h


def rope_kv_write(
    qkv: torch.Tensor,
    start: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_head: int,
    n_kv_head: int,
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.rope_kv_write` in one launch (one program per token).

    Positions come from ``start`` on the device; a position outside the cache ``[0, L)`` writes nothing
    (the reference raises instead). The cos/sin tables must cover the positions the kernel may see (all L of
    the cache, or the T tokens when ``start`` is None): shorter tables, and fp64 ones, run the reference, whose
    IndexError a position past the table raises. Returns the rotated q [R, n_head, T, D].
    """
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [R, T, (n_head + 2 n_kv_head) * D], got {tuple(qkv.shape)}")
    R, T, W = qkv.shape
    heads = n_head + 2 * n_kv_head
    if W % heads or (W // heads) % 2:
        raise ValueError(f"qkv width {W} is not {heads} heads of an even head dim")
    D = W // heads
    if k_cache.ndim != 4 or k_cache.shape != (R, n_kv_head, k_cache.shape[2], D) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must be [R={R}, {n_kv_head}, L, {D}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    L = k_cache.shape[2]
    if cos.ndim != 2 or cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [positions, {D // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.shape[0] < (T if start is None else L) or cos.dtype == torch.float64 or sin.dtype == torch.float64:
        # a position inside the cache but past the table would rotate by zeros: the reference raises there
        return reference.rope_kv_write(qkv, start, cos, sin, k_cache, v_cache, n_head, n_kv_head)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head dim must be contiguous")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((R, n_head, T, D), dtype=qkv.dtype, device=qkv.device)
    if q.numel() == 0:
        return q
    s_start = 0
    if start is not None:
        if start.dtype.is_floating_point or start.numel() not in (1, R) or start.ndim > 1:
            raise ValueError(f"start must be an integer tensor [1] or [R={R}], got {start.dtype} {tuple(start.shape)}")
        s_start = start.stride(0) if start.ndim == 1 and start.numel() == R and R > 1 else 0
    block_h = triton.next_power_of_2(max(n_head, n_kv_head))
    block_half = triton.next_power_of_2(D // 2)
    _rope_kv_write_kernel[(R * T,)](
        qkv, start if start is not None else qkv, cos, sin, q, k_cache, v_cache,
        T, L, cos.shape[0],
        qkv.stride(0), qkv.stride(1), s_start,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0),
        N_HEAD=n_head, N_KV=n_kv_head, HALF=D // 2, BLOCK_H=block_h, BLOCK_HALF=block_half,
        HAS_START=start is not None, num_warps=4 if block_h * block_half <= 1024 else 8,
        enable_fp_fusion=False,  # x1 * cos - x2 * sin rounds as the reference's separate ops
    )  # fmt: skip
    return q


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.swiglu` in one launch: [..., 2H] -> [..., H] (fp32 / fp16 / bf16; other dtypes
    run the reference)."""
    if gate_up.dtype not in _DTYPES:  # the kernel's fp32 math would round an fp64 silu differently
        return reference.swiglu(gate_up)
    W = gate_up.shape[-1]
    if W % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got {W}")
    H = W // 2
    x = _rows(gate_up, "gate_up")
    out = torch.empty((*gate_up.shape[:-1], H), dtype=gate_up.dtype, device=gate_up.device)
    n = x.shape[0]
    if n == 0 or H == 0:
        return out
    block = min(2048, triton.next_power_of_2(H))
    _swiglu_kernel[(n, triton.cdiv(H, block))](x, out, H, x.stride(0), H, BLOCK=block, num_warps=_warps(block))
    return out
