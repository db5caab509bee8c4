"""C++ CPU backend: thin wrappers that call ``dia_fast._C`` on CPU tensors' memory.

The extension never links libtorch. The wrappers of the delay ops, the unseeded sampler and the PCM conversion
hand it numpy views (``Tensor.numpy()`` shares memory, no copy), which the extension checks. The ops a decode
step calls (the int8 GEMM, the layer ops, the seeded sampler, the step's bookkeeping) run ~30 times per step,
where four torch calls per converted tensor cost more than most of the ops: those wrappers check the tensors here
(device, dtype, shape, strides) and hand the extension their addresses and sizes (csrc/module.cpp). Every output
is allocated here. Inputs the kernels do not cover (other dtypes, non-CPU tensors, tensors that need grad, odd
layouts) run the PyTorch reference instead, so a wrapper is always safe to call. The semantics are those of
:mod:`dia_fast.ops.reference`; ``cfg_sample`` differs only in where its random numbers come from (see its
docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .. import _ext
from . import cpu_graph, reference

__all__ = [
    "add_rmsnorm",
    "apply_delay",
    "cfg_sample",
    "decode_attention",
    "embed_codes",
    "int4_linear",
    "int8_linear",
    "revert_delay",
    "rope_kv_write",
    "slot_update",
    "step_update",
    "swiglu",
    "undelay_codes",
]

_CODE_DTYPES = (torch.int64, torch.int32)


class _Recording:
    """The extension, logging each call into this thread's CPU graph capture (:mod:`dia_fast.ops.cpu_graph`)."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._lib, name)

        def call(*args: Any) -> Any:
            result = fn(*args)
            cpu_graph.record_kernel(fn, args, result)
            return result

        return call


class _Observed:
    """The extension, telling the observers (:func:`observe_calls`) the name of each kernel it runs."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        for observer in _observers:
            observer(name)
        return getattr(self._lib, name)


# told the name of every kernel call (dia_fast.bench.launches counts them); empty: no overhead but one check
_observers: list[Callable[[str], None]] = []


@contextlib.contextmanager
def observe_calls(observer: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, ``observer(name)`` is called for every kernel the extension runs (any thread)."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _lib() -> Any:
    lib = _ext.module()  # raises RuntimeError with the reason when the extension is not loaded
    if cpu_graph.capturing():
        return _Recording(lib)
    return _Observed(lib) if _observers else lib


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _delays_np(delay_pattern: Sequence[int] | torch.Tensor, n_channels: int) -> np.ndarray:
    # reference._delays validates (count, non-negative) with the reference's error messages
    return _np(reference._delays(delay_pattern, n_channels, torch.device("cpu")).contiguous())


def _codes_ok(codes: torch.Tensor) -> bool:
    return codes.device.type == "cpu" and codes.ndim == 3 and codes.dtype in _CODE_DTYPES


def apply_delay(
    codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, bos_value: int, pad_value: int
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.apply_delay` in C++ (int32 / int64 codes on the CPU)."""
    if not _codes_ok(codes) or not reference.fits_dtype(codes.dtype, bos_value, pad_value):  # (the reference's error)
        return reference.apply_delay(codes, delay_pattern, bos_value, pad_value)
    codes = codes.contiguous()
    delays = _delays_np(delay_pattern, codes.shape[2])
    out = torch.empty_like(codes)
    _lib().apply_delay(_np(codes), delays, int(bos_value), int(pad_value), _np(out))
    return out


