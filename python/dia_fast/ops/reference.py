"""Plain PyTorch reference implementations of every op in :mod:`dia_fast.ops`.

These are the semantics. Every other backend (Triton, C++, Metal) is tested against the
functions here, and they are the fallback wherever no faster backend is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

DelayPattern = Sequence[int] | torch.Tensor


def _delays(delay_pattern: DelayPattern, n_channels: int, device: torch.device) -> torch.Tensor:
    delays = torch.as_tensor(delay_pattern, dtype=torch.long, device=device)
    if delays.ndim != 1 or delays.numel() != n_channels:
        raise ValueError(f"delay_pattern has {delays.numel()} entries but the codes have {n_channels} channels")
    if bool((delays < 0).any()):
        raise ValueError(f"delay_pattern must be non-negative, got {delays.tolist()}")
    return delays


def _check_codes(codes: torch.Tensor) -> None:
    if codes.ndim != 3:
        raise ValueError(f"codes must be [B, T, C], got shape {tuple(codes.shape)}")


def fits_dtype(dtype: torch.dtype, *values: int) -> bool:
    """Whether an integer ``dtype`` holds every value (kernels would wrap the others around: the backends hand such
    values to :func:`apply_delay` here, whose error names them). Other dtypes: True (nothing wraps)."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return True
    limits = torch.iinfo(dtype)
    return all(limits.min <= int(v) <= limits.max for v in values)


def apply_delay(codes: torch.Tensor, delay_pattern: DelayPattern, bos_value: int, pad_value: int) -> torch.Tensor:
    """Shift channel ``c`` of ``codes`` [B, T, C] right by ``delay_pattern[c]`` frames.

    ``out[b, t, c] = codes[b, t - d_c, c]``; BOS where ``t - d_c < 0``; PAD where
    ``t - d_c >= T`` (never, for non-negative delays, but kept for the official semantics).
    """
    _check_codes(codes)
    B, T, C = codes.shape
    delays = _delays(delay_pattern, C, codes.device)
    src_t = torch.arange(T, device=codes.device)[:, None] - delays[None, :]  # [T, C]
    gathered = codes.gather(1, src_t.clamp(0, max(T - 1, 0)).expand(B, T, C))
    out = torch.where(src_t < 0, torch.full_like(gathered, bos_value), gathered)
    return torch.where(src_t >= T, torch.full_like(out, pad_value), out)


def revert_delay(codes: torch.Tensor, delay_pattern: DelayPattern) -> torch.Tensor:
    """Undo :func:`apply_delay`: ``out[b, t, c] = codes[b, min(t + d_c, T - 1), c]``.

    The last ``max(delay)`` frames are not meaningful (they repeat the last delayed frame);
    :func:`undelay_codes` drops them.
    """
    _check_codes(codes)
    B, T, C = codes.shape
    delays = _delays(delay_pattern, C, codes.device)
    src_t = (torch.arange(T, device=codes.device)[:, None] + delays[None, :]).clamp(max=max(T - 1, 0))
    return codes.gather(1, src_t.expand(B, T, C))


def undelay_codes(delayed: torch.Tensor, delay_pattern: DelayPattern, codebook_size: int = 1024) -> torch.Tensor:
    """Delayed decoder codes -> codec codes: revert the delay, drop the last ``max(delay)`` frames,
    and map every value outside ``[0, codebook_size)`` (BOS/EOS/PAD/unfilled) to 0.

    Returns ``[B, max(T - max_delay, 0), C]`` int64.
    """
    _check_codes(delayed)
    C = delayed.shape[2]
    max_delay = int(_delays(delay_pattern, C, delayed.device).max()) if C else 0
    reverted = revert_delay(delayed, delay_pattern)
    out = reverted[:, : max(delayed.shape[1] - max_delay, 0)].long()
    return torch.where((out < 0) | (out >= codebook_size), torch.zeros_like(out), out)


