"""Hot ops of dia_fast, each dispatched to the best backend for the tensors' device.

The model and the generation loop call only these functions; kernels replace an op by
registering a backend here (see :mod:`dia_fast.ops._dispatch`), never by copying model code.
Every op has a plain PyTorch reference in :mod:`dia_fast.ops.reference` that defines its
semantics; ``backend="torch"`` always runs it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from .. import _ext
from . import _dispatch, reference
from ._dispatch import (
    BACKENDS,
    backend_available,
    get_impl,
    register,
    register_availability,
    select_backend,
    set_backend,
    table,
)
from ._dispatch import (
    generation as dispatch_generation,
)
from .reference import NOT_FORCED, delayed_view, filter_cfg_logits, seed_from_int, top_p_filter

__all__ = [
    "BACKENDS",
    "NOT_FORCED",
    "add_rmsnorm",
    "apply_delay",
    "attention",
    "backend_available",
    "cfg_sample",
    "decode_attention",
    "delayed_view",
    "dispatch_generation",
    "embed_codes",
    "int4_linear",
    "int8_linear",
    "filter_cfg_logits",
    "register",
    "revert_delay",
    "rope_kv_write",
    "seed_from_int",
    "select_backend",
    "set_backend",
    "slot_update",
    "step_update",
    "swiglu",
    "table",
    "top_p_filter",
    "undelay_codes",
]


# --- backend availability -------------------------------------------------------------------


def _triton_available(device_type: str) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device_type == "cuda":
        return (True, "CUDA") if torch.cuda.is_available() else (False, "no CUDA device")
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "TRITON_INTERPRET=1 (interpreter, for tests)"
        return False, "Triton runs on CPU only in the interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton does not run on {device_type}"


def _cpp_available(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, "the C++ kernels are CPU kernels"
    return (True, "extension loaded") if _ext.loaded() else (False, _ext.why_not())


def _metal_available(device_type: str) -> tuple[bool, str]:
    if device_type != "mps":
        return False, "Metal runs on Apple GPUs (mps) only"
    from . import metal

    return metal.available()


register_availability("triton", _triton_available)
register_availability("cpp", _cpp_available)
register_availability("metal", _metal_available)
_ext.on_reload(_dispatch.invalidate)  # loading (or disabling) the extension changes what the cpp backend runs

# --- the table ------------------------------------------------------------------------------

_OPS = (
    "apply_delay",
    "revert_delay",
    "undelay_codes",
    "embed_codes",
    "attention",
    "decode_attention",
    "cfg_sample",
    "add_rmsnorm",
    "rope_kv_write",
    "swiglu",
    "step_update",
    "slot_update",
    "int8_linear",
    "int4_linear",
)
for _op in _OPS:
    register(_op, "torch", getattr(reference, _op))

for _op in ("apply_delay", "revert_delay", "undelay_codes", "embed_codes"):
    register(_op, "triton", f"dia_fast.ops.triton_delay:{_op}")
register("attention", "triton", "dia_fast.ops.triton_attention:attention")
register("decode_attention", "triton", "dia_fast.ops.triton_attention:decode_attention")
register("cfg_sample", "triton", "dia_fast.ops.triton_sampling:cfg_sample")
for _op in ("add_rmsnorm", "rope_kv_write", "swiglu"):
    register(_op, "triton", f"dia_fast.ops.triton_fused:{_op}")
for _op in ("step_update", "slot_update"):
    register(_op, "triton", f"dia_fast.ops.triton_step:{_op}")
register("int8_linear", "triton", "dia_fast.ops.triton_linear:int8_linear")
# C++ CPU kernels: registered where they measured faster than the reference (benchmarks/RESULTS.md; the layer
# ops inside a decode step, where dispatch and cold caches cost more than their arithmetic: docs/native.md)
_CPP_OPS = ("apply_delay", "revert_delay", "undelay_codes", "cfg_sample", "int8_linear", "int4_linear")
_CPP_LAYER_OPS = (
    "add_rmsnorm",
    "swiglu",
    "embed_codes",
    "rope_kv_write",
    "decode_attention",
    "step_update",
    "slot_update",
)
for _op in _CPP_OPS + _CPP_LAYER_OPS:
    register(_op, "cpp", f"dia_fast.ops.cpp:{_op}")
# Metal kernels (kernels/*.metal), compiled at run time on Apple GPUs
for _op in ("apply_delay", "revert_delay", "undelay_codes", "decode_attention", "cfg_sample"):
    register(_op, "metal", f"dia_fast.ops.metal:{_op}")


# --- public API -----------------------------------------------------------------------------


def apply_delay(
    codes: torch.Tensor,
    delay_pattern: Sequence[int] | torch.Tensor,
    bos_value: int,
    pad_value: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Delay channel ``c`` of ``codes`` [B, T, C] by ``delay_pattern[c]`` frames (BOS in front).

    See :func:`dia_fast.ops.reference.apply_delay` for the exact semantics.
    """
    return get_impl("apply_delay", codes.device, backend)(codes, delay_pattern, bos_value, pad_value)


