"""Plain PyTorch reference implementations of every op in :mod:`dia_fast.ops`.

These are the semantics. Every other backend (Triton, C++, Metal) is tested against the
functions here, and they are the fallback wherever no faster backend is available.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float = 1.0,
    kv_len: torch.Tensor | int | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query step against a (static) KV cache.

    q: [B, Hq, 1, D]; k_cache, v_cache: [B, Hkv, L, D]. Keys ``[0, kv_len)`` are attended
    (``kv_len``: int, 0-d or [B] integer tensor, possibly on the device; None = all L), further
    restricted by ``key_mask`` [B, L] (True = attend), used for cross-attention over padded text.
    Returns [B, Hq, 1, D].
    """
    B, _, L, _ = k_cache.shape
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


def filter_cfg_logits(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: float,
    top_k: int | None,
    eos_id: int,
) -> torch.Tensor:
    """CFG + top-k filter + Dia's special-token rules, in fp32. [B, C, V] -> [B, C, V].

    guided = cond + cfg_scale * (cond - uncond); keep the COND logits at the top-k ids of
    ``guided`` (-inf elsewhere); ids above ``eos_id`` are never sampled; only channel 0 may
    emit ``eos_id`` and, when EOS is its argmax, it is the only candidate (else it is masked).
    """
    cond = cond.float()
    uncond = uncond.float()
    guided = cond + cfg_scale * (cond - uncond)
    logits = cond
    V = cond.shape[-1]
    if top_k is not None and 0 < top_k < V:
        idx = guided.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(cond, dtype=torch.bool).scatter_(-1, idx, True)
        logits = cond.masked_fill(~keep, float("-inf"))
    neg_inf = float("-inf")
    logits = logits.clone()
    logits[:, :, eos_id + 1 :] = neg_inf
    logits[:, 1:, eos_id:] = neg_inf
    ch0 = logits[:, 0]
    eos_is_max = ch0.argmax(dim=-1) == eos_id  # [B]
    below_eos = torch.arange(V, device=logits.device) < eos_id
    ch0 = torch.where(eos_is_max[:, None] & below_eos[None, :], neg_inf, ch0)
    ch0[:, eos_id] = torch.where(eos_is_max, ch0[:, eos_id], torch.full_like(ch0[:, eos_id], neg_inf))
    logits[:, 0] = ch0
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter on the last dim: keep the smallest set of highest-probability ids whose
    mass reaches ``top_p`` (always at least the top id)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the id that crosses top_p
    remove[..., 0] = False
    remove_orig = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(remove_orig, float("-inf"))


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
) -> torch.Tensor:
    """Pick the next code of every channel from conditional/unconditional logits [B, C, V].

    Greedy (``do_sample=False`` or ``temperature == 0``): argmax of :func:`filter_cfg_logits`.
    Sampling: temperature, then top-p, then a multinomial draw. Returns [B, C] int64.
    """
    logits = filter_cfg_logits(cond, uncond, cfg_scale=cfg_scale, top_k=top_k, eos_id=eos_id)
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(logits / temperature, top_p)
    probs = logits.softmax(dim=-1)
    B, C, V = probs.shape
    return torch.multinomial(probs.reshape(B * C, V), 1, generator=generator).reshape(B, C)
