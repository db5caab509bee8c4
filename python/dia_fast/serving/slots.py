"""The device state of a continuous batch: slots that requests enter and leave between decode steps.

Slot ``s`` owns decoder rows ``2s`` (conditional) and ``2s + 1`` (unconditional, CFG) of every cache and
buffer, its own position, EOS countdown, length limits, sampling settings and Philox seed. A request starts
at position 0 of its slot, whatever else runs: its prefill and every step compute on its rows alone, and its
draws depend on its seed and its own position only, so its codes are those of a solo run.

:func:`slot_step` is one decode step over the first ``n`` slots (a view: the batch bucket), pure tensor work
without host synchronisation, so it runs eagerly or replays from one CUDA graph per bucket. :func:`admit`
prefills a request into a free slot between two steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .. import ops
from ..generation.generate import build_prefix
from ..generation.sampling import SamplingConfig
from ..model import DecoderState, DiaModel, allocate_state, text_lengths
from ..ops.reference import NOT_FORCED, last_eos_position

__all__ = ["SlotState", "admit", "allocate_slots", "slot_step", "undelayed_codes"]


@dataclass
class SlotState:
    """Static tensors of ``S`` slots (rows ``2S``, interleaved: slot ``s`` has rows ``2s`` and ``2s + 1``)."""

    state: DecoderState  # caches [n_layer, 2S, H, L|T, D], text masks and lengths, semaphores
    logits: torch.Tensor  # [2S, C, V] (model dtype): the logits of each slot's next position
    tokens: torch.Tensor  # [2S, 1, C] int64: the step's decoder input
    row_pos: torch.Tensor  # [2S] int64: its position
    pos: torch.Tensor  # [S] int64: the position each slot samples next
    eos_pos: torch.Tensor  # [S] int64: channel 0's EOS position, -1 while speaking
    forced_eos_pos: torch.Tensor  # [S] int64: EOS forced here at the latest (max_new_tokens)
    min_eos_pos: torch.Tensor  # [S] int64: no EOS before this position (min_new_tokens)
    allow_eos: torch.Tensor  # [S] bool: the next position may end the slot
    active: torch.Tensor  # [S] bool: a request holds the slot
    finished: torch.Tensor  # [S] bool: its last channel wrote EOS
    out: torch.Tensor  # [S, L, C] int64: delayed codes (prefix, then generated)
    forced: torch.Tensor  # [S, L, C] int64: prefix values to force, NOT_FORCED elsewhere
    cfg_scale: torch.Tensor  # [S] fp32
    temperature: torch.Tensor  # [S] fp32 (0 = greedy)
    top_p: torch.Tensor  # [S] fp32
    top_k: torch.Tensor  # [S] int32 (0 = no CFG filter)
    seeds: torch.Tensor  # [S] int64 Philox keys
    delays: torch.Tensor  # [C] int64

    @property
    def slots(self) -> int:
        return self.pos.shape[0]

    def view(self, n: int) -> SlotState:
        """The first ``n`` slots (views of the same memory: a bucket of the running batch)."""
        if not 0 < n <= self.slots:
            raise ValueError(f"a view of 1..{self.slots} slots, got {n}")
        state = self.state.select_rows(slice(0, 2 * n))
        per_row = {"logits", "tokens", "row_pos"}
        kw = {
            f.name: getattr(self, f.name)[: (2 * n if f.name in per_row else n)]
            for f in fields(self)
            if f.name not in ("state", "delays")
        }
        return replace(self, state=state, **kw)

    def move(self, src: int, dst: int, length: int) -> None:
        """Move the request in slot ``src`` into free slot ``dst`` (between two steps), so that the running
        batch fits a smaller bucket: its rows of every cache (self-attention keys up to ``length``), its
        pending logits, delayed codes and settings. Its codes do not change: a step computes each row alone."""
        a, b = slice(2 * src, 2 * src + 2), slice(2 * dst, 2 * dst + 2)
        st = self.state
        n = min(max(length, 0), st.max_len)
        for cache in (st.self_k, st.self_v):
            cache[:, b, :, :n] = cache[:, a, :, :n]
        for t in (st.cross_k, st.cross_v):
            t[:, b] = t[:, a]
        for t in (st.cross_mask, st.self_mask, st.cross_len):
            if t is not None:
                t[b] = t[a]
        for name in ("logits", "tokens", "row_pos"):
            t = getattr(self, name)
            t[b] = t[a]
        for f in fields(self):
            if f.name not in ("state", "delays", "logits", "tokens", "row_pos"):
                t = getattr(self, f.name)
                t[dst] = t[src]
        self.active[src] = False

    def rows(self, s: int) -> DecoderState:
        """Slot ``s``'s two rows of the decoder state (views), for its prefill."""
        return self.state.select_rows(slice(2 * s, 2 * s + 2))


