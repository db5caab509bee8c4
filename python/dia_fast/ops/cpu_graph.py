"""CPU step graphs: record one decode step's calls once, then replay them without the wrappers or PyTorch's
dispatch around them.

On a CPU a decode step runs ~30 small ops between GEMMs that stream the decoder's weights (158 MB in int8, 629 MB
in fp32 at Dia-1.6B's widths with 2 layers) through the caches. After each GEMM the next op finds the wrappers,
PyTorch's dispatcher and allocator and the interpreter's own data evicted: a call that takes 3 us with warm
caches takes 40-100 us (docs/native.md). A CUDA graph solves the same problem on a GPU by recording the launches
once. A :class:`CpuGraph` does it on the CPU:

* :meth:`CpuGraph.capture` runs a function (one decode step) for real with two recorders on. The C++ backend
  (:mod:`dia_fast.ops.cpp`) logs every extension call with its arguments (addresses, sizes, scalars). A
  ``TorchDispatchMode`` sees every PyTorch op. Views and allocations are only kept: their tensors stay alive with
  the graph, so every recorded address stays valid. A short list of ops that write a tensor (``pos + 1``,
  ``pos += 1``, a dtype cast, a GEMM that PyTorch runs) are recorded to run again into the same output. Any other
  op (a reference fallback, a host read such as ``.item()``, a random draw) makes the capture fail with the op's
  name as the reason, and the caller keeps running the function eagerly.
* :meth:`CpuGraph.replay` makes the recorded calls again, in order: the same kernels on the same memory, so the
  same results as an eager call, as long as nothing the function decided in Python has changed (shapes, backend
  choices, settings held in Python values). A decode step keeps everything that changes from step to step
  (position, sampling settings, seeds, masks, lengths) in buffers the kernels read, which is what makes it
  capturable, exactly as for a CUDA graph. The caller owns that condition: :class:`~dia_fast.generation.engine.
  StepRunner` captures per set of buffers and drops the graph with them.
* A kernel that reports an error (a position outside the caches, a code outside the vocabulary) returns something
  else at replay than at capture. :meth:`replay` then stops and returns False, and the caller runs the step
  eagerly, which raises the reference's error.

Captures are per thread: another thread's calls during a capture are neither recorded nor affected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CaptureError", "CpuGraph", "CpuGraphStep", "capturing", "record_kernel"]


def _overloads(*names: str) -> list[Any]:
    """aten overloads by name (``"add_.Tensor"``), leaving out any this torch does not have."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


# Views and allocations: nothing to run again (the graph keeps their tensors alive).
_KEEP = frozenset(
    _overloads(
        "empty.memory_format", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "transpose.int",
        "t", "permute", "select.int", "slice.Tensor", "unsqueeze", "squeeze.dim", "squeeze", "expand", "alias",
        "detach", "as_strided", "split.Tensor", "split_with_sizes", "unbind.int",
    )
)  # fmt: skip

# Casts and copies that return their input when there is nothing to do; otherwise they run again as a copy_.
_MAYBE_SELF = frozenset(_overloads("to.dtype", "to.device", "to.dtype_layout", "contiguous"))

# Ops that write tensors they are given (in place, or ``out=``): run again as they are.
_AGAIN = frozenset(
    _overloads(
        "add_.Tensor", "add_.Scalar", "sub_.Tensor", "sub_.Scalar", "mul_.Tensor", "mul_.Scalar", "copy_",
        "fill_.Scalar", "zero_", "add.out", "mm.out", "matmul.out", "linear.out",
    )
)  # fmt: skip


def _pairs(*pairs: tuple[str, str]) -> dict[Any, Any]:
    """{op: its out= overload} for the pairs this torch has."""
    table = {}
    for name, out_name in pairs:
        found = _overloads(name, out_name)
        if len(found) == 2:
            table[found[0]] = found[1]
    return table


# Ops that make a new tensor: run again through their ``out=`` overload into the captured output.
_FUNCTIONAL = _pairs(
    ("add.Tensor", "add.out"),
    ("add.Scalar", "add.Scalar_out"),
    ("sub.Tensor", "sub.out"),
    ("sub.Scalar", "sub.Scalar_out"),
    ("mul.Tensor", "mul.out"),
    ("mul.Scalar", "mul.Scalar_out"),
    ("_to_copy", "_to_copy.out"),
    ("clone", "clone.out"),
    ("mm", "mm.out"),
    ("linear", "linear.out"),
)
_COPY = torch.ops.aten.copy_.default

# One recorded call: (function, positional args, keyword args or None for an extension call, what it returned).
_Call = tuple[Callable[..., Any], tuple[Any, ...], "dict[str, Any] | None", Any]


class CaptureError(RuntimeError):
    """The function did something a :class:`CpuGraph` cannot replay (the message says what)."""


