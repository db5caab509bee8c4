"""Pinned host-memory pool: reusable host buffers for host<->device copies, guarded by events.

A decode engine copies small tensors between host and device every few steps (text ids, prompt codes,
generated codes, PCM). Allocating pinned memory each time is slow (``cudaHostAlloc`` costs milliseconds)
and pageable memory makes ``non_blocking`` copies synchronous. :class:`PinnedPool` keeps page-locked
blocks bucketed by size (powers of two) and hands them out again, with one rule that makes this safe:
a block is never handed out again before the events of its copies have completed.

Copies made through :meth:`PinnedPool.copy_to_device` / :meth:`PinnedPool.copy_to_host` run on a
dedicated copy stream per CUDA device and record an event on the buffer; the consuming stream waits on
that event, so the copy overlaps compute without a host synchronisation. On CPU-only machines the
buffers are ordinary memory and the copies are plain synchronous copies.

Buffers made with ``persistent=True`` (or by name with :meth:`PinnedPool.static_buffer`) keep a fixed
address for the life of the pool, so a captured CUDA graph can read or write them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EventLike",
    "PinnedPool",
    "PoolExhaustedError",
    "PooledBuffer",
    "bucket_size",
    "default_pool",
    "set_default_pool",
]

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_MIN_BUCKET = 512
_PAGE = 4096

ShapeLike = Sequence[int] | torch.Size | int


class EventLike(Protocol):
    """What the pool needs from an event (``torch.cuda.Event`` satisfies it; tests inject fakes)."""

    def record(self, stream: Any = None) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class PoolExhaustedError(MemoryError):
    """Raised when a request cannot fit under the pool's ``max_bytes`` bound."""


def bucket_size(nbytes: int, max_bytes: int | None = None, min_bucket: int = _MIN_BUCKET) -> int:
    """Capacity of the block that serves a request of ``nbytes``: the next power of two (at least
    ``min_bucket``). Where that would exceed ``max_bytes`` but the request itself fits, the request is
    rounded up to a 4 KiB page instead (capped at ``max_bytes``), so any request up to the bound fits."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    size = max(min_bucket, 1 << max(0, nbytes - 1).bit_length())
    if max_bytes is not None and size > max_bytes >= nbytes:
        size = max(nbytes, min(max_bytes, -(-max(nbytes, 1) // _PAGE) * _PAGE))
    return size


def _shape_tuple(shape: ShapeLike) -> tuple[int, ...]:
    shape_t = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if any(d < 0 for d in shape_t):
        raise ValueError(f"negative dimension in shape {shape_t}")
    return shape_t


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class _Block:
    """One host allocation owned by the pool. Fields are guarded by the pool's lock."""

    __slots__ = ("raw", "capacity", "events", "persistent")

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw = raw  # uint8 tensor of `capacity` bytes
        self.capacity = raw.numel()
        self.events: list[EventLike] = []  # copies that touched this block and may still be in flight
        self.persistent = False

    def ready(self) -> bool:
        """Drops completed events; True when none is left."""
        if self.events:
            self.events = [e for e in self.events if not e.query()]
        return not self.events


