"""Building blocks of Dia: RMSNorm, rotary embeddings, self- and cross-attention (GQA), gated MLP.

Weights use the ``nn.Linear`` layout (out, in) without biases. The math of every hot op is a call
into :mod:`dia_fast.ops` (residual add + norm, RoPE + KV-cache write, attention, SwiGLU), so a kernel
replaces it without touching the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import ops
from ..ops.reference import rotate_half


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (weight included), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.add_rmsnorm(x, None, self.weight, self.eps)[0]

    def add(self, residual: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + delta), residual + delta)`` in one op (``delta`` None: ``(norm(residual), residual)``)."""
        return ops.add_rmsnorm(residual, delta, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate half") RoPE: angle_i = pos / theta^(2i/d), cos/sin tabulated in fp32 for
    positions [0, max_positions). The tables stay fp32 whatever the module is cast to."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed on the CPU in fp32 exactly as transformers' Dia computes its angles (fp32 frequencies,
        # fp32 position x frequency products), whatever the device; explicit device: also right inside a
        # ``torch.device("meta")`` context (meta builds).
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu") / self.head_dim
        inv_freq = (1.0 / self.theta**exponent).float()
        angles = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq
        return angles.cos().to(device), angles.sin().to(device)

    def reset(self) -> None:
        """Recompute the fp32 tables on the module's device (after a cast or a meta-device build)."""
        device = self.cos.device
        self.cos, self.sin = self._tables(torch.device("cpu") if device.type == "meta" else device)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # ``model.to(torch.bfloat16)`` would round the tables (cos off by up to 0.3 at position 3000):
        # whatever ``fn`` does, the tables come back in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.cos.device.type != "meta":  # (to_empty leaves them uninitialised: recompute always)
            self.reset()
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] (integers < max_positions) -> cos, sin [..., T, head_dim // 2] in fp32."""
        return self.cos[positions], self.sin[positions]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D]; cos/sin broadcastable to [B, 1, T, D/2]."""
        return rotate_half(x, cos, sin)


def _heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D] (a view)."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, head_dim).transpose(1, 2)


def _merge_heads(attn: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D] (a view for one decode step)."""
    B, H, T, D = attn.shape
    return attn.transpose(1, 2).reshape(B, T, H * D)


def _add_state_dict_post_hook(module: nn.Module, hook: Any) -> None:
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    register(hook)


class SelfAttention(nn.Module):
    """Self-attention with grouped K/V heads, RoPE on q and k, and an explicit scale (Dia uses 1.0).

    q, k and v come from one matrix ``qkv_proj`` (rows: the q heads, then the k heads, then the v heads),
    concatenated once when the weights are loaded; the state dict keeps the published names ``q_proj``,
    ``k_proj`` and ``v_proj`` (split when saved, joined when loaded), so checkpoints of both layouts load
    and save unchanged.
    """

    def __init__(self, dim: int, out_dim: int, n_head: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.qkv_proj = nn.Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, out_dim, bias=False)
        self.scale = 1.0
        _add_state_dict_post_hook(self, SelfAttention._split_qkv)
        self.register_load_state_dict_pre_hook(SelfAttention._join_qkv)

    @property
    def split_sizes(self) -> list[int]:
        D = self.head_dim
        return [self.n_head * D, self.n_kv_head * D, self.n_kv_head * D]

    @staticmethod
    def _split_qkv(module: SelfAttention, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        if prefix + "qkv_proj.weight" not in state:  # quantized (dia_fast.quantize): saved under its own names
            return
        w = state.pop(prefix + "qkv_proj.weight")
        parts = w.detach().split(module.split_sizes, dim=0)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
            state[prefix + name + ".weight"] = part.clone()  # own storage: savable with safetensors

    @staticmethod
    def _join_qkv(module: SelfAttention, state: dict[str, Any], prefix: str, *_: Any) -> None:
        names = [prefix + n + ".weight" for n in ("q_proj", "k_proj", "v_proj")]
        if prefix + "qkv_proj.weight" not in state and all(n in state for n in names):
            parts = [state.pop(n) for n in names]
            if all(p.ndim == 2 and p.shape[1] == parts[0].shape[1] for p in parts):
                state[prefix + "qkv_proj.weight"] = torch.cat(parts, dim=0)
            else:  # mis-shaped: put them back, load_state_dict reports the keys
                state.update(zip(names, parts, strict=True))

    def project(
        self,
        x: torch.Tensor,
        start: torch.Tensor | None,
        rope: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x [R, T, dim] at positions ``start + t`` -> rotated q [R, H, T, D]; rotated k and v written into the
        caches [R, Hkv, L, D] at those positions (one GEMM + one fused op)."""
        return ops.rope_kv_write(
            self.qkv_proj(x), start, rope.cos, rope.sin, k_cache, v_cache, self.n_head, self.n_kv_head
        )

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, out_dim]."""
        return self.o_proj(_merge_heads(attn))


class CrossAttention(nn.Module):
    """Attention of the decoder over the encoder output (no RoPE in current checkpoints); K/V are projected
    once per generation, so they stay separate matrices."""

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

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [B, T, out_dim]."""
        return self.o_proj(_merge_heads(attn))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one matrix ([gate; up] rows)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(x)))