def allocate_slots(model: DiaModel, slots: int, max_len: int, text_len: int) -> SlotState:
    """Zeroed state for ``slots`` slots of ``max_len`` decoder and ``text_len`` text positions."""
    cfg = model.config
    dec, data = cfg.model.decoder, cfg.data
    R, dev = 2 * slots, model.device
    kw = dict(device=dev, dtype=model.dtype)
    # no text attended by a free slot (cross_len 0): a step's attention covers the live slots' texts only
    state = allocate_state(cfg, R, max_len, text_len, device=dev, dtype=model.dtype)

    def per_slot(value: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((slots,), value, dtype=dtype, device=dev)

    C = data.channels
    return SlotState(
        state=state,
        logits=torch.zeros(R, C, dec.vocab_size, **kw),
        tokens=torch.zeros(R, 1, C, dtype=torch.long, device=dev),
        row_pos=torch.zeros(R, dtype=torch.long, device=dev),
        pos=per_slot(0, torch.long),
        eos_pos=per_slot(-1, torch.long),
        forced_eos_pos=per_slot(last_eos_position(max_len, data.max_delay), torch.long),
        min_eos_pos=per_slot(0, torch.long),
        allow_eos=per_slot(True, torch.bool),
        active=per_slot(False, torch.bool),
        finished=per_slot(False, torch.bool),
        out=torch.full((slots, max_len, C), data.audio_pad_value, dtype=torch.long, device=dev),
        forced=torch.full((slots, max_len, C), NOT_FORCED, dtype=torch.long, device=dev),
        cfg_scale=per_slot(0.0, torch.float32),
        temperature=per_slot(0.0, torch.float32),
        top_p=per_slot(1.0, torch.float32),
        top_k=per_slot(0, torch.int32),
        seeds=per_slot(0, torch.long),
        delays=torch.tensor(data.delay_pattern, dtype=torch.long, device=dev),
    )


def slot_step(model: DiaModel, view: SlotState, sampler: str | None = None) -> None:
    """One decode step of every slot in ``view`` (live or not; only live ones change their output), in place.

    The sampler reads each slot's settings, seed and position; :func:`dia_fast.ops.slot_update` does the
    per-slot bookkeeping; the decoder runs every row at its own position and writes the next logits."""
    data = model.config.data
    logits = view.logits
    codes = ops.cfg_sample(
        logits[0::2],
        logits[1::2],
        cfg_scale=view.cfg_scale,
        temperature=view.temperature,
        top_p=view.top_p,
        top_k=view.top_k,
        eos_id=data.audio_eos_value,
        seed=view.seeds,
        offset=view.pos,
        allow_eos=view.allow_eos,
        backend=sampler,
    )
    ops.slot_update(
        codes,
        view.pos,
        view.eos_pos,
        view.delays,
        view.forced_eos_pos,
        view.min_eos_pos,
        view.forced,
        view.out,
        view.active,
        view.finished,
        view.allow_eos,
        view.tokens,
        view.row_pos,
        eos_value=data.audio_eos_value,
        pad_value=data.audio_pad_value,
    )
    model.decoder(view.tokens, view.state, view.row_pos, logits_out=view.logits)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA through pinned memory, without blocking: a plain copy from pageable
    memory waits for everything queued on the stream (the running batch's steps) before it returns."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # (torch's host allocator keeps it until the copy is done)


def admit(
    model: DiaModel,
    slots: SlotState,
    s: int,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    prompt: torch.Tensor | None,
    max_new_tokens: int,
    min_new_tokens: int,
    sampling: SamplingConfig,
    seed: int,
) -> int:
    """Prefill one request into free slot ``s`` (between two steps): its text through the encoder (conditional
    and unconditional rows), its cross-attention K/V, its prefix (BOS + voice prompt, delayed) through the
    decoder, and its settings. ``text_ids``/``text_mask`` [1, T]; ``prompt`` codes [F, C] or None.
    Returns the prefix length (the first generated position)."""
    data = model.config.data
    dev = model.device
    ids, mask = _to_device(text_ids, dev), _to_device(text_mask, dev).bool()
    enc_ids = torch.cat([ids, torch.zeros_like(ids)])
    enc_mask = mask.repeat(2, 1)
    T = ids.shape[1]
    rows = slice(2 * s, 2 * s + 2)
    st = slots.state
    model.write_cross_kv(model.encode(enc_ids, enc_mask), st.cross_k[:, rows, :, :T], st.cross_v[:, rows, :, :T])
    st.cross_mask[rows] = False
    st.cross_mask[rows, :T] = enc_mask
    st.cross_len[rows] = text_lengths(enc_mask)
    prefix = build_prefix(model.config, [prompt], torch.device("cpu"))
    P0 = prefix.length
    n = prefix.forced.shape[1]
    slots.forced[s].fill_(NOT_FORCED)
    slots.forced[s, :n] = _to_device(prefix.forced[0], dev)
    slots.out[s].fill_(data.audio_pad_value)
    slots.out[s, :P0] = slots.forced[s, :P0]
    model.decoder(slots.out[s : s + 1, :P0].repeat(2, 1, 1), slots.rows(s), logits_out=slots.logits[rows])
    slots.pos[s] = P0
    slots.eos_pos[s] = -1
    slots.forced_eos_pos[s] = last_eos_position(P0 + max_new_tokens, data.max_delay)
    slots.min_eos_pos[s] = P0 + min_new_tokens
    slots.allow_eos[s] = min_new_tokens <= 0
    slots.finished[s] = False
    slots.cfg_scale[s] = sampling.cfg_scale
    slots.temperature[s] = 0.0 if sampling.greedy else sampling.temperature
    slots.top_p[s] = sampling.top_p
    slots.top_k[s] = sampling.cfg_filter_top_k or 0
    slots.seeds[s] = seed
    slots.active[s] = True
    return P0


def undelayed_codes(model: DiaModel, delayed: torch.Tensor, eos_pos: int, prefix_length: int) -> torch.Tensor:
    """A finished slot's new codec codes [n, C] (CPU, int64) from its delayed row ``delayed`` [L, C] (or the part
    of it from any position on, with ``eos_pos`` and ``prefix_length`` counted from there; the engine passes the
    host copy of positions prefix to EOS + the largest delay)."""
    data = model.config.data
    n = max(eos_pos - prefix_length, 0)
    seg = delayed[None, prefix_length : prefix_length + n + data.max_delay]
    return ops.undelay_codes(seg, data.delay_pattern, model.config.codebook_size)[0, :n].cpu()