_local = threading.local()


def capturing() -> bool:
    """Whether a capture is underway in this thread (the C++ wrappers then log their extension calls)."""
    return getattr(_local, "calls", None) is not None


def record_kernel(fn: Callable[..., Any], args: tuple[Any, ...], result: Any) -> None:
    """Logs an extension call made during this thread's capture (:mod:`dia_fast.ops.cpp` calls it)."""
    calls = getattr(_local, "calls", None)
    if calls is not None:
        calls.append((fn, args, None, result))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Recorder(TorchDispatchMode):
    """Sees every PyTorch op of the capture: keeps its tensors alive, records the ones that write, and notes the
    first op it cannot replay."""

    def __init__(self, calls: list[_Call], keep: list[torch.Tensor]) -> None:
        super().__init__()
        self.calls, self.keep = calls, keep
        self.refused: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = _tensors(args) + _tensors(list(kwargs.values())) + _tensors(out)
        self.keep.extend(tensors)
        if func in _KEEP or (func in _MAYBE_SELF and out is args[0]):
            return out
        if self.refused is not None:
            return out
        if any(t.device.type != "cpu" for t in tensors):
            self.refused = f"{func} on a {next(t for t in tensors if t.device.type != 'cpu').device.type} tensor"
        elif func in _MAYBE_SELF and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            self.calls.append((_COPY, (out, args[0]), {}, out))
        elif func in _AGAIN:
            self.calls.append((func, args, kwargs, out))
        elif func in _FUNCTIONAL and isinstance(out, torch.Tensor):
            self.calls.append((_FUNCTIONAL[func], args, {**kwargs, "out": out}, out))
        else:
            self.refused = str(func)
        return out


class CpuGraph:
    """One captured sequence of CPU calls (see the module doc). Replay it from one thread at a time: a
    :class:`~dia_fast.generation.engine.StepRunner` holds its lock while stepping."""

    def __init__(self) -> None:
        self._calls: list[_Call] = []
        self._keep: list[torch.Tensor] = []  # every tensor the capture saw: recorded addresses stay valid

    @classmethod
    def capture(cls, fn: Callable[[], object]) -> CpuGraph:
        """Runs ``fn()`` once, for real, recording it. Raises :class:`CaptureError` when it cannot be replayed:
        ``fn`` has then still run to the end, so its effects are those of an eager call (an exception of ``fn``
        itself propagates as it is)."""
        if capturing():
            raise CaptureError("a CPU graph capture is already underway in this thread")
        graph = cls()
        mode = _Recorder(graph._calls, graph._keep)
        _local.calls = graph._calls
        try:
            with mode:
                fn()
        finally:
            _local.calls = None
        if mode.refused is not None:
            raise CaptureError(f"the step runs {mode.refused}, which a CPU graph does not replay")
        if not graph._calls:
            raise CaptureError("the step made no calls to record")
        return graph

    def __len__(self) -> int:
        """Recorded calls (extension calls and PyTorch ops)."""
        return len(self._calls)

    @property
    def kernel_calls(self) -> int:
        """Recorded calls into the C++ extension."""
        return sum(kwargs is None for _, _, kwargs, _ in self._calls)

    def replay(self) -> bool:
        """Makes the recorded calls again. Returns False, having stopped at that call, when an extension call
        returned something other than at capture (an error it reports): run the step eagerly then."""
        for fn, args, kwargs, result in self._calls:
            if kwargs is None:
                if fn(*args) != result:
                    return False
            else:
                fn(*args, **kwargs)
        return True


class CpuGraphStep:
    """Runs ``fn`` (one decode step) the way a runner wants it: the first call records a :class:`CpuGraph` and the
    later ones replay it. A step that cannot be recorded stays eager (:attr:`note` says why), and a replay that
    reports a kernel error drops the graph and runs that step and the later ones eagerly, which raises the
    reference's error. ``enabled=False``: always eager (:attr:`note` is ``"off"``)."""

    def __init__(self, fn: Callable[[], object], enabled: bool = True) -> None:
        self.fn = fn
        self.graph: CpuGraph | None = None
        self.note = "" if enabled else "off"  # why no graph replays ("" while one does, or may)
        self.refused = False  # the step could not be recorded (note: why): another try would refuse it again
        self._capture_next = enabled

    def __call__(self) -> None:
        if self.graph is not None:
            if self.graph.replay():
                return
            self.graph, self.note = None, "dropped: a kernel reported an error at replay"
        elif self._capture_next:
            self._capture_next = False  # one try: the capture ran the step, recorded or not
            try:
                self.graph = CpuGraph.capture(self.fn)
            except CaptureError as exc:
                self.note, self.refused = str(exc), True
            return
        self.fn()
