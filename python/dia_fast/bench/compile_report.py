"""Compile report: every Triton kernel dia_fast launches, compiled for a GPU architecture without a GPU.

The launches are recorded, not listed by hand. A child process (Triton imported without the
interpreter) runs the public code paths at Dia-1.6B shapes in bf16 with the ``triton`` backend forced
on CPU tensors:

- inside each Triton op's host code the tensors look like they live on a CUDA device of the chosen
  architecture (a ``TorchFunctionMode`` answers ``cuda:0`` for ``Tensor.device`` and maps device
  arguments back to the CPU; ``torch.cuda`` describes that GPU, e.g. 132 SMs for sm_90), so the host
  code picks the launch configuration and split counts it picks on that GPU;
- ``JITFunction.run`` (what ``kernel[grid](...)`` calls) is replaced by a recorder that binds the
  arguments with Triton's own binder for the target (ints equal to 1 become constants, ints divisible
  by 16 and 16-byte aligned pointers are marked) and stores the compile inputs and the grid without
  launching anything;
- each op then returns its PyTorch reference's result, so the generation runs on real values.

Launches are deduplicated by Triton's compile key, compiled with ``triton.compile`` to a cubin, and
``ptxas -v`` (the one Triton ships and uses) gives registers, spills and static shared memory;
Triton's metadata gives the dynamic shared memory. Static numbers only: no timing, no occupancy.

``python -m dia_fast.bench --compile-report --arch sm_90 --json out.json`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..cliparse import OneLineParser
from ..paths import unwritable_file

__all__ = ["ARCHS", "Arch", "compile_report", "main", "parse_arch", "parse_args", "table"]


@dataclass(frozen=True)
class Arch:
    """A GPU architecture and the device the report assumes for it (SM count, shared memory per block)."""

    name: str  # "sm_90"
    capability: int  # 90
    gpu: str  # the device whose SM count the host code sees
    sm_count: int
    smem_per_block: int  # bytes a block may use (static + dynamic), the opt-in maximum

    @property
    def target_name(self) -> str:
        """The ptxas target Triton compiles for (``sm_90a`` on Hopper, ``sm_100a`` on Blackwell)."""
        return f"sm_{self.capability}{'a' if self.capability >= 90 else ''}"


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sm_80", 80, "A100", 108, 166912),
        Arch("sm_86", 86, "RTX 3090", 82, 101376),
        Arch("sm_89", 89, "L40S", 142, 101376),
        Arch("sm_90", 90, "H100 SXM", 132, 232448),
        Arch("sm_100", 100, "B200", 148, 232448),
        Arch("sm_120", 120, "RTX 5090", 170, 101376),
    )
}


def parse_arch(arch: str | int, sm_count: int | None = None) -> Arch:
    """``"sm_90"``, ``"sm_90a"``, ``"90"`` or ``90`` -> :class:`Arch` (``sm_count`` overrides the SM count)."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(arch).strip().lower())
    found = ARCHS.get(f"sm_{m.group(1)}") if m else None
    if found is None:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if sm_count is not None and sm_count != found.sm_count:
        if sm_count < 1:
            raise ValueError(f"sm_count must be >= 1, got {sm_count}")
        found = Arch(found.name, found.capability, f"{found.gpu}-like", sm_count, found.smem_per_block)
    return found


# --- recording (child process: Triton without the interpreter) ---------------------------------------------


@dataclass
class Launch:
    """One recorded ``kernel[grid](...)``: Triton's compile inputs for the target, and the grid."""

    fn: Any  # the JITFunction
    key: str  # Triton's compile key (specialisation + options)
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: Any  # the backend's parsed options (num_warps, num_stages, ...)
    grid: tuple[int, int, int]
    scenario: str


