"""DacCodec against transformers' DacModel (random weights), checkpoint layouts, and input checks."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dia_fast.checkpoint import CheckpointError
from dia_fast.codec import AudioCodec, load_codec
from dia_fast.codec.dac import DacCodec, DacCodecConfig

HOP = 512


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded, well-scaled random weights (transformers' init gives near-zero audio): convs ~ 1/sqrt(fan_in),
    residual branches scaled down, random snake frequencies and biases, unit-normal codebooks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                w = m.weight
                transposed = isinstance(m, torch.nn.ConvTranspose1d)
                fan_in = w.shape[0] * w.shape[2] / m.stride[0] if transposed else w.shape[1] * w.shape[2]
                gain = 0.3 if ("res_unit" in name and name.endswith("conv2")) or name == "decoder.conv2" else 1.0
                w.copy_(torch.randn(w.shape, generator=gen) * gain / math.sqrt(fan_in))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            elif hasattr(m, "alpha"):
                m.alpha.copy_(0.5 + torch.rand(m.alpha.shape, generator=gen))


def _hf_dac(seed: int = 0, **kwargs):
    from transformers import DacConfig, DacModel

    torch.manual_seed(seed)
    model = DacModel(DacConfig(sampling_rate=44100, **kwargs)).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory):
    """(transformers DacModel with tiny shapes and random weights, its save_pretrained directory)."""
    model = _hf_dac(encoder_hidden_size=8, decoder_hidden_size=32)
    directory = tmp_path_factory.mktemp("hf_dac_tiny")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def codec(hf_tiny) -> DacCodec:
    return DacCodec.from_pretrained(hf_tiny[1])


def _signals() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    t = torch.arange(3000) / 44100
    return {
        "noise": 0.3 * torch.randn(1, 5 * HOP + 37, generator=gen),
        "sine": (0.5 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 3100 * t))[None],
        "batch": 0.2 * torch.randn(2, 1500, generator=gen),
    }


def _hf_encode(hf, wav: torch.Tensor):
    wav = wav.reshape(wav.shape[0], 1, -1)
    wav = torch.nn.functional.pad(wav, (0, -wav.shape[-1] % HOP))
    with torch.no_grad():
        return hf.encode(wav)


# --- parity with transformers ---------------------------------------------------------------


def test_config_and_protocol(codec: DacCodec) -> None:
    assert codec.config == DacCodecConfig.preset("tiny")
    assert isinstance(codec, AudioCodec)
    assert (codec.sample_rate, codec.hop_length, codec.n_codebooks, codec.codebook_size) == (44100, 512, 9, 1024)
    assert codec.frame_rate == pytest.approx(44100 / 512)
    assert DacCodecConfig.preset("44khz") == DacCodecConfig()


@pytest.mark.parametrize("signal", ["noise", "sine", "batch"])
def test_encode_matches_transformers(hf_tiny, codec: DacCodec, signal: str) -> None:
    hf, _ = hf_tiny
    wav = _signals()[signal]
    ref = _hf_encode(hf, wav)
    codes = codec.encode(wav)
    assert codes.dtype == torch.long
    assert codes.shape == (wav.shape[0], math.ceil(wav.shape[-1] / HOP), 9)
    assert torch.equal(codes, ref.audio_codes.transpose(1, 2))
    assert codes.unique().numel() > codes.shape[1]  # non-degenerate: many distinct codes
    out = codec.quantize(codec.encode_latent(wav))
    torch.testing.assert_close(out.latents, ref.projected_latents)
    torch.testing.assert_close(out.quantized, ref.quantized_representation)
    assert torch.equal(out.codes, ref.audio_codes)


def test_decode_matches_transformers(hf_tiny, codec: DacCodec) -> None:
    hf, _ = hf_tiny
    codes = torch.randint(0, 1024, (2, 13, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_latent = hf.quantizer.from_codes(codes.transpose(1, 2))[0]
        ref = hf.decode(audio_codes=codes.transpose(1, 2)).audio_values
    torch.testing.assert_close(codec.dequantize(codes), ref_latent)
    wav = codec.decode(codes)
    assert wav.shape == (2, 13 * HOP) and wav.dtype == torch.float32
    assert wav.std() > 0.05  # the reference model makes real (non-silent) audio
    torch.testing.assert_close(wav, ref, atol=5e-5, rtol=1e-4)  # rounding of the fused lookup
    torch.testing.assert_close(codec.decode_latent(ref_latent), ref, atol=1e-5, rtol=1e-4)


def test_input_layouts(codec: DacCodec) -> None:
    wav = 0.3 * torch.randn(2000, generator=torch.Generator().manual_seed(3))
    codes = codec.encode(wav)
    assert codes.shape == (1, 4, 9)
    assert torch.equal(codec.encode(wav[None]), codes)
    assert torch.equal(codec.encode(wav[None, None]), codes)
    assert torch.equal(codec.encode(wav.double()), codes)
    # right-padding to whole frames is zero-padding
    padded = torch.nn.functional.pad(wav, (0, 4 * HOP - 2000))
    assert torch.equal(codec.encode(padded), codes)
    assert torch.equal(codec.decode(codes[0].int()), codec.decode(codes))
    assert codec.decode(torch.zeros(1, 0, 9, dtype=torch.long)).shape == (1, 0)
    for bad, error in ((0, ValueError), (True, TypeError), (2.5, TypeError)):
        with pytest.raises(error, match="chunk_frames must be"):
            codec.decode(codes, chunk_frames=bad)  # also when the codes are shorter than a chunk
    with torch.inference_mode():
        assert torch.equal(codec.decode(codes), codec.decode(codes.clone()))
        assert torch.equal(codec.encode(wav), codes)


def test_chunked_decode_matches_whole(codec: DacCodec) -> None:
    assert codec.context_frames == 11  # receptive field of the (8, 8, 4, 2) decoder: 9.9 frames either side
    codes = torch.randint(0, 1024, (2, 37, 9), generator=torch.Generator().manual_seed(11))
    whole = codec.decode(codes, chunk_frames=None)
    for chunk in (5, 16, 36):
        torch.testing.assert_close(codec.decode(codes, chunk_frames=chunk), whole, atol=1e-5, rtol=1e-5)
    # context is what makes chunks exact: without it the chunk edges differ
    cut = torch.cat([codec.decode(codes[:, :16], chunk_frames=None), codec.decode(codes[:, 16:], chunk_frames=None)], 1)
    assert (cut - whole).abs().max() > 1e-3


def test_odd_upsampling_ratios_keep_the_frame_contract(tmp_path: Path) -> None:
    """Descript's 16/24 kHz layout (ratios 8, 5, 4, 2): each odd transposed convolution is one sample short, so the
    references decode T * hop - 8 samples. dia_fast gives those same samples and zeros for the missing end (T * hop
    in all), so that chunked decoding (and decode() past 1024 frames) works and matches the whole decode."""
    hf = _hf_dac(
        seed=4, encoder_hidden_size=8, decoder_hidden_size=32, downsampling_ratios=[2, 4, 5, 8],
        upsampling_ratios=[8, 5, 4, 2], hop_length=320,
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    codec = DacCodec.from_pretrained(tmp_path)
    assert codec.hop_length == 320
    codes = torch.randint(0, 1024, (2, 30, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.decode(audio_codes=codes.transpose(1, 2)).audio_values
    assert ref.shape == (2, 30 * 320 - 8)
    whole = codec.decode(codes, chunk_frames=None)
    assert whole.shape == (2, 30 * 320) and bool((whole[:, -8:] == 0).all())
    torch.testing.assert_close(whole[:, :-8], ref, atol=5e-5, rtol=1e-4)
    for chunk in (4, 7, 29):
        torch.testing.assert_close(codec.decode(codes, chunk_frames=chunk), whole, atol=1e-5, rtol=1e-5)


# --- checkpoint layouts ----------------------------------------------------------------------


def _descript_name(hf_name: str) -> str:
    """transformers DacModel parameter name -> descript DAC name (its nested nn.Sequential indices)."""
    unit = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}
    rules = [
        (r"^encoder\.conv1\.", lambda m: "encoder.block.0."),
        (r"^encoder\.snake1\.", lambda m: "encoder.block.5."),
        (r"^encoder\.conv2\.", lambda m: "encoder.block.6."),
        (
            r"^encoder\.block\.(\d)\.res_unit(\d)\.(\w+)\.",
            lambda m: f"encoder.block.{int(m[1]) + 1}.block.{int(m[2]) - 1}.block.{unit[m[3]]}.",
        ),
        (r"^encoder\.block\.(\d)\.snake1\.", lambda m: f"encoder.block.{int(m[1]) + 1}.block.3."),
        (r"^encoder\.block\.(\d)\.conv1\.", lambda m: f"encoder.block.{int(m[1]) + 1}.block.4."),
        (r"^decoder\.conv1\.", lambda m: "decoder.model.0."),
        (r"^decoder\.snake1\.", lambda m: "decoder.model.5."),
        (r"^decoder\.conv2\.", lambda m: "decoder.model.6."),
        (
            r"^decoder\.block\.(\d)\.res_unit(\d)\.(\w+)\.",
            lambda m: f"decoder.model.{int(m[1]) + 1}.block.{int(m[2]) + 1}.block.{unit[m[3]]}.",
        ),
        (r"^decoder\.block\.(\d)\.snake1\.", lambda m: f"decoder.model.{int(m[1]) + 1}.block.0."),
        (r"^decoder\.block\.(\d)\.conv_t1\.", lambda m: f"decoder.model.{int(m[1]) + 1}.block.1."),
    ]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, hf_name)
        if n:
            return new
    assert hf_name.startswith("quantizer."), hf_name
    return hf_name


def _write_descript_pth(hf, path: Path) -> None:
    """descript's weights.pth layout: weight-norm (weight_g, weight_v) conv weights, descript names, metadata."""
    state = {}
    for name, value in hf.state_dict().items():
        new = _descript_name(name)
        if name.endswith(".weight") and "codebook" not in name:  # every conv is weight-normalised
            state[new[: -len("weight")] + "weight_g"] = value.flatten(1).norm(dim=1).reshape(-1, 1, 1)
            state[new[: -len("weight")] + "weight_v"] = value.clone()
        else:
            state[new] = value.clone()
    c = hf.config
    kwargs = {
        "encoder_dim": c.encoder_hidden_size,
        "encoder_rates": list(c.downsampling_ratios),
        "latent_dim": None,
        "decoder_dim": c.decoder_hidden_size,
        "decoder_rates": list(c.upsampling_ratios),
        "n_codebooks": c.n_codebooks,
        "codebook_size": c.codebook_size,
        "codebook_dim": c.codebook_dim,
        "quantizer_dropout": False,
        "sample_rate": 44100,
    }
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs}}, path)


