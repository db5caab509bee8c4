"""Metal backend for Apple GPUs (``mps``): shaders in ``kernels/*.metal``, compiled at run time.

The shader sources ship inside the package (``dia_fast/kernels``; in a source checkout they are
read from ``<repo>/kernels``) and are compiled once, on first use, with
``torch.mps.compile_shader``. Each launch goes through :func:`_launch`, which checks the Python
arguments against :data:`SIGNATURES` (the kernels' argument lists, which
``tests/test_metal_sources.py`` checks against the shader sources on any platform): tensors are
bound as ``device`` buffers in argument order, Python ints as ``constant long&`` and floats as
``constant float&``.

Ops: delay / revert / undelay on int64 codes, decode attention on f16 caches and the CFG sampling
step on float32 logits. Inputs a kernel does not cover (other dtypes, too large a vocabulary,
head dims over 256) run the PyTorch reference instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import reference

__all__ = ["SIGNATURES", "SOURCES", "available", "kernel_dir", "load_sources"]

# Shader files, in the order they are concatenated into one library.
SOURCES = ("delay.metal", "decode_attention.metal", "cfg_sample.metal")

# The kernels' argument lists: (type, name) per bound argument, in buffer order, as written in
# the .metal sources (address space and const included), then the builtin thread-position
# arguments as (attribute, name). Threads per group for the group-based kernels.
SIGNATURES: dict[str, dict[str, Any]] = {
    "dia_apply_delay": {
        "args": [
            ("device const long*", "codes"),
            ("device long*", "out"),
            ("device const long*", "delays"),
            ("constant long&", "n"),
            ("constant long&", "T"),
            ("constant long&", "C"),
            ("constant long&", "bos"),
            ("constant long&", "pad"),
        ],
        "builtins": [("thread_position_in_grid", "gid")],
    },
    "dia_revert_delay": {
        "args": [
            ("device const long*", "codes"),
            ("device long*", "out"),
            ("device const long*", "delays"),
            ("constant long&", "n"),
            ("constant long&", "T"),
            ("constant long&", "C"),
        ],
        "builtins": [("thread_position_in_grid", "gid")],
    },
    "dia_undelay_codes": {
        "args": [
            ("device const long*", "codes"),
            ("device long*", "out"),
            ("device const long*", "delays"),
            ("constant long&", "n"),
            ("constant long&", "T"),
            ("constant long&", "C"),
            ("constant long&", "T_out"),
            ("constant long&", "codebook_size"),
        ],
        "builtins": [("thread_position_in_grid", "gid")],
    },
    "dia_decode_attention_f16": {
        "args": [
            ("device const half*", "q"),
            ("device const half*", "k_cache"),
            ("device const half*", "v_cache"),
            ("device const uchar*", "mask"),
            ("device half*", "out"),
            ("constant long&", "Hq"),
            ("constant long&", "Hkv"),
            ("constant long&", "L"),
            ("constant long&", "D"),
            ("constant float&", "scale"),
        ],
        "builtins": [("threadgroup_position_in_grid", "group"), ("thread_position_in_threadgroup", "tid")],
        "group_size": 256,
        "defines": {"DIA_ATTN_GROUP": 256, "DIA_ATTN_MAX_DIM": 256},
    },
    "dia_cfg_sample_f32": {
        "args": [
            ("device const float*", "cond"),
            ("device const float*", "uncond"),
            ("device const float*", "uniforms"),
            ("device long*", "out"),
            ("constant long&", "C"),
            ("constant long&", "V"),
            ("constant long&", "top_k"),
            ("constant long&", "eos_id"),
            ("constant long&", "greedy"),
            ("constant float&", "cfg_scale"),
            ("constant float&", "temperature"),
            ("constant float&", "top_p"),
        ],
        "builtins": [("threadgroup_position_in_grid", "row"), ("thread_position_in_threadgroup", "tid")],
        "group_size": 256,
        "defines": {"DIA_SAMPLE_GROUP": 256, "DIA_SAMPLE_MAX_VOCAB": 2048},
    },
}

ATTN_GROUP = SIGNATURES["dia_decode_attention_f16"]["group_size"]
ATTN_MAX_DIM = SIGNATURES["dia_decode_attention_f16"]["defines"]["DIA_ATTN_MAX_DIM"]
SAMPLE_GROUP = SIGNATURES["dia_cfg_sample_f32"]["group_size"]
SAMPLE_MAX_VOCAB = SIGNATURES["dia_cfg_sample_f32"]["defines"]["DIA_SAMPLE_MAX_VOCAB"]

# Metal pointee type -> the torch dtype a tensor bound there must have.
BUFFER_DTYPES = {"long": torch.int64, "half": torch.float16, "float": torch.float32, "uchar": torch.uint8}


def kernel_dir() -> Path | None:
    """Where the .metal sources are: ``dia_fast/kernels`` (installed) or ``<repo>/kernels``."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "kernels", here.parents[2] / "kernels"):
        if all((d / name).is_file() for name in SOURCES):
            return d
    return None


