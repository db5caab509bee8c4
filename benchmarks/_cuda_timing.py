"""Timing helpers shared by the kernel benchmarks (CUDA only): ``n_calls`` launches per timed round,
replayed from a CUDA graph (no Python launch overhead) or, for ops that synchronise with the host,
run eagerly."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graphed(fn: Callable[[], object], n_calls: int) -> Callable[[], None]:
    """A callable that replays ``fn`` ``n_calls`` times from a CUDA graph and waits for the GPU."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm the caching allocator on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_calls):
            fn()

    def run() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return run


def eager(fn: Callable[[], object], n_calls: int) -> Callable[[], None]:
    """``n_calls`` eager calls of ``fn``, then wait for the GPU (for ops whose host syncs cannot be
    captured in a CUDA graph)."""

    def run() -> None:
        for _ in range(n_calls):
            fn()
        torch.cuda.synchronize()

    fn()
    torch.cuda.synchronize()
    return run
