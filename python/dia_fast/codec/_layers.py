"""Small building blocks for the DAC codec: the snake activation and weight-norm folding."""

from __future__ import annotations

import torch
from torch import nn


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation ``x + sin(alpha * x)^2 / alpha`` with a per-channel ``alpha`` [1, C, 1].

    The ``1e-9`` guard against ``alpha == 0`` is the one DAC was trained with.
    """
    inv_alpha = (alpha + 1e-9).reciprocal()
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + inv_alpha * torch.sin(alpha * x).pow(2)
    # Inference: 3 passes over x instead of 5 (sin and square in place, then one fused multiply-add).
    s = torch.sin(alpha * x).square_()
    return torch.addcmul(x, s, inv_alpha)


class Snake(nn.Module):
    """Snake activation with a learned per-channel frequency ``alpha`` of shape [1, C, 1]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


def _norm_except_dim0(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain weight ``g * v / ||v||`` of a weight-normalised layer (norm over every dim but 0,
    as ``torch.nn.utils.weight_norm`` with its default ``dim=0``, for Conv1d and ConvTranspose1d
    alike). Computed in float32 and returned in ``v``'s dtype."""
    v32 = v.float()
    return (v32 * (g.float() / _norm_except_dim0(v32))).to(v.dtype)


def unfold_weight_norm(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, v)`` with ``fold_weight_norm(g, v) == w`` (``v = w``, ``g = ||w||`` over every dim but 0)."""
    return _norm_except_dim0(w.float()).to(w.dtype), w.clone()