class PooledBuffer:
    """A host tensor on loan from a :class:`PinnedPool`.

    ``tensor`` is a ``shape``/``dtype`` view over the start of a pooled block. After a copy the buffer may
    still be in flight: :meth:`wait` blocks until its copies completed; call it before reading the result of
    :meth:`PinnedPool.copy_to_host` on the host, or before rewriting a buffer you keep across copies.
    Give it back with :meth:`release` or by using it as a context manager; persistent buffers are never
    given back (the context manager leaves them alone).
    """

    __slots__ = ("_pool", "_block", "_tensor", "shape", "dtype", "nbytes", "persistent", "name", "_released")

    def __init__(
        self, pool: PinnedPool, block: _Block, shape: tuple[int, ...], dtype: torch.dtype, persistent: bool
    ) -> None:
        self._pool = pool
        self._block = block
        self.shape = shape
        self.dtype = dtype
        self.nbytes = _nbytes(shape, dtype)
        self._tensor = block.raw[: self.nbytes].view(dtype).view(shape)
        self.persistent = persistent
        self.name: str | None = None
        self._released = False

    @property
    def tensor(self) -> torch.Tensor:
        """The host tensor; raises after release (its memory may then belong to someone else)."""
        if self._released:
            raise RuntimeError("PooledBuffer used after release()")
        return self._tensor

    @property
    def capacity(self) -> int:
        """Bytes of the underlying block (its bucket size)."""
        return self._block.capacity

    @property
    def released(self) -> bool:
        return self._released

    def is_pinned(self) -> bool:
        """True when the memory is page-locked."""
        return torch.cuda.is_available() and bool(self._block.raw.is_pinned())

    def data_ptr(self) -> int:
        """Address of the block (stable for the buffer's life; for persistent buffers, the pool's)."""
        return self._block.raw.data_ptr()

    def ready(self) -> bool:
        """True when no copy that touched this buffer is still in flight."""
        with self._pool._lock:
            return self._block.ready()

    def wait(self) -> torch.Tensor:
        """Blocks until the buffer's copies completed; returns :attr:`tensor`."""
        t = self.tensor
        with self._pool._lock:
            events = list(self._block.events)
        for e in events:
            e.synchronize()
        done = {id(e) for e in events}
        with self._pool._lock:
            self._block.events = [e for e in self._block.events if id(e) not in done]
        return t

    def release(self) -> None:
        """Gives the buffer back to its pool (same as ``pool.release(self)``)."""
        self._pool.release(self)

    def __enter__(self) -> PooledBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.persistent and not self._released:
            self._pool.release(self)

    def __repr__(self) -> str:
        state = "persistent" if self.persistent else ("released" if self._released else "in use")
        name = f", name={self.name!r}" if self.name else ""
        return f"PooledBuffer(shape={self.shape}, dtype={self.dtype}, capacity={self.capacity}, {state}{name})"


def _cuda_event() -> EventLike:
    return torch.cuda.Event()


