"""Fused CFG sampling in Triton: CFG, top-k, Dia's EOS rules, temperature, top-p and the draw in one launch.

Semantics are :func:`dia_fast.ops.reference.cfg_sample` (with ``seed``: the same codes, the same Philox
noise), without any sort and without host synchronisation. On a GPU one program per (batch item, channel)
row, all rows in parallel; per row a short, fixed chain of reductions, each filter skipped by the rows
that do not use it:

* **top-k / top-p thresholds** by a radix search over 32-bit order-preserving keys of the floats,
  ``RADIX_BITS`` bits per pass (``2**RADIX_BITS`` candidate thresholds tested at once by one masked
  reduction over the row): 16 passes at 2 bits, whatever ``k`` or ``top_p`` (the earlier kernel searched
  44-bit keys, value and id, in 22 passes per filter).
* **ties** at the threshold are split by one prefix sum in id order, as a *stable* descending sort
  would: exactly ``k`` ids survive the top-k filter, lower ids first; the nucleus is that of a stable sort.
* **the draw** is Gumbel-max, ``argmax(logits / T + g)``, with ``g`` from Philox4x32-10 keyed by the
  row's seed at counter (id, channel, offset): the function :func:`dia_fast.ops.reference.gumbel_noise`
  computes, so both backends draw the same codes.

Every sampling setting may differ per batch item (device tensors, read in the kernel): a CUDA graph of a
decode step serves any temperature, top-p, top-k or CFG scale. Runs on CUDA, and on CPU tensors in the
Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .reference import Param, top_k_arg

__all__ = ["MAX_VOCAB", "cfg_sample"]

MAX_VOCAB = 4096
# Bits of a threshold fixed per pass (32 / RADIX_BITS passes of 2**RADIX_BITS candidates). Measured on an H200
# (benchmarks/RESULTS.md): 4 bits with 16 warps cost ~2.2 us a pass, 2 bits with 8 warps (the layout of the earlier
# kernel) ~0.6 us: short passes are what a lone row needs, so 2 bits and 8 warps.
RADIX_BITS = 2
# The interpreter pays per op, not per element: half the passes (tests cover both widths).
INTERPRETER_RADIX_BITS = 4


@triton.jit
def _order_key(x):
    """uint32 keys in the order of the floats (-0.0 and +0.0 equal; -inf lowest)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    # negative floats: flip every bit; others: flip the sign bit
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _radix_threshold(key, w, target, ROWS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Per row, the largest ``t`` (uint32 [ROWS]) with ``sum(w * (key >= t)) > target``. key [ROWS, N] uint32,
    w [ROWS, N] >= 0, target [ROWS]; needs ``sum(w) > target`` (then ``t`` is the key of an element with
    ``w > 0``). The predicate is monotone in ``t``, so its bits are fixed from the most significant down,
    RADIX_BITS at a time (2**RADIX_BITS candidates tested by one reduction per pass)."""
    NT: tl.constexpr = 1 << RADIX_BITS
    digit = tl.arange(0, NT).to(tl.uint32)
    prefix = tl.zeros([ROWS], tl.uint32)
    for i in tl.static_range(32 // RADIX_BITS):
        shift = 32 - (i + 1) * RADIX_BITS  # a constant: i comes from static_range
        cand = prefix[:, None] + (digit[None, :] << shift)  # [ROWS, NT]
        ge = key[:, None, :] >= cand[:, :, None]  # [ROWS, NT, N]
        mass = tl.sum(tl.where(ge, w[:, None, :], 0.0), axis=2)  # [ROWS, NT]
        n_ok = tl.sum((mass > target[:, None]).to(tl.int32), axis=1)  # candidate 0 always passes
        prefix = prefix + ((n_ok - 1).to(tl.uint32) << shift)
    return prefix


@triton.jit
def _philox_uniform(seed, offset, idx, ch, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Uniforms strictly inside (0, 1), [ROWS, BLOCK]: Philox4x32-10 keyed by ``seed`` [ROWS] (int64) at counter
    (id, channel, offset low word, offset high word): the high 23 bits of the first output word + 1/2, over 2**23
    (:func:`dia_fast.ops.reference.uniform_from_bits`: 24 bits would round their top value to exactly 1.0)."""
    zero = tl.zeros([ROWS, BLOCK], tl.uint32)
    m0 = zero + 0xD2511F53
    m1 = zero + 0xCD9E8D57
    w0 = zero + 0x9E3779B9
    w1 = zero + 0xBB67AE85
    k0 = zero + (seed & 0xFFFFFFFF).to(tl.uint32)[:, None]
    k1 = zero + ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c0 = zero + idx.to(tl.uint32)[None, :]
    c1 = zero + ch.to(tl.uint32)[:, None]
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    for i in tl.static_range(10):
        if i > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return ((c0 >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _cfg_sample_kernel(
    Cond, Uncond, Out, Scale, Temp, TopP, TopK, Seed, Offset, AllowEos,
    s_cb, s_cc, s_cv, s_ub, s_uc, s_uv,
    s_scale, s_temp, s_topp, s_topk, s_seed, s_off, s_allow,
    n_rows, C, V, eos_id,
    DO_SAMPLE: tl.constexpr,
    HAS_ALLOW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):  # fmt: skip
    # ROWS (batch item, channel) rows per program: 1 on a GPU (rows in parallel), many in the interpreter.
    # A filter runs when a row of the tile needs it (per row on a GPU).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = (rows // C).to(tl.int64)
    ch = rows % C
    idx = tl.arange(0, BLOCK_V)
    ok = row_ok[:, None] & (idx < V)[None, :]
    neg_inf = float("-inf")
    col = idx[None, :].to(tl.int64)
    ch64 = ch[:, None].to(tl.int64)
    x = tl.load(Cond + b[:, None] * s_cb + ch64 * s_cc + col * s_cv, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(Uncond + b[:, None] * s_ub + ch64 * s_uc + col * s_uv, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(Scale + b * s_scale, mask=row_ok, other=0.0).to(tl.float32)
    k = tl.load(TopK + b * s_topk, mask=row_ok, other=0).to(tl.int32)
    guided = x + scale[:, None] * (x - u)
    logits = tl.where(ok, guided, neg_inf)  # no filter: the guided logits

    use_k = k > 0
    if tl.max(use_k.to(tl.int32), axis=0) > 0:  # keep the cond logits at the top-k ids of the guided ones
        kk = tl.minimum(tl.maximum(k, 1), V)
        gkey = _order_key(guided)
        thr = _radix_threshold(gkey, tl.where(ok, 1.0, 0.0), kk.to(tl.float32) - 0.5, ROWS, RADIX_BITS)
        gt = ok & (gkey > thr[:, None])
        eq = ok & (gkey == thr[:, None])
        n_gt = tl.sum(gt.to(tl.int32), axis=1)
        keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=1) <= (kk - n_gt)[:, None]))
        logits = tl.where(use_k[:, None], tl.where(keep, x, neg_inf), logits)

    # ids above EOS never; EOS only on channel 0, alone if it is the argmax (lowest id on ties), else masked
    ch0 = (ch == 0)[:, None]
    allowed = (idx <= eos_id)[None, :] & (ch0 | (idx < eos_id)[None, :])
    if HAS_ALLOW:  # rows that may not end yet (min_new_tokens): no EOS at all
        may_end = tl.load(AllowEos + b * s_allow, mask=row_ok, other=1) != 0
        allowed = allowed & (may_end[:, None] | (idx != eos_id)[None, :])
    logits = tl.where(allowed, logits, neg_inf)
    eos_is_max = tl.argmax(logits, axis=1) == eos_id
    logits = tl.where(ch0 & ((idx == eos_id)[None, :] ^ eos_is_max[:, None]), neg_inf, logits)
    pick = tl.argmax(logits, axis=1)

    if DO_SAMPLE:
        temp = tl.load(Temp + b * s_temp, mask=row_ok, other=0.0).to(tl.float32)
        sampled = temp > 0.0
        if tl.max(sampled.to(tl.int32), axis=0) > 0:
            z = tl.math.div_rn(logits, tl.where(sampled, temp, 1.0)[:, None])  # IEEE division, as torch
            top_p = tl.load(TopP + b * s_topp, mask=row_ok, other=1.0).to(tl.float32)
            # a negative top_p keeps the top id alone, as 0 does (the reference always keeps it); NaN stays NaN
            top_p = tl.where(top_p < 0.0, 0.0, top_p)
            use_p = sampled & (top_p < 1.0)
            if tl.max(use_p.to(tl.int32), axis=0) > 0:  # nucleus: keep an id iff the mass ranked above is <= top_p
                finite = z > neg_inf
                zmax = tl.max(z, axis=1)
                zmax = tl.where(zmax > neg_inf, zmax, 0.0)
                e = tl.where(finite, tl.exp(z - zmax[:, None]), 0.0)
                target = top_p * tl.sum(e, axis=1)
                pkey = _order_key(z)
                thr = _radix_threshold(pkey, e, target, ROWS, RADIX_BITS)
                gt = finite & (pkey > thr[:, None])
                eq = finite & (pkey == thr[:, None])
                e_eq = tl.where(eq, e, 0.0)
                above = tl.sum(tl.where(gt, e, 0.0), axis=1)[:, None] + tl.cumsum(e_eq, axis=1) - e_eq
                keep = gt | (eq & (above <= target[:, None]))
                z = tl.where(use_p[:, None] & ~keep, neg_inf, z)
            seed = tl.load(Seed + b * s_seed, mask=row_ok, other=0).to(tl.int64)
            offset = tl.load(Offset + b * s_off, mask=row_ok, other=0).to(tl.int64)
            unif = _philox_uniform(seed, offset, idx, ch, ROWS, BLOCK_V)
            pick = tl.where(sampled, tl.argmax(z - tl.log(-tl.log(unif)), axis=1), pick)
    tl.store(Out + rows, pick.to(tl.int64), mask=row_ok)


def _row_arg(value: Param, B: int, dtype: torch.dtype, device: torch.device, name: str) -> tuple[torch.Tensor, int]:
    """(tensor, stride per row) of a per-row parameter: a [B] tensor as is (cast only if its dtype differs),
    a number or a one-element tensor broadcast (stride 0)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((1,), value, dtype=dtype, device=device), 0
    if value.ndim > 1 or value.numel() not in (1, B):
        raise ValueError(f"{name} must be a number or a [B={B}] tensor, got shape {tuple(value.shape)}")
    t = value.to(device=device, dtype=dtype).reshape(-1)
    return t, (t.stride(0) if t.numel() == B and B > 1 else 0)


def cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: Param = 3.0,
    temperature: Param = 1.2,
    top_p: Param = 0.95,
    top_k: int | None | torch.Tensor = 45,
    eos_id: int = 1024,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    allow_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next codes [B, C] int64 from conditional / unconditional logits [B, C, V] in one launch (V <= 4096; a larger
    vocabulary runs :func:`dia_fast.ops.reference.cfg_sample`).

    :func:`dia_fast.ops.reference.cfg_sample`'s semantics (CFG, top-k of the guided logits applied to the
    cond logits or, without a top-k, the guided logits; EOS rules; then argmax, or temperature + top-p + a
    Gumbel-max draw), ties broken by the lowest id. ``cfg_scale``, ``temperature``, ``top_p``, ``top_k``,
    ``seed`` and ``offset`` are numbers or per-row tensors (read in the kernel: put them on the logits'
    device and nothing syncs). With ``seed`` (int64 Philox keys, [B] or [1]) the draws equal the
    reference's; without, one seed per row is drawn on the device from ``generator`` (one extra launch).
    ``allow_eos`` ([B] bool, on the device): rows where it is False may not emit EOS. fp32 / bf16 / fp16
    logits, any strides.
    """
    if cond.ndim != 3 or cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must be [B, C, V] of one shape, got {tuple(cond.shape)}, {tuple(uncond.shape)}"
        )
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    B, C, V = cond.shape
    if not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is not a vocabulary id (V = {V})")
    if V > MAX_VOCAB:  # one row must fit one block: larger vocabularies run the reference (as cpp and metal do)
        return reference.cfg_sample(
            cond,
            uncond,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=eos_id,
            do_sample=do_sample,
            generator=generator,
            seed=seed,
            offset=offset,
            allow_eos=allow_eos,
        )
    out = torch.empty((B, C), dtype=torch.int64, device=cond.device)
    if B * C == 0:
        return out
    dev = cond.device
    scale, s_scale = _row_arg(cfg_scale, B, torch.float32, dev, "cfg_scale")
    topk, s_topk = _row_arg(top_k_arg(top_k), B, torch.int32, dev, "top_k")
    sample = bool(do_sample) and (isinstance(temperature, torch.Tensor) or temperature != 0)
    if sample:
        temp, s_temp = _row_arg(temperature, B, torch.float32, dev, "temperature")
        topp, s_topp = _row_arg(top_p, B, torch.float32, dev, "top_p")
        if seed is None:
            seed = torch.randint(0, 2**62, (B,), device=dev, generator=generator)
        elif seed.device != dev or seed.dtype.is_floating_point or seed.numel() not in (1, B):
            raise ValueError(f"seed must be an integer tensor [B] or [1] on {dev}, got {seed.dtype} on {seed.device}")
        seeds, s_seed = _row_arg(seed, B, torch.int64, dev, "seed")
        offs, s_off = _row_arg(offset, B, torch.int64, dev, "offset")
    else:
        temp = topp = seeds = offs = out  # never read
        s_temp = s_topp = s_seed = s_off = 0
    allow, s_allow = out, 0  # never read without HAS_ALLOW
    if allow_eos is not None:
        if allow_eos.device != dev or allow_eos.numel() not in (1, B):
            raise ValueError(f"allow_eos must be a [B={B}] (or one-element) tensor on {dev}")
        allow = allow_eos.reshape(-1)
        allow = allow.view(torch.uint8) if allow.dtype == torch.bool else allow
        s_allow = allow.stride(0) if allow.numel() == B and B > 1 else 0
    block_v = max(16, triton.next_power_of_2(V))
    n_rows = B * C
    # the interpreter runs programs one by one at a fixed cost per op: give it many rows per program
    rows = 1 if dev.type == "cuda" else max(1, min(triton.next_power_of_2(n_rows), 32768 // block_v))
    _cfg_sample_kernel[(triton.cdiv(n_rows, rows),)](
        cond, uncond, out, scale, temp, topp, topk, seeds, offs, allow,
        cond.stride(0), cond.stride(1), cond.stride(2), uncond.stride(0), uncond.stride(1), uncond.stride(2),
        s_scale, s_temp, s_topp, s_topk, s_seed, s_off, s_allow,
        n_rows, C, V, int(eos_id),
        DO_SAMPLE=sample, HAS_ALLOW=allow_eos is not None, ROWS=rows, BLOCK_V=block_v,
        RADIX_BITS=RADIX_BITS if dev.type == "cuda" else INTERPRETER_RADIX_BITS,
        num_warps=max(1, min(8, block_v // 256)),
        # no FMA contraction: guided = cond + s * (cond - uncond) rounds as torch's separate ops do
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
