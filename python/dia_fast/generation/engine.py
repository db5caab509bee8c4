"""The decode step as one pure function over static buffers, and its runners (eager or CUDA graph).

:func:`decode_step` reads and writes only the tensors of a :class:`StepBuffers` (plus the model's
weights and the RNG): sample the codes of position ``pos`` from the logits buffer, apply the EOS
countdown and the forced prefix, write them into the output buffer, run the decoder on them (which
fills the KV caches at ``pos`` and the logits buffer for ``pos + 1``), update the completion flag and
advance ``pos``, all on the device. No Python branch depends on data and nothing syncs with the host,
so the same function runs eagerly (CPU, MPS, CUDA) or is captured once in a ``torch.cuda.CUDAGraph``
and replayed at every step.

A :class:`DecodeEngine` (one per model, :func:`engine_for`) hands out :class:`StepRunner` s. With
``static=True`` (the default on CUDA) the buffers are cached per shape bucket (batch rounded up to a
power of two, decoder length and text length rounded up) so a captured graph is reused from one
``generate_codes`` call to the next; otherwise they are allocated per call with exact shapes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from .. import ops
from ..model import DecoderState, DiaModel
from .sampling import SamplingConfig, apply_eos_rules, sample_codes

__all__ = [
    "NOT_FORCED",
    "DecodeEngine",
    "StepBuffers",
    "StepRunner",
    "StepSpec",
    "allocate_buffers",
    "bucket_batch",
    "bucket_length",
    "decode_step",
    "engine_for",
    "using_device",
]

NOT_FORCED = -1
LENGTH_BUCKET = 256  # decoder positions
TEXT_BUCKET = 128  # encoder positions
_CAPTURE_LOCK = threading.Lock()  # torch.cuda.graph: one capture underway at a time in the process


def using_device(device: torch.device) -> AbstractContextManager[object]:
    """Makes a CUDA ``device`` the current one for the block; a no-op for other devices. Triton launches its
    kernels on the current device (not on their tensors'), and a graph capture registers the current device's
    default generator: work on a model that is not on the current device needs this around it."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def bucket_batch(batch: int) -> int:
    """Batch size a static runner is built for: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


def bucket_length(n: int, multiple: int, cap: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at most ``cap``, never below ``n``)."""
    up = -(-n // multiple) * multiple
    return max(n, min(up, cap)) if cap is not None else up


@dataclass(frozen=True)
class StepSpec:
    """Everything static about a decode step (Python values the step is specialised on)."""

    batch: int  # B: items (rows of the output buffer)
    sampling: SamplingConfig
    channels: int
    eos_value: int
    pad_value: int
    max_delay: int
    sampler: str  # cfg_sample backend ("torch" = graph-safe exponential draw)

    @property
    def rows(self) -> int:
        """Decoder rows: 2B with CFG (conditional rows first), else B."""
        return 2 * self.batch if self.sampling.use_cfg else self.batch


@dataclass
class StepBuffers:
    """The static tensors a decode step reads and writes (fixed shapes and addresses)."""

    state: DecoderState  # KV caches [n, R, H, L, D], cross K/V, masks
    logits: torch.Tensor  # [R, C, V] fp32: logits for position `pos`
    pos: torch.Tensor  # [1] int64: the position sampled by the next step
    out: torch.Tensor  # [B, L, C] int64: delayed codes (prefix, then generated; PAD after the end)
    forced: torch.Tensor  # [B, L, C] int64: value forced at each position, NOT_FORCED elsewhere
    eos_pos: torch.Tensor  # [B] int64: channel 0's EOS position, -1 while speaking
    real: torch.Tensor  # [B] bool: rows that count for completion (False on bucket padding)
    done: torch.Tensor  # [1] bool: every real row has finished (EOS + max_delay written)
    delays: torch.Tensor  # [C] int64
    forced_eos_pos: torch.Tensor  # [] int64: EOS is forced here at the latest


def allocate_buffers(model: DiaModel, spec: StepSpec, max_len: int, text_len: int, self_mask: bool) -> StepBuffers:
    """Fresh buffers for ``spec`` with ``max_len`` decoder and ``text_len`` encoder positions (zeroed)."""
    cfg = model.config
    dec = cfg.model.decoder
    n, R, dev = dec.n_layer, spec.rows, model.device
    kw = dict(device=dev, dtype=model.dtype)
    self_k = torch.zeros(n, R, dec.n_kv_head, max_len, dec.head_dim, **kw)
    cross_k = torch.zeros(n, R, dec.cross_n_kv_head, text_len, dec.cross_head_dim, **kw)
    state = DecoderState(
        self_k,
        torch.zeros_like(self_k),
        cross_k,
        torch.zeros_like(cross_k),
        torch.ones(R, text_len, dtype=torch.bool, device=dev),
        torch.ones(R, max_len, dtype=torch.bool, device=dev) if self_mask else None,
    )
    B, C = spec.batch, spec.channels
    return StepBuffers(
        state=state,
        logits=torch.zeros(R, C, dec.vocab_size, dtype=torch.float32, device=dev),
        pos=torch.zeros(1, dtype=torch.long, device=dev),
        out=torch.full((B, max_len, C), spec.pad_value, dtype=torch.long, device=dev),
        forced=torch.full((B, max_len, C), NOT_FORCED, dtype=torch.long, device=dev),
        eos_pos=torch.full((B,), -1, dtype=torch.long, device=dev),
        real=torch.ones(B, dtype=torch.bool, device=dev),
        done=torch.zeros(1, dtype=torch.bool, device=dev),
        delays=torch.tensor(cfg.data.delay_pattern, dtype=torch.long, device=dev),
        forced_eos_pos=torch.tensor(max_len - spec.max_delay - 1, dtype=torch.long, device=dev),
    )


def decode_step(model: DiaModel, spec: StepSpec, bufs: StepBuffers, generator: torch.Generator | None = None) -> None:
    """One decode step, in place on ``bufs`` (see the module doc). Pure tensor work: graph-capturable."""
    pos = bufs.pos
    p = pos[0]
    codes = sample_codes(bufs.logits, spec.batch, spec.sampling, spec.eos_value, generator, spec.sampler)
    codes = apply_eos_rules(codes, p, bufs.eos_pos, bufs.delays, bufs.forced_eos_pos, spec.eos_value, spec.pad_value)
    forced = bufs.forced.index_select(1, pos)[:, 0]
    codes = torch.where(forced != NOT_FORCED, forced, codes)
    bufs.out.index_copy_(1, pos, codes[:, None])
    # An item is finished once its last channel wrote EOS (max_delay steps after channel 0's).
    finished = ((bufs.eos_pos >= 0) & (p - bufs.eos_pos >= spec.max_delay)) | ~bufs.real
    bufs.done.copy_(finished.all().reshape(1))
    tokens = codes.repeat(spec.rows // spec.batch, 1)[:, None, :]
    bufs.logits.copy_(model.decoder(tokens, bufs.state, pos)[:, 0])
    pos.add_(1)


class StepRunner:
    """Runs :func:`decode_step` on one set of buffers: eagerly, or by replaying a captured CUDA graph.

    ``generator``: the generator the steps draw from (``None``: the device's default one). A static runner
    owns its generator (a graph is tied to the generator registered at capture): :meth:`bind` lends it the
    state of the caller's generator for one call and hands the advanced state back, so a seed gives the same
    codes on a fresh or a reused runner. ``graph=True``: the first :meth:`prepare` warms up and captures the
    graph. Hold it with ``with runner:`` while generating (prepare included): a static runner is shared by the
    calls of a bucket.
    """

    def __init__(
        self,
        model: DiaModel,
        spec: StepSpec,
        bufs: StepBuffers,
        generator: torch.Generator | None,
        graph: bool = False,
        warmup_steps: int = 2,
    ) -> None:
        self.model, self.spec, self.bufs, self.generator = model, spec, bufs, generator
        self.graph: torch.cuda.CUDAGraph | None = None
        self.wants_graph, self.warmup_steps = graph, warmup_steps
        self._lock = threading.Lock()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    @contextmanager
    def bind(self, generator: torch.Generator | None) -> Iterator[None]:
        """Draw from ``generator``'s state during the block (its state advances as if it had been used)."""
        own = self.generator
        if own is None or generator is None or own is generator:
            yield
            return
        own.set_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(own.get_state())

    def _eager(self) -> None:
        decode_step(self.model, self.spec, self.bufs, self.generator)

    def prepare(self) -> float:
        """Warms up and captures the graph if this runner is to replay one and has none yet (call it holding the
        runner, inside :meth:`bind`); returns the seconds it took (0 when there was nothing to do)."""
        if not self.wants_graph or self.graph is not None:
            return 0.0
        t0 = time.perf_counter()
        self._capture(self.warmup_steps)
        return time.perf_counter() - t0

    def step(self) -> None:
        """Queue one decode step (returns at once on CUDA)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()

    def _capture(self, warmup_steps: int) -> None:
        dev = self.model.device
        gen = self.generator
        # Warm-up and capture draw random numbers: put the generator back afterwards so a seed gives the same
        # codes whether or not this call captured.
        rng = gen.get_state() if gen is not None else torch.cuda.get_rng_state(dev)
        pos0 = self.bufs.pos.clone()
        # One capture at a time in the process (torch's rule; runners of other buckets capture in other threads),
        # with the model's device current: the capture registers the current device's default generator, and
        # register_generator_state allocates the generator's graph-side seed/offset on the current device.
        with _CAPTURE_LOCK, using_device(dev):
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles, allocator settles)
                for _ in range(warmup_steps):
                    self.bufs.pos.copy_(pos0)
                    self._eager()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.bufs.pos.copy_(pos0)
            graph = torch.cuda.CUDAGraph()
            if gen is not None:  # the default generator is registered by the capture itself
                graph.register_generator_state(gen)
            # The capture stream is `side` (torch's shared default capture stream lives on whichever device first
            # made it). "thread_local": other threads may keep using the GPU (allocating, querying the pool's
            # events, decoding audio) while this one captures; under "global" their calls would fail and void
            # the capture.
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self._eager()
            torch.cuda.synchronize(dev)
        if gen is not None:
            gen.set_state(rng)
        else:
            torch.cuda.set_rng_state(rng, dev)
        self.graph = graph

    def __enter__(self) -> StepRunner:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@dataclass
class DecodeEngine:
    """Hands out decode-step runners for one model.

    ``static``: cache bucketed buffers (and, on CUDA with ``cuda_graphs``, captured graphs) across calls;
    default: on for CUDA. ``max_entries``: buckets kept (least recently used dropped first; each holds the
    KV caches of its shapes). ``warmup_steps``: eager steps run before a capture.
    """

    model: DiaModel
    static: bool | None = None
    cuda_graphs: bool | None = None
    max_entries: int = 4
    warmup_steps: int = 2
    _entries: OrderedDict[tuple, StepRunner] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def is_static(self) -> bool:
        return self.model.device.type == "cuda" if self.static is None else self.static

    def graphs_enabled(self, cuda_graphs: bool | None = None) -> bool:
        """Whether runners capture CUDA graphs (``cuda_graphs`` overrides the engine's setting)."""
        want = self.cuda_graphs if cuda_graphs is None else cuda_graphs
        on_cuda = self.model.device.type == "cuda"
        return on_cuda and self.is_static and (want is None or bool(want))

    def shapes(self, batch: int, max_len: int, text_len: int) -> tuple[int, int, int]:
        """(batch, decoder length, text length) of the buffers a call with these sizes runs on."""
        if not self.is_static:
            return batch, max_len, text_len
        return (
            bucket_batch(batch),
            bucket_length(max_len, LENGTH_BUCKET, self.model.config.data.audio_length),
            bucket_length(text_len, TEXT_BUCKET),
        )

    def runner(
        self,
        spec: StepSpec,
        max_len: int,
        text_len: int,
        self_mask: bool,
        generator: torch.Generator | None = None,
        cuda_graphs: bool | None = None,
    ) -> StepRunner:
        """A runner for buffers of exactly these shapes (pass the result of :meth:`shapes`).

        Static runners are cached; they own a generator when ``generator`` is given: use
        ``with runner, runner.bind(generator):`` around :meth:`StepRunner.prepare` and the steps.
        """
        graph = self.graphs_enabled(cuda_graphs)
        if not self.is_static:
            bufs = allocate_buffers(self.model, spec, max_len, text_len, self_mask)
            return StepRunner(self.model, spec, bufs, generator)
        key = (spec, max_len, text_len, self_mask, graph, generator is not None, self._weights_key())
        # Made under the lock (allocation is quick; the capture waits for the runner's first prepare()), so calls
        # of one bucket that arrive together share one runner instead of each building and capturing its own.
        with self._lock:
            run = self._entries.get(key)
            if run is not None:
                self._entries.move_to_end(key)
                return run
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            own = None
            if generator is not None:
                own = torch.Generator(device=generator.device)
                own.set_state(generator.get_state())  # warm-up draws must be valid for this device
            bufs = allocate_buffers(self.model, spec, max_len, text_len, self_mask)
            run = self._entries[key] = StepRunner(
                self.model, spec, bufs, own, graph=graph, warmup_steps=self.warmup_steps
            )
        return run

    def _weights_key(self) -> tuple:
        """Device, dtype and addresses of the decoder's tensors: a captured graph reads those addresses, so a
        runner is reused only while they hold (``model.to(...)`` or replaced parameters make new runners)."""
        dec = self.model.decoder
        ptrs = tuple(t.data_ptr() for t in (*dec.parameters(), *dec.buffers()))
        return (self.model.device, self.model.dtype, ptrs)

    def clear(self) -> None:
        """Drops every cached runner (frees their buffers and graphs)."""
        with self._lock:
            self._entries.clear()


_ENGINES_LOCK = threading.Lock()


def engine_for(model: DiaModel) -> DecodeEngine:
    """The model's shared engine (made on first use, with the defaults; kept on the model object)."""
    with _ENGINES_LOCK:
        eng = model.__dict__.get("_dia_fast_engine")
        if eng is None:
            eng = DecodeEngine(model)
            model.__dict__["_dia_fast_engine"] = eng  # plain attribute, not a submodule or state
        return eng


def default_sampler(device: torch.device) -> str:
    """The ``cfg_sample`` backend decode steps use on ``device``."""
    return ops.select_backend("cfg_sample", device)
