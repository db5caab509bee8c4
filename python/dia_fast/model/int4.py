"""A bias-free linear layer with int4 weights: a scale per group of input columns, symmetric, weight-only.

``y = x @ W.T`` with ``W[n, k] = w[n, k] * scale[n, k // group]`` and ``w`` in [-7, 7], stored packed two per byte
(:func:`dia_fast.ops.reference.pack_int4`). On the CPU the C++ kernel (``ops.int4_linear``, csrc/linear_int4.cpp)
reads the packed weights directly; elsewhere the reference dequantizes them per call.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.reference import INT4_BLOCK, pack_int4
from .int8 import _TINY, WeightOnlyLinear, check_finite

__all__ = ["INT4_LEVELS", "Int4Linear", "default_group", "quantize_groups"]

INT4_LEVELS = 7  # |w| <= 7: symmetric (the code -8 is never used)


def default_group(in_features: int) -> int:
    """Columns per scale: 128 where it divides the row, else 64 (the kernel's packing block)."""
    if in_features % INT4_BLOCK:
        raise ValueError(f"int4 weights need in_features divisible by {INT4_BLOCK}, got {in_features}")
    return 128 if in_features % 128 == 0 else INT4_BLOCK


def quantize_groups(
    weight: torch.Tensor, group: int, chunk_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K / 2], fp32 scale [N, K / group]) with ``weight ≈ w * scale`` per group: scale = max |group|
    / 7 (at least the smallest normal float32), values rounded half to even into [-7, 7]. An all-zero group gets
    scale 1 (and zeros); NaN or infinite weights are a ValueError. Works through ``chunk_elements`` at a time
    (loading quantizes tensor by tensor)."""
    N, K = weight.shape
    if group <= 0 or K % group or group % INT4_BLOCK:
        raise ValueError(f"the group must divide {K} columns and be a multiple of {INT4_BLOCK}, got {group}")
    packed = torch.empty((N, K // 2), dtype=torch.uint8, device=weight.device)
    scale = torch.empty((N, K // group), dtype=torch.float32, device=weight.device)
    rows = max(1, chunk_elements // max(K, 1))
    for r0 in range(0, N, rows):
        w = weight[r0 : r0 + rows].detach().float()
        g = w.view(w.shape[0], K // group, group)
        amax = g.abs().amax(dim=2)
        check_finite(amax, r0)
        s = torch.where(amax > 0, (amax / INT4_LEVELS).clamp_min(_TINY), torch.ones_like(amax))
        q = torch.round(g / s[..., None]).clamp_(-INT4_LEVELS, INT4_LEVELS).to(torch.int8).view(w.shape[0], K)
        packed[r0 : r0 + rows] = pack_int4(q)
        scale[r0 : r0 + rows] = s
    return packed, scale


class Int4Linear(WeightOnlyLinear):
    """``nn.Linear(in_features, out_features, bias=False)`` holding packed int4 weights (buffer ``weight_int4``,
    uint8 [out, in / 2]) and a scale per ``group`` input columns (buffer ``weight_scale``, fp32 [out, in / group])."""

    def __init__(
        self, in_features: int, out_features: int, group: int | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group = default_group(in_features) if group is None else group
        if in_features % self.group or self.group % INT4_BLOCK:
            raise ValueError(f"the group must divide {in_features} columns and be a multiple of {INT4_BLOCK}")
        self.register_buffer(
            "weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, in_features // self.group, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group: int | None = None) -> Int4Linear:
        """Quantize a full-precision [out, in] weight (:func:`quantize_groups`)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group, device="meta")
        layer.weight_int4, layer.weight_scale = quantize_groups(weight, layer.group)
        return layer

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a tensor of the result's shape and dtype to write it into (the decode step's logits buffer)."""
        return ops.int4_linear(x, self.weight_int4, self.weight_scale, out=out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 weights, "
            f"fp32 scales per {self.group} columns"
        )
