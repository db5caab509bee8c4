"""Fused CFG sampling in Triton: CFG, top-k, Dia's EOS rules, temperature, top-p and the draw in one kernel.

Semantics are :func:`dia_fast.ops.reference.filter_cfg_logits` followed by
:func:`dia_fast.ops.reference.cfg_sample`, without any sort and without host synchronisation:

* **top-k / top-p thresholds** are found by a radix search over order-preserving integer keys
  of the floats (a few bits per pass, each pass one masked reduction over the row), so the
  work per row is a fixed number of reductions whatever ``k`` is.
* **ties** are broken by the lowest vocabulary id, as a *stable* descending sort would: each
  key is ``(float bits, V - 1 - id)``, so exactly ``k`` ids survive the top-k filter and the
  nucleus is the one of a stable sort. ``torch.topk`` / ``torch.sort`` leave the order of
  tied values unspecified, so on exactly tied logits the set kept may differ from the
  reference's (``-0.0`` and ``+0.0`` count as tied).
* **the draw** is Gumbel-max (``argmax(logits / T + Gumbel noise)``, an exact categorical
  draw) with Philox noise from ``tl.randint``. The Philox key is either drawn *on the device*
  from ``generator`` (one ``torch.randint``), or given as a device ``seed`` tensor together with
  a per-step ``offset`` (an int or a device tensor such as the decode position): either way a
  call is reproducible, never syncs, and can be captured in a CUDA graph. The draws are not
  the ones ``torch.multinomial`` would make; their distribution is the same.

A call is one launch when greedy or given ``seed``, two (seed + kernel) when the seed comes from
the generator. Runs on CUDA, and on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_VOCAB", "cfg_sample"]

MAX_VOCAB = 4096
# Bits of a threshold fixed per radix pass (2**bits candidates tested at once, [rows, 2**bits, V] work per
# pass). GPU: 2 (small per-thread state); interpreter: 4 (half the passes; its cost is per op, not per
# element). None = that default; tests set it to run the GPU configuration in the interpreter too.
_RADIX_BITS: int | None = None


@triton.jit
def _order_key(x, idx, IDX_BITS: tl.constexpr):
    """int64 keys ordered like ``(x, -idx)``: larger value first, lower id first among equal values."""
    x = tl.where(x == 0.0, 0.0, x)  # one key for -0.0 and +0.0
    bits = x.to(tl.int32, bitcast=True)
    # flip the magnitude bits of negative floats: signed-int order == float order
    skey = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return ((skey.to(tl.int64) + 2147483648) << IDX_BITS) | ((1 << IDX_BITS) - 1 - idx)[None, :].to(tl.int64)


@triton.jit
def _max_threshold(keys, w, target, KEY_BITS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Per row, the largest ``t`` with ``sum(w * (keys >= t)) > target``.

    keys [R, N] int64 in ``[0, 2**KEY_BITS)``, w [R, N] >= 0, target [R]; needs ``sum(w) > target``
    (then the answer is the key of an element with ``w > 0``). The predicate is monotone in ``t``,
    so its bits are fixed from the most significant down, RADIX_BITS at a time.
    """
    NT: tl.constexpr = 1 << RADIX_BITS
    digit = tl.arange(0, NT).to(tl.int64)
    prefix = tl.sum(tl.zeros_like(keys), axis=1)  # [R] int64 zeros
    for i in tl.static_range(KEY_BITS // RADIX_BITS):
        shift = KEY_BITS - (i + 1) * RADIX_BITS  # a constant: i comes from static_range
        cand = prefix[:, None] + (digit[None, :] << shift)  # [R, NT]
        ge = keys[:, None, :] >= cand[:, :, None]  # [R, NT, N]
        mass = tl.sum(tl.where(ge, w[:, None, :], 0.0), axis=2)  # [R, NT]
        n_ok = tl.sum((mass > target[:, None]).to(tl.int64), axis=1)  # candidate 0 always passes
        prefix = prefix + ((n_ok - 1) << shift)
    return prefix


# step and n_rows may be 1: never specialise them into constants (`.to` is called on them)
@triton.jit(do_not_specialize=["step", "n_rows"])
def _cfg_sample_kernel(
    cond,
    uncond,
    out,
    seed_ptr,
    step_ptr,
    step,
    n_rows,
    C,
    V,
    s_cb,
    s_cc,
    s_cv,
    s_ub,
    s_uc,
    s_uv,
    cfg_scale,
    temperature,
    top_p,
    top_k_target,
    eos_id,
    GREEDY: tl.constexpr,
    HAS_TOPK: tl.constexpr,
    HAS_TOPP: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    IDX_BITS: tl.constexpr,
    KEY_BITS: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    # ROWS (batch, channel) rows of BLOCK_V >= V logits per program.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = (rows // C).to(tl.int64)
    ch = rows % C
    idx = tl.arange(0, BLOCK_V)
    ok = row_ok[:, None] & (idx < V)[None, :]
    neg_inf = float("-inf")
    col = idx[None, :].to(tl.int64)
    # masked lanes read 0 (finite arithmetic below), they never pass `ok` into the logits
    x = tl.load(cond + b[:, None] * s_cb + ch[:, None].to(tl.int64) * s_cc + col * s_cv, mask=ok, other=0.0)
    x = x.to(tl.float32)

    keep = ok
    if HAS_TOPK:
        u = tl.load(uncond + b[:, None] * s_ub + ch[:, None].to(tl.int64) * s_uc + col * s_uv, mask=ok, other=0.0)
        guided = x + cfg_scale * (x - u.to(tl.float32))
        gkey = _order_key(guided, idx, IDX_BITS)
        k_target = tl.zeros([ROWS], dtype=tl.float32) + top_k_target  # k - 0.5: "count >= k"
        thr = _max_threshold(gkey, tl.where(ok, 1.0, 0.0), k_target, KEY_BITS, RADIX_BITS)
        keep = ok & (gkey >= thr[:, None])

    # ids above EOS never; EOS only on channel 0
    allowed = keep & (idx <= eos_id)[None, :] & ((ch == 0)[:, None] | (idx < eos_id)[None, :])
    logits = tl.where(allowed, x, neg_inf)
    # channel 0: EOS alone if it is the argmax (lowest id on ties, like torch), else EOS masked
    eos_is_max = tl.argmax(logits, axis=1) == eos_id
    drop = (ch == 0)[:, None] & ((idx == eos_id)[None, :] ^ eos_is_max[:, None])
    logits = tl.where(drop, neg_inf, logits)

    if GREEDY:
        pick = tl.argmax(logits, axis=1)
    else:
        z = tl.math.div_rn(logits, temperature)  # IEEE division, as torch
        if HAS_TOPP:
            finite = z > neg_inf
            zmax = tl.max(z, axis=1)
            zmax = tl.where(zmax > neg_inf, zmax, 0.0)  # rows past the end are all -inf
            e = tl.where(finite, tl.exp(z - zmax[:, None]), 0.0)
            p_target = top_p * tl.sum(e, axis=1)
            pkey = _order_key(z, idx, IDX_BITS)
            # nucleus: keep an id iff the mass ranked strictly above it is <= top_p
            thr_p = _max_threshold(pkey, e, p_target, KEY_BITS, RADIX_BITS)
            z = tl.where(pkey >= thr_p[:, None], z, neg_inf)
        seed = tl.load(seed_ptr)
        if STEP_FROM_PTR:
            step = tl.load(step_ptr)
        # one Philox counter per (step, row, id): draws of different steps never share noise
        counter = (step.to(tl.int64) * n_rows.to(tl.int64) + rows[:, None].to(tl.int64)) * BLOCK_V + idx[None, :].to(
            tl.int64
        )
        r = tl.randint(seed, counter).to(tl.uint32, bitcast=True)
        # 23 random bits -> uniform strictly inside (0, 1): the Gumbel noise is always finite
        unif = ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        gumbel = -tl.log(-tl.log(unif))
        pick = tl.argmax(z + gumbel, axis=1)
    tl.store(out + rows, pick.to(tl.int64), mask=row_ok)


def _config(n_rows: int, block_v: int, interpreted: bool) -> tuple[int, int]:
    """(rows per program, num_warps). The interpreter runs programs one by one: give it big tiles."""
    if interpreted:
        return max(1, min(triton.next_power_of_2(n_rows), 65536 // block_v)), 4
    rows = max(1, min(triton.next_power_of_2(n_rows), 1024 // block_v))
    return rows, (4 if rows * block_v <= 1024 else 8 if rows * block_v <= 2048 else 16)


def cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: float = 3.0,
    temperature: float = 1.2,
    top_p: float = 0.95,
    top_k: int | None = 45,
    eos_id: int = 1024,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | int = 0,
) -> torch.Tensor:
    """Next codes [B, C] int64 from conditional / unconditional logits [B, C, V], V <= 4096.

    Same semantics as :func:`dia_fast.ops.reference.cfg_sample` (CFG, top-k of the guided logits
    applied to the cond logits, EOS rules, then argmax, or temperature + top-p + a draw), with
    ties broken by the lowest id. fp32 / bf16 / fp16 inputs, any strides. No host sync.

    The Philox key of the draw is ``seed`` (an integer tensor on the logits' device, first element
    used) when given, else one ``torch.randint(..., generator=generator)`` on the device. ``offset``
    (an int, or a one-element integer device tensor such as the decode position) selects the
    Philox counters: calls with one ``seed`` and different offsets draw independent noise.
    """
    if cond.ndim != 3 or cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must be [B, C, V] of one shape, got {tuple(cond.shape)}, {tuple(uncond.shape)}"
        )
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    B, C, V = cond.shape
    if V > MAX_VOCAB:
        raise ValueError(f"the Triton cfg_sample handles V <= {MAX_VOCAB}, got V = {V}; use backend='torch'")
    if not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is not a vocabulary id (V = {V})")
    out = torch.empty((B, C), dtype=torch.int64, device=cond.device)
    n_rows = B * C
    if n_rows == 0:
        return out
    greedy = (not do_sample) or temperature == 0
    has_topk = top_k is not None and 0 < top_k < V
    has_topp = (not greedy) and top_p < 1.0
    if greedy:
        seed = out  # never read
    elif seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=cond.device, generator=generator)
    elif seed.device != cond.device or seed.dtype.is_floating_point or seed.numel() == 0:
        raise ValueError(f"seed must be a non-empty integer tensor on {cond.device}, got {seed.dtype} on {seed.device}")
    step_from_ptr = isinstance(offset, torch.Tensor)
    if step_from_ptr and (offset.device != cond.device or offset.dtype.is_floating_point or offset.numel() == 0):
        raise ValueError(f"offset must be an int or an integer tensor on {cond.device}")

    block_v = max(16, triton.next_power_of_2(V))
    idx_bits = block_v.bit_length() - 1
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and cond.device.type == "cpu"
    radix_bits = _RADIX_BITS or (4 if interpreted else 2)
    key_bits = -(-(32 + idx_bits) // radix_bits) * radix_bits
    rows, num_warps = _config(n_rows, block_v, interpreted)
    grid = (triton.cdiv(n_rows, rows),)
    _cfg_sample_kernel[grid](
        cond,
        uncond,
        out,
        seed,
        offset if step_from_ptr else out,
        0 if step_from_ptr else int(offset),
        n_rows,
        C,
        V,
        cond.stride(0),
        cond.stride(1),
        cond.stride(2),
        uncond.stride(0),
        uncond.stride(1),
        uncond.stride(2),
        float(cfg_scale),
        float(temperature) if not greedy else 1.0,
        float(top_p),
        float(top_k) - 0.5 if has_topk else 0.0,
        int(eos_id),
        GREEDY=greedy,
        HAS_TOPK=has_topk,
        HAS_TOPP=has_topp,
        STEP_FROM_PTR=step_from_ptr,
        ROWS=rows,
        BLOCK_V=block_v,
        IDX_BITS=idx_bits,
        KEY_BITS=key_bits,
        RADIX_BITS=radix_bits,
        num_warps=num_warps,
        # no FMA contraction: guided = cond + s * (cond - uncond) rounds as torch's separate ops do
        enable_fp_fusion=False,
    )
    return out