def load_sources() -> str:
    """All shader sources concatenated into one library source (raises FileNotFoundError)."""
    d = kernel_dir()
    if d is None:
        raise FileNotFoundError(f"Metal sources {SOURCES} not found next to dia_fast or in the source tree")
    return "\n".join((d / name).read_text() for name in SOURCES)


@functools.lru_cache(maxsize=1)
def _library() -> Any:
    return torch.mps.compile_shader(load_sources())


@functools.lru_cache(maxsize=1)
def _built() -> tuple[bool, str]:
    """Compiles the library and builds every kernel's pipeline once (a failure is cached too, not retried per
    check): torch builds a pipeline, and checks the group size against it, only at a kernel's first launch, which
    would otherwise fail inside a decode loop instead of making the backend unavailable."""
    try:
        lib = _library()
        for name, sig in SIGNATURES.items():
            fn = getattr(lib, name)
            most = getattr(fn, "max_threads_per_threadgroup", None)
            group = sig.get("group_size")
            if group is not None and most is not None and int(most) < group:
                return False, f"{name} needs {group} threads per threadgroup, this GPU allows {most} for it"
    except Exception as exc:  # a shader that fails to compile must not break the package
        return False, f"shader compilation failed: {type(exc).__name__}: {exc}"
    return True, "Metal kernels compiled"


def available() -> tuple[bool, str]:
    """(available, reason) for the Metal kernels on this machine (compiles them on first call)."""
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return False, "no Apple GPU (torch.backends.mps.is_available() is False)"
    if not hasattr(torch.mps, "compile_shader"):
        return False, f"torch {torch.__version__} has no torch.mps.compile_shader"
    if kernel_dir() is None:
        return False, "the .metal sources are not installed"
    return _built()


def _check_arg(kernel: str, i: int, ctype: str, name: str, value: Any) -> None:
    where = f"{kernel} argument {i} ({ctype} {name})"
    if ctype.startswith("device "):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor, got {type(value).__name__}")
        want = BUFFER_DTYPES[ctype.rstrip("*").split()[-1]]
        if value.dtype != want:
            raise TypeError(f"{where}: expected {want}, got {value.dtype}")
        if not value.is_contiguous():
            raise ValueError(f"{where}: must be contiguous")
    elif ctype == "constant long&":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected a Python int, got {type(value).__name__}")
    elif ctype == "constant float&":
        if not isinstance(value, float):
            raise TypeError(f"{where}: expected a Python float, got {type(value).__name__}")
    else:
        raise TypeError(f"{where}: unsupported argument type")


def _launch(kernel: str, *args: Any, threads: int, group_size: int | None = None) -> None:
    """Check ``args`` against ``SIGNATURES[kernel]`` and run the kernel on ``threads`` threads."""
    sig = SIGNATURES[kernel]["args"]
    if len(args) != len(sig):
        raise TypeError(f"{kernel} takes {len(sig)} arguments, got {len(args)}")
    for i, ((ctype, name), value) in enumerate(zip(sig, args, strict=True)):
        _check_arg(kernel, i, ctype, name, value)
    if threads == 0:
        return
    fn = getattr(_library(), kernel)
    if group_size is None:
        fn(*args, threads=threads)
    else:
        fn(*args, threads=threads, group_size=group_size)


def _delays(delay_pattern: Sequence[int] | torch.Tensor, C: int, device: torch.device) -> torch.Tensor:
    return reference._delays(delay_pattern, C, torch.device("cpu")).to(device).contiguous()


