"""The model's fused layout: q/k/v in one matrix behind the published state-dict names, and RoPE tables that stay
fp32 whatever the model is cast to."""

from __future__ import annotations

import torch

from dia_fast import checkpoint as ck
from dia_fast.config import DiaConfig
from dia_fast.model import DiaModel, SelfAttention


def _model(seed: int = 0) -> DiaModel:
    torch.manual_seed(seed)
    return DiaModel(DiaConfig.preset("tiny")).eval()


def test_state_dict_keeps_the_published_names_and_round_trips() -> None:
    model = _model()
    state = model.state_dict()
    assert not any("qkv_proj" in k for k in state)
    dec = model.config.model.decoder
    q = state["decoder.layers.0.self_attention.q_proj.weight"]
    k = state["decoder.layers.0.self_attention.k_proj.weight"]
    assert q.shape == (dec.n_head * dec.head_dim, dec.hidden_size)
    assert k.shape == (dec.n_kv_head * dec.head_dim, dec.hidden_size)
    # each its own storage (safetensors refuses shared tensors), holding the fused matrix's rows
    fused = model.decoder.layers[0].self_attention.qkv_proj.weight
    assert q.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([q, k, state["decoder.layers.0.self_attention.v_proj.weight"]]), fused)
    # the transformers layout of these names converts and loads into transformers' key set
    assert all(k.startswith(("model.", "logits_dense")) for k in ck.to_transformers(state))
    other = _model(seed=1)
    assert not torch.equal(other.decoder.layers[0].self_attention.qkv_proj.weight, fused)
    other.load_state_dict(state, strict=True)
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # published_parameters: the state dict's names, the projections as views that write the model
    pub = dict(model.published_parameters())
    assert set(pub) == set(state)
    with torch.no_grad():
        pub["encoder.layers.1.self_attention.v_proj.weight"].fill_(0.5)
    enc_sa = model.encoder.layers[1].self_attention
    assert isinstance(enc_sa, SelfAttention)
    assert bool((enc_sa.qkv_proj.weight[-enc_sa.split_sizes[2] :] == 0.5).all())


def test_mis_shaped_projections_are_reported_by_name() -> None:
    model = _model()
    state = model.state_dict()
    state["decoder.layers.0.self_attention.k_proj.weight"] = torch.zeros(3, 3)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        assert "k_proj" in str(exc)
    else:
        raise AssertionError("a mis-shaped k_proj loaded")


def test_rope_tables_stay_fp32_under_a_plain_cast() -> None:
    """``model.to(torch.bfloat16)`` casts every buffer; the RoPE tables come back in fp32 (a bf16 frequency moved
    cos by up to 0.29 at position 3000)."""
    model = _model()
    rot = model.decoder.rotary
    want_cos, want_sin = rot.cos.clone(), rot.sin.clone()
    model.to(torch.bfloat16)
    assert rot.cos.dtype == torch.float32 and rot.sin.dtype == torch.float32
    assert torch.equal(rot.cos, want_cos) and torch.equal(rot.sin, want_sin)
    assert model.decoder.layers[0].self_attention.qkv_proj.weight.dtype == torch.bfloat16
    # the error the cast used to make, for scale: bf16-rounded frequencies at position 3000
    D = model.config.model.decoder.head_dim
    inv = (1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)).float()
    rounded = inv.to(torch.bfloat16).float()
    assert float(((3000 * inv).cos() - (3000 * rounded).cos()).abs().max()) > 0.1
    # and the tables are the angles transformers computes (fp32 frequencies x fp32 positions)
    assert torch.equal(want_cos[3000], (torch.tensor(3000.0) * inv).cos())
