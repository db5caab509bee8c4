"""DiaConfig: presets, the three config.json formats, validation."""

from __future__ import annotations

import json

import pytest

from dia_fast.config import ConfigError, DataConfig, DiaConfig

from .test_checkpoint import _official_config


def test_defaults_are_dia_1_6b():
    c = DiaConfig()
    assert c.data.channels == 9 and c.data.text_length == 1024 and c.data.audio_length == 3072
    assert tuple(c.data.delay_pattern) == (0, 8, 9, 10, 11, 12, 13, 14, 15)
    assert (c.data.audio_eos_value, c.data.audio_pad_value, c.data.audio_bos_value) == (1024, 1025, 1026)
    enc, dec = c.model.encoder, c.model.decoder
    assert (enc.n_layer, enc.hidden_size, enc.n_head, enc.head_dim) == (12, 1024, 16, 128)
    assert (dec.n_layer, dec.hidden_size, dec.n_head, dec.n_kv_head, dec.vocab_size) == (18, 2048, 16, 4, 1028)
    assert DiaConfig.preset("dia-1.6b") == c


def test_transformers_config_round_trip():
    from transformers import DiaConfig as HFDiaConfig

    for name in ("tiny", "dia-1.6b"):
        c = DiaConfig.preset(name)
        hf = HFDiaConfig(**c.to_dict())
        back = DiaConfig.from_dict(hf.to_dict())
        assert back == c


def test_transformers_default_config_is_ours():
    from transformers import DiaConfig as HFDiaConfig

    assert DiaConfig.from_dict(HFDiaConfig().to_dict()) == DiaConfig()


def test_official_v01_config(tmp_path):
    raw = _official_config(DiaConfig())
    raw["data"]["audio_length"] = 3000  # the official validator rounds up to a multiple of 128
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    c = DiaConfig.from_json(path)
    assert c.data.audio_length == 3072
    assert c.model.decoder.n_kv_head == 4 and c.model.decoder.cross_n_kv_head == 16
    assert c.model.cross_attention_rope  # the v0.1 code rotated cross-attention q/k


def _official_0626_config() -> dict:
    """nari-labs/Dia-1.6B-0626's config.json (the current official format), field by field as the released file has
    them (shared/dia-facts.md, Part A section 1)."""
    encoder = {
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "max_position_embeddings": 1024,
        "model_type": "dia_encoder",
        "norm_eps": 1e-5,
        "num_attention_heads": 16,
        "num_hidden_layers": 12,
        "num_key_value_heads": 16,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "vocab_size": 256,
    }
    decoder = {
        "cross_head_dim": 128,
        "cross_hidden_size": 1024,
        "cross_num_attention_heads": 16,
        "cross_num_key_value_heads": 16,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 3072,
        "model_type": "dia_decoder",
        "norm_eps": 1e-5,
        "num_attention_heads": 16,
        "num_channels": 9,
        "num_hidden_layers": 18,
        "num_key_value_heads": 4,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "vocab_size": 1028,
    }
    return {
        "architectures": ["DiaForConditionalGeneration"],
        "bos_token_id": 1026,
        "eos_token_id": 1024,
        "pad_token_id": 1025,
        "decoder_config": decoder,
        "encoder_config": encoder,
        "delay_pattern": [0, 8, 9, 10, 11, 12, 13, 14, 15],
        "initializer_range": 0.02,
        "is_encoder_decoder": True,
        "model_type": "dia",
        "norm_eps": 1e-5,
        "torch_dtype": "float32",
        "transformers_version": "4.53.0.dev0",
    }


def test_current_official_config_is_the_transformers_layout():
    # The current official config.json (pydantic) has the same fields as transformers' DiaConfig.
    c = DiaConfig.from_dict(_official_0626_config())
    enc, dec, data = c.model.encoder, c.model.decoder, c.data
    assert (enc.n_layer, enc.hidden_size, enc.intermediate_size, enc.n_head, enc.n_kv_head, enc.head_dim) == (
        12, 1024, 4096, 16, 16, 128
    )  # fmt: skip
    assert (dec.n_layer, dec.hidden_size, dec.intermediate_size, dec.n_head, dec.n_kv_head, dec.head_dim) == (
        18, 2048, 8192, 16, 4, 128
    )  # fmt: skip
    assert (dec.cross_n_head, dec.cross_n_kv_head, dec.cross_head_dim, enc.vocab_size, dec.vocab_size) == (
        16, 16, 128, 256, 1028
    )  # fmt: skip
    assert (enc.norm_eps, dec.norm_eps, enc.rope_theta, dec.rope_theta) == (1e-5, 1e-5, 10000.0, 10000.0)
    assert (data.text_length, data.audio_length, data.channels) == (1024, 3072, 9)
    assert (data.audio_eos_value, data.audio_pad_value, data.audio_bos_value) == (1024, 1025, 1026)
    assert data.delay_pattern == (0, 8, 9, 10, 11, 12, 13, 14, 15)
    assert not c.model.cross_attention_rope  # the current weights have no cross-attention RoPE
    assert c == DiaConfig()  # the defaults are Dia-1.6B-0626