def test_descript_weights_pth(hf_tiny, codec: DacCodec, tmp_path: Path) -> None:
    hf, _ = hf_tiny
    _write_descript_pth(hf, tmp_path / "weights.pth")
    (tmp_path / "beside").mkdir()  # a descript download kept beside a config.json (e.g. of another layout)
    _write_descript_pth(hf, tmp_path / "beside" / "weights.pth")
    (tmp_path / "beside" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    for source in (tmp_path / "weights.pth", tmp_path, tmp_path / "beside"):
        loaded = DacCodec.from_pretrained(source)
        assert loaded.config == codec.config
        for name, value in hf.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    wav = _signals()["noise"]
    assert torch.equal(loaded.encode(wav), _hf_encode(hf, wav).audio_codes.transpose(1, 2))
    codes = torch.randint(0, 1024, (1, 7, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.decode(codes), codec.decode(codes), atol=1e-5, rtol=1e-4)


def test_parametrized_weight_norm_keys(hf_tiny, codec: DacCodec, tmp_path: Path) -> None:
    """A state dict saved with torch's weight-norm parametrization (transformers' apply_weight_norm)."""
    hf, directory = hf_tiny
    wn = copy.deepcopy(hf)
    wn.apply_weight_norm()
    state = wn.state_dict()
    assert any(k.endswith("parametrizations.weight.original0") for k in state)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = DacCodec.from_pretrained(tmp_path / "model.safetensors")
    for name, value in hf.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_save_pretrained_round_trip(codec: DacCodec, tmp_path: Path) -> None:
    from transformers import DacModel

    codec.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dac"
    again = DacCodec.from_pretrained(tmp_path)
    for name, value in codec.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    hf = DacModel.from_pretrained(tmp_path).eval()  # transformers reads what we write
    codes = torch.randint(0, 1024, (1, 5, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.decode(audio_codes=codes.transpose(1, 2)).audio_values
    torch.testing.assert_close(again.decode(codes), ref, atol=5e-5, rtol=1e-4)
    assert isinstance(load_codec(tmp_path), DacCodec)


def _write_hf_dir(directory: Path, config_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text((config_dir / "config.json").read_text())
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_strict_keys(hf_tiny, tmp_path: Path) -> None:
    _, directory = hf_tiny
    state = load_file(str(directory / "model.safetensors"))

    missing = {k: v for k, v in state.items() if k != "decoder.conv2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv2\.bias"):
        DacCodec.from_pretrained(_write_hf_dir(tmp_path / "missing", directory, missing))

    extra = {**state, "decoder.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.extra\.weight"):
        DacCodec.from_pretrained(_write_hf_dir(tmp_path / "extra", directory, extra))

    bad = {**state, "quantizer.quantizers.3.codebook.weight": torch.zeros(512, 8)}
    expected = r"mis-shaped keys: quantizer\.quantizers\.3\.codebook\.weight.*\(512, 8\)"
    with pytest.raises(CheckpointError, match=expected):
        DacCodec.from_pretrained(_write_hf_dir(tmp_path / "bad", directory, bad))

    with pytest.raises(FileNotFoundError):
        DacCodec.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="weights .pth"):
        DacCodec.from_pretrained(tmp_path / "empty")


def test_descript_strict_keys(hf_tiny, tmp_path: Path) -> None:
    hf, _ = hf_tiny
    _write_descript_pth(hf, tmp_path / "weights.pth")
    ckpt = torch.load(tmp_path / "weights.pth", weights_only=True)
    del ckpt["state_dict"]["decoder.model.6.weight_v"]
    ckpt["state_dict"]["decoder.model.9.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"decoder\.model\.6\.weight_g has no matching"):
        DacCodec.from_pretrained(tmp_path / "broken.pth")
    ckpt["state_dict"]["decoder.model.6.weight_v"] = ckpt["state_dict"]["decoder.model.6.weight_g"].expand(1, 4, 7)
    torch.save(ckpt, tmp_path / "broken.pth")
    expected = r"unexpected keys: decoder\.model\.9\.weight.*mis-shaped keys: decoder\.conv2"
    with pytest.raises(CheckpointError, match=expected):
        DacCodec.from_pretrained(tmp_path / "broken.pth")


def test_descript_weights_are_checked_before_they_are_folded(hf_tiny, tmp_path: Path) -> None:
    """A weight-norm gain that is not one value per output channel (it would fold into a weight of the right shape,
    or make torch read past it), and NaN or integer tensors in a .pth: a CheckpointError naming the tensor."""
    hf, _ = hf_tiny
    _write_descript_pth(hf, tmp_path / "weights.pth")
    good = torch.load(tmp_path / "weights.pth", weights_only=True)
    key = "encoder.block.0.weight_g"
    channels = good["state_dict"]["encoder.block.0.weight_v"].shape[0]
    for value, match in (
        (torch.ones(1, 1, 1), rf"{key} is \(1, 1, 1\), not \({channels}, 1, \.\.\.\)"),
        (torch.ones(channels), rf"{key} is \({channels},\)"),
        (good["state_dict"]["encoder.block.0.weight_v"].clone(), f"{key} is"),
        (torch.full_like(good["state_dict"][key], float("nan")), f"tensor {key} holds NaN or infinite values"),
        (good["state_dict"][key].to(torch.int64), f"tensor {key} is int64, not floating point"),
    ):
        broken = {**good, "state_dict": {**good["state_dict"], key: value}}
        torch.save(broken, tmp_path / "broken.pth")
        with pytest.raises(CheckpointError, match=match):
            DacCodec.from_pretrained(tmp_path / "broken.pth")


# --- input checks, random codec, dtypes ------------------------------------------------------


def test_bad_inputs(codec: DacCodec) -> None:
    ok = torch.zeros(1000)
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.encode(torch.cat([ok, torch.tensor([float("nan")])]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        codec.encode(torch.cat([ok, torch.tensor([float("inf")])])[None])
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(2, 1, 0))
    with pytest.raises(ValueError, match="mono"):
        codec.encode(torch.zeros(1, 2, 1000))
    with pytest.raises(ValueError, match="floating point"):
        codec.encode(torch.zeros(1000, dtype=torch.int16))
    good = torch.zeros(1, 3, 9, dtype=torch.long)
    for value in (1024, -1):
        bad = good.clone()
        bad[0, 1, 4] = value
        with pytest.raises(ValueError, match=r"\[0, 1023\]"):
            codec.decode(bad)
    with pytest.raises(ValueError, match="8 codebooks"):
        codec.decode(torch.zeros(1, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        codec.decode(good.float())
    with pytest.raises(ValueError, match=r"\[B, T, n_codebooks\]"):
        codec.decode(torch.zeros(9, dtype=torch.long))


def test_random_codec() -> None:
    a, b, c = DacCodec.random("tiny", seed=0), DacCodec.random("tiny", seed=0), DacCodec.random("tiny", seed=1)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.decoder.conv1.weight, c.decoder.conv1.weight)
    codes = torch.randint(0, 1024, (1, 40, 9), generator=torch.Generator().manual_seed(6))
    wav = a.decode(codes)
    assert wav.shape == (1, 40 * HOP)
    assert 0.05 < wav.std() < 0.7
    assert (wav.abs() > 0.99).float().mean() < 0.01  # not stuck in tanh saturation
    enc = a.encode(0.1 * torch.randn(20 * HOP, generator=torch.Generator().manual_seed(7)))
    assert enc.shape == (1, 20, 9) and enc.unique().numel() > 60
    with pytest.raises(ValueError, match="unknown DAC preset"):
        DacCodec.random("huge")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(hf_tiny, codec: DacCodec, dtype: torch.dtype) -> None:
    half = DacCodec.from_pretrained(hf_tiny[1], dtype=dtype)
    assert half.dtype == dtype
    codes = torch.randint(0, 1024, (1, 6, 9), generator=torch.Generator().manual_seed(8))
    ref = codec.decode(codes)
    out = half.decode(codes)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = {torch.float16: 0.01, torch.bfloat16: 0.05}[dtype]  # bf16 keeps 8 bits of mantissa, fp16 11
    assert (out - ref).abs().mean() < rel * ref.abs().mean()
    wav = 0.3 * torch.randn(3000, generator=torch.Generator().manual_seed(9))
    enc = half.encode(wav)
    assert enc.shape == (1, 6, 9)
    # the first codebook sees the least-perturbed residual: most frames agree with float32
    assert (enc[..., 0] == codec.encode(wav)[..., 0]).float().mean() >= 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(codec: DacCodec, dtype: torch.dtype) -> None:
    gpu = copy.deepcopy(codec).to("cuda", dtype)
    codes = torch.randint(0, 1024, (2, 40, 9), generator=torch.Generator().manual_seed(12))
    ref = codec.decode(codes)
    out = gpu.decode(codes.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    # fp32 on CUDA: cuDNN convolutions use TF32 by default (torch.backends.cudnn.allow_tf32), ~1e-3 relative
    rel = {torch.float32: 3e-3, torch.bfloat16: 0.05}[dtype]
    assert (out.cpu() - ref).abs().mean() < rel * ref.abs().mean()
    torch.testing.assert_close(gpu.decode(codes.cuda(), chunk_frames=16), out, atol=0.05, rtol=0.05)
    wav = 0.3 * torch.randn(2, 4000, generator=torch.Generator().manual_seed(13))
    enc = gpu.encode(wav.cuda())
    assert enc.shape == (2, 8, 9) and enc.device.type == "cuda"
    if dtype == torch.float32:
        assert (enc.cpu() == codec.encode(wav)).float().mean() > 0.95


@pytest.mark.slow
def test_full_size_44khz_decode(tmp_path: Path) -> None:
    """Real Dia codec shapes (DacConfig() at 44.1 kHz): load the transformers checkpoint, decode a few frames."""
    hf = _hf_dac(seed=3)
    hf.save_pretrained(tmp_path)
    codec = DacCodec.from_pretrained(tmp_path)
    assert codec.config == DacCodecConfig.preset("44khz")
    assert sum(p.numel() for p in codec.parameters()) == sum(p.numel() for p in hf.parameters())
    codes = torch.randint(0, 1024, (1, 3, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref = hf.decode(audio_codes=codes.transpose(1, 2)).audio_values
    out = codec.decode(codes)
    assert ref.std() > 0.05
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


def test_a_random_codec_saves_marked_and_warns_when_loaded(tmp_path: Path) -> None:
    """The demo codec (codec.random_codec) is marked random in the saved safetensors metadata, and loading it back
    warns (the directory or its weights file); a codec of one's own is not marked."""
    import warnings

    from dia_fast.checkpoint import RANDOM_WEIGHTS_KEY, safetensors_metadata
    from dia_fast.codec import random_codec

    random_codec("dac").save_pretrained(tmp_path / "demo")
    assert safetensors_metadata(tmp_path / "demo" / "model.safetensors") == {"format": "pt", RANDOM_WEIGHTS_KEY: "true"}
    for path in (tmp_path / "demo", tmp_path / "demo" / "model.safetensors"):
        with pytest.warns(UserWarning, match="holds a random codec"):
            assert load_codec(path).random_weights
    DacCodec.random("tiny", seed=2).save_pretrained(tmp_path / "own")
    assert safetensors_metadata(tmp_path / "own" / "model.safetensors") == {"format": "pt"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not load_codec(tmp_path / "own").random_weights
