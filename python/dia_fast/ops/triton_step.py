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

__all__ = ["step_update"]


@triton.jit
def _step_update_kernel(
    Codes, Pos, EosPos, Delays, ForcedEos, Forced, Out, Real, Done, Tokens,
    B, C, reps,
    s_cb, s_fep, s_fb, s_fl, s_ob, s_ol, s_tr,
    eos_value, pad_value,
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
    ch0 = tl.sum(tl.where((c == 0)[None, :], codes, 0), axis=1)
    eos = tl.load(EosPos + b, mask=b_ok, other=0)
    fep = tl.load(ForcedEos + b64 * s_fep, mask=b_ok, other=0)
    started = (ch0 == eos_value) | (p >= fep)
    eos = tl.where((eos < 0) & started, p, eos)
    tl.store(EosPos + b, eos, mask=b_ok)

    delays = tl.load(Delays + c, mask=c_ok, other=0)
    active = (eos >= 0)[:, None]
    since = (p - eos)[:, None]
    codes = tl.where(active & (since == delays[None, :]), eos_value, codes)
    codes = tl.where(active & (since > delays[None, :]), pad_value, codes)
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
    *,
    eos_value: int,
    pad_value: int,
) -> None:
    """:func:`dia_fast.ops.reference.step_update` in one launch (in place; same arguments)."""
    B, C = codes.shape
    R = tokens.shape[0]
    if B == 0:
        return
    if R % B or tokens.shape[1:] != (1, C):
        raise ValueError(f"tokens must be [k * {B}, 1, {C}], got {tuple(tokens.shape)}")
    if out.shape[0] != B or out.shape[2] != C or forced.shape != out.shape:
        raise ValueError(f"out and forced must be [{B}, L, {C}], got {tuple(out.shape)}, {tuple(forced.shape)}")
    for name, t in (("codes", codes), ("forced", forced), ("out", out), ("tokens", tokens), ("delays", delays)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    if not (eos_pos.is_contiguous() and real.is_contiguous() and done.numel() == 1):
        raise ValueError("eos_pos and real must be contiguous [B] tensors and done a one-element tensor")
    fep = forced_eos_pos.reshape(-1)
    if fep.numel() not in (1, B):
        raise ValueError(f"forced_eos_pos must have 1 or {B} elements, got {fep.numel()}")
    s_fep = fep.stride(0) if fep.numel() == B and B > 1 else 0
    block_b = max(2, triton.next_power_of_2(B))
    _step_update_kernel[(1,)](
        codes, pos, eos_pos, delays, fep, forced, out, real.view(torch.uint8), done.view(torch.uint8), tokens,
        B, C, R // B,
        codes.stride(0), s_fep, forced.stride(0), forced.stride(1), out.stride(0), out.stride(1), tokens.stride(0),
        int(eos_value), int(pad_value),
        BLOCK_B=block_b, BLOCK_C=max(2, triton.next_power_of_2(C)), num_warps=1 if block_b <= 8 else 4,
    )  # fmt: skip
