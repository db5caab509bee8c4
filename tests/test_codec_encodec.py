"""EncodecCodec against transformers' EncodecModel on identical seeded random weights; both checkpoint
layouts (transformers, encodec package); strict key errors; input validation."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import EncodecConfig, EncodecModel
from transformers.models.encodec.modeling_encodec import (
    EncodecConv1d,
    EncodecConvTranspose1d,
    EncodecResidualVectorQuantizer,
)

from dia_fast.checkpoint import CheckpointError
from dia_fast.codec import AudioCodec, codec_kind, load_codec
from dia_fast.codec.encodec import EncodecCodec, EncodecCodecConfig, to_internal, to_transformers

BANDWIDTH = 6.75  # 9 codebooks x 10 bits x 75 Hz
HOP = 320

# Two small transformers configs: the 24 kHz layout at tiny widths (with 2 residual layers, so dilation
# growth is exercised), and a non-causal, constant-padded, identity-shortcut variant.
HF_VARIANTS = {
    "causal": dict(num_filters=4, hidden_size=16, num_residual_layers=2, target_bandwidths=[1.5, 6.0, BANDWIDTH]),
    "noncausal": dict(
        num_filters=4,
        hidden_size=8,
        num_lstm_layers=1,
        use_causal_conv=False,
        pad_mode="constant",
        use_conv_shortcut=False,
        target_bandwidths=[BANDWIDTH],
    ),
}


def _randomize(model: EncodecModel, seed: int) -> EncodecModel:
    """Seeded random weights (transformers initialises codebooks to zero); codebooks are scaled to the
    encoder's latents so that the codes are varied."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
                v = mod.parametrizations.weight.original1
                v.copy_(torch.randn(v.shape, generator=gen) / math.sqrt(v[0].numel()))
                norm = v.flatten(1).norm(dim=1).view(-1, 1, 1)
                mod.parametrizations.weight.original0.copy_(norm * (0.5 + torch.rand(norm.shape, generator=gen)))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.05)
            elif isinstance(mod, nn.LSTM):
                for p in mod.parameters():
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(mod.hidden_size))
        scale = model.encoder(torch.randn(1, 1, 4 * HOP, generator=gen) * 0.2).std()
        for i, layer in enumerate(model.quantizer.layers):
            emb = layer.codebook.embed
            emb.copy_(torch.randn(emb.shape, generator=gen) * scale * 0.7**i)
            layer.codebook.embed_avg.copy_(emb)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_model(request: pytest.FixtureRequest) -> EncodecModel:
    torch.manual_seed(0)
    return _randomize(EncodecModel(EncodecConfig(**HF_VARIANTS[request.param])), seed=1)