def apply_delay(
    codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, bos_value: int, pad_value: int
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.apply_delay` as a Metal kernel (int64 codes)."""
    if codes.ndim != 3 or codes.dtype != torch.int64:
        return reference.apply_delay(codes, delay_pattern, bos_value, pad_value)
    B, T, C = codes.shape
    codes = codes.contiguous()
    out = torch.empty_like(codes)
    n = B * T * C
    _launch("dia_apply_delay", codes, out, _delays(delay_pattern, C, codes.device), n, T, C,
            int(bos_value), int(pad_value), threads=n)  # fmt: skip
    return out


def revert_delay(codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.revert_delay` as a Metal kernel (int64 codes)."""
    if codes.ndim != 3 or codes.dtype != torch.int64:
        return reference.revert_delay(codes, delay_pattern)
    B, T, C = codes.shape
    codes = codes.contiguous()
    out = torch.empty_like(codes)
    n = B * T * C
    _launch("dia_revert_delay", codes, out, _delays(delay_pattern, C, codes.device), n, T, C, threads=n)
    return out


def undelay_codes(
    delayed: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, codebook_size: int = 1024
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.undelay_codes` as a Metal kernel (int64 codes)."""
    if delayed.ndim != 3 or delayed.dtype != torch.int64:
        return reference.undelay_codes(delayed, delay_pattern, codebook_size)
    B, T, C = delayed.shape
    delays = _delays(delay_pattern, C, delayed.device)
    t_out = max(T - (int(delays.max()) if C else 0), 0)
    out = torch.empty((B, t_out, C), dtype=torch.int64, device=delayed.device)
    n = B * t_out * C
    _launch("dia_undelay_codes", delayed.contiguous(), out, delays, n, T, C, t_out, int(codebook_size), threads=n)
    return out


def _attend_mask(
    B: int, L: int, kv_len: torch.Tensor | int | None, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The reference's decode key mask as the kernel's contiguous uchar [B, L] buffer."""
    if key_mask is not None:
        key_mask = key_mask.to(device=device)
    mask = reference.decode_key_mask(B, L, kv_len, key_mask, device)
    if mask is None:
        return torch.ones(B, L, dtype=torch.uint8, device=device)
    return mask.expand(B, L).to(torch.uint8).contiguous()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float = 1.0,
    kv_len: torch.Tensor | int | None = None,
    key_mask: torch.Tensor | None = None,
    semaphores: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.decode_attention` as a Metal kernel (f16, head dim <= 256; one launch,
    no split, so ``semaphores`` is unused)."""
    B, Hq, Tq, D = q.shape
    Bk, Hkv, L, Dk = k_cache.shape
    ok = (
        Tq == 1
        and (Bk, Dk) == (B, D)  # the kernel indexes the caches with q's batch and head dim
        and q.dtype == k_cache.dtype == v_cache.dtype == torch.float16
        and D <= ATTN_MAX_DIM
        and Hq % Hkv == 0
        and v_cache.shape == k_cache.shape
    )
    if not ok:
        return reference.decode_attention(q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_mask=key_mask)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    mask = _attend_mask(B, L, kv_len, key_mask, q.device)
    _launch("dia_decode_attention_f16", q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), mask, out,
            Hq, Hkv, L, D, float(scale), threads=B * Hq * ATTN_GROUP, group_size=ATTN_GROUP)  # fmt: skip
    return out


def cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: reference.Param = 3.0,
    temperature: reference.Param = 1.2,
    top_p: reference.Param = 0.95,
    top_k: int | None | torch.Tensor = 45,
    eos_id: int = 1024,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    allow_eos: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.cfg_sample` as a Metal kernel (logits upcast to float32).

    Greedy mode picks the reference's codes (up to float rounding of the guided logits). Sampling
    inverts the CDF of the filtered distribution with one ``torch.rand`` uniform per row drawn
    from ``generator`` on the device: same distribution, reproducible, not ``torch.multinomial``'s
    draws. Settings given as tensors (per row, as every decode step passes them), seeded draws (``seed``) and
    ``allow_eos`` run the reference, which reads nothing back to the host: the kernel would need the settings on
    the host, and each read waits for the GPU.
    """
    B, C, V = cond.shape
    settings = (cfg_scale, temperature, top_p, top_k)
    on_device = allow_eos is not None or any(isinstance(x, torch.Tensor) for x in settings)
    shape_ok = V <= SAMPLE_MAX_VOCAB and cond.shape == uncond.shape
    hp = reference.host_params(*settings) if shape_ok and not on_device else None
    greedy = (not do_sample) or (hp is not None and not hp.temperature > 0)  # (as the reference: T <= 0, NaN)
    if hp is None or (not greedy and seed is not None):
        return reference.cfg_sample(cond, uncond, cfg_scale=cfg_scale, temperature=temperature, top_p=top_p,
                                    top_k=top_k, eos_id=eos_id, do_sample=do_sample, generator=generator,
                                    seed=seed, offset=offset, allow_eos=allow_eos)  # fmt: skip
    if not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    if hp.top_k <= 0:  # no CFG filter: the guided logits are sampled (the kernel then reads cond only)
        cond = uncond = reference.guided_logits(cond, uncond, hp.cfg_scale)
    c = cond.float().contiguous()
    u = uncond.float().contiguous()
    uniforms = (
        torch.zeros(B * C, device=cond.device)
        if greedy
        else torch.rand(B * C, generator=generator, device=cond.device, dtype=torch.float32)
    )
    out = torch.empty((B, C), dtype=torch.int64, device=cond.device)
    _launch("dia_cfg_sample_f32", c, u, uniforms, out, C, V, max(hp.top_k, 0), int(eos_id), int(greedy),
            hp.cfg_scale, hp.temperature, max(hp.top_p, 0.0), threads=B * C * SAMPLE_GROUP,
            group_size=SAMPLE_GROUP)  # fmt: skip
    return out
