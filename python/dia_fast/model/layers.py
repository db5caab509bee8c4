"""Building blocks of Dia: RMSNorm, rotary embeddings, attention (GQA), gated MLP.

Weights use the ``nn.Linear`` layout (out, in) without biases. The attention math itself is
not here: it is :func:`dia_fast.ops.attention` / :func:`dia_fast.ops.decode_attention`, so a
kernel replaces it without touching the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (weight included), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate half") RoPE: angle_i = pos / theta^(2i/d), applied in fp32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # explicit device: also right inside a ``torch.device("meta")`` context (meta builds)
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu") / self.head_dim
        return (1.0 / self.theta**exponent).float().to(device)

    def reset(self) -> None:
        """Recompute the fp32 frequencies (after a dtype cast or a meta-device build)."""
        device = self.inv_freq.device
        self.inv_freq = self._inv_freq(torch.device("cpu") if device.type == "meta" else device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (any int/float) -> cos, sin [..., T, head_dim // 2] in fp32."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        return angles.cos(), angles.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D]; cos/sin broadcastable to [B, 1, T, D/2]."""
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, head_dim).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads and an explicit scale (Dia uses 1.0).

    ``q_in``/``kv_in`` are the query and key/value input widths (they differ in cross-attention).
    """

    def __init__(self, q_in: int, kv_in: int, out_dim: int, n_head: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(q_in, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(kv_in, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(kv_in, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, out_dim, bias=False)
        self.scale = 1.0

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return _heads(self.q_proj(x), self.n_head, self.head_dim)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            _heads(self.k_proj(x), self.n_kv_head, self.head_dim),
            _heads(self.v_proj(x), self.n_kv_head, self.head_dim),
        )

    def qkv_rope(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections with RoPE on q and k: [B, T, in] -> q, k, v as [B, H, T, D]."""
        q = RotaryEmbedding.apply(self.project_q(x), cos, sin)
        k, v = self.project_kv(x)
        return q, RotaryEmbedding.apply(k, cos, sin), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, out_dim]."""
        B, H, T, D = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(B, T, H * D))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one matrix ([gate; up] rows)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)
