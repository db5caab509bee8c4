"""dia_fast.memory.PinnedPool: bucketing, reuse, bound/LRU, event-guarded reuse, persistence, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from dia_fast.memory import (
    PinnedPool,
    PooledBuffer,
    PoolExhaustedError,
    bucket_size,
    default_pool,
    set_default_pool,
)

KiB = 1024


class FakeEvent:
    """Stands for a copy in flight until `done` is flipped (or synchronize() is called)."""

    def __init__(self) -> None:
        self.done = False
        self.recorded = 0
        self.synchronized = 0

    def record(self, stream: object = None) -> None:
        self.recorded += 1

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True


class FakeEvents:
    """Event factory that remembers the events it made."""

    def __init__(self) -> None:
        self.made: list[FakeEvent] = []

    def __call__(self) -> FakeEvent:
        e = FakeEvent()
        self.made.append(e)
        return e


def _fill_and_send(pool: PinnedPool, shape: tuple[int, ...], value: float) -> tuple[PooledBuffer, torch.Tensor]:
    buf = pool.acquire(shape, torch.float32)
    buf.tensor.fill_(value)
    dst = pool.copy_to_device(buf, "cpu")
    return buf, dst


# ---------------------------------------------------------------------------------------------- sizes


def test_bucket_size_powers_of_two() -> None:
    assert bucket_size(0) == 512
    assert bucket_size(1) == 512
    assert bucket_size(512) == 512
    assert bucket_size(513) == 1024
    assert bucket_size(1024) == 1024
    assert bucket_size(1025) == 2048
    assert bucket_size(3 * 2**20) == 4 * 2**20
    assert bucket_size(100, min_bucket=64) == 128
    # Above the bound's power of two: rounded to a 4 KiB page, capped at the bound, never below the request.
    assert bucket_size(5000, max_bytes=6000) == 6000
    assert bucket_size(5000, max_bytes=10_000) == 8192
    assert bucket_size(4097, max_bytes=16_384) == 8192
    assert bucket_size(9000, max_bytes=12_000) == 12_000
    assert bucket_size(9000, max_bytes=16_384) == 16_384
    with pytest.raises(ValueError):
        bucket_size(-1)


def test_buffer_view_shape_dtype_and_capacity() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    buf = pool.acquire((3, 7), torch.int64)
    t = buf.tensor
    assert t.shape == (3, 7) and t.dtype == torch.int64 and t.is_contiguous()
    assert t.device.type == "cpu"
    assert buf.nbytes == 3 * 7 * 8
    assert buf.capacity == 256 * 2 >= buf.nbytes  # 168 bytes -> smallest bucket
    assert t.data_ptr() == buf.data_ptr()
    t.copy_(torch.arange(21).view(3, 7))
    assert torch.equal(buf.tensor, torch.arange(21).view(3, 7))
    one_d = pool.acquire(5, torch.bfloat16)
    assert one_d.tensor.shape == (5,) and one_d.tensor.dtype == torch.bfloat16
    empty = pool.acquire((0, 9), torch.float16)
    assert empty.tensor.numel() == 0 and empty.capacity == 512
    with pytest.raises(ValueError):
        pool.acquire((2, -1), torch.float32)


# ---------------------------------------------------------------------------------------------- reuse


def test_release_then_acquire_same_bucket_is_a_hit() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    a = pool.acquire((100,), torch.float32)  # 400 B -> 512 bucket
    addr = a.data_ptr()
    a.release()
    b = pool.acquire((64,), torch.int64)  # 512 B, same bucket, other dtype
    assert b.data_ptr() == addr
    assert b.tensor.shape == (64,) and b.tensor.dtype == torch.int64
    s = pool.stats()
    assert (s["hits"], s["misses"], s["allocations"]) == (1, 1, 1)
    assert s["buffers"] == 1 and s["bytes_pinned"] == 512


def test_buckets_are_separate() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    small = pool.acquire(600, torch.uint8)
    assert small.capacity == 1024
    small_addr = small.data_ptr()
    small.release()
    big = pool.acquire(1025, torch.uint8)  # 2048 bucket: may not take the 1024 block
    assert big.capacity == 2048 and big.data_ptr() != small_addr
    same = pool.acquire(1024, torch.uint8)  # 1024 bucket again
    assert same.data_ptr() == small_addr
    s = pool.stats()
    assert (s["hits"], s["misses"]) == (1, 2)
    assert s["bytes_pinned"] == 1024 + 2048 and s["bytes_in_use"] == 1024 + 2048


def test_context_manager_releases() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    with pool.acquire((8,), torch.float32) as buf:
        buf.tensor.fill_(1.0)
        assert pool.stats()["buffers_in_use"] == 1
    assert buf.released
    assert pool.stats()["buffers_in_use"] == 0 and pool.stats()["bytes_in_use"] == 0


def test_misuse_raises() -> None:
    pool, other = PinnedPool(max_bytes=1 << 20), PinnedPool(max_bytes=1 << 20)
    buf = pool.acquire(4, torch.float32)
    buf.release()
    with pytest.raises(RuntimeError, match="after release"):
        _ = buf.tensor
    with pytest.raises(ValueError, match="already released"):
        pool.release(buf)
    with pytest.raises(ValueError, match="another pool"):
        other.release(pool.acquire(4, torch.float32))
    with pytest.raises(ValueError):
        PinnedPool(max_bytes=0)
    with pytest.raises(ValueError):
        PinnedPool(min_bucket=1000)


# ---------------------------------------------------------------------------------------------- bound


def test_bound_evicts_idle_lru_first() -> None:
    pool = PinnedPool(max_bytes=4 * KiB, min_bucket=KiB)
    bufs = {k: pool.acquire(KiB, torch.uint8) for k in "abcd"}
    addr = {k: b.data_ptr() for k, b in bufs.items()}
    for k in "bdac":  # release order = LRU order: b oldest
        bufs[k].release()
    assert pool.stats()["bytes_pinned"] == 4 * KiB
    big = pool.acquire(2 * KiB, torch.uint8)  # full: frees the two least recently released (b, d)
    s = pool.stats()
    assert s["evictions"] == 2 and s["bytes_pinned"] == 4 * KiB and s["buffers"] == 3
    assert big.capacity == 2 * KiB
    left = {pool.acquire(KiB, torch.uint8).data_ptr() for _ in range(2)}
    assert left == {addr["a"], addr["c"]}
    assert pool.stats()["hits"] == 2
    assert pool.stats()["peak_bytes"] <= 4 * KiB


def test_request_larger_than_bound_raises_memory_error() -> None:
    pool = PinnedPool(max_bytes=64 * KiB)
    with pytest.raises(MemoryError, match="max_bytes=65536"):
        pool.acquire(64 * KiB + 1, torch.uint8)
    with pytest.raises(PoolExhaustedError):
        pool.acquire((4, 4 * KiB + 1), torch.float32)
    s = pool.stats()
    assert s["allocations"] == 0 and s["bytes_pinned"] == 0
    # A request under the bound whose power of two is not fits exactly.
    odd = PinnedPool(max_bytes=3000)
    buf = odd.acquire(2500, torch.uint8)
    assert buf.capacity == 3000 and odd.stats()["bytes_pinned"] == 3000


def test_bound_filled_by_buffers_in_use_raises_then_recovers() -> None:
    pool = PinnedPool(max_bytes=2 * KiB, min_bucket=KiB)
    a = pool.acquire(KiB, torch.uint8)
    b = pool.acquire(KiB, torch.uint8)
    with pytest.raises(PoolExhaustedError, match="in use"):
        pool.acquire(KiB, torch.uint8)
    s = pool.stats()
    assert s["bytes_pinned"] == 2 * KiB and s["buffers"] == 2  # the failed request reserved nothing
    a.release()
    c = pool.acquire(KiB, torch.uint8)
    assert c.data_ptr() == a.data_ptr()
    b.release()
    c.release()
    assert pool.trim() == 2 * KiB
    assert pool.stats()["bytes_pinned"] == 0


def test_stats_track_bytes_and_peaks() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    s0 = pool.stats()
    assert s0["pinned"] is torch.cuda.is_available()
    assert not PinnedPool(pin=False).stats()["pinned"]
    x = pool.acquire(3000, torch.uint8)  # 4096
    y = pool.acquire(100, torch.uint8)  # 512
    s = pool.stats()
    assert s["bytes_in_use"] == s["bytes_pinned"] == 4608 and s["buffers_in_use"] == 2
    x.release()
    s = pool.stats()
    assert s["bytes_in_use"] == 512 and s["bytes_pinned"] == 4608
    assert s["peak_bytes"] == 4608 and s["peak_bytes_in_use"] == 4608
    y.release()
    pool.trim()
    s = pool.stats()
    assert s["bytes_pinned"] == 0 and s["peak_bytes"] == 4608 and s["evictions"] == 2
    assert set(s) >= {"hits", "misses", "allocations", "bytes_pinned", "bytes_in_use", "peak_bytes", "waits", "pinned"}


# ---------------------------------------------------------------------------------------------- persistent


def test_persistent_buffers_are_never_handed_out_again() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    keep = pool.acquire((16,), torch.float32, persistent=True)
    keep.tensor.fill_(7.0)
    with pytest.raises(ValueError, match="persistent"):
        keep.release()
    with keep:  # the context manager leaves persistent buffers alone
        pass
    assert not keep.released
    seen = set()
    for _ in range(5):
        b = pool.acquire((16,), torch.float32)
        seen.add(b.data_ptr())
        b.tensor.fill_(-1.0)
        b.release()
    assert keep.data_ptr() not in seen
    assert torch.equal(keep.tensor, torch.full((16,), 7.0))
    assert pool.trim() == 512  # the idle block only
    s = pool.stats()
    assert s["persistent_buffers"] == 1 and s["bytes_in_use"] == 512 and s["bytes_pinned"] == 512


def test_static_buffer_by_name() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    a = pool.static_buffer("codes", (2, 9), torch.int32)
    b = pool.static_buffer("codes", (2, 9), torch.int32)
    assert a is b and a.persistent and a.name == "codes"
    other = pool.static_buffer("pcm", (2, 9), torch.int32)
    assert other.data_ptr() != a.data_ptr()
    with pytest.raises(ValueError, match="codes"):
        pool.static_buffer("codes", (2, 10), torch.int32)
    with pytest.raises(ValueError):
        pool.static_buffer("codes", (2, 9), torch.int64)
    assert pool.stats()["persistent_buffers"] == 2


# ---------------------------------------------------------------------------------------------- in flight


def test_buffer_with_copy_in_flight_is_not_reused_until_it_completes() -> None:
    events = FakeEvents()
    pool = PinnedPool(max_bytes=1 << 20, event_factory=events)
    first, dst = _fill_and_send(pool, (64,), 1.0)
    assert len(events.made) == 1 and events.made[0].recorded == 1
    assert torch.equal(dst, torch.full((64,), 1.0))
    first_addr = first.data_ptr()
    first.release()  # released while its copy is "in flight"
    assert not events.made[0].done

    second = pool.acquire((64,), torch.float32)
    assert second.data_ptr() != first_addr  # early reuse would hand out first's memory here
    second.tensor.fill_(2.0)
    assert pool.stats()["misses"] == 2 and pool.stats()["waits"] == 0

    events.made[0].done = True  # the copy completed
    third = pool.acquire((64,), torch.float32)
    assert third.data_ptr() == first_addr
    s = pool.stats()
    assert (s["hits"], s["misses"], s["waits"]) == (1, 2, 0)
    assert events.made[0].synchronized == 0  # reused by query(), never blocked


def test_at_bound_reuse_waits_for_the_event() -> None:
    events = FakeEvents()
    pool = PinnedPool(max_bytes=KiB, min_bucket=KiB, event_factory=events)
    buf, _ = _fill_and_send(pool, (16,), 3.0)
    addr = buf.data_ptr()
    buf.release()
    again = pool.acquire((16,), torch.float32)  # no room for a second block: must wait, then reuse
    assert again.data_ptr() == addr
    assert events.made[0].synchronized == 1
    s = pool.stats()
    assert (s["waits"], s["hits"], s["allocations"]) == (1, 1, 1)
    assert again.ready()


def test_at_bound_in_flight_block_of_other_size_is_waited_for_before_eviction() -> None:
    events = FakeEvents()
    pool = PinnedPool(max_bytes=2 * KiB, min_bucket=KiB, event_factory=events)
    small, _ = _fill_and_send(pool, (16,), 1.0)
    small.release()
    big = pool.acquire(2 * KiB, torch.uint8)
    assert events.made[0].synchronized == 1
    s = pool.stats()
    assert (s["evictions"], s["waits"], s["buffers"], s["bytes_pinned"]) == (1, 1, 1, 2 * KiB)
    assert big.capacity == 2 * KiB


def test_ready_and_wait() -> None:
    events = FakeEvents()
    pool = PinnedPool(max_bytes=1 << 20, event_factory=events)
    buf, _ = _fill_and_send(pool, (4,), 5.0)
    assert not buf.ready()
    t = buf.wait()
    assert buf.ready() and events.made[0].synchronized == 1
    assert torch.equal(t, torch.full((4,), 5.0))


def test_copy_to_host_into_a_buffer_in_flight_waits_first() -> None:
    events = FakeEvents()
    pool = PinnedPool(max_bytes=1 << 20, event_factory=events)
    buf, _ = _fill_and_send(pool, (8,), 1.0)  # buf is still being read by a "copy"
    src = torch.arange(8, dtype=torch.float32)
    out = pool.copy_to_host(src, out=buf)
    assert out is buf
    assert events.made[0].synchronized == 1  # the earlier copy finished before the overwrite
    assert torch.equal(out.wait(), src)


# ---------------------------------------------------------------------------------------------- copies on CPU


def test_cpu_copies_are_plain_copies() -> None:
    pool = PinnedPool(max_bytes=1 << 20)
    host = pool.acquire((3, 4), torch.float32)
    host.tensor.copy_(torch.arange(12.0).view(3, 4))
    dev = pool.copy_to_device(host, "cpu")
    assert dev.data_ptr() != host.data_ptr()  # a copy, not an alias of pooled memory
    host.tensor.zero_()
    assert torch.equal(dev, torch.arange(12.0).view(3, 4))
    out = torch.empty(3, 4)
    assert pool.copy_to_device(host, "cpu", out=out) is out and torch.equal(out, torch.zeros(3, 4))
    with pytest.raises(ValueError):
        pool.copy_to_device(host, "cpu", out=torch.empty(4, 3))

    codes = torch.randint(0, 1024, (2, 9), dtype=torch.int64)
    h = pool.copy_to_host(codes)
    assert isinstance(h, PooledBuffer) and h.tensor.dtype == torch.int64
    assert torch.equal(h.wait(), codes) and h.ready()
    with pytest.raises(ValueError):
        pool.copy_to_host(torch.zeros(3, 9, dtype=torch.int64), out=h)
    plain = pool.copy_to_device(torch.ones(5), "cpu")  # plain tensors are accepted too
    assert torch.equal(plain, torch.ones(5))


def test_default_pool_is_shared() -> None:
    set_default_pool(None)
    try:
        p = default_pool()
        assert default_pool() is p and isinstance(p, PinnedPool)
        mine = PinnedPool(max_bytes=KiB)
        set_default_pool(mine)
        assert default_pool() is mine
    finally:
        set_default_pool(None)


# ---------------------------------------------------------------------------------------------- threads


def test_threads_never_share_a_buffer() -> None:
    pool = PinnedPool(max_bytes=1 << 20, min_bucket=256)
    lent: set[int] = set()
    guard = threading.Lock()
    errors: list[str] = []
    n_threads, n_iter = 4, 300

    def worker(tid: int) -> None:
        g = torch.Generator().manual_seed(tid)
        for i in range(n_iter):
            n = int(torch.randint(1, 600, (1,), generator=g))
            buf = pool.acquire((n,), torch.int32)
            with guard:
                if buf.data_ptr() in lent:
                    errors.append(f"block {buf.data_ptr():#x} lent twice")
                lent.add(buf.data_ptr())
            buf.tensor.fill_(tid * 100_000 + i)
            if not bool((buf.tensor == tid * 100_000 + i).all()):
                errors.append("buffer overwritten while lent")
            with guard:
                lent.discard(buf.data_ptr())
            buf.release()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = pool.stats()
    assert s["hits"] + s["misses"] == n_threads * n_iter
    assert s["buffers_in_use"] == 0 and s["bytes_in_use"] == 0
    # reuse happened: few blocks for 1200 acquires. A free block serves only its own size bucket (5 of them here:
    # 256 B .. 4 KiB), so at worst every thread ends up owning one block per bucket (the former bound, 4 per
    # thread, failed about one run in three on a busy 2-core machine)
    assert s["allocations"] == s["buffers"] <= 5 * n_threads


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_buffers_are_pinned() -> None:
    pool = PinnedPool()
    buf = pool.acquire((128,), torch.float32)
    assert buf.is_pinned() and buf.tensor.is_pinned()
    assert pool.stats()["pinned"]
    assert not PinnedPool(pin=False).acquire(4, torch.float32).is_pinned()


@pytest.mark.gpu
def test_gpu_round_trip_on_side_stream() -> None:
    pool = PinnedPool()
    host = pool.acquire((1000, 9), torch.int64)
    ref = torch.randint(0, 1024, (1000, 9), dtype=torch.int64)
    host.tensor.copy_(ref)
    dev = pool.copy_to_device(host, "cuda")
    host.release()  # safe while the copy is in flight
    doubled = dev * 2  # queued on the current stream, which waits on the copy's event
    back = pool.copy_to_host(doubled)
    assert torch.equal(back.wait(), ref * 2)
    assert pool.copy_stream("cuda") is pool.copy_stream(torch.device("cuda", torch.cuda.current_device()))
    assert pool.copy_stream("cuda") != torch.cuda.current_stream()

    x = torch.randn(513, 7, device="cuda", dtype=torch.bfloat16)
    h = pool.copy_to_host(x)
    assert torch.equal(h.wait(), x.cpu())


@pytest.mark.gpu
def test_gpu_in_flight_copy_blocks_reuse() -> None:
    pool = PinnedPool(max_bytes=1 << 30)
    n = 16 << 20  # 64 MiB of float32
    dev_out = torch.empty(n, device="cuda")
    torch.cuda.synchronize()
    first = pool.acquire((n,), torch.float32)
    first.tensor.fill_(1.0)
    torch.cuda._sleep(200_000_000)  # keep the current stream busy; the copy into `dev_out` waits behind it
    pool.copy_to_device(first, "cuda", out=dev_out)
    addr = first.data_ptr()
    first.release()
    assert not first._block.ready()
    second = pool.acquire((n,), torch.float32)
    assert second.data_ptr() != addr
    second.tensor.fill_(2.0)  # would corrupt the copy if the pool had handed out `first` again
    torch.cuda.synchronize()
    assert bool((dev_out == 1.0).all())
    third = pool.acquire((n,), torch.float32)
    assert third.data_ptr() == addr
    assert pool.stats()["waits"] == 0

    # Device to host: not ready until the producer's queued work and the copy ran.
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    torch.cuda._sleep(200_000_000)
    y = x + 1
    h = pool.copy_to_host(y)
    assert not h.ready()
    assert torch.equal(h.wait(), torch.arange(n, dtype=torch.float32) + 1)


@pytest.mark.gpu
def test_gpu_at_bound_reuse_waits() -> None:
    n = 4 << 20
    pool = PinnedPool(max_bytes=n * 4)
    dev_out = torch.empty(n, device="cuda")
    buf = pool.acquire((n,), torch.float32)
    buf.tensor.fill_(3.0)
    torch.cuda._sleep(100_000_000)
    pool.copy_to_device(buf, "cuda", out=dev_out)
    addr = buf.data_ptr()
    buf.release()
    again = pool.acquire((n,), torch.float32)  # the bound leaves room for one block: waits for the copy
    assert again.data_ptr() == addr and again.ready()
    assert pool.stats()["waits"] == 1
    again.tensor.fill_(4.0)
    torch.cuda.synchronize()
    assert bool((dev_out == 3.0).all())


def test_a_failed_copy_to_host_does_not_keep_its_buffer():
    """A copy that raises (a source the host cannot read from here; on CUDA, an error surfacing at the copy) gives the
    buffer it acquired back: the engine's error path relies on not leaking one per failure."""
    pool = PinnedPool(pin=False)
    with pytest.raises((NotImplementedError, RuntimeError)):
        pool.copy_to_host(torch.empty(4, 3, device="meta"))
    assert pool.stats()["buffers_in_use"] == 0
    good = pool.copy_to_host(torch.arange(12).reshape(4, 3))
    assert torch.equal(good.wait(), torch.arange(12).reshape(4, 3)) and pool.stats()["buffers_in_use"] == 1
    good.release()
