"""Triton kernels for the delay pattern (apply / revert / undelay) and the decoder's code embedding.

Semantics are those of :mod:`dia_fast.ops.reference`; every function here is one kernel launch.
The delay pattern travels as a small int32 device tensor cached per ``(pattern, device)``, so a
call does no host->device copy once the pattern has been seen (pass it as a list/tuple or a CPU
tensor: reading a CUDA tensor's values is a host synchronisation).

Runs on CUDA, and on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import reference
from .reference import _check_codes

__all__ = ["apply_delay", "embed_codes", "embed_delayed_codes", "revert_delay", "undelay_codes"]

# Elements per tile of the delay kernels; None = the per-device default (tests set it to get many tiles).
_TILE: int | None = None
_DELAY_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _pattern(
    delay_pattern: Sequence[int] | torch.Tensor, n_channels: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(int32 delays on ``device``, max delay), validated like the reference and cached."""
    if isinstance(delay_pattern, torch.Tensor):
        if delay_pattern.ndim != 1:
            raise ValueError(f"delay_pattern must be 1-D, got shape {tuple(delay_pattern.shape)}")
        key = tuple(int(d) for d in delay_pattern.tolist())
    else:
        key = tuple(int(d) for d in delay_pattern)
    if len(key) != n_channels:
        raise ValueError(f"delay_pattern has {len(key)} entries but the codes have {n_channels} channels")
    if any(d < 0 for d in key):
        raise ValueError(f"delay_pattern must be non-negative, got {list(key)}")
    cache_key = (key, device)
    delays = _DELAY_CACHE.get(cache_key)
    if delays is None:
        # an empty pattern (C = 0) still gets a valid, never read, pointer
        delays = torch.tensor(key if key else (0,), dtype=torch.int32, device=device)
        _DELAY_CACHE[cache_key] = delays
    return delays, (max(key) if key else 0)


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _delay_kernel(
    src,
    dst,
    delays,
    T_in,
    T_out,
    C,
    s_b,
    s_t,
    s_c,
    bos_value,
    pad_value,
    codebook_size,
    REVERT: tl.constexpr,
    CLEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One [BLOCK_T, BLOCK_C] tile of the output [B, T_out, C] (contiguous) per program.
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.load(delays + c, mask=c_ok, other=0).to(tl.int64)
    mask = (t[:, None] < T_out) & c_ok[None, :]
    if REVERT:
        src_t = tl.minimum(t[:, None] + d[None, :], T_in - 1)
        load_ok = mask
    else:
        src_t = t[:, None] - d[None, :]
        load_ok = mask & (src_t >= 0) & (src_t < T_in)
    vals = tl.load(src + b * s_b + src_t * s_t + c[None, :].to(tl.int64) * s_c, mask=load_ok, other=0)
    if not REVERT:
        vals = tl.where(src_t < 0, bos_value, vals)
        vals = tl.where(src_t >= T_in, pad_value, vals)
    if CLEAN:
        v64 = vals.to(tl.int64)
        vals = tl.where((v64 < 0) | (v64 >= codebook_size), 0, v64)
    out = dst + b * T_out * C + t[:, None] * C + c[None, :]
    tl.store(out, vals.to(dst.dtype.element_ty), mask=mask)


def _launch_delay(
    codes: torch.Tensor,
    delays: torch.Tensor,
    out: torch.Tensor,
    *,
    revert: bool,
    clean: bool,
    bos_value: int = 0,
    pad_value: int = 0,
    codebook_size: int = 0,
) -> torch.Tensor:
    B, T_in, C = codes.shape
    T_out = out.shape[1]
    if out.numel() == 0:
        return out
    block_c = triton.next_power_of_2(C)
    # 1K elements per tile on the GPU (a [3072, 9] sequence is 48 programs); the interpreter runs
    # programs one by one, so it gets big tiles. At most the (rounded up) number of frames.
    tile = _TILE or (8192 if _interpreted(codes) else 1024)
    block_t = max(1, min(tile // block_c, triton.next_power_of_2(T_out)))
    grid = (triton.cdiv(T_out, block_t), B)
    _delay_kernel[grid](
        codes,
        out,
        delays,
        T_in,
        T_out,
        C,
        codes.stride(0),
        codes.stride(1),
        codes.stride(2),
        bos_value,
        pad_value,
        codebook_size,
        REVERT=revert,
        CLEAN=clean,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
    )
    return out


def apply_delay(
    codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, bos_value: int, pad_value: int
) -> torch.Tensor:
    """Shift channel ``c`` of ``codes`` [B, T, C] right by ``delay_pattern[c]`` frames (BOS in front).

    Same as :func:`dia_fast.ops.reference.apply_delay`; output contiguous, dtype of ``codes``.
    """
    _check_codes(codes)
    if not reference.fits_dtype(codes.dtype, bos_value, pad_value):
        return reference.apply_delay(codes, delay_pattern, bos_value, pad_value)  # (its error, or its result)
    delays, _ = _pattern(delay_pattern, codes.shape[2], codes.device)
    out = torch.empty(codes.shape, dtype=codes.dtype, device=codes.device)
    return _launch_delay(
        codes, delays, out, revert=False, clean=False, bos_value=int(bos_value), pad_value=int(pad_value)
    )


def revert_delay(codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_delay`: ``out[b, t, c] = codes[b, min(t + d_c, T - 1), c]``.

    Same as :func:`dia_fast.ops.reference.revert_delay`; output contiguous, dtype of ``codes``.
    """
    _check_codes(codes)
    delays, _ = _pattern(delay_pattern, codes.shape[2], codes.device)
    out = torch.empty(codes.shape, dtype=codes.dtype, device=codes.device)
    return _launch_delay(codes, delays, out, revert=True, clean=False)


def undelay_codes(
    delayed: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, codebook_size: int = 1024
) -> torch.Tensor:
    """Delayed decoder codes -> codec codes ``[B, max(T - max_delay, 0), C]`` int64, in one kernel:
    revert the delay, drop the last ``max(delay)`` frames, map values outside ``[0, codebook_size)`` to 0.
    """
    _check_codes(delayed)
    B, T, C = delayed.shape
    delays, max_delay = _pattern(delay_pattern, C, delayed.device)
    out = torch.empty((B, max(T - max_delay, 0), C), dtype=torch.int64, device=delayed.device)
    return _launch_delay(delayed, delays, out, revert=True, clean=True, codebook_size=int(codebook_size))


@triton.jit
def _embed_kernel(
    codes,
    table,
    out,
    delays,
    T,
    C,
    D,
    vocab_size,
    s_b,
    s_t,
    s_c,
    s_row,
    s_col,
    bos_value,
    pad_value,
    DELAY: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One (b, t) position and one BLOCK_D slice of the hidden dim per program.
    bt = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    b = bt // T
    t = bt % T
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    if DELAY:
        # the code of the delayed sequence at (t, c): codes[t - d_c, c], BOS before, PAD after
        src_t = t - tl.load(delays + c, mask=c_ok, other=0).to(tl.int64)
        in_ok = c_ok & (src_t >= 0) & (src_t < T)
        code = tl.load(codes + b * s_b + src_t * s_t + c.to(tl.int64) * s_c, mask=in_ok, other=0).to(tl.int64)
        code = tl.where(src_t < 0, bos_value, tl.where(src_t >= T, pad_value, code))
    else:
        code = tl.load(codes + b * s_b + t * s_t + c.to(tl.int64) * s_c, mask=c_ok, other=0).to(tl.int64)
    # Out-of-range codes would read another channel's rows (or out of bounds): they contribute 0.
    row_ok = c_ok & (code >= 0) & (code < vocab_size)
    row = c.to(tl.int64) * vocab_size + code
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    emb = tl.load(
        table + row[:, None] * s_row + d[None, :].to(tl.int64) * s_col,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    acc = tl.sum(emb.to(tl.float32), axis=0)
    tl.store(out + bt * D + d, acc.to(out.dtype.element_ty), mask=d_ok)


def _launch_embed(
    codes: torch.Tensor,
    table: torch.Tensor,
    vocab_size: int,
    delays: torch.Tensor | None,
    bos_value: int = 0,
    pad_value: int = 0,
) -> torch.Tensor:
    B, T, C = codes.shape
    D = table.shape[1]
    out = torch.empty((B, T, D), dtype=table.dtype, device=table.device)
    if out.numel() == 0:
        return out
    if C == 0:
        return out.zero_()
    block_c = triton.next_power_of_2(C)
    block_d = max(16, min(256, triton.next_power_of_2(D)))
    grid = (B * T, triton.cdiv(D, block_d))
    _embed_kernel[grid](
        codes,
        table,
        out,
        codes if delays is None else delays,
        T,
        C,
        D,
        int(vocab_size),
        codes.stride(0),
        codes.stride(1),
        codes.stride(2),
        table.stride(0),
        table.stride(1),
        int(bos_value),
        int(pad_value),
        DELAY=delays is not None,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
    )
    return out


_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _table_ok(codes: torch.Tensor, table: torch.Tensor, vocab_size: int) -> bool:
    """Whether the kernel takes this table: every channel's ``vocab_size`` rows inside it (the kernel reads row
    ``c * vocab_size + code`` for any in-vocabulary code, unchecked) and a dtype it sums as the reference does."""
    _check_codes(codes)
    if table.ndim != 2:
        raise ValueError(f"table must be [C * vocab_size, D], got shape {tuple(table.shape)}")
    n_rows = codes.shape[2] * int(vocab_size)
    return table.dtype in _TABLE_DTYPES and vocab_size > 0 and table.shape[0] >= n_rows


def embed_codes(codes: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Decoder input embedding: ``out[b, t] = sum_c table[c * vocab_size + codes[b, t, c]]``.

    codes [B, T, C] integer in ``[0, vocab_size)`` (out-of-range codes add zero instead of raising),
    table [C * vocab_size, D] -> [B, T, D] in ``table``'s dtype, summed in fp32. One kernel launch. A table of
    fewer than ``C * vocab_size`` rows (or not fp32 / fp16 / bf16) runs the reference, which raises its IndexError
    for a code past the table.
    """
    if not _table_ok(codes, table, vocab_size):
        return reference.embed_codes(codes, table, vocab_size)
    return _launch_embed(codes, table, vocab_size, None)


def embed_delayed_codes(
    codes: torch.Tensor,
    delay_pattern: Sequence[int] | torch.Tensor,
    bos_value: int,
    pad_value: int,
    table: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """``embed_codes(apply_delay(codes, delay_pattern, bos_value, pad_value), table, vocab_size)`` in one
    kernel, without materialising the delayed codes: the decoder input of undelayed codes [B, T, C]
    (e.g. an audio prompt). Same value ranges, precision and fallback as :func:`embed_codes`.
    """
    if not _table_ok(codes, table, vocab_size):
        delayed = reference.apply_delay(codes, delay_pattern, bos_value, pad_value)
        return reference.embed_codes(delayed, table, vocab_size)
    delays, _ = _pattern(delay_pattern, codes.shape[2], codes.device)
    return _launch_embed(codes, table, vocab_size, delays, bos_value, pad_value)