def delayed_view(buffer: torch.Tensor, delay_pattern: DelayPattern) -> torch.Tensor | None:
    """Zero-copy delayed view of an undelayed, channel-major code buffer, where the layout allows it.

    ``buffer`` is ``[B, C, P + T]`` with a contiguous last dim, holding ``P = max(delay)``
    frames of BOS in front of the ``T`` real frames of each channel. When the delays are
    affine in the channel index (``d_c = d_0 + c * s``, e.g. ``[0, 1, 2, ...]``) the delayed
    codes ``out[b, t, c] = buffer[b, c, P + t - d_c]`` (= ``apply_delay`` of the real frames)
    are a strided view ``[B, T, C]`` and it is returned; otherwise ``None`` (use
    :func:`apply_delay`). Dia's own pattern ``[0, 8, ..., 15]`` is not affine.
    """
    if buffer.ndim != 3:
        raise ValueError(f"buffer must be [B, C, P + T], got shape {tuple(buffer.shape)}")
    B, C, L = buffer.shape
    delays = [int(d) for d in torch.as_tensor(delay_pattern).tolist()]
    if len(delays) != C:
        raise ValueError(f"delay_pattern has {len(delays)} entries but the buffer has {C} channels")
    if C == 0 or buffer.stride(2) != 1:
        return None
    step = delays[1] - delays[0] if C > 1 else 0
    if any(delays[c] != delays[0] + c * step for c in range(C)):
        return None
    P = max(delays)
    T = L - P
    channel_stride = buffer.stride(1) - step
    if T <= 0 or channel_stride < 0:
        return None
    # element (b, t, c) lives at b*sB + c*sC + P + t - d0 - c*step
    offset = buffer.storage_offset() + P - delays[0]
    return buffer.as_strided((B, T, C), (buffer.stride(0), 1, channel_stride), offset)


def embed_codes(codes: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum of per-channel embeddings: ``out[b, t] = sum_c table[c * vocab_size + codes[b, t, c]]``.

    codes [B, T, C] integer in ``[0, vocab_size)``; table [C * vocab_size, D] -> [B, T, D] in table's dtype.
    """
    _check_codes(codes)
    C = codes.shape[2]
    offsets = torch.arange(C, device=codes.device) * vocab_size
    return F.embedding(codes.long() + offsets, table).sum(dim=2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention over a whole sequence (prefill, encoder, cross-attention).

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with ``Hq % Hkv == 0`` (GQA: query head ``h`` uses
    KV head ``h // (Hq // Hkv)``). ``key_mask`` [B, Tk] bool, True = attend. ``causal`` aligns
    the queries to the end of the keys (query ``i`` sees keys ``<= i + Tk - Tq``). A query
    row that sees no key at all returns zeros. Returns [B, Hq, Tq, D] in q's dtype.
    """
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
    if causal:
        qi = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        cm = torch.arange(Tk, device=q.device)[None, :] <= qi
        mask = cm[None, None] if mask is None else (mask & cm[None, None])
    # GQA without repeating K/V (a copy of the whole cache per call): the ``groups`` query heads
    # of KV head j (heads j * groups ... (j + 1) * groups - 1) are stacked into one query matrix.
    Hkv = k.shape[1]
    groups = Hq // Hkv
    qg = q.float().reshape(B, Hkv, groups * Tq, D)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).reshape(B, Hq, Tq, Tk) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> zeros
    out = torch.matmul(probs.reshape(B, Hkv, groups * Tq, Tk), v.float())
    return out.reshape(B, Hq, Tq, D).to(q.dtype)


