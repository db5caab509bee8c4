"""A bias-free linear layer with int8 weights: one fp32 scale per output row, symmetric, weight-only.

``y = x @ (weight_int8 * weight_scale[:, None]).T``: the activations are never rounded to 8 bits. On the CPU the
C++ kernel (``ops.int8_linear``, csrc/linear.cpp) reads the int8 weights directly; elsewhere the reference
dequantizes them per call.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["Int8Linear", "WeightOnlyLinear", "quantize_rows"]


_TINY = torch.finfo(torch.float32).tiny


def check_finite(amax: torch.Tensor, first_row: int) -> None:
    """A ValueError naming the first row whose largest magnitude (``amax``, per row or group) is NaN or infinite."""
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0])
        raise ValueError(f"the weight holds NaN or infinite values (row {row}): it cannot be quantized")


def quantize_rows(weight: torch.Tensor, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], fp32 scale [N]) with ``weight ≈ q * scale[:, None]``: scale = max |row| / 127 (at least the
    smallest normal float32, so that it stays positive), values rounded half to even into [-127, 127]. A zero row
    gets scale 1 (and zeros); NaN or infinite weights are a ValueError. Works through ``chunk_elements`` at a time,
    so that its temporaries stay small next to a large weight (loading quantizes tensor by tensor)."""
    N, K = weight.shape
    q = torch.empty((N, K), dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    rows = max(1, chunk_elements // max(K, 1))
    for r0 in range(0, N, rows):
        w = weight[r0 : r0 + rows].detach().float()
        amax = w.abs().amax(dim=1)
        check_finite(amax, r0)
        s = torch.where(amax > 0, (amax / 127.0).clamp_min(_TINY), torch.ones_like(amax))
        q[r0 : r0 + rows] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r0 : r0 + rows] = s
    return q, scale


class WeightOnlyLinear(nn.Module):
    """A bias-free linear layer whose weights are held quantized (buffers) with fp32 scales (``weight_scale``):
    the part :class:`Int8Linear` and :class:`~dia_fast.model.int4.Int4Linear` share."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # .to(dtype) must not cast the scales (nn.Module casts every float buffer): keep them fp32
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return out


class Int8Linear(WeightOnlyLinear):
    """``nn.Linear(in_features, out_features, bias=False)`` holding int8 weights (buffer ``weight_int8``) and a
    scale per output row (buffer ``weight_scale``, fp32)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Quantize a full-precision [out, in] weight (:func:`quantize_rows`)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, device="meta")
        layer.weight_int8, layer.weight_scale = quantize_rows(weight)
        return layer

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a tensor of the result's shape and dtype to write it into (the decode step's logits buffer)."""
        return ops.int8_linear(x, self.weight_int8, self.weight_scale, out=out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, fp32 row scales"
