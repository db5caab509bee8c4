"""The bookkeeping of a decode step in one Triton launch: :func:`dia_fast.ops.reference.step_update`.

After the draw, a decode step applies Dia's end-of-speech countdown and the forced prefix, writes the
codes into the output buffer and the next decoder input, and updates the completion flag: about twenty
small tensor ops in PyTorch, one program here (the batch is a [B, C] tile). Runs on CUDA and, for tests,
on CPU tensors in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

__all__ = ["slot_update", "step_update"]


@triton.jit
def _eos_countdown(codes, c, p, eos, fep, delays, live, eos_value, pad_value):
    """Dia's end-of-speech countdown (``reference._eos_countdown``) on a [rows, C] tile of codes sampled at
    position(s) ``p``, for the rows where ``live``: returns the codes and the rows' EOS positions."""
    ch0 = tl.sum(tl.where((c == 0)[None, :], codes, 0), axis=1)
    started = (ch0 == eos_value) | (p >= fep)
    eos = tl.where(live & (eos < 0) & started, p, eos)
    counting = (live & (eos >= 0))[:, None]
    since = (p - eos)[:, None]
    codes = tl.where(counting & (since == delays[None, :]), eos_value, codes)
    codes = tl.where(counting & (since > delays[None, :]), pad_value, codes)
    return codes, eos