# decode_attention on CPU tensors reads kv_len to skip the keys past it (free there; a sync elsewhere).
SKIP_PAST_LENGTH_ON_CPU = True


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float = 1.0,
    kv_len: torch.Tensor | int | None = None,
    key_mask: torch.Tensor | None = None,
    semaphores: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query step against a (static) KV cache.

    q: [B, Hq, 1, D]; k_cache, v_cache: [B, Hkv, L, D]. Keys ``[0, kv_len)`` are attended
    (``kv_len``: int, 0-d or [B] integer tensor, possibly on the device; None = all L), further
    restricted by ``key_mask`` [B, L] (True = attend), used for cross-attention over padded text.
    ``semaphores``: scratch of the split-KV kernels (unused here). Returns [B, Hq, 1, D].
    """
    B, _, L, _ = k_cache.shape
    if kv_len is not None and q.device.type == "cpu" and SKIP_PAST_LENGTH_ON_CPU and L > 512:
        # Keys past every row's length are masked anyway; on the CPU reading the length costs little, so a long
        # cache (e.g. sized for the model's limit) is cut to it. Elsewhere that read would sync: mask instead.
        n = min(L, max(int(torch.as_tensor(kv_len).max()), 0))
        k_cache, v_cache, L = k_cache[:, :, :n], v_cache[:, :, :n], n
        key_mask = None if key_mask is None else key_mask[:, :n]
    mask = decode_key_mask(B, L, kv_len, key_mask, q.device)
    return attention(q, k_cache, v_cache, scale=scale, causal=False, key_mask=mask)


def decode_key_mask(
    B: int, L: int, kv_len: torch.Tensor | int | None, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The keys a :func:`decode_attention` step attends: ``[0, kv_len)`` and ``key_mask``, as a
    bool mask broadcastable to [B, L] ([B, L] when ``kv_len`` is given); None when both are None."""
    mask = None
    if kv_len is not None:
        lens = torch.as_tensor(kv_len, device=device).reshape(-1, 1)
        mask = torch.arange(L, device=device)[None, :] < lens  # [B or 1, L]
        mask = mask.expand(B, L)
    if key_mask is not None:
        mask = key_mask.bool() if mask is None else (mask & key_mask.bool())
    return mask


# --- sampling ------------------------------------------------------------------------------

Param = float | int | torch.Tensor | None


