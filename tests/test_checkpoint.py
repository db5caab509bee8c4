"""Checkpoint loading: transformers and official nari-labs layouts, file formats, strict errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
