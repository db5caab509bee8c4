"""Checkpoint loading: transformers and official nari-labs layouts, file formats, strict errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dia_fast import DiaTTS
from dia_fast.checkpoint import RANDOM_WEIGHTS_KEY, CheckpointError, safetensors_metadata
from dia_fast.config import DiaConfig
from dia_fast.text import encode_batch

from .hf_reference import HFDacAdapter, hf_dia, hf_processor

TEXT = ["[S1] Checkpoints load the same weights. [S2] Yes."]


def _codec() -> HFDacAdapter:
    return HFDacAdapter(hf_processor().audio_tokenizer)


def _official_config(config: DiaConfig) -> dict:
    """The official v0.1 config.json for ``config`` (field names from the released file)."""
    enc, dec, data = config.model.encoder, config.model.decoder, config.data
    return {
        "version": "0.1",
        "model": {
            "encoder": {
                "n_layer": enc.n_layer,
                "n_embd": enc.hidden_size,
                "n_hidden": enc.intermediate_size,
                "n_head": enc.n_head,
                "head_dim": enc.head_dim,
            },
            "decoder": {
                "n_layer": dec.n_layer,
                "n_embd": dec.hidden_size,
                "n_hidden": dec.intermediate_size,
                "gqa_query_heads": dec.n_head,
                "kv_heads": dec.n_kv_head,
                "gqa_head_dim": dec.head_dim,
                "cross_query_heads": dec.cross_n_head,
                "cross_head_dim": dec.cross_head_dim,
            },
            "src_vocab_size": 256,
            "tgt_vocab_size": 1028,
            "dropout": 0.0,
            "normalization_layer_epsilon": 1e-5,
            "weight_dtype": "float32",
            "rope_min_timescale": 1,
            "rope_max_timescale": 10000,
        },
        "training": {},
        "data": {
            "text_length": data.text_length,
            "audio_length": data.audio_length,
            "channels": 9,
            "text_pad_value": 0,
            "audio_eos_value": 1024,
            "audio_pad_value": 1025,
            "audio_bos_value": 1026,
            "delay_pattern": list(data.delay_pattern),
        },
    }


def _hf_to_nari(hf_state: dict, config: DiaConfig) -> dict:
    """transformers keys -> official DenseGeneral kernels, written from the published conversion rules
    (W_hf = W_nari.reshape(in_total, out_total).T), independently of dia_fast's converter."""
    dec = config.model.decoder
    out = {}
    for key, w in hf_state.items():
        k = key.removeprefix("model.")
        if k == "logits_dense.weight":
            out["decoder.logits_dense.weight"] = w.T.reshape(w.shape[1], config.data.channels, -1).contiguous()
            continue
        if k == "decoder.embeddings.embed.weight":
            for c, table in enumerate(w.split(dec.vocab_size)):
                out[f"decoder.embeddings.{c}.weight"] = table.clone()
            continue
        if k.endswith("mlp.gate_up_proj.weight"):
            out[k.replace("gate_up_proj", "wi_fused")] = w.T.reshape(w.shape[1], 2, -1).contiguous()
            continue
        if k.endswith("mlp.down_proj.weight"):
            out[k.replace("down_proj", "wo")] = w.T.contiguous()
            continue
        if "_attention." in k and k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            head_dim = (
                config.model.encoder.head_dim
                if k.startswith("encoder")
                else (dec.cross_head_dim if "cross_attention" in k else dec.head_dim)
            )
            out[k] = w.T.reshape(w.shape[1], -1, head_dim).contiguous()
            continue
        if "_attention." in k and k.endswith("o_proj.weight"):
            head_dim = (
                config.model.encoder.head_dim
                if k.startswith("encoder")
                else (dec.cross_head_dim if "cross_attention" in k else dec.head_dim)
            )
            out[k] = w.T.reshape(-1, head_dim, w.shape[0]).contiguous()
            continue
        out[k] = w.clone()
    return out


@pytest.fixture(scope="module")
def hf_model():
    return hf_dia(DiaConfig.preset("tiny"), seed=11)