@pytest.fixture(scope="module")
def hf_dir(hf_model: EncodecModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf_encodec")
    hf_model.save_pretrained(out)
    return out


def _hf_encode(model: EncodecModel, wav: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, T, C] through transformers' public encode."""
    with torch.no_grad():
        out = model.encode(wav[:, None], bandwidth=BANDWIDTH)
    assert out.audio_codes.shape[0] == 1  # one chunk: the 24 kHz model does not chunk
    return out.audio_codes[0].transpose(1, 2)


def _hf_decode(model: EncodecModel, codes: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, T * hop] through transformers' public decode."""
    with torch.no_grad():
        return model.decode(codes.transpose(1, 2)[None], [None]).audio_values[:, 0]


def _signals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    t = torch.arange(777) / 24_000
    return {
        "noise": torch.randn(2, 1000, generator=gen) * 0.3,  # not a multiple of the hop
        "sine": (0.5 * torch.sin(2 * math.pi * 440 * t))[None],
        "short": torch.randn(1, 5, generator=gen) * 0.3,  # shorter than the first conv's reflect padding
    }


def _assert_same_as_hf(codec: EncodecCodec, hf: EncodecModel, wav: torch.Tensor) -> None:
    ref_codes = _hf_encode(hf, wav)
    codes = codec.encode(wav)
    assert codes.dtype == torch.int64
    assert codes.shape == (wav.shape[0], math.ceil(wav.shape[-1] / HOP), 9)
    assert torch.equal(codes, ref_codes)
    audio = codec.decode(codes)
    assert audio.dtype == torch.float32
    torch.testing.assert_close(audio, _hf_decode(hf, ref_codes), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- config


def test_config_matches_transformers_24khz() -> None:
    ours, hf = EncodecCodecConfig.preset("24khz"), EncodecConfig()
    assert (ours.hop_length, ours.frame_rate, ours.num_quantizers) == (hf.hop_length, hf.frame_rate, 32)
    rvq = EncodecResidualVectorQuantizer(hf)
    assert ours.n_codebooks == rvq.get_num_quantizers_for_bandwidth(6.75) == 9
    assert replace(ours, bandwidth=6.0).n_codebooks == rvq.get_num_quantizers_for_bandwidth(6.0) == 8
    for name in ("num_filters", "hidden_size", "codebook_size", "num_lstm_layers", "kernel_size", "compress"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.upsampling_ratios == tuple(hf.upsampling_ratios)
    tiny = EncodecCodecConfig.preset("tiny")
    assert (tiny.hop_length, tiny.codebook_size, tiny.n_codebooks, tiny.num_quantizers) == (HOP, 1024, 9, 9)


def test_24khz_layout_matches_transformers() -> None:
    hf_state = EncodecModel(EncodecConfig()).state_dict()
    ours = EncodecCodec(EncodecCodecConfig.preset("24khz"))
    assert {k: v.shape for k, v in to_internal(hf_state).items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in to_transformers(ours.state_dict()).items()} == {
        k: v.shape for k, v in hf_state.items()
    }


@pytest.mark.parametrize(
    "kwargs",
    [dict(audio_channels=2), dict(normalize=True), dict(chunk_length_s=1.0), dict(norm_type="time_group_norm")],
)
def test_unsupported_configs(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EncodecCodecConfig(**kwargs)


def test_bandwidth_beyond_checkpoint() -> None:
    with pytest.raises(ValueError, match="codebooks"):
        replace(EncodecCodecConfig.preset("tiny"), bandwidth=12.0)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("signal", sorted(_signals()))
def test_matches_transformers(hf_model: EncodecModel, hf_dir: Path, signal: str) -> None:
    codec = EncodecCodec.from_pretrained(hf_dir)
    wav = _signals()[signal]
    _assert_same_as_hf(codec, hf_model, wav)


def test_codes_are_varied(hf_model: EncodecModel, hf_dir: Path) -> None:
    # Guards the parity test against degenerate weights (e.g. every code 0).
    codes = EncodecCodec.from_pretrained(hf_dir).encode(_signals()["noise"])
    assert all(codes[..., c].unique().numel() > 1 for c in range(9))


def test_transformers_loads_our_save(tmp_path: Path) -> None:
    codec = EncodecCodec.random("tiny", seed=2)
    codec.save_pretrained(tmp_path)
    hf = EncodecModel.from_pretrained(tmp_path).eval()
    wav = _signals()["noise"]
    _assert_same_as_hf(codec, hf, wav)
    again = EncodecCodec.from_pretrained(tmp_path)
    assert torch.equal(again.encode(wav), codec.encode(wav))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "encodec"


def _to_package_layout(hf: EncodecModel) -> dict[str, torch.Tensor]:
    """transformers' weights renamed to the facebookresearch/encodec module tree: SConv1d -> NormConv1d ->
    weight-normed Conv1d (``.conv.conv.weight_g/_v``), SConvTranspose1d (``.convtr.convtr.``), nn.Sequential
    ``model``, ``quantizer.vq.layers.N._codebook``."""
    kinds = {name: type(m) for name, m in hf.named_modules()}
    out = {}
    for key, value in hf.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        owner, _, leaf = key.rpartition(".conv.")
        if kinds.get(owner) is EncodecConv1d:
            key = f"{owner}.conv.conv.{leaf}"
        elif kinds.get(owner) is EncodecConvTranspose1d:
            key = f"{owner}.convtr.convtr.{leaf}"
        key = key.replace("encoder.layers.", "encoder.model.").replace("decoder.layers.", "decoder.model.")
        key = key.replace(".codebook.", "._codebook.").replace("quantizer.layers.", "quantizer.vq.layers.")
        out[key] = value.clone()
    return out


def test_encodec_package_layout(hf_model: EncodecModel, tmp_path: Path) -> None:
    state = _to_package_layout(hf_model)
    assert "encoder.model.0.conv.conv.weight_g" in state
    assert "quantizer.vq.layers.0._codebook.embed" in state
    assert any(".convtr.convtr.weight_v" in k for k in state)
    path = tmp_path / "encodec_tiny.th"
    torch.save(state, path)
    config = EncodecCodecConfig.from_dict(hf_model.config.to_dict())
    wav = _signals()["noise"]
    _assert_same_as_hf(EncodecCodec.from_pretrained(path, config), hf_model, wav)
    _assert_same_as_hf(EncodecCodec.from_pretrained(tmp_path, config), hf_model, wav)  # directory holding the .th
    assert codec_kind(path) == "encodec"
    plain = tmp_path / "codec"  # no "encodec" in the names: the package's .th extension tells
    plain.mkdir()
    torch.save(state, plain / "weights.th")
    assert codec_kind(plain) == codec_kind(plain / "weights.th") == "encodec"


def test_legacy_weight_g_v_keys(hf_model: EncodecModel, hf_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(hf_dir / "model.safetensors"))
    state = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    _assert_same_as_hf(EncodecCodec.from_pretrained(tmp_path), hf_model, _signals()["sine"])


def test_load_codec_finds_encodec(hf_dir: Path) -> None:
    codec = load_codec(hf_dir)
    assert isinstance(codec, EncodecCodec)
    assert codec_kind(hf_dir) == "encodec"


# ---------------------------------------------------------------------------------------------- strict loading


@pytest.fixture()
def tiny_state(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    EncodecCodec.random("tiny").save_pretrained(tmp_path)
    return tmp_path, load_file(str(tmp_path / "model.safetensors"))


def _rewrite(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, str(path / "model.safetensors"))


def test_missing_key_named(tiny_state: tuple[Path, dict]) -> None:
    path, state = tiny_state
    del state["decoder.layers.1.lstm.weight_hh_l0"]
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.layers\.1\.lstm\.weight_hh_l0"):
        EncodecCodec.from_pretrained(path)


def test_unexpected_key_named(tiny_state: tuple[Path, dict]) -> None:
    path, state = tiny_state
    state["encoder.layers.99.conv.bias"] = torch.zeros(3)
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.layers\.99\.conv\.bias"):
        EncodecCodec.from_pretrained(path)


def test_misshaped_key_named(tiny_state: tuple[Path, dict]) -> None:
    path, state = tiny_state
    state["quantizer.layers.3.codebook.embed"] = torch.zeros(512, 16)
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"quantizer\.layers\.3\.embed: checkpoint \(512, 16\)"):
        EncodecCodec.from_pretrained(path)


def test_unpaired_weight_norm_key(tiny_state: tuple[Path, dict]) -> None:
    path, state = tiny_state
    del state["encoder.layers.0.conv.parametrizations.weight.original1"]
    _rewrite(path, state)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.conv\.parametrizations\.weight\.original0"):
        EncodecCodec.from_pretrained(path)


def test_24khz_default_rejects_tiny_weights(tiny_state: tuple[Path, dict]) -> None:
    path, _ = tiny_state
    (path / "config.json").unlink()  # no config: the 24 kHz preset is assumed, and the shapes disagree
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        EncodecCodec.from_pretrained(path)


def test_foreign_config_json_ignored(hf_model: EncodecModel, tmp_path: Path) -> None:
    # An encodec .th inside a Dia checkpoint directory: the Dia config.json is not an EnCodec config, so the
    # 24 kHz preset is assumed (and these tiny weights then fail on shapes, not on the config).
    torch.save(_to_package_layout(hf_model), tmp_path / "encodec_24khz.th")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dia"}))
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        EncodecCodec.from_pretrained(tmp_path / "encodec_24khz.th")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        EncodecCodec.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def tiny() -> EncodecCodec:
    return EncodecCodec.random("tiny", seed=0)


def test_properties(tiny: EncodecCodec) -> None:
    assert isinstance(tiny, AudioCodec)
    assert (tiny.sample_rate, tiny.hop_length, tiny.n_codebooks, tiny.codebook_size) == (24_000, HOP, 9, 1024)
    assert tiny.frame_rate == 75.0


def test_input_shapes(tiny: EncodecCodec) -> None:
    wav = torch.randn(2, 700) * 0.3
    codes = tiny.encode(wav)
    assert codes.shape == (2, 3, 9)
    assert torch.equal(tiny.encode(wav[:, None]), codes)
    assert torch.equal(tiny.encode(wav[1]), codes[1:])
    assert torch.equal(tiny.encode(wav.double()), codes)
    assert tiny.decode(codes).shape == (2, 3 * HOP)
    torch.testing.assert_close(tiny.decode(codes[0]), tiny.decode(codes[:1]))
    torch.testing.assert_close(tiny.decode(codes.int()), tiny.decode(codes))


def test_random_is_seeded() -> None:
    a, b, c = (EncodecCodec.random("tiny", seed=s) for s in (0, 0, 1))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.quantizer.layers[0].embed, c.quantizer.layers[0].embed)


@pytest.mark.parametrize(
    "wav, match",
    [
        (torch.tensor([0.0, float("nan"), 0.1]), "NaN or infinite"),
        (torch.tensor([[0.0, float("inf")]]), "NaN or infinite"),
        (torch.zeros(0), "empty"),
        (torch.zeros(2, 0), "empty"),
        (torch.zeros(1, 2, 100), "mono"),
        (torch.zeros(1, 1, 1, 100), "shape"),
        (torch.zeros(100, dtype=torch.int16), "floating point"),
    ],
)
def test_bad_audio(tiny: EncodecCodec, wav: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny.encode(wav)


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.full((1, 2, 9), 1024), r"\[0, 1024\)"),
        (torch.full((1, 2, 9), -1), r"\[0, 1024\)"),
        (torch.zeros(1, 2, 8, dtype=torch.long), "codes must be"),
        (torch.zeros(1, 2, 9), "integer"),
        (torch.zeros(9, dtype=torch.long), "codes must be"),
    ],
)
def test_bad_codes(tiny: EncodecCodec, codes: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny.decode(codes)


def test_zero_frames_decode_to_zero_samples(tiny: EncodecCodec) -> None:
    """As DacCodec does (the AudioCodec protocol): no frames are no samples, per batch row."""
    assert tiny.decode(torch.zeros(2, 0, 9, dtype=torch.long)).shape == (2, 0)


@pytest.mark.gpu
def test_cuda_matches_transformers_on_cuda(hf_model: EncodecModel, hf_dir: Path) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        hf = copy.deepcopy(hf_model).cuda()
        codec = EncodecCodec.from_pretrained(hf_dir).cuda()
        wav = _signals()["noise"].cuda()
        codes, ref = codec.encode(wav), _hf_encode(hf, wav)
        assert codes.device.type == "cuda"
        # Folded weight norm and cuDNN kernels round differently from transformers': allow rare near-tie flips.
        assert (codes == ref).float().mean() >= 0.95
        torch.testing.assert_close(codec.decode(ref), _hf_decode(hf, ref), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            codec.decode(ref).cpu(), EncodecCodec.from_pretrained(hf_dir).decode(ref.cpu()), rtol=1e-4, atol=1e-4
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_a_random_codec_saves_marked_and_warns_when_loaded(tmp_path: Path) -> None:
    """The demo codec (codec.random_codec) is marked random in the saved safetensors metadata, and loading it back
    warns; EncodecCodec.random called directly (a codec of one's own) is not marked."""
    import warnings

    from dia_fast.checkpoint import RANDOM_WEIGHTS_KEY, safetensors_metadata
    from dia_fast.codec import random_codec

    demo = random_codec("encodec")
    demo.save_pretrained(tmp_path / "demo")
    assert safetensors_metadata(tmp_path / "demo" / "model.safetensors") == {"format": "pt", RANDOM_WEIGHTS_KEY: "true"}
    with pytest.warns(UserWarning, match="demo.* holds a random codec"):
        assert load_codec(tmp_path / "demo").random_weights
    EncodecCodec.random("tiny", seed=2).save_pretrained(tmp_path / "own")
    assert safetensors_metadata(tmp_path / "own" / "model.safetensors") == {"format": "pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not load_codec(tmp_path / "own").random_weights