@triton.jit
def _step_update_kernel(
    Codes, Pos, EosPos, Delays, ForcedEos, Forced, Out, Real, Done, Tokens, MinEos, AllowEos,
    B, C, reps,
    s_cb, s_fep, s_fb, s_fl, s_ob, s_ol, s_tr,
    eos_value, pad_value,
    HAS_MIN: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.arange(0, BLOCK_B)
    c = tl.arange(0, BLOCK_C)
    b_ok = b < B
    c_ok = c < C
    m = b_ok[:, None] & c_ok[None, :]
    b64 = b.to(tl.int64)
    p = tl.load(Pos).to(tl.int64)

    codes = tl.load(Codes + b64[:, None] * s_cb + c[None, :], mask=m, other=0).to(tl.int64)
    eos = tl.load(EosPos + b, mask=b_ok, other=0)
    fep = tl.load(ForcedEos + b64 * s_fep, mask=b_ok, other=0)
    delays = tl.load(Delays + c, mask=c_ok, other=0)
    codes, eos = _eos_countdown(codes, c, p, eos, fep, delays, b_ok, eos_value, pad_value)
    tl.store(EosPos + b, eos, mask=b_ok)
    forced = tl.load(Forced + b64[:, None] * s_fb + p * s_fl + c[None, :], mask=m, other=-1)
    codes = tl.where(forced != -1, forced, codes)
    tl.store(Out + b64[:, None] * s_ob + p * s_ol + c[None, :], codes, mask=m)

    max_delay = tl.max(tl.where(c_ok, delays, 0), axis=0)
    real = tl.load(Real + b, mask=b_ok, other=0)
    finished = ((eos >= 0) & (p - eos >= max_delay)) | (real == 0) | (b >= B)
    tl.store(Done, tl.min(finished.to(tl.int32), axis=0).to(tl.uint8))

    for k in range(0, reps):  # the next decoder input: row k * B + b gets item b's codes
        rows = (k * B + b).to(tl.int64)
        tl.store(Tokens + rows[:, None] * s_tr + c[None, :], codes, mask=m)
    if HAS_MIN:  # min_new_tokens: may the next position end the item?
        mep = tl.load(MinEos + b, mask=b_ok, other=0)
        tl.store(AllowEos + b, (p + 1 >= mep).to(tl.uint8), mask=b_ok)


def step_update(
    codes: torch.Tensor,
    pos: torch.Tensor,
    eos_pos: torch.Tensor,
    delays: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    forced: torch.Tensor,
    out: torch.Tensor,
    real: torch.Tensor,
    done: torch.Tensor,
    tokens: torch.Tensor,
    min_eos_pos: torch.Tensor | None = None,
    allow_eos: torch.Tensor | None = None,
    *,
    eos_value: int,
    pad_value: int,
) -> None:
    """:func:`dia_fast.ops.reference.step_update` in one launch (in place; same arguments). Buffers of other
    shapes, layouts or flag dtypes than the decode step's run the reference (which raises for bad ones)."""
    args = (codes, pos, eos_pos, delays, forced_eos_pos, forced, out, real, done, tokens, min_eos_pos, allow_eos)
    if codes.ndim != 2 or out.ndim != 3 or tokens.ndim != 3:
        return reference.step_update(*args, eos_value=eos_value, pad_value=pad_value)
    B, C = codes.shape
    if B == 0:
        return None
    R = tokens.shape[0]
    fep = forced_eos_pos.reshape(-1)
    has_min = min_eos_pos is not None and allow_eos is not None
    if (
        R % B
        or tokens.shape[1:] != (1, C)
        or out.shape[0] != B
        or out.shape[2] != C
        or forced.shape != out.shape
        or eos_pos.shape != (B,)
        or real.shape != (B,)
        or delays.shape != (C,)
        or pos.numel() < 1
        or done.numel() != 1
        or fep.numel() not in (1, B)
        or real.dtype != torch.bool
        or done.dtype != torch.bool
        or any(t.stride(-1) != 1 for t in (codes, forced, out, tokens, delays, eos_pos, real))
        or (has_min and (min_eos_pos.shape != (B,) or allow_eos.shape != (B,) or not allow_eos.is_contiguous()))
    ):
        return reference.step_update(*args, eos_value=eos_value, pad_value=pad_value)
    s_fep = fep.stride(0) if fep.numel() == B and B > 1 else 0
    allow = allow_eos.view(torch.uint8) if has_min and allow_eos.dtype == torch.bool else allow_eos
    block_b = max(2, triton.next_power_of_2(B))
    _step_update_kernel[(1,)](
        codes, pos, eos_pos, delays, fep, forced, out, real.view(torch.uint8), done.view(torch.uint8), tokens,
        min_eos_pos if has_min else pos, allow if has_min else pos,
        B, C, R // B,
        codes.stride(0), s_fep, forced.stride(0), forced.stride(1), out.stride(0), out.stride(1), tokens.stride(0),
        int(eos_value), int(pad_value),
        HAS_MIN=has_min, BLOCK_B=block_b, BLOCK_C=max(2, triton.next_power_of_2(C)),
        num_warps=1 if block_b <= 8 else 4,
    )  # fmt: skip


@triton.jit
def _slot_update_kernel(
    Codes, Pos, EosPos, Delays, ForcedEos, MinEos, Forced, Out, Active, Finished, AllowEos, Tokens, RowPos,
    S, C, L,
    s_cb, s_fs, s_fl, s_os, s_ol, s_tr,
    eos_value, pad_value,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    s = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_C)
    s_ok = s < S
    c_ok = c < C
    m = s_ok[:, None] & c_ok[None, :]
    s64 = s.to(tl.int64)

    # every read of the per-slot state first; the barrier below orders them before the writes
    p = tl.minimum(tl.maximum(tl.load(Pos + s, mask=s_ok, other=0), 0), L - 1).to(tl.int64)
    eos = tl.load(EosPos + s, mask=s_ok, other=-1).to(tl.int64)
    fep = tl.load(ForcedEos + s, mask=s_ok, other=0).to(tl.int64)
    mep = tl.load(MinEos + s, mask=s_ok, other=0).to(tl.int64)
    live = (tl.load(Active + s, mask=s_ok, other=0) != 0) & (tl.load(Finished + s, mask=s_ok, other=1) == 0)
    done_before = tl.load(Finished + s, mask=s_ok, other=1) != 0
    codes = tl.load(Codes + s64[:, None] * s_cb + c[None, :], mask=m, other=0).to(tl.int64)
    forced = tl.load(Forced + s64[:, None] * s_fs + p[:, None] * s_fl + c[None, :], mask=m, other=-1)
    prev = tl.load(Out + s64[:, None] * s_os + p[:, None] * s_ol + c[None, :], mask=m, other=0)
    delays = tl.load(Delays + c, mask=c_ok, other=0)
    tl.debug_barrier()

    codes, eos = _eos_countdown(codes, c, p, eos, fep, delays, live, eos_value, pad_value)
    codes = tl.where(forced != -1, forced, codes)
    max_delay = tl.max(tl.where(c_ok, delays, 0), axis=0)
    done_now = live & (eos >= 0) & (p - eos >= max_delay)
    new_pos = tl.where(live & ~done_now, tl.minimum(p + 1, L - 1), p)

    tl.store(Out + s64[:, None] * s_os + p[:, None] * s_ol + c[None, :], tl.where(live[:, None], codes, prev), mask=m)
    tl.store(EosPos + s, eos, mask=s_ok)
    tl.store(Finished + s, (done_before | done_now).to(tl.uint8), mask=s_ok)
    tl.store(Pos + s, new_pos, mask=s_ok)
    tl.store(AllowEos + s, (new_pos >= mep).to(tl.uint8), mask=s_ok)
    for k in range(0, 2):  # rows 2s (conditional) and 2s + 1 (unconditional)
        rows = (2 * s + k).to(tl.int64)
        tl.store(Tokens + rows[:, None] * s_tr + c[None, :], codes, mask=m)
        tl.store(RowPos + rows, p, mask=s_ok)


def _slot_warps(block_s: int) -> int:
    """Warps of the slot kernel: one up to 16 slots, then one more per 16 (max_slots is a power of two up to 128;
    one warp spills registers on sm_90a from 32 slots: docs/kernels-compile-report.md)."""
    return max(1, min(8, block_s // 16))


def slot_update(
    codes: torch.Tensor,
    pos: torch.Tensor,
    eos_pos: torch.Tensor,
    delays: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    min_eos_pos: torch.Tensor,
    forced: torch.Tensor,
    out: torch.Tensor,
    active: torch.Tensor,
    finished: torch.Tensor,
    allow_eos: torch.Tensor,
    tokens: torch.Tensor,
    row_pos: torch.Tensor,
    *,
    eos_value: int,
    pad_value: int,
) -> None:
    """:func:`dia_fast.ops.reference.slot_update` in one launch (in place; same arguments). Buffers of other shapes
    or layouts than the slot engine's run the reference (which raises for bad ones)."""
    per_slot = (pos, eos_pos, forced_eos_pos, min_eos_pos, active, finished, allow_eos)
    args = (codes, pos, eos_pos, delays, forced_eos_pos, min_eos_pos, forced, out, *per_slot[4:], tokens, row_pos)
    if codes.ndim != 2 or out.ndim != 3:
        return reference.slot_update(*args, eos_value=eos_value, pad_value=pad_value)
    S, C = codes.shape
    if S == 0:
        return None
    if (
        tokens.shape != (2 * S, 1, C)
        or row_pos.shape != (2 * S,)
        or out.shape[0] != S
        or out.shape[1] == 0
        or out.shape[2] != C
        or forced.shape != out.shape
        or delays.shape != (C,)
        or any(t.shape != (S,) or not t.is_contiguous() for t in per_slot)
        or any(t.stride(-1) != 1 for t in (codes, forced, out, tokens, delays))
    ):
        return reference.slot_update(*args, eos_value=eos_value, pad_value=pad_value)

    def as_u8(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.bool else t

    block_s = max(2, triton.next_power_of_2(S))
    _slot_update_kernel[(1,)](
        codes, pos, eos_pos, delays, forced_eos_pos, min_eos_pos, forced, out,
        as_u8(active), as_u8(finished), as_u8(allow_eos), tokens, row_pos,
        S, C, out.shape[1],
        codes.stride(0), forced.stride(0), forced.stride(1), out.stride(0), out.stride(1), tokens.stride(0),
        int(eos_value), int(pad_value),
        BLOCK_S=block_s, BLOCK_C=max(2, triton.next_power_of_2(C)), num_warps=_slot_warps(block_s),
    )  # fmt: skip