def _hf_logits(hf, dec_ids):
    ids, mask = encode_batch(TEXT)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec_ids).logits
    B, T = dec_ids.shape[:2]
    return out.view(B, 9, T, -1).transpose(1, 2)


def _our_logits(tts: DiaTTS, dec_ids):
    ids, mask = encode_batch(TEXT)
    with torch.no_grad():
        return tts.model(ids, mask, dec_ids)


@pytest.fixture(scope="module")
def dec_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1024, (1, 20, 9), generator=g)


def test_transformers_save_pretrained_loads_and_matches(hf_model, dec_ids, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    tts = DiaTTS.from_pretrained(tmp_path / "hf", codec=_codec())
    ref = _hf_logits(hf_model, dec_ids)
    torch.testing.assert_close(_our_logits(tts, dec_ids), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_official_layout_loads_and_matches(hf_model, dec_ids, tmp_path, fmt):
    config = DiaConfig.preset("tiny")
    nari = _hf_to_nari(hf_model.state_dict(), config)
    cfg = _official_config(config)
    cfg["model"]["rope_max_timescale"] = 10000
    d = tmp_path / "nari"
    d.mkdir()
    # The v0.1 code put RoPE on cross-attention; the current official config does not. Use the
    # transformers config (current semantics) so that the logits compare with transformers.
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    if fmt == "safetensors":
        save_file(nari, str(d / "model.safetensors"))
    else:
        torch.save(nari, d / "dia-v0_1.pth")
    tts = DiaTTS.from_pretrained(d, codec=_codec())
    ref = _hf_logits(hf_model, dec_ids)
    torch.testing.assert_close(_our_logits(tts, dec_ids), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_official_v01_config_and_weights_file_path(hf_model, tmp_path):
    config = DiaConfig.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(_official_config(config)))
    torch.save(_hf_to_nari(hf_model.state_dict(), config), tmp_path / "dia-v0_1.pth")
    tts = DiaTTS.from_pretrained(tmp_path / "dia-v0_1.pth", codec=_codec())  # a file: config.json next to it
    assert tts.config.model.cross_attention_rope  # v0.1 semantics
    assert tts.config.model.decoder.n_kv_head == config.model.decoder.n_kv_head


@pytest.mark.parametrize("layout", ["transformers", "official"])
def test_save_pretrained_round_trip(tmp_path, layout, dec_ids):
    tts = DiaTTS.random("tiny", seed=3)
    tts.save_pretrained(tmp_path / layout, layout=layout)
    back = DiaTTS.from_pretrained(tmp_path / layout, codec=_codec())
    for (k, a), (k2, b) in zip(tts.model.state_dict().items(), back.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(_our_logits(tts, dec_ids), _our_logits(back, dec_ids))


@pytest.mark.parametrize("layout", ["transformers", "official"])
def test_saved_random_weights_load_back_marked_as_a_demo(tmp_path, layout):
    """Weights saved from DiaTTS.random carry a mark in the safetensors metadata: loading them back (the directory
    or the weights file) warns that they are random and gives a demo model. A model of one's own with the same
    weights is not marked, and saving it over the directory clears the mark."""
    demo = DiaTTS.random("tiny", seed=3)
    directory = demo.save_pretrained(tmp_path / "ckpt", layout=layout)
    assert safetensors_metadata(directory) == {"format": "pt", RANDOM_WEIGHTS_KEY: "true"}
    for path in (directory, directory / "model.safetensors"):
        with pytest.warns(UserWarning, match=r"holds random weights \(saved from a dia_fast demo model"):
            assert DiaTTS.from_pretrained(path, codec=_codec()).demo
    DiaTTS(demo.model, demo.codec).save_pretrained(directory, layout=layout)
    assert safetensors_metadata(directory) == {"format": "pt"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not DiaTTS.from_pretrained(directory, codec=_codec()).demo
    assert not [w for w in caught if "random" in str(w.message)]


def test_save_pretrained_keeps_the_codec_and_fails_without_leaving_a_partial_model(tmp_path, monkeypatch):
    """The codec is saved with the model (dac/), so the directory loads back speaking as the model did. A failed
    save (a full disk) is an OSError naming the directory: a new directory is removed, an existing model is left as
    it was."""
    import safetensors.torch
    from safetensors import SafetensorError

    tts = DiaTTS.random("tiny", seed=5)
    directory = tts.save_pretrained(tmp_path / "m")
    assert (directory / "dac" / "config.json").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = DiaTTS.from_pretrained(directory)
    assert not [w for w in caught if "codec" in str(w.message)]
    for (k, a), (_, b) in zip(tts.codec.state_dict().items(), back.codec.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    before = (directory / "model.safetensors").read_bytes()

    def disk_full(*_a, **_k):
        raise SafetensorError("Error while serializing: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match=r"cannot save the model to .*new: .*No space left on device"):
        tts.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="cannot save the model"):
        tts.save_pretrained(directory)
    assert (directory / "model.safetensors").read_bytes() == before
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_sharded_safetensors_with_index(hf_model, dec_ids, tmp_path):
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(DiaConfig.preset("tiny").to_dict()))
    tts = DiaTTS.from_pretrained(tmp_path, codec=_codec())
    ref = _hf_logits(hf_model, dec_ids)
    torch.testing.assert_close(_our_logits(tts, dec_ids), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_save_pretrained_over_a_sharded_checkpoint_loads_what_was_saved(tmp_path):
    """A sharded checkpoint's index is preferred when loading: saving over one removes the index and the shards it
    names (and nothing else), so the model just saved is what loads back, not the old shards."""
    old, new = DiaTTS.random("tiny", seed=1), DiaTTS.random("tiny", seed=2)

    def loaded(directory):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (random weights)
            return DiaTTS.from_pretrained(directory, codec=old.codec).model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()

    directory = old.save_pretrained(tmp_path / "ckpt")
    shard = "model-00001-of-00001.safetensors"
    (directory / "model.safetensors").rename(directory / shard)
    with safe_open(str(directory / shard), "pt") as f:
        weight_map = dict.fromkeys(f.keys(), shard)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "notes.safetensors").write_bytes(b"not named by the index")
    assert same(loaded(directory), old.model.state_dict())

    new.save_pretrained(directory)
    kept = ["config.json", "dac", "model.safetensors", "notes.safetensors"]
    assert sorted(p.name for p in directory.iterdir()) == kept
    assert same(loaded(directory), new.model.state_dict())
    assert not same(new.model.state_dict(), old.model.state_dict())


def _write(tmp_path, state):
    (tmp_path / "config.json").write_text(json.dumps(DiaConfig.preset("tiny").to_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys_are_named(hf_model, tmp_path):
    state = dict(hf_model.state_dict())
    del state["model.encoder.norm.weight"]
    state["model.decoder.extra.weight"] = torch.zeros(3)
    state["model.decoder.norm.weight"] = torch.zeros(7)
    _write(tmp_path, state)
    with pytest.raises(CheckpointError) as err:
        DiaTTS.from_pretrained(tmp_path, codec=_codec())
    msg = str(err.value)
    assert "missing keys: encoder.norm.weight" in msg
    assert "unexpected keys: decoder.extra.weight" in msg
    assert "decoder.norm.weight: checkpoint (7,) vs model (64,)" in msg


def test_config_mismatch_is_a_shape_error(hf_model, tmp_path):
    big = DiaConfig.preset("tiny").with_layers(2, 3)
    (tmp_path / "config.json").write_text(json.dumps(big.to_dict()))
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: decoder.layers.2"):
        DiaTTS.from_pretrained(tmp_path, codec=_codec())


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        DiaTTS.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(DiaConfig.preset("tiny").to_dict()))
    with pytest.raises(CheckpointError, match="no weights found"):
        DiaTTS.from_pretrained(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        DiaTTS.from_pretrained(tmp_path)
    only = tmp_path / "alone"
    only.mkdir()
    save_file({"x": torch.zeros(1)}, str(only / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no config.json"):
        DiaTTS.from_pretrained(only)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face hub"):
        DiaTTS.from_pretrained("nari-labs/definitely-not-cached-dia")
    # the arguments are checked before anything is fetched
    with pytest.raises(ValueError, match="device"):
        DiaTTS.from_pretrained("nari-labs/definitely-not-cached-dia", device="bogus")
    with pytest.raises(ValueError, match="quantize"):
        DiaTTS.from_pretrained("nari-labs/definitely-not-cached-dia", quantize="int9")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_half_precision_keeps_norms_fp32(tmp_path, dtype, dec_ids):
    tts = DiaTTS.random("tiny", seed=1)
    tts.save_pretrained(tmp_path)
    half = DiaTTS.from_pretrained(tmp_path, dtype=dtype, codec=_codec())
    assert half.dtype == dtype
    assert half.model.decoder.norm.weight.dtype == torch.float32
    # the checkpoint's fp32 values, not rounded to the load dtype on the way (1 + 0.1 * randn: not representable)
    saved = load_file(str(tmp_path / "model.safetensors"))
    norms = [k for k in saved if k.endswith("norm.weight")]
    assert len(norms) == 2 * 2 + 3 * 2 + 2
    for key in norms:
        assert torch.equal(half.model.get_parameter(key.removeprefix("model.")), saved[key]), key
    assert not torch.equal(saved["model.decoder.norm.weight"].to(dtype).float(), saved["model.decoder.norm.weight"])
    ref = _our_logits(tts, dec_ids)
    got = _our_logits(half, dec_ids).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def _saved(tmp_path):
    from dia_fast import DiaTTS

    out = DiaTTS.random("tiny", seed=0).save_pretrained(tmp_path / "ckpt")
    return out, out / "model.safetensors"


def test_a_truncated_safetensors_file_is_a_one_line_error_naming_it(tmp_path):
    from dia_fast import DiaTTS
    from dia_fast.checkpoint import CheckpointError

    directory, weights = _saved(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file") as err:
        DiaTTS.from_pretrained(directory, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("poison", "message"), [("nan", "holds NaN or infinite values"), ("int", "not floating point")]
)
def test_bad_weights_are_errors_naming_the_file_and_tensor(tmp_path, poison, message):
    from safetensors.torch import load_file, save_file

    from dia_fast import DiaTTS
    from dia_fast.checkpoint import CheckpointError

    directory, weights = _saved(tmp_path)
    state = load_file(str(weights))
    name = sorted(state)[3]
    if poison == "nan":
        state[name] = state[name].clone()
        state[name].view(-1)[7] = float("nan")
    else:
        state[name] = state[name].to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=f"tensor {name} {message}|tensor {name} is int32, {message}"):
        DiaTTS.from_pretrained(directory, device="cpu")


def test_an_official_kernel_of_too_few_dimensions_is_a_checkpoint_error():
    """A 1-D attention kernel in the official layout named the tensor in a CheckpointError (it was an IndexError)."""
    from dia_fast.checkpoint import from_official

    with pytest.raises(CheckpointError, match=r"decoder.layers.0.self_attention.o_proj.weight: .* shape \(4,\)"):
        from_official({"decoder.layers.0.self_attention.o_proj.weight": torch.zeros(4)})


@pytest.fixture(scope="module")
def v01_checkpoint(hf_model, tmp_path_factory):
    """An official v0.1 checkpoint (Dia-1.6B's format: v0.1 config.json, DenseGeneral kernels in dia-v0_1.pth),
    whose cross-attention applies RoPE."""
    directory = tmp_path_factory.mktemp("v01")
    config = DiaConfig.preset("tiny")
    (directory / "config.json").write_text(json.dumps(_official_config(config)))
    torch.save(_hf_to_nari(hf_model.state_dict(), config), directory / "dia-v0_1.pth")
    return directory


@pytest.mark.parametrize(("layout", "quantize"), [("transformers", None), ("official", None), (None, "int8")])
def test_a_v01_model_saved_and_loaded_back_keeps_cross_attention_rope(
    v01_checkpoint, tmp_path, dec_ids, layout, quantize
):
    """Saving a v0.1 model kept its weights but lost the cross-attention RoPE (the saved copy was another model):
    the official layout now writes the v0.1 config format, the transformers and quantized layouts a 'dia_fast' block
    (the transformers layout warning that transformers cannot run it)."""
    tts = DiaTTS.from_pretrained(v01_checkpoint, codec=_codec(), quantize=quantize)
    assert tts.config.model.cross_attention_rope
    if layout == "transformers":
        with pytest.warns(UserWarning, match="transformers' Dia does not implement"):
            tts.save_pretrained(tmp_path / "saved", layout=layout, save_codec=False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tts.save_pretrained(tmp_path / "saved", layout=layout, save_codec=False)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    if layout == "official":
        assert written["version"] == "0.1"  # what the official v0.1 code reads
    else:
        assert written["dia_fast"] == {"cross_attention_rope": True}
    back = DiaTTS.from_pretrained(tmp_path / "saved", codec=_codec())
    assert back.config == tts.config
    assert torch.equal(_our_logits(back, dec_ids), _our_logits(tts, dec_ids))
    if layout == "transformers":  # (the RoPE matters: without it the same weights give other logits)
        plain = DiaConfig.from_dict({k: v for k, v in written.items() if k != "dia_fast"})
        other = DiaTTS.from_pretrained(tmp_path / "saved", codec=_codec(), config=plain)
        assert not torch.allclose(_our_logits(other, dec_ids), _our_logits(tts, dec_ids), atol=1e-3)


def _hf_dia_sub_configs(enc_kw: dict, dec_kw: dict, top_kw: dict, seed: int = 4):
    """A tiny transformers Dia built from its own config classes (not from dia_fast's to_dict), random weights."""
    from transformers import DiaConfig as HFDiaConfig
    from transformers import DiaDecoderConfig, DiaEncoderConfig, DiaForConditionalGeneration

    enc = DiaEncoderConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        intermediate_size=128, **enc_kw,
    )  # fmt: skip
    dec = DiaDecoderConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, cross_num_attention_heads=4, cross_head_dim=16, cross_num_key_value_heads=4,
        cross_hidden_size=64, **dec_kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = DiaForConditionalGeneration(HFDiaConfig(encoder_config=enc, decoder_config=dec, **top_kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _rope(theta: float) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


@pytest.mark.parametrize(
    ("enc_kw", "dec_kw"),
    [
        ({"norm_eps": 1e-2, **_rope(500.0)}, {"norm_eps": 1e-5, **_rope(10000.0)}),
        ({"norm_eps": 1e-6, **_rope(10000.0)}, {"norm_eps": 3e-2, **_rope(300.0)}),
    ],
)
def test_encoder_and_decoder_eps_and_theta_match_transformers(tmp_path, enc_kw, dec_kw):
    """transformers' Dia takes each sub-config's norm_eps and RoPE theta (and ignores the top-level norm_eps): a
    checkpoint whose encoder and decoder differ gives transformers' logits (dia_fast took the top-level eps and the
    decoder's theta for both)."""
    hf = _hf_dia_sub_configs(enc_kw, dec_kw, {"norm_eps": 0.3})
    hf.save_pretrained(tmp_path)
    tts = DiaTTS.from_pretrained(tmp_path, codec=_codec())
    ids, mask = encode_batch(["[S1] A text long enough that the positions of its bytes matter. [S2] Yes."])
    codes = torch.randint(0, 1024, (1, 40, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=codes).logits
        ref = ref.view(1, 9, 40, -1).transpose(1, 2)
        got = tts.model(ids, mask, codes)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_unsupported_rope_type_in_a_checkpoint_is_a_config_error(tmp_path):
    from dia_fast.config import ConfigError

    rope = {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}
    _hf_dia_sub_configs(rope, rope, {}).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.json: encoder_config\.rope_type='linear' is not supported"):
        DiaTTS.from_pretrained(tmp_path, codec=_codec())


def test_a_random_codec_saved_with_a_real_model_is_marked_and_warns_again(hf_model, tmp_path, dec_ids):
    """A real checkpoint without a codec gets the random demo DAC (with a warning). Saving it wrote that DAC into
    dac/ unmarked, and the saved directory then loaded it silently as if real: its weights are now marked as random
    (as a demo model's are) and loading them warns again. The model is not a demo; a codec of one's own is not
    marked."""
    from dia_fast.codec.dac import DacCodec

    hf_model.save_pretrained(tmp_path / "real")
    with pytest.warns(UserWarning, match="no codec checkpoint given"):
        tts = DiaTTS.from_pretrained(tmp_path / "real")
    directory = tts.save_pretrained(tmp_path / "saved")
    assert safetensors_metadata(directory / "dac") == {"format": "pt", RANDOM_WEIGHTS_KEY: "true"}
    assert safetensors_metadata(directory) == {"format": "pt"}  # (the model's weights are real)
    with pytest.warns(UserWarning, match=r"saved.dac holds a random codec .* not speech") as caught:
        back = DiaTTS.from_pretrained(directory)
    assert not [w for w in caught if "holds random weights" in str(w.message)]
    assert not back.demo
    for (k, a), (_, b) in zip(tts.codec.state_dict().items(), back.codec.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # saved again from the reloaded model: still marked
    back.save_pretrained(tmp_path / "again")
    assert safetensors_metadata(tmp_path / "again" / "dac")[RANDOM_WEIGHTS_KEY] == "true"
    # a codec of one's own (not the demo codec) is saved and loaded without a mark or a warning
    DiaTTS(tts.model, DacCodec.random("tiny", seed=7)).save_pretrained(tmp_path / "own")
    assert safetensors_metadata(tmp_path / "own" / "dac") == {"format": "pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiaTTS.from_pretrained(tmp_path / "own")


def test_save_pretrained_expands_the_tilde(tmp_path, monkeypatch):
    """from_pretrained expanded ``~`` but save_pretrained (and the codecs') wrote into a ``~`` folder of the cwd."""
    from dia_fast.codec import random_codec

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    tts = DiaTTS.random("tiny", seed=1)
    assert tts.save_pretrained("~/saved model") == home / "saved model"
    assert (home / "saved model" / "model.safetensors").is_file() and (home / "saved model" / "dac").is_dir()
    random_codec("dac").save_pretrained("~/dac")
    random_codec("encodec").save_pretrained("~/encodec")
    assert (home / "dac" / "model.safetensors").is_file() and (home / "encodec" / "model.safetensors").is_file()
    assert list(cwd.iterdir()) == []
    with pytest.warns(UserWarning, match="holds random weights"):
        DiaTTS.from_pretrained("~/saved model")


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"metadata": {}}', "no 'weight_map'"),
        ("{not json", "not a readable shard index"),
        ('["a list"]', "not a readable shard index"),
        ('{"weight_map": {"x": ["model-00001-of-00001.safetensors"]}}', "no 'weight_map'"),  # (unhashable values)
        ('{"weight_map": {"x": "model-00009-of-00009.safetensors"}}', "names shard files that are not in"),
    ],
)
def test_a_malformed_shard_index_is_an_error_naming_it(tmp_path, index, message):
    (tmp_path / "config.json").write_text(json.dumps(DiaConfig.preset("tiny").to_dict()))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: {message}") as err:
        DiaTTS.from_pretrained(tmp_path, codec=_codec())
    assert "\n" not in str(err.value)


def test_a_weights_file_path_finds_the_codec_beside_it(tmp_path):
    """from_pretrained(dir/model.safetensors) ignored dir/dac/ (the demo codec, with a warning, instead)."""
    from dia_fast.codec.dac import DacCodec

    tts = DiaTTS(DiaTTS.random("tiny", seed=2).model, DacCodec.random("tiny", seed=7))  # (not a demo: no warning)
    directory = tts.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = DiaTTS.from_pretrained(directory / "model.safetensors")
    for (k, a), (_, b) in zip(tts.codec.state_dict().items(), back.codec.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