def revert_delay(codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.revert_delay` in C++ (int32 / int64 codes on the CPU)."""
    if not _codes_ok(codes):
        return reference.revert_delay(codes, delay_pattern)
    codes = codes.contiguous()
    delays = _delays_np(delay_pattern, codes.shape[2])
    out = torch.empty_like(codes)
    _lib().revert_delay(_np(codes), delays, _np(out))
    return out


def undelay_codes(
    delayed: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, codebook_size: int = 1024
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.undelay_codes` in C++ (int32 / int64 codes on the CPU)."""
    if not _codes_ok(delayed):
        return reference.undelay_codes(delayed, delay_pattern, codebook_size)
    delayed = delayed.contiguous()
    B, T, C = delayed.shape
    delays = _delays_np(delay_pattern, C)
    max_delay = int(delays.max()) if C else 0
    out = torch.empty((B, max(T - max_delay, 0), C), dtype=torch.long)
    _lib().undelay_codes(_np(delayed), delays, int(codebook_size), _np(out))
    return out


def _logits_view(x: torch.Tensor) -> torch.Tensor:
    x = x.float()  # (read through its address or a numpy view of it: nothing records a graph)
    return x if x.stride(-1) == 1 else x.contiguous()


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
    """:func:`dia_fast.ops.reference.cfg_sample` in C++ for CPU logits [B, C, V].

    Greedy rows return exactly the reference's codes. Seeded draws (``seed``; what decode steps use), any
    per-row settings and ``allow_eos``: the reference's seeded Gumbel-max draw with its Philox noise
    (``cfg_sample_rows``; the nucleus is computed in double precision, so a row whose top-p boundary falls
    within rounding of the reference's can keep one id more or less). Without ``seed``: one uniform per row
    from ``generator`` (``torch.rand``) drives an inverse-CDF walk of the filtered distribution in ascending id
    order: the reference's distribution, reproducible with a seeded generator, but not the draws
    ``torch.multinomial`` would make.
    """
    if cond.device.type != "cpu" or cond.ndim != 3 or cond.shape != uncond.shape:
        return reference.cfg_sample(
            cond,
            uncond,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=eos_id,
            do_sample=do_sample,
            generator=generator,
            seed=seed,
            offset=offset,
            allow_eos=allow_eos,
        )
    B, C, V = cond.shape
    if not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    out = torch.empty((B, C), dtype=torch.long)
    if out.numel() == 0:  # nothing to sample (an empty array's strides would fail the kernel's layout checks)
        return out
    if seed is not None:  # a decode step's call: the per-row kernel, no settings read on the host
        greedy, hp = not do_sample, None
    else:
        hp = reference.host_params(cfg_scale, temperature, top_p, top_k)
        greedy = not do_sample or (hp is not None and not hp.temperature > 0)  # as the reference: T <= 0 is greedy
    if seed is not None or greedy or hp is None or allow_eos is not None:
        if seed is None:  # keys for the sampled rows (a greedy call draws nothing from the generator)
            seed = torch.zeros(B, dtype=torch.long) if greedy else torch.randint(0, 2**62, (B,), generator=generator)
        return _sample_rows(cond, uncond, out, cfg_scale, 0.0 if not do_sample else temperature, top_p, top_k,
                            seed, offset, allow_eos, eos_id)  # fmt: skip
    if hp.top_k <= 0:  # no CFG filter: the guided logits are sampled (the kernel then reads cond only)
        cond = uncond = reference.guided_logits(cond, uncond, hp.cfg_scale)
    c, u = _logits_view(cond), _logits_view(uncond)
    uniforms = _np(torch.rand(B * C, generator=generator, dtype=torch.float32))
    k = max(hp.top_k, 0)
    _lib().cfg_sample(_np(c), _np(u), _np(out), hp.cfg_scale, hp.temperature, hp.top_p, k, int(eos_id), uniforms)
    return out


def _row_values(value: reference.Param, B: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A per-row setting as a contiguous [B] CPU tensor of ``dtype`` (the step's buffers as they are; anything else
    through the reference's :func:`~dia_fast.ops.reference.row_param`, with its checks)."""
    if (
        isinstance(value, torch.Tensor)
        and value.dtype == dtype
        and value.shape == (B,)
        and value.device.type == "cpu"
        and value.is_contiguous()
    ):
        return value
    return reference.row_param(value, B, dtype, torch.device("cpu"), name).contiguous()


def _sample_rows(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    out: torch.Tensor,
    cfg_scale: reference.Param,
    temperature: reference.Param,
    top_p: reference.Param,
    top_k: int | None | torch.Tensor,
    seed: torch.Tensor | None,
    offset: int | torch.Tensor,
    allow_eos: torch.Tensor | None,
    eos_id: int,
) -> torch.Tensor:
    """The per-row, seeded kernel (called with the addresses of the tensors checked here: csrc/module.cpp)."""
    B, C, V = cond.shape
    c, u = _logits_view(cond), _logits_view(uncond)
    if min(c.stride()) < 0 or min(u.stride()) < 0:
        c, u = c.contiguous(), u.contiguous()
    rows = [
        _row_values(cfg_scale, B, torch.float32, "cfg_scale"),
        _row_values(temperature, B, torch.float32, "temperature"),
        _row_values(top_p, B, torch.float32, "top_p"),
        _row_values(reference.top_k_arg(top_k), B, torch.int64, "top_k"),
        _row_values(seed, B, torch.int64, "seed"),
        _row_values(offset, B, torch.int64, "offset"),
    ]
    allow = None if allow_eos is None else _row_values(allow_eos.to(torch.bool), B, torch.bool, "allow_eos")
    if B * C:
        _lib().cfg_sample_rows(
            c.data_ptr(), u.data_ptr(), B, C, V, c.stride(0), c.stride(1), u.stride(0), u.stride(1), out.data_ptr(),
            *(t.data_ptr() for t in rows), 0 if allow is None else allow.data_ptr(), int(eos_id),
        )  # fmt: skip
    return out


def _best_isa() -> int:
    global _BEST_ISA
    if _BEST_ISA < 0:
        _BEST_ISA = int(_lib().int8_linear_best_isa())
    return _BEST_ISA


_BEST_ISA = -1


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None, isa: int = -1
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.int8_linear` in C++ for float32 CPU activations (others: the reference).

    Each row of ``x`` is rounded to 16-bit integers against its own max |x| inside the kernel (relative error
    at most 2^-16 of that max, also for tiny and subnormal rows) and the products are summed exactly in integers,
    then scaled by ``scale``, then by the row's scale (finite wherever the result is), so the result differs from
    the reference's fp32 sum by about 3e-5 of the output's scale (csrc/linear.cpp). Rows holding NaN or inf are
    computed in fp32. K = 0 gives zeros. ``out``: as in the reference (an fp32 CPU tensor of the result's shape;
    written directly when it is contiguous, else copied into). ``isa``: -1 the best this CPU runs, 0 portable,
    1 AVX2, 2 AVX-512, 3 AVX-512 VNNI (tests).
    """
    if not _weight_only_args(x, weight, torch.int8, scale):
        return reference.int8_linear(x, weight, scale, out=out)
    N, K = weight.shape
    if scale.shape != (N,) or x.shape[-1] != K:
        return reference.int8_linear(x, weight, scale, out=out)  # raises its error

    def call(x_ptr: int, M: int, w_ptr: int, s_ptr: int, y_ptr: int, kernel_isa: int) -> None:
        _lib().int8_linear(x_ptr, M, K, w_ptr, s_ptr, N, y_ptr, kernel_isa)

    return _weight_only_gemm(x, weight, scale, out, isa, N, call, reference.int8_linear)


def int4_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None, isa: int = -1
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.int4_linear` in C++ for float32 CPU activations (others: the reference).

    As :func:`int8_linear`: each row of ``x`` is rounded to 16-bit integers against its max |x|, each group's
    products are summed exactly in integers (in chunks of 8192 columns for larger groups), then scaled in fp32
    (about 3e-5 of the output's scale from the reference). K and the group must be multiples of 64 (the
    reference's error otherwise, as on every backend)."""
    if not _weight_only_args(x, weight, torch.uint8, scale) or scale.ndim != 2 or scale.shape[0] != weight.shape[0]:
        return reference.int4_linear(x, weight, scale, out=out)
    N, K, groups = weight.shape[0], 2 * weight.shape[1], scale.shape[1]
    if x.shape[-1] != K or groups == 0 or K % groups or (K // groups) % reference.INT4_BLOCK:
        return reference.int4_linear(x, weight, scale, out=out)  # raises its error

    def call(x_ptr: int, M: int, w_ptr: int, s_ptr: int, y_ptr: int, kernel_isa: int) -> None:
        _lib().int4_linear(x_ptr, M, K, w_ptr, s_ptr, K // groups, N, y_ptr, kernel_isa)

    return _weight_only_gemm(x, weight, scale, out, isa, N, call, reference.int4_linear)


def _weight_only_args(x: torch.Tensor, weight: torch.Tensor, wdtype: torch.dtype, scale: torch.Tensor) -> bool:
    """fp32 CPU activations that need no grad, 2-D CPU weights of ``wdtype`` and fp32 CPU scales."""
    return (
        _cpu_f32(x)
        and not x.requires_grad
        and weight.dtype == wdtype
        and weight.device.type == "cpu"
        and weight.ndim == 2
        and _cpu_f32(scale)
    )


def _weight_only_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor | None,
    isa: int,
    N: int,
    call: Callable[[int, int, int, int, int, int], None],
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The int8 and int4 wrappers' common part, once the weights are checked: the ISA, the output (written directly
    when ``out`` is a contiguous fp32 CPU tensor of the result's shape, else copied into it) and the kernel call
    ``call(x, M, w, scale, y, isa)`` with addresses."""
    best = _best_isa()
    if isa > best:
        raise ValueError(f"isa {isa} is not supported by this CPU (best: {best})")
    shape = (*x.shape[:-1], N)
    if out is not None and (out.shape != shape or out.dtype != _F32 or out.device.type != "cpu"):
        return fallback(x, weight, scale, out=out)  # says why it cannot (or copies to the device)
    x2 = x.contiguous()  # read through its address: no autograd here (x.requires_grad ran the reference)
    w, s = weight.contiguous(), scale.contiguous()
    # written directly only when out shares no storage with x: the kernel re-reads x's non-finite rows after it wrote
    # out's (an in-place out=x would read its own output there)
    direct = (
        out is not None and out.is_contiguous() and out.untyped_storage().data_ptr() != x2.untyped_storage().data_ptr()
    )
    y = out if direct else torch.empty(shape, dtype=_F32)
    K = x.shape[-1]
    M = x2.numel() // K if K else 0
    if M and N:
        call(x2.data_ptr(), M, w.data_ptr(), s.data_ptr(), y.data_ptr(), best if isa < 0 else isa)
    elif K == 0:
        y.zero_()  # no columns: empty sums (the kernel is not called)
    return out.copy_(y) if out is not None and not direct else y


# --- the fp32 layer ops of a decode step (csrc/rowwise.cpp, csrc/attention.cpp) -------------------------------
#
# These call the extension with the addresses of tensors (csrc/module.cpp: converting each to a numpy array cost
# more than the op on a busy CPU), so every wrapper checks here what the kernel will read and write: CPU, fp32
# (int64 codes and positions, bool masks), the shapes, the strides the kernel assumes, and outputs it allocates
# itself. Anything else runs the reference.

_F32 = torch.float32


def _cpu_f32(t: torch.Tensor) -> bool:
    return t.dtype == _F32 and t.device.type == "cpu"


def _no_grad(*tensors: torch.Tensor) -> bool:
    """Autograd needs none of them (the kernels record no graph)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def add_rmsnorm(
    residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dia_fast.ops.reference.add_rmsnorm` in C++ for fp32 CPU tensors (one pass per row; the sum of
    squares in another order than PyTorch's, so results agree to rounding)."""
    D = residual.shape[-1]
    inputs = (residual, weight) if delta is None else (residual, weight, delta)
    if (
        not all(_cpu_f32(t) for t in inputs)
        or weight.shape != (D,)
        or (delta is not None and delta.shape != residual.shape)
        or not _no_grad(*inputs)
    ):
        return reference.add_rmsnorm(residual, delta, weight, eps)
    r = residual.contiguous()
    w = weight.contiguous()
    normed = torch.empty(residual.shape, dtype=_F32)
    if delta is None:
        h, d_ptr, h_ptr = residual, 0, 0
    else:
        d = delta.contiguous()
        h = torch.empty(residual.shape, dtype=_F32)
        d_ptr, h_ptr = d.data_ptr(), h.data_ptr()
    rows = normed.numel() // D if D else 0
    if rows:
        _lib().add_rmsnorm(r.data_ptr(), d_ptr, w.data_ptr(), float(eps), rows, D, normed.data_ptr(), h_ptr)
    return normed, h


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.swiglu` in C++ for fp32 CPU tensors (``exp`` by a polynomial: within 2e-7
    relative of PyTorch's)."""
    W = gate_up.shape[-1]
    if not _cpu_f32(gate_up) or W % 2 or not _no_grad(gate_up):
        return reference.swiglu(gate_up)
    g = gate_up.contiguous()
    out = torch.empty((*gate_up.shape[:-1], W // 2), dtype=_F32)
    rows = out.numel() // (W // 2) if W else 0
    if rows:
        _lib().swiglu(g.data_ptr(), rows, W // 2, out.data_ptr())
    return out


def embed_codes(codes: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.embed_codes` in C++ for an fp32 CPU table (the channels summed in order).
    A code outside the vocabulary raises the reference's error."""
    if (
        codes.ndim != 3
        or codes.device.type != "cpu"
        or codes.dtype not in _CODE_DTYPES
        or not _cpu_f32(table)
        or table.ndim != 2
        or not _no_grad(table)
    ):
        return reference.embed_codes(codes, table, vocab_size)
    B, T, C = codes.shape
    if C == 0 or vocab_size <= 0 or table.shape[0] != C * vocab_size:
        return reference.embed_codes(codes, table, vocab_size)
    D = table.shape[1]
    flat = codes.reshape(B * T, C).to(torch.long).contiguous()
    t = table.contiguous()
    out = torch.empty((B, T, D), dtype=_F32)
    if B * T and D:
        bad = _lib().embed_codes(flat.data_ptr(), B * T, C, t.data_ptr(), int(vocab_size), D, out.data_ptr())
        if bad >= 0:
            return reference.embed_codes(codes, table, vocab_size)  # raises its IndexError (nothing was written)
    return out


class _Unsupported(Exception):
    """An argument the kernel does not take: the wrapper runs the reference instead."""


def _int64_values(value: torch.Tensor | int | None, rows: int) -> torch.Tensor | None:
    """None, or 1 or ``rows`` int64 values in a contiguous CPU tensor; raises _Unsupported for anything else."""
    if value is None:
        return None
    if (
        isinstance(value, torch.Tensor)
        and value.dtype == torch.long
        and value.ndim <= 1
        and value.numel() in (1, rows)
        and value.device.type == "cpu"
        and value.is_contiguous()
    ):
        return value  # a decode step's position or lengths, as they are
    t = value if isinstance(value, torch.Tensor) else torch.tensor([int(value)])
    if t.device.type != "cpu" or t.dtype not in _CODE_DTYPES + (torch.int16, torch.int8, torch.uint8):
        raise _Unsupported
    if t.numel() not in (1, rows):
        raise _Unsupported
    return t.reshape(-1).to(torch.long).contiguous()


def _kv_strides_ok(cache: torch.Tensor, D: int) -> bool:
    """[B, H, L, D] with [L, D] contiguous and non-negative strides (what the kernels index)."""
    return cache.stride(3) == 1 and cache.stride(2) == D and cache.stride(0) >= 0 and cache.stride(1) >= 0


def rope_kv_write(
    qkv: torch.Tensor,
    start: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_head: int,
    n_kv_head: int,
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.rope_kv_write` in C++ for fp32 CPU tensors (the same products and sums, so
    the same bits). Positions outside the caches or the tables raise the reference's error."""
    args = (qkv, start, cos, sin, k_cache, v_cache, n_head, n_kv_head)
    if (
        qkv.ndim != 3
        or k_cache.ndim != 4
        or not all(_cpu_f32(t) for t in (qkv, cos, sin, k_cache, v_cache))
        or not _no_grad(qkv, k_cache, v_cache)
        or n_head <= 0
        or n_kv_head <= 0
    ):
        return reference.rope_kv_write(*args)
    R, T, W = qkv.shape
    D = k_cache.shape[3]
    half = D // 2
    if (
        D == 0
        or D % 2
        or W != (n_head + 2 * n_kv_head) * D
        or k_cache.shape != (R, n_kv_head, k_cache.shape[2], D)
        or v_cache.shape != k_cache.shape
        or v_cache.stride() != k_cache.stride()
        or not _kv_strides_ok(k_cache, D)
        or cos.ndim != 2
        or cos.shape[1] != half
        or sin.shape != cos.shape
        or _overlap(k_cache, v_cache)
    ):
        return reference.rope_kv_write(*args)
    try:
        pos = _int64_values(start, R)
    except _Unsupported:
        return reference.rope_kv_write(*args)
    x, c, s = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q = torch.empty((R, n_head, T, D), dtype=_F32)
    if R * T == 0:
        return q
    bad = _lib().rope_kv_write(
        x.data_ptr(), R, T, n_head, n_kv_head, D,
        0 if pos is None else pos.data_ptr(), 0 if pos is None else pos.numel(),
        c.data_ptr(), s.data_ptr(), c.shape[0],
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.shape[2],
        q.data_ptr(),
    )  # fmt: skip
    if bad >= 0:
        return reference.rope_kv_write(*args)  # raises its IndexError (nothing was written)
    return q


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' storages are the same memory (the caches are written while both are indexed)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


_MAX_GROUP = 64  # query heads per KV head the kernel takes (csrc/kernels.hpp: kMaxGroup)


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
    """:func:`dia_fast.ops.reference.decode_attention` in C++ for fp32 CPU tensors: the query heads of a KV
    head read each cached key and value once; keys past ``kv_len`` are never read (``exp`` by a polynomial:
    within 2e-7 relative of PyTorch's). ``semaphores``: unused."""
    kw = dict(scale=scale, kv_len=kv_len, key_mask=key_mask, semaphores=semaphores)
    if (
        q.ndim != 4
        or k_cache.ndim != 4
        or q.shape[2] != 1
        or not all(_cpu_f32(t) for t in (q, k_cache, v_cache))
        or not _no_grad(q, k_cache, v_cache)
    ):
        return reference.decode_attention(q, k_cache, v_cache, **kw)
    B, Hq, _, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if (
        k_cache.shape != (B, Hkv, L, D)
        or v_cache.shape != k_cache.shape
        or Hkv == 0
        or Hq % Hkv
        or Hq // Hkv > _MAX_GROUP
        or not _kv_strides_ok(k_cache, D)
        or not _kv_strides_ok(v_cache, D)
    ):
        return reference.decode_attention(q, k_cache, v_cache, **kw)
    mask = None
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (B, L) or key_mask.device.type != "cpu":
            return reference.decode_attention(q, k_cache, v_cache, **kw)
        mask = key_mask if key_mask.stride(1) == 1 and key_mask.stride(0) >= 0 else key_mask.contiguous()
    try:
        lens = _int64_values(kv_len, B)
    except _Unsupported:
        return reference.decode_attention(q, k_cache, v_cache, **kw)
    qc = q.contiguous()
    out = torch.empty((B, Hq, 1, D), dtype=_F32)
    if B * Hq * D == 0:
        return out.zero_()
    _lib().decode_attention(
        qc.data_ptr(), B, Hq, D,
        k_cache.data_ptr(), v_cache.data_ptr(), Hkv, L,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        0 if lens is None else lens.data_ptr(), 0 if lens is None else lens.numel(),
        0 if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
        float(scale), out.data_ptr(),
    )  # fmt: skip
    return out


def _long_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.long and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _bool_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bool and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def step_update(
    codes: torch.Tensor,
    pos: torch.Tensor,
    eos_pos: torch.Tensor,
    delays: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    forced: torch.Tensor,
    out: torch.Tensor,
    real: torch.Tensor,
    done: torch.Tensor,
    tokens: torch.Tensor,
    min_eos_pos: torch.Tensor | None = None,
    allow_eos: torch.Tensor | None = None,
    *,
    eos_value: int,
    pad_value: int,
) -> None:
    """:func:`dia_fast.ops.reference.step_update` in C++ for int64 CPU buffers (the same integers)."""
    args = (codes, pos, eos_pos, delays, forced_eos_pos, forced, out, real, done, tokens, min_eos_pos, allow_eos)
    kw = dict(eos_value=eos_value, pad_value=pad_value)
    if codes.ndim != 2 or forced.ndim != 3:
        return reference.step_update(*args, **kw)
    B, C = codes.shape
    R, L = tokens.shape[0], forced.shape[1]
    with_min = min_eos_pos is not None and allow_eos is not None
    bools = (real, done) + ((allow_eos,) if with_min else ())
    if (
        not _long_cpu(codes, pos, eos_pos, delays, forced_eos_pos, forced, out, tokens)
        or not _bool_cpu(*bools)
        or (with_min and not _long_cpu(min_eos_pos))
        or B == 0
        or pos.numel() != 1
        or eos_pos.shape != (B,)
        or delays.shape != (C,)
        or forced_eos_pos.numel() not in (1, B)
        or forced.shape != (B, L, C)
        or out.shape != (B, L, C)
        or real.shape != (B,)
        or done.numel() != 1
        or tokens.shape != (R, 1, C)
        or R % B
        or (with_min and (min_eos_pos.shape != (B,) or allow_eos.shape != (B,)))
    ):
        return reference.step_update(*args, **kw)
    final = torch.empty((B, C), dtype=torch.long)
    bad = _lib().step_update(
        codes.data_ptr(), final.data_ptr(), B, C, L, R, pos.data_ptr(), eos_pos.data_ptr(), delays.data_ptr(),
        forced_eos_pos.data_ptr(), forced_eos_pos.numel(), forced.data_ptr(), out.data_ptr(), real.data_ptr(),
        done.data_ptr(), tokens.data_ptr(),
        min_eos_pos.data_ptr() if with_min else 0, allow_eos.data_ptr() if with_min else 0,
        int(eos_value), int(pad_value),
    )  # fmt: skip
    if bad >= 0:
        return reference.step_update(*args, **kw)  # raises its IndexError (nothing was written)
    return None


def slot_update(
    codes: torch.Tensor,
    pos: torch.Tensor,
    eos_pos: torch.Tensor,
    delays: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    min_eos_pos: torch.Tensor,
    forced: torch.Tensor,
    out: torch.Tensor,
    active: torch.Tensor,
    finished: torch.Tensor,
    allow_eos: torch.Tensor,
    tokens: torch.Tensor,
    row_pos: torch.Tensor,
    *,
    eos_value: int,
    pad_value: int,
) -> None:
    """:func:`dia_fast.ops.reference.slot_update` in C++ for int64 CPU buffers (the same integers)."""
    args = (codes, pos, eos_pos, delays, forced_eos_pos, min_eos_pos, forced, out, active, finished, allow_eos)
    args += (tokens, row_pos)
    kw = dict(eos_value=eos_value, pad_value=pad_value)
    if codes.ndim != 2 or forced.ndim != 3:
        return reference.slot_update(*args, **kw)
    S, C = codes.shape
    L = forced.shape[1]
    if (
        not _long_cpu(codes, pos, eos_pos, delays, forced_eos_pos, min_eos_pos, forced, out, tokens, row_pos)
        or not _bool_cpu(active, finished, allow_eos)
        or S == 0
        or L == 0
        or any(t.shape != (S,) for t in (pos, eos_pos, forced_eos_pos, min_eos_pos, active, finished, allow_eos))
        or delays.shape != (C,)
        or forced.shape != (S, L, C)
        or out.shape != (S, L, C)
        or tokens.shape != (2 * S, 1, C)
        or row_pos.shape != (2 * S,)
    ):
        return reference.slot_update(*args, **kw)
    _lib().slot_update(
        codes.data_ptr(), S, C, L, pos.data_ptr(), eos_pos.data_ptr(), delays.data_ptr(), forced_eos_pos.data_ptr(),
        min_eos_pos.data_ptr(), forced.data_ptr(), out.data_ptr(), active.data_ptr(), finished.data_ptr(),
        allow_eos.data_ptr(), tokens.data_ptr(), row_pos.data_ptr(), int(eos_value), int(pad_value),
    )  # fmt: skip
    return None
