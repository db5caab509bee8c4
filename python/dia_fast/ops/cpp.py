"""C++ CPU backend: thin wrappers that call ``dia_fast._C`` on numpy views of CPU tensors.

The extension never links libtorch: every wrapper hands it numpy views (``Tensor.numpy()``
shares memory, no copy) of contiguous CPU tensors and a torch-allocated output to fill. Inputs the
kernels do not cover (other dtypes, non-CPU tensors, tensors that need grad) run the PyTorch
reference instead, so a wrapper is always safe to call. The semantics are those of
:mod:`dia_fast.ops.reference`; ``cfg_sample`` differs only in where its random numbers come from
(see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import _ext
from . import reference

__all__ = ["apply_delay", "cfg_sample", "int8_linear", "revert_delay", "undelay_codes"]

_CODE_DTYPES = (torch.int64, torch.int32)


def _lib():
    return _ext.module()  # raises RuntimeError with the reason when the extension is not loaded


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
    if not _codes_ok(codes):
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
    x = x.detach().float()
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
    hp = reference.host_params(cfg_scale, temperature, top_p, top_k)
    greedy = not do_sample or (hp is not None and hp.temperature == 0)
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


def _row_np(value: reference.Param, B: int, dtype: torch.dtype, name: str) -> np.ndarray:
    """A per-row setting as a contiguous [B] numpy array (a view of a CPU tensor where it can be)."""
    return _np(reference.row_param(value, B, dtype, torch.device("cpu"), name).contiguous())


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
    """The per-row, seeded kernel."""
    B = cond.shape[0]
    allow = None
    if allow_eos is not None:
        allow = _row_np(allow_eos.to(torch.bool), B, torch.uint8, "allow_eos")
    _lib().cfg_sample_rows(
        _np(_logits_view(cond)),
        _np(_logits_view(uncond)),
        _np(out),
        _row_np(cfg_scale, B, torch.float32, "cfg_scale"),
        _row_np(temperature, B, torch.float32, "temperature"),
        _row_np(top_p, B, torch.float32, "top_p"),
        _row_np(reference.top_k_arg(top_k), B, torch.int64, "top_k"),
        _row_np(seed, B, torch.int64, "seed"),
        _row_np(offset, B, torch.int64, "offset"),
        allow,
        int(eos_id),
    )
    return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, isa: int = -1) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.int8_linear` in C++ for float32 CPU activations (others: the reference).

    Each row of ``x`` is rounded to 16-bit integers against its own max |x| inside the kernel (relative error
    at most 2^-16 of that max) and the products are summed exactly in integers, so the result differs from the
    reference's fp32 sum by about 3e-5 of the output's scale (csrc/linear.cpp). Rows holding NaN or inf are
    computed in fp32. ``isa``: -1 the best this CPU runs, 0 portable, 1 AVX2, 2 AVX-512 (tests).
    """
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.int8
        or weight.ndim != 2
        or scale.dtype != torch.float32
        or scale.shape != (weight.shape[0],)
        or x.shape[-1] != weight.shape[1]
        or x.requires_grad
    ):
        return reference.int8_linear(x, weight, scale)
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.float32)
    if x2.shape[0]:
        _lib().int8_linear(_np(x2), _np(weight.contiguous()), _np(scale.contiguous()), _np(out), int(isa))
    return out.view(*x.shape[:-1], weight.shape[0])