class PinnedPool:
    """A bounded, thread-safe pool of (pinned) host buffers with event-guarded reuse.

    Args:
        max_bytes: bound on the bytes the pool holds (idle, in use and persistent). Over the bound, idle
            buffers are freed least-recently-released first; a request larger than the bound raises
            :class:`PoolExhaustedError` (a ``MemoryError``), and so does one that cannot fit because buffers
            in use fill the bound.
        pin: page-lock the buffers. Default: when CUDA is available. Without CUDA buffers are ordinary
            memory whatever this says.
        event_factory: makes the events that guard buffers. Default ``torch.cuda.Event`` for CUDA copies;
            CPU copies are synchronous and record none. An injected factory is used on every path (tests use
            it to simulate copies in flight).
        min_bucket: smallest block size in bytes (a power of two).

    Freed pinned blocks go back to PyTorch's caching host allocator, not to the OS.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        pin: bool | None = None,
        event_factory: Callable[[], EventLike] | None = None,
        min_bucket: int = _MIN_BUCKET,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        if min_bucket <= 0 or min_bucket & (min_bucket - 1):
            raise ValueError(f"min_bucket must be a power of two, got {min_bucket}")
        cuda = torch.cuda.is_available()
        self.max_bytes = int(max_bytes)
        self.pinned = bool(cuda if pin is None else (pin and cuda))
        self.min_bucket = min_bucket
        self._injected_events = event_factory is not None
        self._event_factory: Callable[[], EventLike] = event_factory or _cuda_event
        self._lock = threading.RLock()
        self._free: dict[int, list[_Block]] = {}  # bucket -> idle blocks, oldest release first
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # id(block) -> idle block, oldest release first
        self._static: dict[str, PooledBuffer] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._held = 0  # bytes of all blocks (idle + in use + persistent, reservations included)
        self._in_use = 0
        self._n_blocks = 0
        self._n_in_use = 0
        self._n_persistent = 0
        self._counters = dict.fromkeys(("hits", "misses", "allocations", "evictions", "waits"), 0)
        self._peak = 0
        self._peak_in_use = 0

    # ------------------------------------------------------------------ acquire / release

    def acquire(
        self, shape: ShapeLike, dtype: torch.dtype = torch.float32, *, persistent: bool = False
    ) -> PooledBuffer:
        """A host buffer of ``shape``/``dtype`` (contents uninitialised).

        Reuses an idle block of the same bucket whose copies completed; otherwise allocates one (first
        freeing idle blocks, LRU, when over the bound), and only at the bound waits for an in-flight block.
        ``persistent=True``: the buffer keeps its address for the life of the pool and is never reused.
        """
        shape_t = _shape_tuple(shape)
        block = self._take_block(_nbytes(shape_t, dtype))
        if persistent:
            with self._lock:
                block.persistent = True
                self._n_persistent += 1
        return PooledBuffer(self, block, shape_t, dtype, persistent)

    def static_buffer(self, name: str, shape: ShapeLike, dtype: torch.dtype) -> PooledBuffer:
        """The persistent buffer called ``name``, made on first use: the same buffer (same address) on every
        call, for CUDA graphs. Asking again with another shape or dtype raises ``ValueError``."""
        shape_t = _shape_tuple(shape)
        with self._lock:  # re-entrant; held across acquire so two threads cannot both create `name`
            buf = self._static.get(name)
            if buf is not None:
                if buf.shape != shape_t or buf.dtype != dtype:
                    raise ValueError(
                        f"static buffer {name!r} has shape {buf.shape} and dtype {buf.dtype},"
                        f" asked for {shape_t} and {dtype}"
                    )
                return buf
            buf = self.acquire(shape_t, dtype, persistent=True)
            buf.name = name
            self._static[name] = buf
            return buf

    def release(self, buf: PooledBuffer) -> None:
        """Gives ``buf`` back. Copies still in flight are fine: the block is not handed out again before they
        complete. Raises ``ValueError`` for a persistent, foreign or already released buffer."""
        if buf._pool is not self:
            raise ValueError("buffer belongs to another pool")
        if buf.persistent:
            raise ValueError("persistent buffers are never released")
        with self._lock:
            if buf._released:
                raise ValueError("buffer already released")
            buf._released = True
            block = buf._block
            self._in_use -= block.capacity
            self._n_in_use -= 1
            self._free.setdefault(block.capacity, []).append(block)
            self._lru[id(block)] = block

    def trim(self) -> int:
        """Frees every idle block whose copies completed; returns the bytes freed."""
        with self._lock:
            victims = [b for b in self._lru.values() if b.ready()]
            for b in victims:
                self._remove_idle(b)
            self._counters["evictions"] += len(victims)
            return sum(b.capacity for b in victims)

    def _take_block(self, nbytes: int) -> _Block:
        if nbytes > self.max_bytes:
            raise PoolExhaustedError(
                f"requested {nbytes} bytes, more than the pool's bound max_bytes={self.max_bytes};"
                " make the pool with a larger max_bytes"
            )
        cap = bucket_size(nbytes, self.max_bytes, self.min_bucket)
        reuse: _Block | None = None
        to_drain: list[_Block] = []  # evicted blocks whose copies are still in flight
        with self._lock:
            idle = self._free.get(cap, [])
            # 1. an idle block of this bucket whose copies completed
            for b in idle:
                if b.ready():
                    self._counters["hits"] += 1
                    return self._lend(b)
            if self._held + cap > self.max_bytes:
                ready_idle = [b for b in self._lru.values() if b.ready()]
                if self._held - sum(b.capacity for b in ready_idle) + cap <= self.max_bytes:
                    # 2. make room by freeing idle blocks whose copies completed, LRU first
                    self._evict(ready_idle, cap)
                elif idle:
                    # 3. at the bound: wait for the oldest in-flight block of this bucket
                    reuse = idle[0]
                else:
                    # 4. at the bound, nothing of this size idle: free in-flight idle blocks too (after waiting)
                    all_idle = list(self._lru.values())
                    if self._held - sum(b.capacity for b in all_idle) + cap > self.max_bytes:
                        raise PoolExhaustedError(
                            f"cannot allocate {cap} bytes: buffers in use ({self._in_use} bytes) fill the pool's"
                            f" bound max_bytes={self.max_bytes}; release buffers or raise max_bytes"
                        )
                    to_drain = [b for b in self._evict(all_idle, cap) if not b.ready()]
            if reuse is not None:
                self._counters["hits"] += 1
                self._counters["waits"] += 1
                self._lend(reuse)
                events = list(reuse.events)
            else:
                self._counters["misses"] += 1
                self._counters["waits"] += len(to_drain)
                # Reserve the bytes now, allocate outside the lock (pinned allocations are slow).
                self._held += cap
                self._in_use += cap
                self._n_in_use += 1
                self._n_blocks += 1
                self._update_peaks()
        if reuse is not None:  # the waits happen outside the lock: other threads keep going
            for e in events:
                e.synchronize()
            with self._lock:
                reuse.events = []
            return reuse
        for b in to_drain:
            for e in b.events:
                e.synchronize()
        try:
            raw = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pinned)
        except BaseException:
            with self._lock:
                self._held -= cap
                self._in_use -= cap
                self._n_in_use -= 1
                self._n_blocks -= 1
            raise
        with self._lock:
            self._counters["allocations"] += 1
        return _Block(raw)

    def _evict(self, candidates: list[_Block], cap: int) -> list[_Block]:
        """Frees candidates (in LRU order) until ``cap`` more bytes fit; returns the evicted blocks."""
        evicted = []
        for b in candidates:
            if self._held + cap <= self.max_bytes:
                break
            self._remove_idle(b)
            evicted.append(b)
        self._counters["evictions"] += len(evicted)
        return evicted

    def _unlink_idle(self, b: _Block) -> None:
        bucket = self._free[b.capacity]
        bucket.remove(b)
        if not bucket:
            del self._free[b.capacity]
        del self._lru[id(b)]

    def _remove_idle(self, b: _Block) -> None:
        self._unlink_idle(b)
        self._held -= b.capacity
        self._n_blocks -= 1

    def _lend(self, b: _Block) -> _Block:
        self._unlink_idle(b)
        self._in_use += b.capacity
        self._n_in_use += 1
        self._update_peaks()
        return b

    def _update_peaks(self) -> None:
        self._peak = max(self._peak, self._held)
        self._peak_in_use = max(self._peak_in_use, self._in_use)

    # ------------------------------------------------------------------ copies

    def copy_stream(self, device: torch.device | str | int) -> torch.cuda.Stream:
        """The pool's copy stream for a CUDA device (made on first use)."""
        dev = _cuda_device(device)
        with self._lock:
            s = self._streams.get(dev.index)
            if s is None:
                s = self._streams[dev.index] = torch.cuda.Stream(device=dev)
            return s

    def copy_to_device(
        self,
        host_buf: PooledBuffer | torch.Tensor,
        device: torch.device | str | int,
        *,
        stream: torch.cuda.Stream | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Copies a host buffer to ``device`` without blocking the host; returns the device tensor.

        On CUDA the copy runs on the pool's copy stream and records an event on the buffer; ``stream``
        (default: the device's current stream) waits on it, so work queued there afterwards sees the data.
        The buffer may be released at once. ``out``: a device tensor to copy into (e.g. a CUDA graph's static
        input); the copy then first waits for the work already queued on ``stream``, which may still read it.
        On CPU this is a plain copy (into a new tensor, or ``out``).
        """
        block = host_buf._block if isinstance(host_buf, PooledBuffer) else None
        src = host_buf.tensor if isinstance(host_buf, PooledBuffer) else host_buf
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if out is not None and (out.shape != src.shape or out.dtype != src.dtype):
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the source {tuple(src.shape)} {src.dtype}")
        if dev.type != "cuda" or not torch.cuda.is_available():
            dst = torch.empty(src.shape, dtype=src.dtype, device=dev) if out is None else out
            dst.copy_(src)
            self._record_synchronous(block)
            return dst
        dev = _cuda_device(dev)
        consumer = stream if stream is not None else torch.cuda.current_stream(dev)
        side = self.copy_stream(dev)
        if block is not None:
            with self._lock:
                pending = list(block.events)
            for e in pending:  # e.g. the device-to-host copy that filled this buffer
                side.wait_event(e)
        if out is not None:
            side.wait_stream(consumer)
        with torch.cuda.stream(side):
            # Allocated on the copy stream and handed to the consumer with record_stream, so the caching
            # allocator neither reuses memory the consumer still reads nor memory the copy still writes.
            dst = torch.empty(src.shape, dtype=src.dtype, device=dev) if out is None else out
            dst.copy_(src, non_blocking=True)
            event = self._event_factory()
            event.record(side)
        if out is None:
            dst.record_stream(consumer)
        consumer.wait_event(event)
        if block is not None:
            with self._lock:
                block.events.append(event)
        return dst

    def copy_to_host(self, device_tensor: torch.Tensor, *, out: PooledBuffer | None = None) -> PooledBuffer:
        """Copies ``device_tensor`` into a pooled host buffer (``out``, or a new one from :meth:`acquire`).

        On CUDA the copy is queued on the copy stream behind the work already queued on the current stream
        (which produces the tensor) and this returns at once: call ``buf.wait()`` before reading the result.
        On CPU this is a plain copy.
        """
        if out is None:
            out = self.acquire(device_tensor.shape, device_tensor.dtype)
            try:
                return self._copy_to_host(device_tensor, out)
            except BaseException:
                self.release(out)  # (a failed copy, e.g. a CUDA error: the buffer is not lent out for nothing)
                raise
        if out._pool is not self:
            raise ValueError("out belongs to another pool")
        return self._copy_to_host(device_tensor, out)

    def _copy_to_host(self, device_tensor: torch.Tensor, out: PooledBuffer) -> PooledBuffer:
        dst = out.tensor
        if dst.shape != device_tensor.shape or dst.dtype != device_tensor.dtype:
            raise ValueError(
                f"out is {tuple(dst.shape)} {dst.dtype}, the source {tuple(device_tensor.shape)} {device_tensor.dtype}"
            )
        if device_tensor.device.type != "cuda":
            out.wait()  # an earlier copy may still read the buffer
            dst.copy_(device_tensor)
            self._record_synchronous(out._block)
            return out
        dev = device_tensor.device
        side = self.copy_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with self._lock:
            pending = list(out._block.events)
        for e in pending:  # an earlier copy from this buffer must have read it first
            side.wait_event(e)
        with torch.cuda.stream(side):
            dst.copy_(device_tensor, non_blocking=True)
            event = self._event_factory()
            event.record(side)
        device_tensor.record_stream(side)  # its memory is not reused before the copy has read it
        with self._lock:
            out._block.events.append(event)
        return out

    def _record_synchronous(self, block: _Block | None) -> None:
        # CPU copies are synchronous; an injected event factory still gets its event (tests simulate flights).
        if block is not None and self._injected_events:
            event = self._event_factory()
            event.record(None)
            with self._lock:
                block.events.append(event)

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, int | bool]:
        """Counters and sizes.

        ``hits`` / ``misses``: acquires served by an idle block / by a new one; ``allocations``: blocks
        allocated; ``evictions``: idle blocks freed to stay under the bound or by :meth:`trim`; ``waits``:
        times the pool blocked on an event before reusing or freeing a block; ``bytes_pinned``: host bytes the
        pool holds (page-locked when ``pinned``); ``bytes_in_use``: of those, lent out or persistent;
        ``peak_bytes`` / ``peak_bytes_in_use``: their maxima; ``buffers`` / ``buffers_in_use`` /
        ``persistent_buffers``: block counts; ``max_bytes``: the bound.
        """
        with self._lock:
            return {
                **self._counters,
                "bytes_pinned": self._held,
                "bytes_in_use": self._in_use,
                "peak_bytes": self._peak,
                "peak_bytes_in_use": self._peak_in_use,
                "buffers": self._n_blocks,
                "buffers_in_use": self._n_in_use,
                "persistent_buffers": self._n_persistent,
                "max_bytes": self.max_bytes,
                "pinned": self.pinned,
            }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PinnedPool(max_bytes={self.max_bytes}, pinned={self.pinned}, bytes_pinned={s['bytes_pinned']},"
            f" bytes_in_use={s['bytes_in_use']}, buffers={s['buffers']})"
        )


def _cuda_device(device: torch.device | str | int) -> torch.device:
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"not a CUDA device: {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


_default: PinnedPool | None = None
_default_lock = threading.Lock()


def default_pool() -> PinnedPool:
    """The process-wide pool (made on first use, with the default bound)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PinnedPool()
        return _default


def set_default_pool(pool: PinnedPool | None) -> None:
    """Replaces the process-wide pool (``None``: a fresh default one is made on next use)."""
    global _default
    with _default_lock:
        _default = pool
