"""Prefill + decode loop of Dia: encoder once, CFG rows, static KV cache, per-item stopping.

Semantics follow transformers' ``DiaForConditionalGeneration.generate`` (which the tests compare
against token for token):

- The decoder sequence of item ``i`` starts with BOS, then its audio prompt frames (if any),
  delayed with the delay pattern; positions that the delay pattern fixes (BOS at ``t <= d_c``,
  the delayed prompt) are forced whatever the model predicts. Shorter prompts in a batch are
  left-padded with BOS and masked out of self-attention.
- With CFG the batch has 2B rows: B conditional rows, then B unconditional rows whose text is all
  padding (same text mask).
- ``min_new_tokens``: channel 0 may not emit EOS before that many positions after the prefix.
- ``max_new_tokens`` counts decoder positions after the prefix (as in transformers): EOS is forced
  at ``prefix + max_new_tokens - (max_delay + 1)`` at the latest, so an item yields at most
  ``max_new_tokens - max_delay - 1`` audio frames.

Each decode step is :func:`dia_fast.generation.engine.decode_step`, one pure function over static
buffers, run eagerly or replayed from a CUDA graph; the loop here only counts steps, calls
``on_step`` and polls the completion flag every ``sync_every`` steps. Host<->device copies (text,
prompt prefix, completion flag, output codes) go through :mod:`dia_fast.memory`'s pinned pool.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..config import DataConfig, DiaConfig
from ..memory import PinnedPool, PooledBuffer, default_pool
from ..model import DiaModel, text_lengths
from ..ops.reference import last_eos_position
from ..options import check_int_option, named
from ..progress import progress_bar
from .engine import NOT_FORCED, DecodeEngine, StepBuffers, StepSpec, default_sampler, engine_for, using_device
from .sampling import SamplingConfig


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


def check_step_budget(data: DataConfig, prompt_frames: int, max_new_tokens: object, min_new_tokens: object) -> int:
    """The decode steps a generation after a voice prompt of ``prompt_frames`` frames may take: ``max_new_tokens``,
    or what the model's audio length leaves when None. It must give the delay pattern its steps to finish one frame
    and fit the audio length; ``min_new_tokens`` (EOS held back until then) must leave room before it. Else a
    TypeError / ValueError naming the option (its ``param``)."""
    max_new = check_int_option("max_new_tokens", max_new_tokens, minimum=1, optional=True)
    min_new = check_int_option("min_new_tokens", min_new_tokens, minimum=0)
    md, prefix = data.max_delay, prompt_frames + 1
    budget = data.audio_length - prefix
    steps = budget if max_new is None else max_new
    if steps < md + 2:
        raise named(
            ValueError(
                f"max_new_tokens={steps} is too small: the delay pattern needs {md + 1} steps to finish, "
                f"so at least {md + 2} are needed for one audio frame"
            ),
            "max_new_tokens",
        )
    if steps > budget:
        raise named(
            ValueError(
                f"max_new_tokens={steps} plus the {prefix} prefix positions exceeds the model's audio length "
                f"{data.audio_length} (at most {budget} new tokens here)"
            ),
            "max_new_tokens",
        )
    if min_new > steps - md - 1:
        raise named(
            ValueError(
                f"min_new_tokens must be in [0, max_new_tokens - {md + 1}] = [0, {steps - md - 1}] "
                f"(EOS is held back until then), got {min_new}"
            ),
            "min_new_tokens",
        )
    return steps


@dataclass
class DecodeOutput:
    """Raw result of :func:`generate_codes` (tensors on the CPU)."""

    delayed: torch.Tensor  # [B, L, C] whole delayed sequences (prefix included, PAD after each item's end)
    eos_pos: torch.Tensor  # [B] position of channel 0's EOS
    prefix_length: int
    steps: int  # decode steps run
    prefill_seconds: float
    decode_seconds: float  # steady-state decode loop (capture excluded)
    warmup_seconds: float = 0.0  # CUDA-graph warm-up + capture in this call (0 when eager or reused)
    cuda_graphs: bool = False  # whether the steps replayed a captured CUDA graph
    batch_bucket: int = 0  # rows the step ran on (batch rounded up to a bucket by static runners)
    cpu_graph: bool = False  # whether the steps after the first replayed a CPU graph (dia_fast.ops.cpu_graph)
    cpu_graph_note: str = ""  # on the CPU without one: why ("off", or the op the step runs that it cannot replay)
    limit_pos: int = -1  # where EOS is forced at the latest (max_new_tokens); -1: unknown

    def truncated(self) -> list[bool]:
        """Per item: whether max_new_tokens ended its speech (EOS forced at the limit) rather than the model."""
        return [self.limit_pos >= 0 and int(e) >= self.limit_pos for e in self.eos_pos]

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


def _pad_batch(
    text_ids: torch.Tensor, text_mask: torch.Tensor, prompts: list[torch.Tensor | None], rows: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Pads a batch to ``rows`` items with copies of item 0 (their output is dropped)."""
    extra = rows - text_ids.shape[0]
    if extra <= 0:
        return text_ids, text_mask, prompts
    text_ids = torch.cat([text_ids, text_ids[:1].expand(extra, -1)])
    text_mask = torch.cat([text_mask, text_mask[:1].expand(extra, -1)])
    return text_ids, text_mask, prompts + [prompts[0]] * extra


