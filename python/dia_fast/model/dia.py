"""The Dia encoder-decoder transformer.

Encoder: byte embeddings -> ``n_layer`` x [RMSNorm -> self-attention (RoPE) -> RMSNorm -> gated
MLP] -> RMSNorm. Decoder: sum of the 9 channel embeddings of the delayed audio codes ->
``n_layer`` x [self-attention (RoPE, causal, GQA) -> cross-attention over the encoder output
(no RoPE) -> gated MLP], each pre-norm with a residual -> RMSNorm -> logits [B, T, 9, 1028].
Attention scale is 1.0 everywhere. Generation state (static KV caches, cross K/V computed once)
lives in :class:`DecoderState`. Each residual add is fused into the norm after it
(:meth:`RMSNorm.add`): a layer hands the next one the residual stream and its pending output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import DiaConfig
from .int4 import Int4Linear
from .int8 import Int8Linear
from .layers import CrossAttention, GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention


class EncoderLayer(nn.Module):
    def __init__(self, config: DiaConfig) -> None:
        super().__init__()
        enc, eps = config.model.encoder, config.model.encoder.norm_eps
        self.pre_sa_norm = RMSNorm(enc.hidden_size, eps)
        self.self_attention = SelfAttention(enc.hidden_size, enc.hidden_size, enc.n_head, enc.n_kv_head, enc.head_dim)
        self.post_sa_norm = RMSNorm(enc.hidden_size, eps)  # really the pre-MLP norm
        self.mlp = GatedMLP(enc.hidden_size, enc.intermediate_size)

    def forward(
        self, h: torch.Tensor, delta: torch.Tensor | None, rope: RotaryEmbedding, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream ``h`` plus the previous layer's pending output ``delta`` -> (new ``h``, this
        layer's pending output): each residual add is fused into the norm that follows it."""
        x, h = self.pre_sa_norm.add(h, delta)
        sa = self.self_attention
        k = x.new_empty(x.shape[0], sa.n_kv_head, x.shape[1], sa.head_dim)
        v = torch.empty_like(k)
        q = sa.project(x, None, rope, k, v)
        x, h = self.post_sa_norm.add(h, sa.output(ops.attention(q, k, v, scale=sa.scale, causal=False, key_mask=mask)))
        return h, self.mlp(x)


class Encoder(nn.Module):
    def __init__(self, config: DiaConfig) -> None:
        super().__init__()
        enc = config.model.encoder
        self.embedding = nn.Embedding(enc.vocab_size, enc.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(enc.n_layer))
        self.norm = RMSNorm(enc.hidden_size, enc.norm_eps)
        self.rotary = RotaryEmbedding(enc.head_dim, enc.rope_theta, config.data.text_length)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """text_ids [R, T] (0 = pad, T <= text_length), text_mask [R, T] bool -> hidden states [R, T, D]."""
        if text_ids.shape[1] > self.rotary.max_positions:
            raise ValueError(f"{text_ids.shape[1]} text positions exceed the model's {self.rotary.max_positions}")
        h, delta = self.embedding(text_ids), None
        for layer in self.layers:
            h, delta = layer(h, delta, self.rotary, text_mask)
        return self.norm.add(h, delta)[0]