def row_param(value: Param, B: int, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """A per-row sampling parameter as a [B] tensor: a number is broadcast, a [B] (or 1-element)
    tensor is used as is (moved to ``device``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() not in (1, B) or value.ndim > 1:
            raise ValueError(f"{name} must be a number or a [B={B}] tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).reshape(-1).expand(B)
    return torch.full((B,), value, dtype=dtype, device=device)


class HostParams(NamedTuple):
    """Sampling settings shared by every row, as numbers (``top_k`` 0 = no CFG filter)."""

    cfg_scale: float
    temperature: float
    top_p: float
    top_k: int


def host_params(
    cfg_scale: Param, temperature: Param, top_p: Param, top_k: int | None | torch.Tensor
) -> HostParams | None:
    """The settings as numbers when every row shares them, else None. Tensors are read on the host (meant
    for the CPU / MPS backends, whose kernels take one setting per call)."""
    values = []
    for v in (cfg_scale, temperature, top_p, top_k_arg(top_k)):
        if isinstance(v, torch.Tensor):
            flat = v.reshape(-1).tolist()
            if not flat or any(x != flat[0] for x in flat):
                return None
            v = flat[0]
        values.append(v)
    return HostParams(float(values[0]), float(values[1]), float(values[2]), int(values[3]))


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``cond + cfg_scale * (cond - uncond)`` in fp32 (what is sampled without a CFG filter)."""
    cond = cond.float()
    return cond + cfg_scale * (cond - uncond.float())


def top_k_arg(top_k: int | None | torch.Tensor) -> int | torch.Tensor:
    """``cfg_filter_top_k`` as the kernels take it: None (no filter, sample the guided logits) -> 0."""
    return 0 if top_k is None else top_k


def stable_ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of every element along the last dim in a stable descending sort (0 = largest; among equal
    values the lower index ranks first; -0.0 == +0.0)."""
    order = torch.sort(x + 0.0, dim=-1, descending=True, stable=True).indices  # + 0.0: -0.0 -> +0.0
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))


def filter_cfg_logits(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: Param,
    top_k: int | None | torch.Tensor,
    eos_id: int,
    allow_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """CFG + top-k filter + Dia's special-token rules, in fp32. [B, C, V] -> [B, C, V].

    guided = cond + cfg_scale * (cond - uncond). With a top-k (``top_k`` >= 1): keep the COND logits
    at the top-k ids of ``guided`` (-inf elsewhere; ties go to the lower id; ``top_k >= V`` keeps every
    cond logit). Without (``top_k`` None or 0): the guided logits themselves, as transformers'
    guidance does without a filter. Then ids above ``eos_id`` are never sampled; only channel 0 may
    emit ``eos_id`` and, when EOS is its argmax, it is the only candidate (else it is masked).
    ``cfg_scale`` and ``top_k`` may be per-row [B] tensors. ``allow_eos`` [B] bool: rows where it is False
    may not emit EOS at all (``min_new_tokens``): it is masked before the EOS rule.
    """
    cond = cond.float()
    uncond = uncond.float()
    B, C, V = cond.shape
    scale = row_param(cfg_scale, B, torch.float32, cond.device, "cfg_scale")[:, None, None]
    k = row_param(top_k_arg(top_k), B, torch.long, cond.device, "top_k")[:, None, None]
    guided = cond + scale * (cond - uncond)
    keep = stable_ranks(guided) < k
    logits = torch.where(k > 0, torch.where(keep, cond, float("-inf")), guided)
    neg_inf = float("-inf")
    logits = logits.clone()
    logits[:, :, eos_id + 1 :] = neg_inf
    logits[:, 1:, eos_id:] = neg_inf
    if allow_eos is not None:
        ok = allow_eos.to(device=logits.device, dtype=torch.bool).reshape(-1).expand(B)
        logits[:, 0, eos_id] = torch.where(ok, logits[:, 0, eos_id], neg_inf)
    ch0 = logits[:, 0]
    eos_is_max = ch0.argmax(dim=-1) == eos_id  # [B]
    below_eos = torch.arange(V, device=logits.device) < eos_id
    ch0 = torch.where(eos_is_max[:, None] & below_eos[None, :], neg_inf, ch0)
    ch0[:, eos_id] = torch.where(eos_is_max, ch0[:, eos_id], torch.full_like(ch0[:, eos_id], neg_inf))
    logits[:, 0] = ch0
    return logits


def top_p_filter(logits: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Nucleus filter on the last dim: keep the smallest set of highest-probability ids whose
    mass reaches ``top_p`` (always at least the top id; ties ranked by the lower id first).
    ``top_p`` may be a per-row [B] tensor for [B, C, V] logits."""
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return logits
    p = top_p
    if isinstance(top_p, torch.Tensor):
        p = row_param(top_p, logits.shape[0], torch.float32, logits.device, "top_p")
        p = p.reshape(-1, *([1] * (logits.ndim - 1)))
    order = torch.sort(logits + 0.0, dim=-1, descending=True, stable=True).indices
    sorted_logits = logits.gather(-1, order)
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    above = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # mass ranked strictly above
    remove = (above > p) & (p < 1.0)
    remove[..., 0] = False
    remove_orig = torch.zeros_like(remove).scatter_(-1, order, remove)
    return logits.masked_fill(remove_orig, float("-inf"))


# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the counter-based
# generator of the sampled draws. The Triton kernel computes the same function, so the two backends draw
# the same codes for the same seeds.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * b`` for a constant ``a < 2**32`` and int64 ``b`` in [0, 2**32),
    without 64-bit overflow (16-bit limbs)."""
    p_lo = a * (b & 0xFFFF)
    mid = (p_lo >> 16) + a * (b >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(
    key: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under a 64-bit key (low word first): four int64 tensors
    holding 32-bit words. Inputs broadcast; each counter word must be in [0, 2**32)."""
    k0, k1 = key & _U32, (key >> 32) & _U32
    for i in range(10):
        if i:
            k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uint32(
    key: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> torch.Tensor:
    """The first word of :func:`philox4x32` (what the sampler's noise uses)."""
    return philox4x32(key, c0, c1, c2, c3)[0]


def gumbel_noise(seed: torch.Tensor, offset: torch.Tensor, C: int, V: int) -> torch.Tensor:
    """Standard Gumbel noise [B, C, V] (fp32) of the seeded draws: element (b, c, v) comes from
    Philox with key ``seed[b]`` and counter ``(v, c, offset[b] low word, offset[b] high word)``, made a uniform
    strictly inside (0, 1) (:func:`uniform_from_bits`), then ``-log(-log(u))``."""
    dev = seed.device
    key = seed.reshape(-1, 1, 1).long()
    off = offset.reshape(-1, 1, 1).long()
    v = torch.arange(V, device=dev).reshape(1, 1, V)
    c = torch.arange(C, device=dev).reshape(1, C, 1)
    return -torch.log(-torch.log(uniform_from_bits(philox_uint32(key, v, c, off & _U32, (off >> 32) & _U32))))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2**32)) -> fp32 uniforms strictly inside (0, 1): the high 23 bits + 1/2, over
    2**23. (24 bits would round their top value to exactly 1.0 in fp32, whose Gumbel noise is +inf.)"""
    return ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)


def seed_from_int(seed: int) -> int:
    """Any Python int as a Philox key: reduced modulo 2**64, stored as a signed int64 (two's complement)."""
    s = int(seed) % (1 << 64)
    return s - (1 << 64) if s >= (1 << 63) else s


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
    """Pick the next code of every channel from conditional/unconditional logits [B, C, V].

    :func:`filter_cfg_logits`, then per row: greedy (``do_sample=False`` or ``temperature == 0``): the
    argmax; else temperature, :func:`top_p_filter` and a draw. ``cfg_scale``, ``temperature``, ``top_p``
    and ``top_k`` are numbers or per-row [B] tensors. The draw: with ``seed`` (an int64 tensor [B] or [1],
    one Philox key per row) the Gumbel-max draw ``argmax(logits / T + g)`` with the noise of
    :func:`gumbel_noise` at counter offset ``offset`` (an int, or a [1] / [B] integer tensor such as the
    decode position): reproducible, identical in every backend that implements it, and never syncing;
    without ``seed``: ``torch.multinomial`` from ``generator``. ``allow_eos`` [B] bool: rows that may not
    emit EOS yet (see :func:`filter_cfg_logits`). Returns [B, C] int64.
    """
    logits = filter_cfg_logits(cond, uncond, cfg_scale=cfg_scale, top_k=top_k, eos_id=eos_id, allow_eos=allow_eos)
    B, C, V = logits.shape
    greedy_pick = logits.argmax(dim=-1)
    temp = row_param(temperature, B, torch.float32, logits.device, "temperature")
    if not do_sample:
        return greedy_pick
    if seed is None and not isinstance(temperature, torch.Tensor) and temperature == 0:
        return greedy_pick
    sampled = temp > 0
    z = top_p_filter(logits / torch.where(sampled, temp, 1.0)[:, None, None], top_p)
    if seed is not None:
        seeds = row_param(seed, B, torch.long, logits.device, "seed")
        offs = row_param(offset, B, torch.long, logits.device, "offset")
        pick = (z + gumbel_noise(seeds, offs, C, V)).argmax(dim=-1)
    else:
        probs = z.softmax(dim=-1)
        pick = torch.multinomial(probs.reshape(B * C, V), 1, generator=generator).reshape(B, C)
    return torch.where(sampled[:, None], pick, greedy_pick)


# --- the fused ops of a decode step -----------------------------------------------------------


def add_rmsnorm(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``h = residual + delta`` (in their dtype; ``delta`` None: ``h = residual``),
    ``normed = h * rsqrt(mean(h**2) + eps) * weight`` computed in fp32 and cast to h's dtype.
    Returns ``(normed, h)``; shapes [..., D], weight [D]."""
    h = residual if delta is None else residual + delta
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(h.dtype), h


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in fp32, cast back: x [..., D], cos/sin broadcastable to [..., D/2]."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


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
    """RoPE on q and k of a fused projection, and the write of k/v into a static cache.

    ``qkv`` [R, T, (n_head + 2 n_kv_head) * D] (q heads, then k heads, then v heads); token ``t`` of row
    ``r`` is at position ``start[r] + t`` (``start``: None = 0, or an integer tensor [1] or [R], e.g. the
    decode position on the device). ``cos``/``sin``: fp32 tables [P, D/2] indexed by position. Writes the
    rotated k and the v of every token at its position into ``k_cache``/``v_cache`` [R, n_kv_head, L, D]
    (positions must be < L) and returns the rotated q [R, n_head, T, D] (contiguous, qkv's dtype).
    """
    R, T, W = qkv.shape
    D = W // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)
    one_position = start is not None and T == 1 and start.numel() == 1  # a decode step: fewer ops
    if one_position:
        pos = start.to(qkv.device).reshape(1, 1).long()
    else:
        pos = torch.arange(T, device=qkv.device)[None, :]
        if start is not None:
            pos = pos + start.to(qkv.device).reshape(-1, 1).long()  # [1 or R, T]
    c, s = cos[pos][:, None], sin[pos][:, None]  # [1 or R, 1, T, D/2]

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(R, T, n, D).transpose(1, 2)

    q = rotate_half(heads(q, n_head), c, s).contiguous()
    k = rotate_half(heads(k, n_kv_head), c, s)
    v = heads(v, n_kv_head)
    if start is None:
        k_cache[:, :, :T].copy_(k)
        v_cache[:, :, :T].copy_(v)
    elif one_position:
        k_cache.index_copy_(2, pos[0], k)
        v_cache.index_copy_(2, pos[0], v)
    else:
        rows = torch.arange(R, device=qkv.device)[:, None]
        where = (rows, slice(None), pos.expand(R, T))
        k_cache[where] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[where] = v.transpose(1, 2).to(v_cache.dtype)
    return q


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` [..., 2H] -> [..., H] (torch's rounding in the
    input dtype)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


NOT_FORCED = -1


def last_eos_position(end: int, max_delay: int) -> int:
    """The last position channel 0's EOS may take (where it is forced) so that the delay pattern's countdown of
    ``max_delay`` more positions ends before position ``end`` (the prefix length plus ``max_new_tokens``)."""
    return end - max_delay - 1


def _eos_countdown(
    codes: torch.Tensor,
    p: torch.Tensor,
    eos_pos: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    delays: torch.Tensor,
    live: torch.Tensor | None,
    eos_value: int,
    pad_value: int,
) -> torch.Tensor:
    """Dia's end-of-speech countdown for the codes [B, C] sampled at position ``p`` (0-d or [B]): channel 0's
    EOS or reaching ``forced_eos_pos`` starts it (recorded in ``eos_pos``, in place); channel ``c`` then gets
    EOS exactly ``delays[c]`` steps later and PAD after that. ``live`` [B] (None: every row) limits it."""
    started = (eos_pos < 0) & ((codes[:, 0] == eos_value) | (p >= forced_eos_pos))
    eos_pos.copy_(torch.where(started if live is None else live & started, p, eos_pos))
    counting = (eos_pos >= 0 if live is None else live & (eos_pos >= 0))[:, None]
    since = (p - eos_pos)[:, None]
    codes = torch.where(counting & (since == delays[None, :]), torch.full_like(codes, eos_value), codes)
    return torch.where(counting & (since > delays[None, :]), torch.full_like(codes, pad_value), codes)


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
    """The bookkeeping of a decode step after the draw, in place (no host sync).

    ``codes`` [B, C]: the codes sampled for position ``p = pos[0]``. Dia's end-of-speech countdown: channel 0
    emitting EOS, or ``p`` reaching ``forced_eos_pos`` ([] or [B]), starts it (``eos_pos`` [B] records
    where; -1 while speaking); channel ``c`` is then forced to EOS exactly ``delays[c]`` steps later and to
    PAD after that. A value of ``forced`` [B, L, C] at ``p`` other than -1 (the BOS / voice-prompt prefix)
    wins over both. The codes go to ``out[:, p]`` [B, L, C] and to ``tokens`` [R, 1, C] (the next decoder
    input: row ``r`` gets item ``r % B``). ``done`` [1] becomes True once every row with ``real`` [B] set
    has written its last EOS (``max(delays)`` steps after channel 0's). With ``min_eos_pos`` [B], ``allow_eos``
    [B] is set to whether the next position reaches it (``min_new_tokens``: the sampler masks EOS before).
    """
    p = pos.reshape(-1)[0]
    codes = _eos_countdown(codes, p, eos_pos, forced_eos_pos, delays, None, eos_value, pad_value)
    at_p = forced.index_select(1, pos.reshape(-1)[:1])[:, 0]
    codes = torch.where(at_p != NOT_FORCED, at_p, codes)
    out.index_copy_(1, pos.reshape(-1)[:1], codes[:, None])
    finished = ((eos_pos >= 0) & (p - eos_pos >= delays.max())) | ~real
    done.copy_(finished.all().reshape(1))
    tokens.copy_(codes.repeat(tokens.shape[0] // codes.shape[0], 1)[:, None, :])
    if min_eos_pos is not None and allow_eos is not None:
        allow_eos.copy_(p + 1 >= min_eos_pos)


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
    """The bookkeeping of a continuous-batching step, per slot, in place (no host sync).

    Slot ``s`` owns decoder rows ``2s`` (conditional) and ``2s + 1`` (unconditional) and its own position
    ``pos[s]`` (the position its ``codes[s]`` were sampled for). For every *live* slot (``active`` and not
    ``finished``): Dia's EOS countdown as in :func:`step_update` (started by channel 0's EOS or by reaching
    ``forced_eos_pos[s]``), the forced prefix at ``pos[s]``, the codes into ``out[s, pos[s]]``; ``finished[s]``
    once its last channel wrote EOS; then ``pos[s]`` advances and ``allow_eos[s]`` says whether the next position
    reaches ``min_eos_pos[s]``. Every slot's rows get its codes in ``tokens`` [2S, 1, C] and its position
    (clamped to the buffer) in ``row_pos`` [2S]: the next decoder input; rows of slots that are not live are
    computed but never read.
    """
    S, C = codes.shape
    L = out.shape[1]
    live = active & ~finished
    p = pos.clamp(0, L - 1)
    codes = _eos_countdown(codes, p, eos_pos, forced_eos_pos, delays, live, eos_value, pad_value)
    at = p[:, None, None].expand(S, 1, C)
    at_p = forced.gather(1, at)[:, 0]
    codes = torch.where(at_p != NOT_FORCED, at_p, codes)
    out.scatter_(1, at, torch.where(live[:, None], codes, out.gather(1, at)[:, 0])[:, None])
    done_now = live & (eos_pos >= 0) & (p - eos_pos >= delays.max())
    finished.copy_(finished | done_now)
    tokens.copy_(codes.repeat_interleave(2, dim=0)[:, None, :])
    row_pos.copy_(p.repeat_interleave(2))
    pos.copy_(torch.where(live & ~done_now, (p + 1).clamp(max=L - 1), p))
    allow_eos.copy_(pos >= min_eos_pos)


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int8 linear: ``x @ (weight * scale[:, None]).T`` with ``weight`` int8 [N, K] and ``scale``
    fp32 [N] (one per output row); ``x`` [..., K] in any float dtype, result in ``x``'s dtype (written into ``out``
    and returned when it is given: the result's shape and dtype). Dequantizes the whole weight for each call, in fp32
    (so the result is finite wherever ``x @ W.T`` is, even when ``x @ weight.T`` alone would overflow): the
    definition, not a fast path."""
    if weight.dtype != torch.int8 or weight.ndim != 2 or scale.shape != (weight.shape[0],):
        raise ValueError(
            f"int8_linear takes int8 [N, K] weights and N scales, got {weight.dtype} {tuple(weight.shape)} "
            f"and {tuple(scale.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features, the weight {weight.shape[1]}")
    dense = weight.float().mul_(scale.float()[:, None])
    return _into(out, torch.nn.functional.linear(x.float(), dense).to(x.dtype), "int8_linear")


def _into(out: torch.Tensor | None, result: torch.Tensor, op: str) -> torch.Tensor:
    """``result``, or copied into ``out`` (which must have its shape and dtype)."""
    if out is None:
        return result
    if out.shape != result.shape or out.dtype != result.dtype:
        raise ValueError(
            f"{op}: out is {out.dtype} {tuple(out.shape)}, the result {result.dtype} {tuple(result.shape)}"
        )
    return out.copy_(result)


INT4_BLOCK = 64  # columns per packing block of int4 weights (pack_int4)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 weights [N, K] (int8 values in [-8, 7], K a multiple of 64) -> uint8 [N, K / 2], the layout the C++
    kernel reads: in each block of 64 columns, byte j holds column j + 8 in its low nibble and column 32 + j + 8 in
    its high nibble."""
    N, K = q.shape
    if K % INT4_BLOCK:
        raise ValueError(f"int4 packing needs a multiple of {INT4_BLOCK} columns, got {K}")
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(N, K // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 [N, K / 2] -> int8 [N, K] in [-8, 7]."""
    N, half = packed.shape
    if half % (INT4_BLOCK // 2):
        raise ValueError(f"int4 packing needs a multiple of {INT4_BLOCK} columns, got {2 * half}")
    blocks = packed.view(N, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    u = torch.cat([blocks & 0xF, blocks >> 4], dim=2)
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(N, 2 * half)


def int4_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int4 linear with a scale per group of columns: ``x @ W.T`` with ``W[n, k] = w[n, k] *
    scale[n, k // group]``, ``weight`` the packed int4 values ([N, K / 2] uint8, :func:`pack_int4`), ``scale`` fp32
    [N, K / group] (the group is K over its columns). ``x`` [..., K] in any float dtype, result in ``x``'s dtype
    (written into ``out`` and returned when it is given). Dequantizes the whole weight for each call: the
    definition, not a fast path. K and the group must be multiples of 64 (:func:`pack_int4`'s blocks, the C++
    kernel's): every backend falls back to this function, so this is the op's one check."""
    if weight.dtype != torch.uint8 or weight.ndim != 2 or scale.ndim != 2 or scale.shape[0] != weight.shape[0]:
        raise ValueError(
            f"int4_linear takes packed uint8 [N, K/2] weights and [N, groups] scales, got {weight.dtype} "
            f"{tuple(weight.shape)} and {tuple(scale.shape)}"
        )
    K = 2 * weight.shape[1]
    if x.shape[-1] != K or scale.shape[1] == 0 or K % scale.shape[1]:
        raise ValueError(
            f"int4_linear: x has {x.shape[-1]} features, the weight {K} in {scale.shape[1]} groups of scales"
        )
    if (K // scale.shape[1]) % INT4_BLOCK:  # K too, as a multiple of the group
        raise ValueError(
            f"int4_linear: K and the group must be multiples of {INT4_BLOCK}, got K {K} in {scale.shape[1]} groups "
            f"of {K // scale.shape[1]}"
        )
    dense = unpack_int4(weight).float() * scale.float().repeat_interleave(K // scale.shape[1], dim=1)
    return _into(out, torch.nn.functional.linear(x.float(), dense).to(x.dtype), "int4_linear")