def test_norm_eps_and_rope_theta_are_read_per_sub_config():
    """As transformers' Dia: each sub-config's norm_eps and RoPE theta (the top-level norm_eps is unused), whether the
    theta is a plain field (the official format) or in rope_parameters / rope_scaling (transformers)."""
    raw = _official_0626_config()
    raw["norm_eps"] = 0.5  # unused
    raw["encoder_config"].update(norm_eps=1e-3, rope_theta=500.0)
    raw["decoder_config"].update(norm_eps=1e-4, rope_theta=None, rope_scaling={"rope_type": "default", "rope_theta": 7})
    c = DiaConfig.from_dict(raw)
    assert (c.model.encoder.norm_eps, c.model.decoder.norm_eps) == (1e-3, 1e-4)
    assert (c.model.encoder.rope_theta, c.model.decoder.rope_theta) == (500.0, 7.0)
    del raw["encoder_config"]["rope_theta"], raw["decoder_config"]["rope_scaling"]
    raw["encoder_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 250.0}
    c = DiaConfig.from_dict(raw)
    assert (c.model.encoder.rope_theta, c.model.decoder.rope_theta) == (250.0, 10000.0)
    back = DiaConfig.from_dict(c.to_dict())
    assert (back.model.encoder.norm_eps, back.model.decoder.norm_eps) == (1e-3, 1e-4)
    assert (back.model.encoder.rope_theta, back.model.decoder.rope_theta) == (250.0, 10000.0)


@pytest.mark.parametrize(
    "sub, rope, message",
    [
        ("decoder_config", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}, "rope_type='linear'"),
        ("encoder_config", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ("decoder_config", {"rope_scaling": 2.0}, "must be an object"),
    ],
)
def test_unsupported_rope_is_an_error(sub, rope, message):
    raw = _official_0626_config()
    raw[sub].update(rope)
    with pytest.raises(ConfigError, match=f"{sub}.*{message}"):
        DiaConfig.from_dict(raw)


def test_a_partial_rotary_factor_is_ignored_as_transformers_does():
    """transformers' Dia builds its rotary tables over the whole head whatever partial_rotary_factor says: the same
    model as without it (not an error)."""
    raw = _official_0626_config()
    raw["encoder_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    assert DiaConfig.from_dict(raw) == DiaConfig.from_dict(_official_0626_config())


def test_v01_config_round_trips_in_both_formats():
    """A v0.1 config (cross-attention RoPE) keeps it through the transformers format (the 'dia_fast' block) and the
    official v0.1 format; the v0.1 format is refused for what it cannot hold."""
    raw = _official_config(DiaConfig.preset("tiny"))
    c = DiaConfig.from_dict(raw)
    assert c.model.cross_attention_rope
    hf = c.to_dict()
    assert hf["dia_fast"] == {"cross_attention_rope": True}
    assert DiaConfig.from_dict(hf) == c
    assert c.to_official_v01_dict() == raw
    assert DiaConfig.from_dict(c.to_official_v01_dict()) == c
    assert "dia_fast" not in DiaConfig.preset("tiny").to_dict()  # (plain transformers configs stay plain)
    with pytest.raises(ConfigError, match="no cross-attention RoPE"):
        DiaConfig.preset("tiny").to_official_v01_dict()
    gqa_encoder = DiaConfig.from_dict(dict(hf, encoder_config=dict(hf["encoder_config"], num_key_value_heads=2)))
    with pytest.raises(ConfigError, match="encoder n_kv_head 2 != n_head 4"):
        gqa_encoder.to_official_v01_dict()
    with pytest.raises(ConfigError, match="boolean cross_attention_rope"):
        DiaConfig.from_dict(dict(hf, dia_fast={"cross_attention_rope": "yes"}))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(delay_pattern=[0, 8, 9]), "delay_pattern has 3 entries"),
        (lambda r: r["decoder_config"].update(num_key_value_heads=3), "multiple of n_kv_head"),
        (lambda r: r["decoder_config"].update(head_dim=127), "even"),
        (lambda r: r["decoder_config"].update(cross_num_key_value_heads=0), "cross_n_kv_head must be positive"),
        (lambda r: r["decoder_config"].update(vocab_size=1000), "too small for EOS/PAD/BOS"),
        (lambda r: r["encoder_config"].update(hidden_act="gelu"), "gelu"),
        (lambda r: r.pop("encoder_config"), "unrecognised config format"),
    ],
)
def test_validation_errors_are_clear(change, message):
    raw = DiaConfig.preset("tiny").to_dict()
    change(raw)
    with pytest.raises(ConfigError, match=message):
        DiaConfig.from_dict(raw)


def test_bad_json_and_bad_preset(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DiaConfig.from_json(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        DiaConfig.preset("dia-7b")
    with pytest.raises(ConfigError, match="EOS/PAD/BOS values must differ"):
        DiaConfig(data=DataConfig(audio_pad_value=1024))
