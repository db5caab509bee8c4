"""Small building blocks for the codecs: the snake activation (DAC) and weight-norm folding (DAC, EnCodec)."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_weights


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
    """The plain float32 weight ``g * v / ||v||`` of a weight-normalised layer (norm over every dim but 0,
    as ``torch.nn.utils.weight_norm`` with its default ``dim=0``, for Conv1d and ConvTranspose1d alike).

    Computed in float32 with ``torch._weight_norm``, the op torch's weight norm (and so transformers'
    ``DacModel`` / ``EncodecModel``) runs: the folded weight is the one the reference computes.
    """
    return torch._weight_norm(v.float(), g.float(), 0)


def unfold_weight_norm(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, v)`` with ``fold_weight_norm(g, v) == w`` (``v = w``, ``g = ||w||`` over every dim but 0)."""
    return _norm_except_dim0(w.float()).to(w.dtype), w.clone()


# (gain, direction) suffixes: torch.nn.utils.weight_norm, and the parametrization API.
_WEIGHT_NORM_PAIRS = {
    ".weight_g": ".weight_v",
    ".parametrizations.weight.original0": ".parametrizations.weight.original1",
}


def fold_weight_norms(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` with every weight-norm pair (``weight_g``/``weight_v``, or
    ``parametrizations.weight.original0/1``) replaced by the plain ``weight``. Every tensor must be floating point
    and finite, and each gain one value per output channel (``[C_out, 1, ...]`` of its direction's rank); else a
    :class:`~dia_fast.checkpoint.CheckpointError` naming the tensor (``what`` names the checkpoint), as for an
    unpaired key. (The shapes are checked here: a mis-shaped gain would fold into a weight of the right shape, and
    ``torch._weight_norm`` reads past a gain too small.)"""
    check_weights(state, what)
    out = dict(state)
    for key in state:
        for g_suffix, v_suffix in _WEIGHT_NORM_PAIRS.items():
            if key.endswith(g_suffix):
                prefix = key[: -len(g_suffix)]
                if prefix + v_suffix not in state:
                    raise CheckpointError(f"{what}: {key} has no matching {prefix + v_suffix}")
                g, v = state[key], state[prefix + v_suffix]
                if v.dim() < 1 or tuple(g.shape) != (v.shape[0], *([1] * (v.dim() - 1))):
                    raise CheckpointError(
                        f"{what}: {key} is {tuple(g.shape)}, not ({v.shape[0] if v.dim() else '?'}, 1, ...) for "
                        f"{prefix + v_suffix} {tuple(v.shape)}"
                    )
                out[prefix + ".weight"] = fold_weight_norm(out.pop(key), out.pop(prefix + v_suffix))
    for key in out:
        if key.endswith(tuple(_WEIGHT_NORM_PAIRS.values())):
            raise CheckpointError(f"{what}: {key} has no matching weight-norm gain")
    return out