@dataclass
class DecoderState:
    """Everything a decode step reads and writes, preallocated (static shapes, fixed addresses).

    self_k/self_v: [n_layer, R, Hkv, L, D] self-attention caches (R = rows = 2 x batch with CFG);
    cross_k/cross_v: [n_layer, R, Hc, Tenc, D] computed once from the encoder output;
    cross_mask: [R, Tenc] text padding mask; self_mask: [R, L] or None (left-padded prompts);
    cross_len: [R] text positions each row attends (the last real one + 1; None: all Tenc);
    semaphores: int32 zeros for the split-KV decode attention (None: made per call).
    """

    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    cross_mask: torch.Tensor
    self_mask: torch.Tensor | None = None
    cross_len: torch.Tensor | None = None
    semaphores: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.self_k.shape[3]

    def select_rows(self, rows: slice) -> DecoderState:
        """Views of ``rows`` of every per-row tensor (the semaphores are shared)."""

        def cut(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            return None if t is None else t[(slice(None),) * dim + (rows,)]

        return DecoderState(
            cut(self.self_k, 1),
            cut(self.self_v, 1),
            cut(self.cross_k, 1),
            cut(self.cross_v, 1),
            cut(self.cross_mask, 0),
            cut(self.self_mask, 0),
            cut(self.cross_len, 0),
            self.semaphores,
        )


def text_lengths(mask: torch.Tensor) -> torch.Tensor:
    """[R, T] bool -> [R] int64: the last True position + 1 (0 for an all-False row)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * pos).amax(dim=1)


def allocate_state(
    config: DiaConfig,
    rows: int,
    max_len: int,
    text_len: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    self_mask: bool = False,
) -> DecoderState:
    """A zeroed :class:`DecoderState` of ``rows`` rows, ``max_len`` decoder and ``text_len`` text positions:
    caches zero, no text attended (``cross_mask`` False, ``cross_len`` 0) until a prefill writes them,
    ``self_mask`` (when asked for) all True."""
    dec = config.model.decoder
    self_k = torch.zeros(dec.n_layer, rows, dec.n_kv_head, max_len, dec.head_dim, device=device, dtype=dtype)
    cross_k = torch.zeros(
        dec.n_layer, rows, dec.cross_n_kv_head, text_len, dec.cross_head_dim, device=device, dtype=dtype
    )
    return DecoderState(
        self_k,
        torch.zeros_like(self_k),
        cross_k,
        torch.zeros_like(cross_k),
        torch.zeros(rows, text_len, dtype=torch.bool, device=device),
        torch.ones(rows, max_len, dtype=torch.bool, device=device) if self_mask else None,
        torch.zeros(rows, dtype=torch.long, device=device),
        semaphores_for(config, rows, device),
    )


def semaphores_for(config: DiaConfig, rows: int, device: torch.device) -> torch.Tensor:
    """The int32 zeros the decode attention of ``rows`` rows needs (self- and cross-attention share them)."""
    dec = config.model.decoder
    return torch.zeros(rows * max(dec.n_kv_head, dec.cross_n_kv_head), dtype=torch.int32, device=device)


class DecoderLayer(nn.Module):
    def __init__(self, config: DiaConfig) -> None:
        super().__init__()
        dec, enc, eps = config.model.decoder, config.model.encoder, config.model.decoder.norm_eps
        D = dec.hidden_size
        self.pre_sa_norm = RMSNorm(D, eps)
        self.self_attention = SelfAttention(D, D, dec.n_head, dec.n_kv_head, dec.head_dim)
        self.pre_ca_norm = RMSNorm(D, eps)
        self.cross_attention = CrossAttention(
            D, enc.hidden_size, D, dec.cross_n_head, dec.cross_n_kv_head, dec.cross_head_dim
        )
        self.pre_mlp_norm = RMSNorm(D, eps)
        self.mlp = GatedMLP(D, dec.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        delta: torch.Tensor | None,
        state: DecoderState,
        layer: int,
        pos: torch.Tensor | None,
        kv_len: torch.Tensor | None,
        rope: RotaryEmbedding,
        cross_rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill from position 0 when ``pos`` is None, else one step at ``pos`` (1-element tensor)
        attending the ``kv_len`` (= ``pos + 1``, computed once per step by the decoder) cached keys.

        Takes the residual stream ``h`` and the previous layer's pending output ``delta``, returns the new
        ``h`` and this layer's pending output: a decode step is add+norm, qkv GEMM, RoPE + cache write,
        attention, o GEMM, add+norm, q GEMM, cross-attention, o GEMM, add+norm, gate/up GEMM, SwiGLU,
        down GEMM (13 launches)."""
        sa = self.self_attention
        x, h = self.pre_sa_norm.add(h, delta)
        k_cache, v_cache = state.self_k[layer], state.self_v[layer]
        q = sa.project(x, pos, rope, k_cache, v_cache)
        if pos is None:
            T = x.shape[1]
            mask = None if state.self_mask is None else state.self_mask[:, :T]
            a = ops.attention(q, k_cache[:, :, :T], v_cache[:, :, :T], scale=sa.scale, causal=True, key_mask=mask)
        else:
            a = ops.decode_attention(
                q,
                k_cache,
                v_cache,
                scale=sa.scale,
                kv_len=kv_len,
                key_mask=state.self_mask,
                semaphores=state.semaphores,
            )
        x, h = self.pre_ca_norm.add(h, sa.output(a))

        ca = self.cross_attention
        q = ca.project_q(x)
        if cross_rope is not None:  # old (v0.1) checkpoints only
            q = RotaryEmbedding.apply(q, *cross_rope)
        ck, cv = state.cross_k[layer], state.cross_v[layer]
        if pos is None:
            a = ops.attention(q, ck, cv, scale=ca.scale, causal=False, key_mask=state.cross_mask)
        else:
            a = ops.decode_attention(
                q,
                ck,
                cv,
                scale=ca.scale,
                kv_len=state.cross_len,
                key_mask=state.cross_mask,
                semaphores=state.semaphores,
            )
        x, h = self.pre_mlp_norm.add(h, ca.output(a))
        return h, self.mlp(x)


class MultiChannelEmbedding(nn.Module):
    """One table of ``channels * vocab`` rows; channel c's code v reads row ``c * vocab + v``."""

    def __init__(self, channels: int, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(channels * vocab, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return ops.embed_codes(codes, self.embed.weight, self.vocab)


class Decoder(nn.Module):
    def __init__(self, config: DiaConfig) -> None:
        super().__init__()
        dec = config.model.decoder
        self.channels, self.vocab = config.data.channels, dec.vocab_size
        self.embeddings = MultiChannelEmbedding(self.channels, dec.vocab_size, dec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(dec.n_layer))
        self.norm = RMSNorm(dec.hidden_size, dec.norm_eps)
        self.logits_dense = nn.Linear(dec.hidden_size, self.channels * dec.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(dec.head_dim, dec.rope_theta, config.data.audio_length)
        self.cross_rotary = (
            RotaryEmbedding(dec.cross_head_dim, dec.rope_theta, max(config.data.audio_length, config.data.text_length))
            if config.model.cross_attention_rope
            else None
        )

    def forward(
        self,
        codes: torch.Tensor,
        state: DecoderState,
        pos: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        logits_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Delayed codes [R, T, C] -> fp32 logits [R, T, C, V].

        ``pos`` None: prefill positions [0, T) (fills the caches). Otherwise T == 1 and ``pos`` is
        an int64 tensor on the device with the position of this step: one element for every row, or one per
        row ([R], continuous batching). ``last_only``:
        only the last position's logits, [R, 1, C, V] (a prefill that needs just the next step's
        logits skips the output projection of the others). ``logits_out`` [R, C, V] in the model's dtype:
        the last position's logits are written there by the output GEMM itself (no cast, no copy) and it is
        returned instead.
        """
        R, T, _ = codes.shape
        if pos is None and T > self.rotary.max_positions:
            raise ValueError(f"{T} decoder positions exceed the model's {self.rotary.max_positions}")
        kv_len = None if pos is None else pos + 1  # one op per step, not one per layer
        cross_rope = None
        if self.cross_rotary is not None:  # per-row positions broadcast over heads: [R or 1, 1, 1, D/2]
            at = torch.arange(T, device=codes.device) if pos is None else pos.reshape(-1, 1, 1)
            cross_rope = self.cross_rotary.cos_sin(at)
        h, delta = self.embeddings(codes), None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, delta, state, i, pos, kv_len, self.rotary, cross_rope)
        if last_only or logits_out is not None:
            h, delta = h[:, -1:], delta[:, -1:]
        x = self.norm.add(h, delta)[0]
        if logits_out is not None:
            head, flat_x, flat_out = self.logits_dense, x.reshape(R, -1), logits_out.view(R, -1)
            if isinstance(head, (Int8Linear, Int4Linear)):
                head(flat_x, out=flat_out)
            elif isinstance(head, nn.Linear) and type(head.weight) is nn.Parameter:
                torch.matmul(flat_x, head.weight.t(), out=flat_out)
            else:  # a torchao-quantized head (CUDA): a tensor-subclass weight with its own kernels, no out=
                flat_out.copy_(head(flat_x))
            return logits_out
        logits = self.logits_dense(x)
        return logits.view(R, x.shape[1], self.channels, self.vocab).float()


class DiaModel(nn.Module):
    """Encoder + decoder with the state-dict naming of transformers' Dia (minus the ``model.`` prefix)."""

    def __init__(self, config: DiaConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return self.decoder.embeddings.embed.weight.device  # not a GEMM weight: those may be quantized

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle leave out the decode engine that generation keeps on the model (its buffers,
        # graphs and locks belong to this model); a copy makes its own on first use
        state = self.__dict__.copy()
        state.pop("_dia_fast_engine", None)
        return state

    def published_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict name, tensor) of every weight under its published name: the ``q_proj``, ``k_proj`` and
        ``v_proj`` of a self-attention are views into its fused ``qkv_proj`` (writing them writes the model)."""
        for name, param in self.named_parameters():
            if name.endswith(".qkv_proj.weight"):
                attn = self.get_submodule(name[: -len(".qkv_proj.weight")])
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), param.split(attn.split_sizes), strict=True):
                    yield name.replace("qkv_proj", proj), part
            else:
                yield name, param

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embeddings.embed.weight.dtype

    def encode(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(text_ids, text_mask)

    def new_state(
        self,
        encoder_out: torch.Tensor,
        text_mask: torch.Tensor,
        max_len: int,
        self_mask: torch.Tensor | None = None,
    ) -> DecoderState:
        """Allocate the decoder caches for ``encoder_out.shape[0]`` rows and ``max_len`` positions,
        and compute the cross-attention K/V of every layer once."""
        dec = self.config.model.decoder
        R, Tenc, _ = encoder_out.shape
        n = dec.n_layer
        kw = dict(device=encoder_out.device, dtype=self.dtype)
        self_k = torch.zeros(n, R, dec.n_kv_head, max_len, dec.head_dim, **kw)
        self_v = torch.zeros_like(self_k)
        cross_k = torch.empty(n, R, dec.cross_n_kv_head, Tenc, dec.cross_head_dim, **kw)
        cross_v = torch.empty_like(cross_k)
        self.write_cross_kv(encoder_out, cross_k, cross_v)
        mask = text_mask.bool()
        sems = semaphores_for(self.config, R, encoder_out.device)
        return DecoderState(self_k, self_v, cross_k, cross_v, mask, self_mask, text_lengths(mask), sems)

    def write_cross_kv(self, encoder_out: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor) -> None:
        """Write the cross-attention K/V of every decoder layer for ``encoder_out`` [R, Tenc, D]
        into ``cross_k`` / ``cross_v`` [n_layer, R, Hc, Tenc, Dc] (views of larger, preallocated
        caches work: nothing else is allocated beyond one layer's projections)."""
        Tenc = encoder_out.shape[1]
        enc_rope = None
        if self.decoder.cross_rotary is not None:
            enc_rope = self.decoder.cross_rotary.cos_sin(torch.arange(Tenc, device=encoder_out.device))
        for i, layer in enumerate(self.decoder.layers):
            k, v = layer.cross_attention.project_kv(encoder_out)
            if enc_rope is not None:
                k = RotaryEmbedding.apply(k, *enc_rope)
            cross_k[i].copy_(k)
            cross_v[i].copy_(v)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, T, C, V] for delayed decoder codes [B, T, C] (no CFG)."""
        enc = self.encode(text_ids, text_mask)
        state = self.new_state(enc, text_mask, codes.shape[1])
        return self.decoder(codes, state)