def revert_delay(
    codes: torch.Tensor, delay_pattern: Sequence[int] | torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Undo :func:`apply_delay` (``out[t, c] = codes[min(t + d_c, T - 1), c]``)."""
    return get_impl("revert_delay", codes.device, backend)(codes, delay_pattern)


def undelay_codes(
    delayed: torch.Tensor,
    delay_pattern: Sequence[int] | torch.Tensor,
    codebook_size: int = 1024,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Delayed decoder output -> codec codes [B, T - max_delay, C] (special values -> 0)."""
    return get_impl("undelay_codes", delayed.device, backend)(delayed, delay_pattern, codebook_size)


def embed_codes(
    codes: torch.Tensor, table: torch.Tensor, vocab_size: int, *, backend: str | None = None
) -> torch.Tensor:
    """Decoder input: sum over channels of ``table[c * vocab_size + codes[..., c]]`` -> [B, T, D]."""
    return get_impl("embed_codes", codes.device, backend)(codes, table, vocab_size)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over whole sequences with GQA, optional causal mask and key padding mask.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], key_mask [B, Tk] (True = attend) -> [B, Hq, Tq, D].
    """
    return get_impl("attention", q.device, backend)(q, k, v, scale=scale, causal=causal, key_mask=key_mask)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float = 1.0,
    kv_len: torch.Tensor | int | None = None,
    key_mask: torch.Tensor | None = None,
    semaphores: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode step: q [B, Hq, 1, D] against caches [B, Hkv, L, D], keys ``< kv_len`` (and ``key_mask``).

    ``semaphores``: an int32 tensor of at least ``B * Hkv`` zeros that split-KV kernels use to combine
    their partials in the same launch (left at zero; one per decode state, see
    :func:`dia_fast.ops.triton_attention.decode_attention`); None: the kernel makes its own per call."""
    return get_impl("decode_attention", q.device, backend)(
        q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_mask=key_mask, semaphores=semaphores
    )


def cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: float | torch.Tensor = 3.0,
    temperature: float | torch.Tensor = 1.2,
    top_p: float | torch.Tensor = 0.95,
    top_k: int | None | torch.Tensor = 45,
    eos_id: int = 1024,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    seed: torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    allow_eos: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Next codes [B, C] from conditional / unconditional logits [B, C, V] (CFG + filters + draw).

    Settings are numbers or per-row [B] tensors; ``top_k`` None (or 0): no CFG filter, the guided logits
    are sampled. ``seed`` ([B] int64 Philox keys) + ``offset``: the seeded draw of
    :func:`dia_fast.ops.reference.cfg_sample`, identical across the backends that implement it (torch,
    Triton; the C++ and Metal backends hand seeded draws to the reference); otherwise each backend's own
    draw from ``generator``. ``allow_eos`` [B] bool: rows that may not emit EOS yet. See
    :func:`dia_fast.ops.reference.cfg_sample`.
    """
    kw: dict[str, object] = dict(
        cfg_scale=cfg_scale,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        do_sample=do_sample,
        generator=generator,
    )
    if seed is not None:
        kw.update(seed=seed, offset=offset)
    if allow_eos is not None:
        kw["allow_eos"] = allow_eos
    return get_impl("cfg_sample", cond.device, backend)(cond, uncond, **kw)


def add_rmsnorm(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(residual + delta) * weight, residual + delta)``; ``delta`` None: just the norm (and the
    residual itself). See :func:`dia_fast.ops.reference.add_rmsnorm`."""
    return get_impl("add_rmsnorm", residual.device, backend)(residual, delta, weight, eps)


def rope_kv_write(
    qkv: torch.Tensor,
    start: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_head: int,
    n_kv_head: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RoPE on the q and k of a fused projection ``qkv`` [R, T, (Hq + 2 Hkv) D] at positions ``start + t``,
    k/v written into the caches [R, Hkv, L, D]; returns q [R, Hq, T, D]. See
    :func:`dia_fast.ops.reference.rope_kv_write`."""
    return get_impl("rope_kv_write", qkv.device, backend)(qkv, start, cos, sin, k_cache, v_cache, n_head, n_kv_head)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weight-only int8 linear ``x @ (weight * scale[:, None]).T`` (int8 [N, K] weights, fp32 scale per row).
    ``out``: a tensor of the result's shape and dtype to write it into (returned). See
    :func:`dia_fast.ops.reference.int8_linear`; the C++ kernel: :func:`dia_fast.ops.cpp.int8_linear`."""
    return get_impl("int8_linear", x.device, backend)(x, weight, scale, out=out)


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weight-only int4 linear with a scale per group of columns (packed uint8 [N, K / 2] weights, fp32 scales
    [N, K / group]). ``out``: as for :func:`int8_linear`. See :func:`dia_fast.ops.reference.int4_linear`; the C++
    kernel: :func:`dia_fast.ops.cpp.int4_linear`."""
    return get_impl("int4_linear", x.device, backend)(x, weight, scale, out=out)


def swiglu(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``[gate | up]`` [..., 2H] -> [..., H]."""
    return get_impl("swiglu", gate_up.device, backend)(gate_up)


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
    backend: str | None = None,
) -> None:
    """A decode step's bookkeeping after the draw (EOS countdown, forced prefix, output and next input,
    completion flag, and whether the next position may end each item), in place. See
    :func:`dia_fast.ops.reference.step_update`."""
    get_impl("step_update", codes.device, backend)(
        codes,
        pos,
        eos_pos,
        delays,
        forced_eos_pos,
        forced,
        out,
        real,
        done,
        tokens,
        min_eos_pos,
        allow_eos,
        eos_value=eos_value,
        pad_value=pad_value,
    )


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
    backend: str | None = None,
) -> None:
    """A continuous-batching step's per-slot bookkeeping (each slot its own position, lifecycle and EOS
    countdown; rows interleaved), in place. See :func:`dia_fast.ops.reference.slot_update`."""
    get_impl("slot_update", codes.device, backend)(
        codes,
        pos,
        eos_pos,
        delays,
        forced_eos_pos,
        min_eos_pos,
        forced,
        out,
        active,
        finished,
        allow_eos,
        tokens,
        row_pos,
        eos_value=eos_value,
        pad_value=pad_value,
    )
