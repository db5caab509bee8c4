"""Host memory for host<->device traffic: a bounded pool of (pinned) buffers reused under CUDA events.

>>> from dia_fast.memory import default_pool
>>> pool = default_pool()
>>> with pool.acquire((2, 16), torch.int64) as buf:      # doctest: +SKIP
...     buf.tensor.copy_(ids)
...     ids_dev = pool.copy_to_device(buf, "cuda")          # non-blocking; safe to release now
"""

from __future__ import annotations

from .pool import (
    DEFAULT_MAX_BYTES,
    EventLike,
    PinnedPool,
    PooledBuffer,
    PoolExhaustedError,
    bucket_size,
    default_pool,
    set_default_pool,
)

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
