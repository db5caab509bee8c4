"""The decode step as one pure function over static buffers, and its runners (eager, CUDA graph or CPU graph).

:func:`decode_step` reads and writes only the tensors of a :class:`StepBuffers` (plus the model's
weights): sample the codes of position ``pos`` from the logits buffer (per-row sampling settings and
Philox seeds live in the buffers), apply the EOS countdown and the forced prefix, write them into the
output buffer and the next decoder input, run the decoder on them (which fills the KV caches at ``pos``
and writes the logits for ``pos + 1`` straight into the logits buffer), update the completion flag and
advance ``pos``, all on the device. No Python branch depends on data or on a sampling setting, and
nothing syncs with the host, so the same function runs eagerly (CPU, MPS, CUDA) or is captured once in a
``torch.cuda.CUDAGraph`` and replayed at every step, for any temperature, top-p, top-k, CFG scale, seed,
text length or prompt length. On the CPU the same property lets a runner record the step's kernel calls once
and replay them (:class:`~dia_fast.ops.cpu_graph.CpuGraph`), skipping the wrappers and PyTorch's dispatch.

With the Triton backend a step is about 5 launches outside the decoder layers (sampling, bookkeeping,
embedding, ``pos + 1``, final norm + logits GEMM, ``pos += 1``) and 13 per layer (see
:class:`dia_fast.model.dia.DecoderLayer`); ``python -m dia_fast.bench --count-launches`` counts them.

A :class:`DecodeEngine` (one per model, :func:`engine_for`) hands out :class:`StepRunner` s. With
``static=True`` (the default on CUDA) the buffers are cached per batch bucket (batch rounded up to a
power of two) and sized for the model's limits (``audio_length`` decoder positions, ``text_length`` text
positions), so a captured graph is reused by every later ``generate_codes`` call of that bucket;
otherwise they are allocated per call with exact shapes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from .. import ops
from ..model import DecoderState, DiaModel, allocate_state
from ..ops.cpu_graph import CpuGraph, CpuGraphStep
from ..ops.reference import NOT_FORCED, last_eos_position
from .sampling import SamplingConfig

__all__ = [
    "NOT_FORCED",
    "DecodeEngine",
    "StepBuffers",
    "StepRunner",
    "StepSpec",
    "allocate_buffers",
    "bucket_batch",
    "capture_cuda_graph",
    "decode_step",
    "engine_for",
    "using_device",
]

_MAX_REFUSED = 64  # refused CPU-graph captures remembered at most (the oldest is forgotten first)
_CAPTURE_LOCK = threading.Lock()  # torch.cuda.graph: one capture underway at a time in the process


def using_device(device: torch.device) -> AbstractContextManager[object]:
    """Makes a CUDA ``device`` the current one for the block; a no-op for other devices. Triton launches its
    kernels on the current device (not on their tensors'), and a graph capture allocates on the current
    device: work on a model that is not on the current device needs this around it."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _clear_cublas_workspaces() -> None:
    """Drops cuBLAS's cached workspaces (as torch.compile's CUDA graphs do around each capture): a workspace made
    outside a capture lives in the ordinary memory pool, and a graph that captured GEMMs using it would keep its
    raw address after anything (torch.compile, a destroyed graph, ``empty_cache``) frees it; cleared first, the
    capture allocates its own in the graph's private pool."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def capture_cuda_graph(
    device: torch.device, step: Callable[[], None], warmup_steps: int, reset: Callable[[], None] | None = None
) -> torch.cuda.CUDAGraph:
    """Warms ``step`` up ``warmup_steps`` times on a side stream (Triton compiles, the allocator settles) and
    captures one more call of it as a CUDA graph; ``reset`` (if given) runs before each warm-up step and before the
    capture (e.g. to restore a position that the steps advance).

    One capture at a time in the process (torch's rule: runners of other buckets, and engines, capture in other
    threads), with ``device`` current. The capture uses its own stream and ``capture_error_mode="thread_local"``:
    other threads may keep using the GPU (allocating, querying events, decoding audio); they must not synchronize
    the whole device meanwhile (dia_fast synchronizes streams, never the device, outside benchmarks)."""
    with _CAPTURE_LOCK, using_device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                if reset is not None:
                    reset()
                step()
        side.synchronize()  # the warm-up's GEMMs are done with their workspaces before these are dropped
        if reset is not None:
            with torch.cuda.stream(side):
                reset()
        _clear_cublas_workspaces()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            step()
        _clear_cublas_workspaces()  # (the graph's own workspace stays in its pool)
        side.synchronize()
    return graph


def bucket_batch(batch: int) -> int:
    """Batch size a static runner is built for: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass(frozen=True)
class StepSpec:
    """Everything static about a decode step (Python values the step is specialised on). Sampling settings
    are not among them: they are per-row tensors of :class:`StepBuffers`."""

    batch: int  # B: items (rows of the output buffer)
    use_cfg: bool  # unconditional rows run (CFG): 2B decoder rows, else B
    channels: int
    eos_value: int
    pad_value: int
    max_delay: int
    sampler: str  # cfg_sample backend

    @property
    def rows(self) -> int:
        """Decoder rows: 2B with CFG (conditional rows first), else B."""
        return 2 * self.batch if self.use_cfg else self.batch


@dataclass
class StepBuffers:
    """The static tensors a decode step reads and writes (fixed shapes and addresses)."""

    state: DecoderState  # KV caches [n, R, H, L, D], cross K/V, masks, text lengths, semaphores
    logits: torch.Tensor  # [R, C, V] in the model's dtype: logits for position `pos`
    positions: torch.Tensor  # [1 + B] int64: `pos` then `draw_pos` (one add moves them all)
    pos: torch.Tensor  # [1] int64 (a view of `positions`): the position sampled by the next step
    # [B] int64 (a view of `positions`): each row's own position at `pos`, the counter of its draws: rows with a
    # shorter voice prompt are left-padded in the batch, and draw as they would alone (and in BatchEngine)
    draw_pos: torch.Tensor
    out: torch.Tensor  # [B, L, C] int64: delayed codes (prefix, then generated; PAD after the end)
    forced: torch.Tensor  # [B, L, C] int64: value forced at each position, NOT_FORCED elsewhere
    tokens: torch.Tensor  # [R, 1, C] int64: the decoder input of the step (the codes just written)
    eos_pos: torch.Tensor  # [B] int64: channel 0's EOS position, -1 while speaking
    real: torch.Tensor  # [B] bool: rows that count for completion (False on bucket padding)
    done: torch.Tensor  # [1] bool: every real row has finished (EOS + max_delay written)
    delays: torch.Tensor  # [C] int64
    forced_eos_pos: torch.Tensor  # [B] int64: EOS is forced here at the latest
    min_eos_pos: torch.Tensor  # [B] int64: no EOS before this position (min_new_tokens)
    allow_eos: torch.Tensor  # [B] bool: the position sampled next may be EOS
    cfg_scale: torch.Tensor  # [B] fp32
    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_p: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int32, 0 = no CFG filter
    seeds: torch.Tensor  # [B] int64: Philox key of each row's draws (counter: the position)

    def set_sampling(self, sampling: SamplingConfig) -> None:
        """Every row's settings from one :class:`SamplingConfig` (greedy: temperature 0; no CFG filter: top-k 0).
        The seeds are set apart (:attr:`seeds`)."""
        self.cfg_scale.fill_(sampling.cfg_scale)
        self.temperature.fill_(0.0 if sampling.greedy else sampling.temperature)
        self.top_p.fill_(sampling.top_p)
        self.top_k.fill_(sampling.cfg_filter_top_k or 0)

    def nbytes(self) -> int:
        """Device memory these buffers hold."""
        tensors = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        tensors += [v for v in vars(self.state).values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors if t._base is None)  # (views counted once)


def allocate_buffers(model: DiaModel, spec: StepSpec, max_len: int, text_len: int, self_mask: bool) -> StepBuffers:
    """Fresh buffers for ``spec`` with ``max_len`` decoder and ``text_len`` encoder positions (zeroed)."""
    cfg = model.config
    dec = cfg.model.decoder
    R, dev = spec.rows, model.device
    kw = dict(device=dev, dtype=model.dtype)
    state = allocate_state(cfg, R, max_len, text_len, device=dev, dtype=model.dtype, self_mask=self_mask)
    state.cross_mask.fill_(True)  # every text position until a prefill writes the real masks
    state.cross_len.fill_(text_len)
    B, C = spec.batch, spec.channels

    def per_row(value: float | int, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((B,), value, dtype=dtype, device=dev)

    positions = torch.zeros(1 + B, dtype=torch.long, device=dev)
    return StepBuffers(
        state=state,
        logits=torch.zeros(R, C, dec.vocab_size, **kw),
        positions=positions,
        pos=positions[:1],
        draw_pos=positions[1:],
        out=torch.full((B, max_len, C), spec.pad_value, dtype=torch.long, device=dev),
        forced=torch.full((B, max_len, C), NOT_FORCED, dtype=torch.long, device=dev),
        tokens=torch.zeros(R, 1, C, dtype=torch.long, device=dev),
        eos_pos=per_row(-1, torch.long),
        real=per_row(True, torch.bool),
        done=torch.zeros(1, dtype=torch.bool, device=dev),
        delays=torch.tensor(cfg.data.delay_pattern, dtype=torch.long, device=dev),
        forced_eos_pos=per_row(last_eos_position(max_len, spec.max_delay), torch.long),
        min_eos_pos=per_row(0, torch.long),
        allow_eos=per_row(True, torch.bool),
        cfg_scale=per_row(0.0, torch.float32),
        temperature=per_row(0.0, torch.float32),
        top_p=per_row(1.0, torch.float32),
        top_k=per_row(0, torch.int32),
        seeds=per_row(0, torch.long),
    )


def decode_step(model: DiaModel, spec: StepSpec, bufs: StepBuffers) -> None:
    """One decode step, in place on ``bufs`` (see the module doc). Pure tensor work: graph-capturable."""
    B = spec.batch
    cond = bufs.logits[:B]
    codes = ops.cfg_sample(
        cond,
        bufs.logits[B:] if spec.use_cfg else cond,
        cfg_scale=bufs.cfg_scale,
        temperature=bufs.temperature,
        top_p=bufs.top_p,
        top_k=bufs.top_k,
        eos_id=spec.eos_value,
        seed=bufs.seeds,
        offset=bufs.draw_pos,
        allow_eos=bufs.allow_eos,
        backend=spec.sampler,
    )
    ops.step_update(
        codes,
        bufs.pos,
        bufs.eos_pos,
        bufs.delays,
        bufs.forced_eos_pos,
        bufs.forced,
        bufs.out,
        bufs.real,
        bufs.done,
        bufs.tokens,
        bufs.min_eos_pos,
        bufs.allow_eos,
        eos_value=spec.eos_value,
        pad_value=spec.pad_value,
    )
    model.decoder(bufs.tokens, bufs.state, bufs.pos, logits_out=bufs.logits)
    bufs.positions.add_(1)


class StepRunner:
    """Runs :func:`decode_step` on one set of buffers: eagerly, or by replaying a captured CUDA graph or CPU graph.

    ``graph=True``: the first :meth:`prepare` warms up and captures the CUDA graph. ``cpu_graph=True``: the first
    :meth:`step` runs the step while recording a :class:`~dia_fast.ops.cpu_graph.CpuGraph`, the later ones replay
    it (a step that cannot be recorded runs eagerly, and :attr:`cpu_graph_note` says why). Hold the runner with
    ``with runner:`` while generating (prepare included): a static runner is shared by the calls of a bucket. The
    step draws no torch random numbers (the seeds are in the buffers), so a graph serves every seed.
    """

    def __init__(
        self,
        model: DiaModel,
        spec: StepSpec,
        bufs: StepBuffers,
        graph: bool = False,
        warmup_steps: int = 2,
        cpu_graph: bool = False,
    ) -> None:
        self.model, self.spec, self.bufs = model, spec, bufs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.wants_graph, self.warmup_steps = graph, warmup_steps
        self.cpu_step = CpuGraphStep(self._eager, enabled=cpu_graph)
        self._lock = threading.Lock()

    @property
    def graphed(self) -> bool:
        """Whether the steps replay a CUDA graph."""
        return self.graph is not None

    @property
    def cpu_graph(self) -> CpuGraph | None:
        """The CPU graph the steps replay (None: eager steps)."""
        return self.cpu_step.graph

    @property
    def cpu_graphed(self) -> bool:
        """Whether the steps replay a CPU graph."""
        return self.cpu_step.graph is not None

    @property
    def cpu_graph_note(self) -> str:
        """Why the steps do not replay a CPU graph ("off", the op that stopped the capture, ...; "" when they do)."""
        return self.cpu_step.note

    def _eager(self) -> None:
        decode_step(self.model, self.spec, self.bufs)

    def prepare(self) -> float:
        """Warms up and captures the graph if this runner is to replay one and has none yet (call it holding the
        runner, before loading the call's inputs: warm-up steps write the buffers); returns the seconds it took
        (0 when there was nothing to do)."""
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
            self.cpu_step()  # eager, or replayed from a CPU graph

    def _capture(self, warmup_steps: int) -> None:
        positions0 = self.bufs.positions.clone()
        self.graph = capture_cuda_graph(
            self.model.device, self._eager, warmup_steps, reset=lambda: self.bufs.positions.copy_(positions0)
        )

    def __enter__(self) -> StepRunner:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _addresses(tensor: torch.Tensor) -> tuple[int, ...]:
    """The memory a graph reads for ``tensor``: its data address, or for a tensor subclass (torchao's quantized
    weights, whose own ``data_ptr()`` is 0) those of the tensors inside it."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return tuple(a for n in names if getattr(tensor, n) is not None for a in _addresses(getattr(tensor, n)))
    return (tensor.data_ptr(),)


@dataclass
class DecodeEngine:
    """Hands out decode-step runners for one model.

    ``static``: cache buffers per batch bucket, sized for the model's limits (and, on CUDA with
    ``cuda_graphs``, their captured graphs) across calls; default: on for CUDA. ``max_entries``: buckets
    kept (least recently used dropped first; each holds full-length KV caches for its rows: see
    docs/engine.md for the memory). ``warmup_steps``: eager steps run before a capture. ``cpu_graphs``: on the
    CPU, record each runner's first step and replay it (:mod:`dia_fast.ops.cpu_graph`); default: on.
    """

    model: DiaModel
    static: bool | None = None
    cuda_graphs: bool | None = None
    cpu_graphs: bool | None = None
    max_entries: int = 4
    warmup_steps: int = 2
    _entries: OrderedDict[tuple, StepRunner] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # (spec, weights key) -> why its step cannot be recorded as a CPU graph: later runners skip the capture
    _cpu_refused: dict[tuple, str] = field(default_factory=dict, repr=False)

    @property
    def is_static(self) -> bool:
        return self.model.device.type == "cuda" if self.static is None else self.static

    def graphs_enabled(self, cuda_graphs: bool | None = None) -> bool:
        """Whether runners capture CUDA graphs (``cuda_graphs`` overrides the engine's setting)."""
        want = self.cuda_graphs if cuda_graphs is None else cuda_graphs
        on_cuda = self.model.device.type == "cuda"
        return on_cuda and self.is_static and (want is None or bool(want))

    def cpu_graphs_enabled(self, cpu_graphs: bool | None = None) -> bool:
        """Whether runners record and replay CPU graphs (``cpu_graphs`` overrides the engine's setting)."""
        want = self.cpu_graphs if cpu_graphs is None else cpu_graphs
        return self.model.device.type == "cpu" and (want is None or bool(want))

    def shapes(self, batch: int, max_len: int, text_len: int) -> tuple[int, int, int]:
        """(batch, decoder length, text length) of the buffers a call with these sizes runs on: exact sizes, or
        for a static engine the batch bucket and the model's limits (every length then replays one graph)."""
        if not self.is_static:
            return batch, max_len, text_len
        data = self.model.config.data
        return bucket_batch(batch), max(max_len, data.audio_length), max(text_len, data.text_length)

    def runner(
        self,
        spec: StepSpec,
        max_len: int,
        text_len: int,
        self_mask: bool,
        cuda_graphs: bool | None = None,
        cpu_graphs: bool | None = None,
    ) -> StepRunner:
        """A runner for buffers of exactly these shapes (pass the result of :meth:`shapes`); static runners are
        cached and shared: hold one with ``with runner:`` around :meth:`StepRunner.prepare` and the steps."""
        graph = self.graphs_enabled(cuda_graphs)
        cpu = self.cpu_graphs_enabled(cpu_graphs)
        weights = self._weights_key() if cpu or self.is_static else None
        refused = self._cpu_refused.get((spec, weights)) if cpu else None
        if refused is not None:  # this step was refused before (its ops, dtype, weights): capturing costs a step
            cpu = False
        if not self.is_static:
            bufs = allocate_buffers(self.model, spec, max_len, text_len, self_mask)
            return self._noted(StepRunner(self.model, spec, bufs, cpu_graph=cpu), refused)
        key = (spec, max_len, text_len, self_mask, graph, cpu, weights)
        # Made under the lock (allocation is quick; the capture waits for the runner's first prepare()), so calls
        # of one bucket that arrive together share one runner instead of each building and capturing its own.
        with self._lock:
            run = self._entries.get(key)
            if run is not None:
                self._entries.move_to_end(key)
                return run
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            bufs = allocate_buffers(self.model, spec, max_len, text_len, self_mask)
            run = self._entries[key] = self._noted(
                StepRunner(self.model, spec, bufs, graph=graph, warmup_steps=self.warmup_steps, cpu_graph=cpu), refused
            )
        return run

    @staticmethod
    def _noted(run: StepRunner, refused: str | None) -> StepRunner:
        if refused is not None:
            run.cpu_step.note = refused
        return run

    def remember(self, run: StepRunner) -> None:
        """After a call: if ``run``'s step could not be recorded as a CPU graph, later runners for the same step
        and weights do not try again (the failed capture runs, and costs, a recorded step every call)."""
        if run.cpu_step.refused:
            with self._lock:
                if len(self._cpu_refused) >= _MAX_REFUSED:  # (a long process meets many batch sizes and backends)
                    self._cpu_refused.pop(next(iter(self._cpu_refused)))
                self._cpu_refused[(run.spec, self._weights_key())] = run.cpu_step.note

    def _weights_key(self) -> tuple:
        """Device, dtype and addresses of the decoder's tensors, and the op dispatch's generation: a captured graph
        reads those addresses and calls the kernels chosen when it was captured, so a runner is reused only while
        they hold (``model.to(...)``, replaced parameters or ``ops.set_backend`` make new runners)."""
        dec = self.model.decoder
        ptrs = tuple(_addresses(t) for t in (*dec.parameters(), *dec.buffers()))
        return (self.model.device, self.model.dtype, ptrs, ops.dispatch_generation())

    def clear(self) -> None:
        """Drops every cached runner (frees their buffers and graphs)."""
        with self._lock:
            self._entries.clear()
            self._cpu_refused.clear()


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
