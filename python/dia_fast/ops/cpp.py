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

__all__ = ["apply_delay", "cfg_sample", "revert_delay", "undelay_codes"]

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
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.cfg_sample` in C++ for CPU logits [B, C, V].

    Greedy mode (``do_sample=False`` or ``temperature == 0``) returns exactly the reference's
    codes. Sampling draws one uniform per row from ``generator`` (``torch.rand``) and inverts the
    CDF of the filtered distribution in ascending id order: the distribution is the reference's
    and a seeded generator makes it reproducible, but the codes are not those that
    ``torch.multinomial`` would draw from the same generator state. Settings that differ per row and
    seeded draws (``seed``) run the reference.
    """
    on_cpu = cond.device.type == "cpu" and cond.ndim == 3 and cond.shape == uncond.shape
    hp = reference.host_params(cfg_scale, temperature, top_p, top_k) if on_cpu else None
    sampled = do_sample and (hp is None or hp.temperature != 0)
    if hp is None or (sampled and seed is not None):
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
        )
    B, C, V = cond.shape
    if not 0 <= eos_id < V:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {V})")
    if hp.top_k <= 0:  # no CFG filter: the guided logits are sampled (the kernel then reads cond only)
        cond = uncond = reference.guided_logits(cond, uncond, hp.cfg_scale)
    c, u = _logits_view(cond), _logits_view(uncond)
    out = torch.empty((B, C), dtype=torch.long)
    uniforms = None
    if sampled:
        uniforms = _np(torch.rand(B * C, generator=generator, dtype=torch.float32))
    k = max(hp.top_k, 0)
    _lib().cfg_sample(_np(c), _np(u), _np(out), hp.cfg_scale, hp.temperature, hp.top_p, k, int(eos_id), uniforms)
    return out
