"""Prefill + decode loop of Dia: encoder once, CFG rows, static KV cache, per-item stopping.

Semantics follow transformers' ``DiaForConditionalGeneration.generate`` (which the tests compare
against token for token):

- The decoder sequence of item ``i`` starts with BOS, then its audio prompt frames (if any),
  delayed with the delay pattern; positions that the delay pattern fixes (BOS at ``t <= d_c``,
  the delayed prompt) are forced whatever the model predicts. Shorter prompts in a batch are
  left-padded with BOS and masked out of self-attention.
- With CFG the batch has 2B rows: B conditional rows, then B unconditional rows whose text is all
  padding (same text mask).
- ``max_new_tokens`` counts decoder positions after the prefix (as in transformers): EOS is forced
  at ``prefix + max_new_tokens - (max_delay + 1)`` at the latest, so an item yields at most
  ``max_new_tokens - max_delay - 1`` audio frames.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..config import DiaConfig
from ..model import DecoderState, DiaModel
from .sampling import SamplingConfig, apply_eos_rules

NOT_FORCED = -1


@dataclass
class Prefix:
    """Delayed decoder prefix of a batch: BOS + (left-padded) prompt frames."""

    forced: torch.Tensor  # [B, P0 + max_delay, C]: value to force at each position, NOT_FORCED elsewhere
    length: int  # P0: positions prefilled (BOS + longest prompt)
    self_mask: torch.Tensor | None  # [B, P0] False on left padding, None when no item is padded
    prompt_frames: list[int]


def build_prefix(config: DiaConfig, prompts: Sequence[torch.Tensor | None], device: torch.device) -> Prefix:
    """Delayed prefix for prompts of undelayed codes [F_i, C] (or None)."""
    data = config.data
    C, bos, pad = data.channels, data.audio_bos_value, data.audio_pad_value
    frames = [0 if p is None else int(p.shape[0]) for p in prompts]
    P0 = max(frames) + 1
    B = len(prompts)
    seq = torch.full((B, P0 + data.max_delay, C), pad, dtype=torch.long)
    self_mask = torch.ones(B, P0, dtype=torch.bool)
    for i, p in enumerate(prompts):
        left = P0 - 1 - frames[i]
        seq[i, : left + 1] = bos
        self_mask[i, :left] = False
        if p is not None and frames[i]:
            seq[i, left + 1 : P0] = p.to(torch.long).cpu()
    delayed = ops.reference.apply_delay(seq, data.delay_pattern, bos, pad)
    forced = torch.where(delayed == pad, torch.full_like(delayed, NOT_FORCED), delayed)
    mask = None if bool(self_mask.all()) else self_mask.to(device)
    return Prefix(forced.to(device), P0, mask, frames)


@dataclass
class DecodeOutput:
    """Raw result of :func:`generate_codes`."""

    delayed: torch.Tensor  # [B, L, C] whole delayed sequences (prefix included, PAD after each item's end)
    eos_pos: torch.Tensor  # [B] position of channel 0's EOS
    prefix_length: int
    steps: int  # decode steps run
    prefill_seconds: float
    decode_seconds: float

    def frames(self, config: DiaConfig) -> list[torch.Tensor]:
        """Undelayed new audio codes per item, [T_i, C] int64 (prompt, BOS, EOS, PAD removed)."""
        out = []
        md = config.data.max_delay
        for i in range(self.delayed.shape[0]):
            e = int(self.eos_pos[i])
            n = max(e - self.prefix_length, 0)
            seg = self.delayed[i : i + 1, self.prefix_length : self.prefix_length + n + md]
            codes = ops.undelay_codes(seg, config.data.delay_pattern, config.codebook_size)[0, :n]
            out.append(codes.cpu())
        return out


def _progress_bar(total: int, enabled: bool | None, frame_rate: float, batch: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", desc="generating", leave=False, dynamic_ncols=True)
    bar.frame_rate, bar.batch = frame_rate, batch  # type: ignore[attr-defined]
    return bar


@torch.inference_mode()
def generate_codes(
    model: DiaModel,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    prompts: Sequence[torch.Tensor | None] | None = None,
    max_new_tokens: int | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    frame_rate: float = 44100 / 512,
    sync_every: int = 8,
    on_step: Callable[[torch.Tensor, int], None] | None = None,
) -> DecodeOutput:
    """Generate delayed codes for a batch of tokenized texts [B, T] (see the module doc)."""
    sampling = sampling or SamplingConfig()
    cfg = model.config
    data = cfg.data
    device = model.device
    B = text_ids.shape[0]
    prompts = list(prompts) if prompts is not None else [None] * B
    if len(prompts) != B:
        raise ValueError(f"got {len(prompts)} prompts for {B} texts")
    prefix = build_prefix(cfg, prompts, device)
    P0, md = prefix.length, data.max_delay
    budget = data.audio_length - P0
    if max_new_tokens is None:
        max_new_tokens = budget
    if max_new_tokens < md + 2:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is too small: the delay pattern needs {md + 1} steps to finish, "
            f"so at least {md + 2} are needed for one audio frame"
        )
    if max_new_tokens > budget:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} plus the {P0} prefix positions exceeds the model's audio length "
            f"{data.audio_length} (at most {budget} new tokens here)"
        )

    t0 = time.perf_counter()
    text_ids, text_mask = text_ids.to(device), text_mask.to(device)
    rows = 2 if sampling.use_cfg else 1
    enc_ids = torch.cat([text_ids, torch.zeros_like(text_ids)]) if rows == 2 else text_ids
    enc_mask = text_mask.repeat(rows, 1)
    enc_out = model.encode(enc_ids, enc_mask)
    L = P0 + max_new_tokens
    self_mask = None
    if prefix.self_mask is not None:
        self_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        self_mask[:, :P0] = prefix.self_mask
        self_mask = self_mask.repeat(rows, 1)
    state: DecoderState = model.new_state(enc_out, enc_mask, L, self_mask)

    out = torch.full((B, L, data.channels), data.audio_pad_value, dtype=torch.long, device=device)
    out[:, :P0] = prefix.forced[:, :P0]
    logits = model.decoder(out[:, :P0].repeat(rows, 1, 1), state)[:, -1]
    prefill_s = time.perf_counter() - t0

    delays = torch.tensor(data.delay_pattern, dtype=torch.long, device=device)
    eos_pos = torch.full((B,), -1, dtype=torch.long, device=device)
    forced_eos_pos = torch.tensor(L - md - 1, device=device)
    n_forced = prefix.forced.shape[1]
    bar = _progress_bar(max_new_tokens, progress, frame_rate, B)
    t1 = time.perf_counter()
    steps = 0
    pos_t = torch.zeros(1, dtype=torch.long, device=device)
    for p in range(P0, L):
        pos_t.fill_(p)
        cond, uncond = (logits[:B], logits[B:]) if rows == 2 else (logits, logits)
        codes = ops.cfg_sample(
            cond,
            uncond,
            cfg_scale=sampling.cfg_scale,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.cfg_filter_top_k,
            eos_id=data.audio_eos_value,
            do_sample=not sampling.greedy,
            generator=generator,
        )
        codes = apply_eos_rules(
            codes, pos_t[0], eos_pos, delays, forced_eos_pos, data.audio_eos_value, data.audio_pad_value
        )
        if p < n_forced:
            f = prefix.forced[:, p]
            codes = torch.where(f != NOT_FORCED, f, codes)
        out[:, p] = codes
        steps += 1
        if on_step is not None:
            on_step(out, p)
        if bar is not None:
            bar.update(1)
            if steps % 16 == 0:
                rate = steps / max(time.perf_counter() - t1, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} steps/s, x{rate / frame_rate:.2f} realtime", refresh=False)
        if p == L - 1:
            break
        if steps % sync_every == 0 and bool(((eos_pos >= 0) & (p - eos_pos >= md)).all()):
            break
        logits = model.decoder(codes.repeat(rows, 1)[:, None, :], state, pos_t)[:, 0]
    if bar is not None:
        bar.close()
    decode_s = time.perf_counter() - t1
    # Items that stopped are complete up to eos + max_delay; crop to the longest.
    end = int(torch.clamp(eos_pos + md + 1, max=L).max()) if bool((eos_pos >= 0).all()) else L
    return DecodeOutput(out[:, :end], eos_pos, P0, steps, prefill_s, decode_s)
