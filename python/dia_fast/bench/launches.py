"""Kernel launches per decode step: every non-view aten op plus every Triton kernel launch.

A CUDA graph replays one node per launch, and on a GPU each node costs ~1.5-2.5 us whatever it does, so
the launch count of a decode step bounds its speed as surely as the bytes of weights it reads.
:class:`LaunchCounter` counts what runs inside its block: aten ops through a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` (views and allocations excluded: they launch
nothing and a graph has no node for them), Triton launches by wrapping the launcher of Triton's
``JITFunction`` (and of the interpreter's ``InterpretedFunction``) and the C++ CPU kernels' calls through
:func:`dia_fast.ops.cpp.observe_calls`. :func:`count_decode_launches` runs
eager decode steps of a model under it and splits the count into the decoder layers (forward hooks)
and the rest.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..generation.engine import StepSpec, allocate_buffers, decode_step, default_sampler, using_device
from ..generation.sampling import SamplingConfig
from ..model import DiaModel
from ..ops import cpp

__all__ = ["LaunchCount", "LaunchCounter", "count_decode_launches"]

# Metadata-only or allocation ops: no kernel, no graph node.
_NOT_LAUNCHES = {
    "aten::_unsafe_view",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::detach",
    "aten::alias",
}


def _is_view(func: Any) -> bool:
    """An op whose outputs all alias inputs without writing them (view, as_strided, slice, t, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class LaunchCounter(TorchDispatchMode):
    """Counts launches inside ``with LaunchCounter() as c:``: ``c.aten``, ``c.triton`` and ``c.cpp`` (Counters by op /
    kernel name) and ``c.total``. Not thread-safe: count one thread's work at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.cpp: Counter[str] = Counter()  # the C++ extension's CPU kernels (named cpp::kernel)
        self.in_kernel = False  # inside a Triton launch: the interpreter's own tensor traffic is not counted
        self._patches: contextlib.ExitStack | None = None

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values()) + sum(self.cpp.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if not self.in_kernel and name not in _NOT_LAUNCHES and not _is_view(func):
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    def _count_cpp(self, name: str) -> None:
        if not self.in_kernel:
            self.cpp[f"cpp::{name}"] += 1

    def __enter__(self) -> LaunchCounter:
        self._patches = contextlib.ExitStack()
        for cls in _triton_launcher_classes():
            self._patches.enter_context(_count_runs(cls, self))
        self._patches.enter_context(cpp.observe_calls(self._count_cpp))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._patches is not None:
                self._patches.close()


def _triton_launcher_classes() -> list[type]:
    if importlib.util.find_spec("triton") is None:
        return []
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def _count_runs(cls: type, counter: LaunchCounter) -> Iterator[None]:
    """``kernel[grid](...)`` calls ``cls.run(..., grid=..., warmup=False)``: count those launches by kernel name."""
    original = cls.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("warmup", False) or counter.in_kernel:
            return original(self, *args, **kwargs)
        fn = getattr(self, "fn", None)
        counter.triton[getattr(fn, "__name__", None) or getattr(self, "__name__", "triton_kernel")] += 1
        counter.in_kernel = True
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_kernel = False

    cls.run = run
    try:
        yield
    finally:
        cls.run = original


@dataclass
class LaunchCount:
    """Launches of one eager decode step (averaged over the counted steps)."""

    per_step: float
    per_layer: float  # the most launched by one decoder layer
    outside_layers: float
    layers: int
    batch: int
    by_op: dict[str, float] = field(default_factory=dict)  # per step, aten ops, Triton and C++ kernels by name
    # CUDA only: GPU kernels (and memcpy/memset) of a step as the profiler sees them (a library call such as a
    # cuBLAS GEMM may run more than one), or why they could not be counted
    cuda_kernels_per_step: float | None = None
    cuda_kernels_by_name: dict[str, float] = field(default_factory=dict)
    cuda_kernels_error: str = ""
    # their GPU time per eager step (microseconds; the GPU's busy time, without the gaps between kernels)
    cuda_kernel_us_per_step: float | None = None
    cuda_kernel_us_by_name: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "launches_per_step": self.per_step,
            "launches_per_layer": self.per_layer,
            "launches_outside_layers": self.outside_layers,
            "decoder_layers": self.layers,
            "batch": self.batch,
            "launches_by_op": self.by_op,
            "cuda_kernels_per_step": self.cuda_kernels_per_step,
            "cuda_kernels_by_name": self.cuda_kernels_by_name,
            "cuda_kernels_error": self.cuda_kernels_error,
            "cuda_kernel_us_per_step": self.cuda_kernel_us_per_step,
            "cuda_kernel_us_by_name": self.cuda_kernel_us_by_name,
        }


@torch.no_grad()  # not inference_mode: under it some casts (x.float()) bypass the dispatch mode, uncounted
def count_decode_launches(
    model: DiaModel, *, batch: int = 1, steps: int = 2, sampling: SamplingConfig | None = None
) -> LaunchCount:
    """Launches of ``model``'s decode step at ``batch`` items (CFG rows included), with the backends the
    dispatcher picks for its device (force others with :func:`dia_fast.ops.set_backend`).

    Runs one warm-up step (kernels compile), then ``steps`` counted eager steps on small buffers (64 decoder,
    32 text positions: the launch count does not depend on lengths).
    """
    sampling = sampling or SamplingConfig()
    data = model.config.data
    spec = StepSpec(
        batch=batch,
        use_cfg=sampling.use_cfg,
        channels=data.channels,
        eos_value=data.audio_eos_value,
        pad_value=data.audio_pad_value,
        max_delay=data.max_delay,
        sampler=default_sampler(model.device),
    )
    bufs = allocate_buffers(model, spec, max(64, data.max_delay + 8), 32, self_mask=True)
    bufs.set_sampling(sampling)
    bufs.positions.fill_(1)
    layers = model.decoder.layers
    inside = [0] * len(layers)
    counter = LaunchCounter()
    marks: list[int] = []

    def enter(*_: Any) -> None:
        marks.append(counter.total)

    def leave(index: int) -> Any:
        def hook(*_: Any) -> None:
            inside[index] += counter.total - marks.pop()

        return hook

    with using_device(model.device):
        decode_step(model, spec, bufs)  # warm-up: compiles, lazy initialisations
        handles = [layer.register_forward_pre_hook(enter) for layer in layers]
        handles += [layer.register_forward_hook(leave(i)) for i, layer in enumerate(layers)]
        try:
            with counter:
                for _ in range(steps):
                    decode_step(model, spec, bufs)
        finally:
            for h in handles:
                h.remove()
    per_step = counter.total / steps
    per_layer = max(inside, default=0) / steps
    by_op = {k: v / steps for k, v in sorted((counter.aten + counter.triton + counter.cpp).items())}
    count = LaunchCount(per_step, per_layer, per_step - sum(inside) / steps, len(layers), batch, by_op)
    if model.device.type == "cuda":
        try:
            kernels, micros = _profile_cuda_kernels(model, spec, bufs, steps)
            count.cuda_kernels_per_step = sum(kernels.values())
            count.cuda_kernels_by_name = kernels
            if micros:
                count.cuda_kernel_us_per_step = sum(micros.values())
                count.cuda_kernel_us_by_name = micros
        except Exception as exc:  # the profiler (CUPTI) may be unavailable: the aten/Triton count stands
            count.cuda_kernels_error = f"{type(exc).__name__}: {exc}"
    return count


def _profile_cuda_kernels(
    model: DiaModel, spec: StepSpec, bufs: Any, steps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """GPU activities (kernels, memcpy, memset) per eager decode step, by name, from torch.profiler: their count and
    their GPU time in microseconds (:func:`kernels_by_name`)."""
    from torch.profiler import ProfilerActivity, profile

    with using_device(model.device):
        torch.cuda.synchronize(model.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decode_step(model, spec, bufs)
            torch.cuda.synchronize(model.device)
    counts, micros = kernels_by_name(prof.events(), steps)
    if not counts:
        raise RuntimeError("the profiler recorded no GPU activity")
    return counts, micros


def kernels_by_name(events: Any, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per step, by name, the GPU events' count and their time in microseconds (each event's own interval on the
    GPU), from the profiler's ``events()``; the times are ``{}`` where an event carries none."""
    names: Counter[str] = Counter()
    micros: Counter[str] = Counter()
    timed = True
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        names[evt.name] += 1
        span = getattr(evt, "time_range", None)
        if span is None:
            timed = False
        else:
            micros[evt.name] += span.elapsed_us()
    per_step = lambda c: {k: v / steps for k, v in sorted(c.items())}  # noqa: E731
    return per_step(names), per_step(micros) if timed else {}
