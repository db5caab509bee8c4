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


def test_current_official_config_is_the_transformers_layout():
    # The current official config.json (pydantic) has the same fields as transformers' DiaConfig.
    raw = DiaConfig().to_dict()
    c = DiaConfig.from_dict(raw)
    assert not c.model.cross_attention_rope


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