@dataclass
class _Recorder:
    arch: Arch
    launches: list[Launch] = field(default_factory=list)
    scenario: str = ""
    _binders: dict[int, Any] = field(default_factory=dict)

    def record(self, fn: Any, args: tuple, grid: Any, kwargs: dict[str, Any]) -> None:
        """What ``JITFunction.run`` does up to the compile, for the target instead of the current device."""
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import jit

        # the same run-time options Triton's JITFunction.run adds (3.9)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        entry = self._binders.get(id(fn))
        if entry is None:
            backend = make_backend(GPUTarget("cuda", self.arch.capability, 32))
            binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
            entry = self._binders[id(fn)] = (backend, binder)
        backend, binder = entry
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        key = f"{jit.get_full_name(fn.fn)}:{jit._replace_jit_callables(specialization)}:{options}"
        if callable(grid):
            grid = grid(bound_args)
        g = tuple(int(x) for x in grid) + (1, 1)
        self.launches.append(Launch(fn, key, signature, constexprs, attrs, options, g[:3], self.scenario))


class _AsCuda:
    """Inside: CPU tensors report ``cuda:0``, device arguments ``cuda*`` mean the CPU, and ``torch.cuda``
    describes ``arch``'s GPU. Only the Triton ops' host code runs inside (see :func:`_install_ops`)."""

    def __init__(self, arch: Arch) -> None:
        import torch
        from torch.overrides import TorchFunctionMode

        base = torch._C.TensorBase
        cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
        # what a CUDA tensor answers, for the getters and methods host code asks a tensor's device with
        answers = {id(base.device): cuda0, id(base.is_cuda): True, id(base.is_cpu): False, id(base.get_device): 0}

        def to_cpu(x: Any) -> Any:
            if isinstance(x, torch.device) and x.type == "cuda":
                return cpu
            if isinstance(x, str) and re.fullmatch(r"cuda(:\d+)?", x):
                return cpu
            return x

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                key = id(func) if id(func) in answers else id(getattr(func, "__self__", None))
                if key in answers:  # a getter (bound to its descriptor) or method asking the device
                    if base.device.__get__(args[0]).type != "cpu":
                        return func(*args, **kwargs)
                    return answers[key]
                return func(*(to_cpu(a) for a in args), **{k: to_cpu(v) for k, v in kwargs.items()})

        cap = divmod(arch.capability, 10)
        props = SimpleNamespace(
            name=f"{arch.gpu} (compile report)",
            major=cap[0],
            minor=cap[1],
            multi_processor_count=arch.sm_count,
            shared_memory_per_block_optin=arch.smem_per_block,
            total_memory=80 << 30,
            warp_size=32,
        )
        self._mode = Mode()
        self._cuda_patches: dict[str, Callable[..., Any]] = {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "current_device": lambda: 0,
            "get_device_properties": lambda *a, **k: props,
            "get_device_capability": lambda *a, **k: cap,
            "get_device_name": lambda *a, **k: props.name,
        }
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> _AsCuda:
        import torch

        stack = contextlib.ExitStack()
        self._stacks.append(stack)
        for name, fn in self._cuda_patches.items():
            stack.callback(setattr, torch.cuda, name, getattr(torch.cuda, name))
            setattr(torch.cuda, name, fn)
        stack.enter_context(self._mode)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stacks.pop().close()


def _install_ops(arch: Arch, log: Callable[[str], None]) -> list[str]:
    """Force the ``triton`` backend of every op that has one, on CPU tensors; each call runs the Triton host
    code under :class:`_AsCuda` (recording its launches) and returns the PyTorch reference's result."""
    from ..ops import _dispatch

    _dispatch.register_availability("triton", lambda device_type: (True, "compile report: launches recorded"))
    _dispatch.set_backend("triton")
    as_cuda = _AsCuda(arch)
    wrapped = []
    for op in _dispatch.ops():
        try:
            fast = _dispatch.get_impl(op, "cpu", "triton")
        except (ValueError, RuntimeError):
            continue  # no Triton backend for this op
        try:
            ref: Callable[..., Any] | None = _dispatch.get_impl(op, "cpu", "torch")
        except (ValueError, RuntimeError):
            ref = None  # no reference: the op's (never written) outputs flow on
            log(f"op {op!r} has no torch reference: its outputs are left uninitialised")

        def run(*args: Any, _fast: Callable[..., Any] = fast, _ref: Any = ref, **kwargs: Any) -> Any:
            with as_cuda:
                out = _fast(*args, **kwargs)  # records the launches; their outputs are never written
            return out if _ref is None else _ref(*args, **kwargs)

        _dispatch.register(op, "triton", run)
        wrapped.append(op)
    log(f"ops on the recorded Triton backend: {', '.join(wrapped)}")
    return wrapped