def _to_device(pool: PinnedPool | None, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device, through a pooled (pinned) buffer when a pool is given."""
    if pool is None:
        return t.to(device)
    with pool.acquire(t.shape, t.dtype) as buf:  # released at once: the pool waits for the copy itself
        buf.tensor.copy_(t)
        return pool.copy_to_device(buf, device)


def _to_host(pool: PinnedPool | None, t: torch.Tensor) -> torch.Tensor:
    """Device tensor -> a new CPU tensor, through a pooled (pinned) buffer when a pool is given."""
    if pool is None:
        return t.to("cpu", copy=True)
    buf = pool.copy_to_host(t)
    try:
        return buf.wait().clone()
    finally:
        buf.release()


class _DoneFlag:
    """Reads the step's completion flag without stalling the device, and keeps the host from running ahead.

    With a pool on CUDA, :meth:`poll` queues a non-blocking copy of the flag into a pooled host buffer and
    reads the copies queued earlier once their events completed. At most ``max_pending`` copies stay in
    flight: past that the oldest is waited for, which bounds how far the host queues steps ahead of the
    device (so an early stop is seen within about ``(max_pending + 1) * sync_every`` steps) while always
    leaving ``max_pending * sync_every`` steps queued. Without a pool, or on the CPU, it reads the flag
    directly (a synchronisation on CUDA).
    """

    def __init__(self, done: torch.Tensor, pool: PinnedPool | None, max_pending: int = 2) -> None:
        self.done = done
        self.pool = pool if done.device.type == "cuda" else None
        self.max_pending = max_pending
        self.pending: deque[PooledBuffer] = deque()

    def poll(self) -> bool:
        if self.pool is None:
            return bool(self.done)
        self.pending.append(self.pool.copy_to_host(self.done))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0].ready()):
            buf = self.pending.popleft()
            finished = bool(buf.wait()[0])
            buf.release()
            if finished:
                return True
        return False

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().release()  # the pool keeps the blocks until their copies complete


def _on_model_device(fn: Callable[..., DecodeOutput]) -> Callable[..., DecodeOutput]:
    """Runs ``fn(model, ...)`` with the model's device current (a model on cuda:1 called from a thread whose
    current device is cuda:0 would otherwise get its Triton kernels launched on cuda:0)."""

    @functools.wraps(fn)
    def run(model: DiaModel, *args: object, **kwargs: object) -> DecodeOutput:
        with using_device(model.device):
            return fn(model, *args, **kwargs)

    return run


@_on_model_device
@torch.inference_mode()
def generate_codes(
    model: DiaModel,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    prompts: Sequence[torch.Tensor | None] | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool | None = None,
    frame_rate: float = 44100 / 512,
    sync_every: int = 8,
    on_step: Callable[[torch.Tensor, int], None] | None = None,
    cuda_graphs: bool | None = None,
    cpu_graphs: bool | None = None,
    pool: bool | PinnedPool | None = True,
    engine: DecodeEngine | None = None,
) -> DecodeOutput:
    """Generate delayed codes for a batch of tokenized texts [B, T] (see the module doc).

    Every decode step is :func:`dia_fast.generation.engine.decode_step`, run eagerly or replayed from a
    captured CUDA graph. ``cuda_graphs``: None = on for CUDA (with a static engine), False = eager steps.
    ``cpu_graphs``: on the CPU, None or True = the first step records a CPU graph that the others replay
    (:mod:`dia_fast.ops.cpu_graph`; the same codes, less time per step), False = eager steps.
    ``sync_every``: steps between reads of the completion flag (with a pool on CUDA the read is a
    non-blocking copy, so the loop may run up to ``3 * sync_every`` steps past the end; the codes do not
    change). ``on_step(out, p)`` is called after step ``p`` with the [B, L, C] output buffer (on the device,
    possibly still being written by queued work on CUDA): ``out[:, :p + 1]`` is final. ``pool``: the
    :class:`~dia_fast.memory.PinnedPool` for host<->device copies (True: the default pool; False/None:
    plain copies). ``engine``: the :class:`DecodeEngine` (default: the model's shared one). ``seeds``: one int per
    text, the Philox key of its draws (as a :class:`~dia_fast.serving.BatchEngine` request with that seed draws);
    without them each row's key is drawn from ``generator``.
    """
    sampling = sampling or SamplingConfig()
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    cfg = model.config
    data = cfg.data
    device = model.device
    B = text_ids.shape[0]
    prompts = list(prompts) if prompts is not None else [None] * B
    if len(prompts) != B:
        raise ValueError(f"got {len(prompts)} prompts for {B} texts")
    if seeds is not None:
        seeds = [check_int_option("seeds", s) for s in seeds]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} texts")
    host_pool: PinnedPool | None = default_pool() if pool is True else (pool or None)
    engine = engine or engine_for(model)

    frames = [0 if p is None else int(p.shape[0]) for p in prompts]
    P0, md = max(frames) + 1, data.max_delay
    max_new_tokens = check_step_budget(data, P0 - 1, max_new_tokens, min_new_tokens)
    min_new_tokens = int(min_new_tokens)
    L = P0 + max_new_tokens
    Bb, Lb, Tb = engine.shapes(B, L, text_ids.shape[1])
    text_ids, text_mask, prompts = _pad_batch(text_ids.cpu(), text_mask.cpu(), prompts, Bb)

    t0 = time.perf_counter()
    prefix = build_prefix(cfg, prompts, torch.device("cpu"))
    text_ids = _to_device(host_pool, text_ids, device)
    text_mask = _to_device(host_pool, text_mask.bool(), device)
    rows = 2 if sampling.use_cfg else 1
    enc_ids = torch.cat([text_ids, torch.zeros_like(text_ids)]) if rows == 2 else text_ids
    enc_mask = text_mask.repeat(rows, 1)
    enc_out = model.encode(enc_ids, enc_mask)
    spec = StepSpec(
        batch=Bb,
        use_cfg=sampling.use_cfg,
        channels=data.channels,
        eos_value=data.audio_eos_value,
        pad_value=data.audio_pad_value,
        max_delay=md,
        sampler=default_sampler(device),
    )
    # One Philox key per row: the caller's seeds, or drawn from the caller's generator (the steps themselves draw
    # no torch numbers)
    keys = torch.zeros(Bb, dtype=torch.long)
    if seeds is not None:
        keys[:B] = torch.tensor([ops.seed_from_int(s) for s in seeds], dtype=torch.long)
    elif not sampling.greedy:
        keys = torch.randint(0, 2**62, (Bb,), generator=generator, device=generator.device if generator else "cpu")
    runner = engine.runner(spec, Lb, Tb, prefix.self_mask is not None or engine.is_static, cuda_graphs, cpu_graphs)
    with runner:
        warmup_s = runner.prepare()  # CUDA-graph warm-up + capture, the first time this runner is used
        bufs = runner.bufs
        _load(model, bufs, enc_out, enc_mask, prefix, L, B, host_pool, sampling, keys, min_new_tokens)
        # Prefill: the decoder over the prefix fills the caches and the logits of position P0.
        out = bufs.out
        model.decoder(out[:, :P0].repeat(rows, 1, 1), bufs.state, logits_out=bufs.logits)
        if device.type == "cuda":
            # honest prefill timing (once per call); the stream, not the device: another thread may be capturing
            torch.cuda.current_stream(device).synchronize()
        prefill_s = time.perf_counter() - t0 - warmup_s

        out_view = out[:B, :L]
        flag = _DoneFlag(bufs.done, host_pool)
        bar = progress_bar(max_new_tokens, progress, desc="generating", unit="step", leave=False)
        t1 = time.perf_counter()
        steps = 0
        try:
            for p in range(P0, L):
                runner.step()
                steps += 1
                if on_step is not None:
                    on_step(out_view, p)
                if bar is not None:
                    bar.update(1)
                    if steps % 16 == 0:
                        rate = steps / max(time.perf_counter() - t1, 1e-9)
                        bar.set_postfix_str(f"{rate:.1f} steps/s, x{rate / frame_rate:.2f} realtime", refresh=False)
                if steps % sync_every == 0 and p < L - 1 and flag.poll():
                    break
            eos_pos = _to_host(host_pool, bufs.eos_pos[:B])  # waits for the queued steps
        finally:
            flag.close()
            if bar is not None:
                bar.close()
        decode_s = time.perf_counter() - t1
        # Items that stopped are complete up to eos + max_delay; crop to the longest.
        end = int(torch.clamp(eos_pos + md + 1, max=L).max()) if bool((eos_pos >= 0).all()) else L
        delayed = _to_host(host_pool, out[:B, :end])
    engine.remember(runner)
    note = runner.cpu_graph_note if device.type == "cpu" else ""
    return DecodeOutput(
        delayed, eos_pos, P0, steps, prefill_s, decode_s, warmup_s, runner.graphed, Bb, runner.cpu_graphed, note,
        limit_pos=last_eos_position(L, md),
    )  # fmt: skip


def _load(
    model: DiaModel,
    bufs: StepBuffers,
    enc_out: torch.Tensor,
    enc_mask: torch.Tensor,
    prefix: Prefix,
    L: int,
    B: int,
    host_pool: PinnedPool | None,
    sampling: SamplingConfig,
    seeds: torch.Tensor,
    min_new_tokens: int,
) -> None:
    """Fills a runner's buffers for a new call (every buffer a step reads is rewritten here). Text positions
    past this call's text are masked and never read: their stale K/V need no clearing."""
    state, dev = bufs.state, model.device
    T = enc_out.shape[1]
    model.write_cross_kv(enc_out, state.cross_k[..., :T, :], state.cross_v[..., :T, :])
    state.cross_mask.zero_()
    state.cross_mask[:, :T].copy_(enc_mask)
    state.cross_len.copy_(text_lengths(state.cross_mask))
    P0 = prefix.length
    if state.self_mask is not None:
        state.self_mask.fill_(True)
        if prefix.self_mask is not None:
            rows = state.self_mask.shape[0] // prefix.self_mask.shape[0]
            state.self_mask[:, :P0].copy_(_to_device(host_pool, prefix.self_mask, dev).repeat(rows, 1))
    n = prefix.forced.shape[1]
    bufs.forced.fill_(NOT_FORCED)
    bufs.forced[:, :n].copy_(_to_device(host_pool, prefix.forced, dev))
    bufs.out.fill_(model.config.data.audio_pad_value)
    bufs.out[:, :P0].copy_(bufs.forced[:, :P0])
    bufs.eos_pos.fill_(-1)
    bufs.real.copy_(torch.arange(bufs.real.shape[0], device=dev) < B)
    bufs.done.zero_()
    bufs.forced_eos_pos.fill_(last_eos_position(L, model.config.data.max_delay))
    bufs.pos.fill_(P0)
    # each row draws at its own position: P0 less its left padding (1 + its prompt's frames), as alone
    own = [1 + f for f in prefix.prompt_frames] + [P0] * (bufs.draw_pos.shape[0] - len(prefix.prompt_frames))
    bufs.draw_pos.copy_(_to_device(host_pool, torch.tensor(own, dtype=torch.long), dev))
    bufs.min_eos_pos.fill_(P0 + min_new_tokens)
    bufs.allow_eos.fill_(min_new_tokens <= 0)
    bufs.set_sampling(sampling)
    bufs.seeds.copy_(seeds)