@contextlib.contextmanager
def _recording(rec: _Recorder) -> Iterator[None]:
    """``JITFunction.run`` records instead of compiling and launching."""
    from triton.runtime import jit

    old = jit.JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        rec.record(self, args, grid, kwargs)
        return None

    jit.JITFunction.run = run
    try:
        yield
    finally:
        jit.JITFunction.run = old


class _Enough(Exception):
    """Stops a generation after a few decode steps (its buffers keep the full length)."""


class _StopAfter:
    """``on_step`` callback raising :class:`_Enough` after ``steps`` steps (None: never)."""

    def __init__(self, steps: int | None) -> None:
        self.steps, self.seen = steps, 0

    def __call__(self, out: Any, pos: int) -> None:
        self.seen += 1
        if self.steps is not None and self.seen >= self.steps:
            raise _Enough


def _scenarios(rec: _Recorder | None, dtype: str, log: Callable[[str], None], device: str = "cpu") -> None:
    """What users run at Dia-1.6B shapes (1 encoder + 1 decoder layer: launches are per layer alike), with
    the buffers a CUDA run uses (static engine: batch, length and text buckets). ``rec`` gets the scenario
    names; ``device="cuda"`` runs the same on a GPU (to compare the recording with real launches)."""
    import torch

    from .. import ops
    from ..api import DiaTTS
    from ..codec.dac import DacCodec
    from ..config import DiaConfig
    from ..generation.engine import DecodeEngine
    from ..generation.generate import generate_codes
    from ..generation.sampling import SamplingConfig
    from ..text import encode_batch, prompted_text

    cfg = DiaConfig.preset("dia-1.6b").with_layers(1, 1)
    tts = DiaTTS.random(cfg, device=device, dtype=dtype, codec=DacCodec.random("tiny").to(device))
    model, data = tts.model, cfg.data
    engine = DecodeEngine(model, static=True)  # CUDA's default (bucketed static buffers)
    gen = torch.Generator().manual_seed(0)  # prompts and codes
    draws = torch.Generator(device=device).manual_seed(0)  # sampling

    def prompt(frames: int) -> torch.Tensor:
        return torch.randint(0, cfg.codebook_size, (frames, data.channels), generator=gen)

    texts = [
        "[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts and voices.",
        "[S1] Wow. Amazing. (laughs) [S2] Try it now on Git hub or Hugging Face.",
        "[S1] The quick brown fox jumps over the lazy dog. [S2] And then it runs away!",
        "[S1] How fast can this go? [S2] Let us measure it, on the same weights, in the same process.",
    ] * 2
    greedy, sampled = SamplingConfig(do_sample=False), SamplingConfig()
    short = data.max_delay + 5  # runs to the forced EOS and the end of the delay pattern
    # (name, texts, prompts, sampling, max_new_tokens (None: the whole budget), steps before stopping)
    runs = [
        ("b1 greedy", texts[:1], [None], greedy, short, None),
        ("b1 sampled, 100-frame voice prompt", [prompted_text(texts[0], texts[1])], [prompt(100)], sampled, None, 2),
        ("b8 sampled", texts, [None] * 8, sampled, None, 2),
        ("b8 greedy, ragged prompts", texts, [prompt(40), None, prompt(24), None] * 2, greedy, None, 2),
        ("b16 sampled (one split per cross-attention head)", texts * 2, [None] * 16, sampled, None, 2),
    ]
    for name, batch_texts, prompts, sampling, max_new, stop_after in runs:
        if rec is not None:
            rec.scenario = name
        t0 = time.perf_counter()
        ids, mask = encode_batch(batch_texts, data.text_length)
        with contextlib.suppress(_Enough):  # the output is undelayed on the host (CPU tensors): no launch
            generate_codes(
                model,
                ids,
                mask,
                prompts=prompts,
                max_new_tokens=max_new,
                sampling=sampling,
                generator=None if sampling.greedy else draws,
                progress=False,
                on_step=_StopAfter(stop_after),
                engine=engine,
            )
        log(f"recorded {name!r} ({time.perf_counter() - t0:.1f} s)")
    # an int8 model whose GEMMs run dia_fast's Triton kernel (quantize.CUDA_INT8_KERNEL = "dia_fast"): its decode
    # steps, the logits head writing into the step's buffer
    from ..quantize import INT4_PARTS, PARTS, gemm_kinds, quantize_cuda

    name = "b2 greedy, int8 GEMMs on dia_fast's Triton kernel"
    if rec is not None:
        rec.scenario = name
    t0 = time.perf_counter()
    int8_model = copy.deepcopy(model)
    quantize_cuda(int8_model, gemm_kinds(int8_model, "int8", PARTS, INT4_PARTS), int8_kernel="dia_fast")
    ids, mask = encode_batch(texts[:2], data.text_length)
    with contextlib.suppress(_Enough):
        generate_codes(
            int8_model,
            ids,
            mask,
            max_new_tokens=short,
            sampling=greedy,
            progress=False,
            on_step=_StopAfter(2),
            engine=DecodeEngine(int8_model, static=True),
        )
    del int8_model
    log(f"recorded {name!r} ({time.perf_counter() - t0:.1f} s)")
    # continuous batching (dia_fast.serving.BatchEngine's step): a request admitted into slot 3 of 16, two steps
    # over the 16-slot bucket (per-slot settings, seeds and positions)
    from ..serving.slots import admit, allocate_slots, slot_step

    if rec is not None:
        rec.scenario = "continuous batching: slot step, 16 slots"
    t0 = time.perf_counter()
    slots = allocate_slots(model, 16, data.audio_length, data.text_length)
    ids, mask = encode_batch(texts[:1], data.text_length)
    with torch.inference_mode():
        admit(model, slots, 3, ids, mask, prompt(24), 100, 10, sampled, 1234)
        for _ in range(2):
            slot_step(model, slots.view(16))
    del slots
    log(f"recorded the slot step ({time.perf_counter() - t0:.1f} s)")
    # public ops on a whole [1, 3072, 9] sequence on the device (the generation delays its prompts and undelays
    # its output on the host; streaming undelays its chunks on the device)
    if rec is not None:
        rec.scenario = "ops: apply_delay / revert_delay / undelay_codes [1, 3072, 9]"
    codes = torch.randint(0, cfg.codebook_size, (1, data.audio_length, data.channels), generator=gen).to(device)
    delayed = ops.apply_delay(codes, data.delay_pattern, data.audio_bos_value, data.audio_pad_value)
    ops.revert_delay(delayed, data.delay_pattern)
    ops.undelay_codes(delayed, data.delay_pattern, cfg.codebook_size)
    # the weight-only int8 GEMMs of a decode step (Int8Linear on CUDA): QKV, down, gate/up, logits at 2, 16 and 64
    # activation rows (batch 1, 8 and 32 with CFG), and at 1024 (a prefill: 16 row blocks)
    if rec is not None:
        rec.scenario = "ops: int8_linear, Dia's decoder GEMMs, 2 / 16 / 64 / 1024 rows"
    for n, k in ((3072, 2048), (2048, 8192), (16384, 2048), (9252, 2048)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to(device)
        s = (torch.rand(n, generator=gen) * 0.01).to(device)
        for m in (2, 16, 64, 1024):
            ops.int8_linear(torch.randn(m, k, generator=gen).to(device=device, dtype=model.dtype), w, s)
    _edge_scenarios(rec, model.dtype, data, gen, device)


def _edge_scenarios(rec: _Recorder | None, dtype: Any, data: Any, gen: Any, device: str) -> None:
    """Supported configurations the generations above do not reach: the slot step at the larger ``max_slots``
    buckets (64 and 128 slots: more warps), fp32 decode attention at Dia's head dim (a model run in fp32) and
    prefill attention at head dim 256 in the model's dtype (another architecture)."""
    import torch

    from .. import ops

    if rec is not None:
        rec.scenario = "ops: slot_update, 32 / 64 / 128 slots"
    C, L = data.channels, data.audio_length
    delays = torch.tensor(data.delay_pattern, device=device)

    def per_slot(S: int, value: int | bool, dt: torch.dtype) -> torch.Tensor:
        return torch.full((S,), value, dtype=dt, device=device)

    for S in (32, 64, 128):
        ops.slot_update(
            torch.randint(0, 1024, (S, C), generator=gen).to(device),
            per_slot(S, 5, torch.long),
            per_slot(S, -1, torch.long),
            delays,
            per_slot(S, L - data.max_delay - 1, torch.long),
            per_slot(S, 0, torch.long),
            torch.full((S, L, C), -1, dtype=torch.long, device=device),
            torch.full((S, L, C), data.audio_pad_value, dtype=torch.long, device=device),
            per_slot(S, True, torch.bool),
            per_slot(S, False, torch.bool),
            per_slot(S, True, torch.bool),
            torch.zeros(2 * S, 1, C, dtype=torch.long, device=device),
            torch.zeros(2 * S, dtype=torch.long, device=device),
            eos_value=data.audio_eos_value,
            pad_value=data.audio_pad_value,
        )
    if rec is not None:
        rec.scenario = "ops: decode_attention fp32, head_dim 128, 3072 keys"
    q = torch.randn(2, 16, 1, 128, generator=gen).to(device)
    kv = torch.randn(2, 4, L, 128, generator=gen).to(device)
    ops.decode_attention(
        q,
        kv,
        kv,
        scale=0.088,
        kv_len=torch.tensor([L - 72], device=device),
        key_mask=torch.ones(2, L, dtype=torch.bool, device=device),
        semaphores=torch.zeros(8, dtype=torch.int32, device=device),
    )
    if rec is not None:
        rec.scenario = "ops: attention, head_dim 256, 300 causal steps"
    q = torch.randn(2, 16, 300, 256, generator=gen).to(device=device, dtype=dtype)
    kv = torch.randn(2, 4, 300, 256, generator=gen).to(device=device, dtype=dtype)
    ops.attention(q, kv, kv, scale=0.0625, causal=True, key_mask=torch.ones(2, 300, dtype=torch.bool, device=device))


def record_launches(arch: Arch, dtype: str = "bfloat16", log: Callable[[str], None] = print) -> list[Launch]:
    """Run the scenarios and return every Triton launch they made (call in a process whose Triton is not the
    interpreter; the ops' dispatch is left patched: use a process of its own)."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("Triton runs as the interpreter here (TRITON_INTERPRET=1): record in a child process")
    rec = _Recorder(arch)
    _install_ops(arch, log)
    with _recording(rec):
        _scenarios(rec, dtype, log)
    return rec.launches


# --- compiling ----------------------------------------------------------------------------------------------

_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(.*)")


def _ptxas_usage(ptx: str, arch: Arch, options: dict[str, Any]) -> dict[str, int]:
    """Registers, stack, spills and static shared memory of the kernel in ``ptx``, from ``ptxas -v`` run as
    Triton runs it (same ptxas, same flags)."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch.capability).path
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if knobs.compilation.disable_line_info:
        flags.append("-suppress-debug-info")
    if not options.get("enable_fp_fusion", True):
        flags.append("--fmad=false")
    if options.get("ptx_options"):
        flags += options["ptx_options"].split(" ")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, *flags, f"--gpu-name={arch.target_name}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = proc.stdout + proc.stderr
    props, used = _PTXAS_PROPS.search(log), _PTXAS_USED.search(log)
    if proc.returncode != 0 or props is None or used is None:
        raise RuntimeError(f"ptxas -v failed ({proc.returncode}): {log[-2000:]}")
    smem = re.search(r"(\d+) bytes smem", used.group(2))
    return {
        "registers": int(used.group(1)),
        "stack_bytes": int(props.group(1)),
        "spill_store_bytes": int(props.group(2)),
        "spill_load_bytes": int(props.group(3)),
        "shared_static_bytes": int(smem.group(1)) if smem else 0,
    }


def _cubin_registers(cubin: bytes) -> int | None:
    """Registers per thread of the kernel in Triton's own cubin (``cuobjdump --dump-resource-usage``), or None
    when cuobjdump is not available."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # no cuobjdump shipped with this Triton
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)", proc.stdout)
    return int(m.group(1)) if proc.returncode == 0 and m else None


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _describe(group: list[Launch], arch: Arch) -> dict[str, Any]:
    """The JSON row of one compile key (without the compile results)."""
    first = group[0]
    names = first.fn.arg_names
    declared = {p.name for p in first.fn.params if p.is_constexpr}
    consts = {names[path[0]]: _jsonable(v) for path, v in first.constexprs.items() if len(path) == 1}
    div16 = {names[path[0]] for path, a in first.attrs.items() if len(path) == 1 and ["tt.divisibility", 16] in a}
    runtime = {k: v for k, v in first.signature.items() if v != "constexpr"}
    return {
        "kernel": first.fn.fn.__name__,
        "module": first.fn.fn.__module__,
        "arch": arch.target_name,
        "gpu": f"{arch.gpu}, {arch.sm_count} SMs",
        "num_warps": first.options.num_warps,
        "num_stages": first.options.num_stages,
        "num_ctas": first.options.num_ctas,
        "constexprs": {k: v for k, v in consts.items() if k in declared},
        "equal_to_1": sorted(k for k in consts if k not in declared),
        "signature": runtime,
        "divisible_by_16": sorted(n for n in div16 if not runtime[n].startswith("*")),
        "aligned_16": sorted(n for n in div16 if runtime[n].startswith("*")),
        # runtime ints and pointers without the /16 attribute (floats are never specialised)
        "not_16": sorted(n for n, t in runtime.items() if n not in div16 and (t.startswith(("*", "i", "u")))),
        "grids": [list(g) for g in sorted({lg.grid for lg in group})],
        "launches": len(group),
        "scenarios": sorted({lg.scenario for lg in group}),
    }


def _compile(fn: Any, signature: dict, constexprs: dict, attrs: dict, options: dict, arch: Arch) -> dict[str, Any]:
    """``triton.compile`` to a cubin for ``arch`` (Triton's on-disk cache applies) and the kernel's resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch.capability, 32), options=options
        )
        usage = _ptxas_usage(kernel.asm["ptx"], arch, options)
        in_cubin = _cubin_registers(kernel.asm["cubin"])
    except Exception as exc:  # reported per kernel; the others still compile
        return {"compiled": False, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
    if in_cubin is not None and in_cubin != usage["registers"]:  # the rerun differs from Triton's cubin: trust that
        usage["registers"], usage["ptxas_rerun_registers"] = in_cubin, usage["registers"]
    dynamic = int(kernel.metadata.shared)
    return {
        "compiled": "cubin" in kernel.asm,
        "error": None,
        **usage,
        "shared_dynamic_bytes": dynamic,
        "shared_bytes": usage["shared_static_bytes"] + dynamic,
    }


def _compile_by_name(module: str, qualname: str, *args: Any) -> dict[str, Any]:
    """:func:`_compile` in a worker process: the kernel found again by its module and name."""
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return _compile(fn, *args)


def _findable(fn: Any) -> bool:
    try:
        found: Any = importlib.import_module(fn.fn.__module__)
        for part in fn.fn.__qualname__.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is fn


def build_report(
    launches: list[Launch], arch: Arch, jobs: int | None = None, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Deduplicate ``launches`` by compile key, compile each for ``arch`` and return the report rows.

    Compiles run in ``jobs`` worker processes (Triton's compiler holds the GIL), each kernel found again by
    its module and name; kernels defined elsewhere compile here."""
    groups: dict[str, list[Launch]] = {}
    for lg in launches:
        groups.setdefault(lg.key, []).append(lg)
    log(f"{len(launches)} launches, {len(groups)} distinct compiles for {arch.target_name}")
    t0 = time.perf_counter()
    firsts = {k: g[0] for k, g in groups.items()}
    tasks = {k: (lg.signature, lg.constexprs, lg.attrs, dict(lg.options.__dict__), arch) for k, lg in firsts.items()}
    remote = [k for k, lg in firsts.items() if _findable(lg.fn)]
    workers = min(max(1, jobs or os.cpu_count() or 1), len(remote))
    results: dict[str, dict[str, Any]] = {}
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # not fork: this process has torch's thread pools
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {
                k: pool.submit(_compile_by_name, firsts[k].fn.fn.__module__, firsts[k].fn.fn.__qualname__, *tasks[k])
                for k in remote
            }
            results = {k: f.result() for k, f in futures.items()}
    for k in groups:
        if k not in results:
            results[k] = _compile(firsts[k].fn, *tasks[k])
    log(f"compiled in {time.perf_counter() - t0:.1f} s ({workers} processes)")
    rows = [{**_describe(g, arch), **results[k]} for k, g in groups.items()]
    rows.sort(key=lambda r: (r["module"], r["kernel"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"]))
    return rows


# --- the public function (parent process) -------------------------------------------------------------------

_MEMO: dict[tuple[str, int, str], list[dict[str, Any]]] = {}


def compile_report(
    arch: str = "sm_90",
    *,
    sm_count: int | None = None,
    dtype: str = "bfloat16",
    jobs: int | None = None,
    verbose: bool = False,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Compile every Triton kernel launch of dia_fast's public code paths at Dia-1.6B shapes for ``arch``.

    ``arch``: ``"sm_80"``, ``"sm_86"``, ``"sm_89"``, ``"sm_90"`` (Hopper, compiled as ``sm_90a``), ``"sm_100"``,
    ``"sm_120"``; the host code sees that architecture's reference GPU (``sm_count`` overrides its SM count,
    which sets the KV split counts). ``dtype``: the model's dtype. Needs no GPU; runs in a child process
    (Triton must not be the interpreter there), so the caller's Triton and ops dispatch are untouched.
    Results are memoised per process. ``jobs``: parallel compiles (default: CPU count).

    Returns one dict per distinct compile (kernel, constexprs, ``num_warps``, ``num_stages``, the
    specialisation: ``equal_to_1``, ``divisible_by_16``, ``aligned_16``), with the recorded ``grids``,
    ``scenarios``, ``launches``, and ``compiled``, ``error``, ``registers``, ``spill_store_bytes``,
    ``spill_load_bytes``, ``stack_bytes``, ``shared_static_bytes``, ``shared_dynamic_bytes``,
    ``shared_bytes`` (static + dynamic, per block), ``smem_limit_bytes`` (the GPU's per-block maximum).
    """
    target = parse_arch(arch, sm_count)
    memo_key = (target.name, target.sm_count, dtype)
    if memo_key not in _MEMO:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the dia_fast package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "dia_fast.bench.compile_report", "--arch", target.name, "--dtype", dtype]
            cmd += ["--sm-count", str(target.sm_count), "--child-out", str(out)]
            if jobs is not None:
                cmd += ["--jobs", str(jobs)]
            proc = subprocess.run(
                cmd, env=env, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, timeout=timeout
            )
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stderr or b"").decode(errors="replace")[-6000:]
                raise RuntimeError(f"the compile report's child process failed ({proc.returncode}):\n{tail}")
            rows = json.loads(out.read_text())
        for r in rows:
            r["smem_limit_bytes"] = target.smem_per_block
        _MEMO[memo_key] = rows
    return copy.deepcopy(_MEMO[memo_key])


def _fmt_config(r: dict[str, Any]) -> str:
    consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
    return f"{consts} w{r['num_warps']} s{r['num_stages']}"


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the report, one line per compiled configuration."""
    head = ["kernel", "config (constexprs, warps, stages)", "=1", "not /16", "grid", "regs", "spill st/ld", "smem"]
    head.append("ok")
    lines = [head]
    for r in rows:
        grids = " ".join("x".join(map(str, g)) for g in r["grids"][:3]) + (" ..." if len(r["grids"]) > 3 else "")
        if r["compiled"]:
            use = [str(r["registers"]), f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"]
            use.append(f"{r['shared_static_bytes']}+{r['shared_dynamic_bytes']}")
            spills = r["spill_store_bytes"] or r["spill_load_bytes"]
            ok = "ok" if r["shared_bytes"] <= r["smem_limit_bytes"] and not spills else "CHECK"
        else:
            use, ok = ["-", "-", "-"], "FAILED"
        spec = [",".join(r["equal_to_1"]) or "-", ",".join(r["not_16"]) or "-"]
        lines.append([r["kernel"], _fmt_config(r), *spec, grids, *use, ok])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _child(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[compile-report {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    arch = parse_arch(args.arch, args.sm_count)
    launches = record_launches(arch, args.dtype, log)
    rows = build_report(launches, arch, args.jobs, log)
    Path(args.child_out).write_text(json.dumps(rows, indent=1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of :func:`main`, checked before any compile (one-line errors, exit 2)."""
    p = OneLineParser(
        error_prefix="dia_fast.bench",
        prog="python -m dia_fast.bench --compile-report",
        description="Registers, spills and shared memory of every Triton kernel dia_fast launches at Dia-1.6B "
        "shapes, compiled for a GPU architecture (no GPU needed).",
    )
    p.add_argument("--compile-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="sm_90", help=f"{' | '.join(ARCHS)} (default sm_90, compiled as sm_90a)")
    p.add_argument("--sm-count", type=int, default=None, help="SMs of the GPU the host code sees (default: the arch's)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--json", dest="json_path", default=None, help="write the per-kernel rows as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.add_argument("--strict", action="store_true", help="exit 1 if a kernel fails, spills or exceeds shared memory")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.json_path is not None:  # checked before the compiles; ~ expanded once, here
        a.json_path = str(Path(a.json_path).expanduser())
        if problem := unwritable_file("--json", Path(a.json_path), "compile_report.json"):
            p.error(problem)
    return a


def main(argv: list[str] | None = None) -> int:
    """``python -m dia_fast.bench --compile-report [--arch sm_90] [--json F] [--quiet] [--strict]`` (also
    ``python -m dia_fast.bench.compile_report``): print the table, write the rows as JSON. Exit status 2 on
    a bad option or a failed recording; with ``--strict``, 1 when a kernel fails, spills or exceeds the
    shared memory per block."""
    a = parse_args(argv)
    try:
        if a.child_out:
            return _child(a)
        rows = compile_report(a.arch, sm_count=a.sm_count, dtype=a.dtype, jobs=a.jobs, verbose=not a.quiet)
    except (ValueError, RuntimeError) as exc:
        print(f"dia_fast.bench: error: {exc}", file=sys.stderr)
        return 2
    if a.json_path:
        from .report import write_json

        write_json(a.json_path, rows, indent=1)
    bad = [r for r in rows if not r["compiled"] or r["spill_store_bytes"] or r["spill_load_bytes"]]
    bad += [r for r in rows if r["compiled"] and r["shared_bytes"] > r["smem_limit_bytes"]]
    if not a.quiet:
        print(table(rows))
        print(f"{len(rows)} compiles, {len(bad)} failing, spilling or over the shared-memory limit")
    return 1 if a.strict and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
