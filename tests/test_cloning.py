"""Voice cloning (audio prompt + transcript) against transformers' Dia on identical random weights."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from dia_fast import DiaTTS
from dia_fast import checkpoint as ck
from dia_fast.config import DiaConfig
from dia_fast.model import DiaModel

from .hf_reference import HFDacAdapter, hf_dia, hf_processor

TRANSCRIPT = "[S1] This is the voice to clone."
TEXT = "[S1] And this is new text, spoken in that voice."


@pytest.fixture(scope="module")
def setup():
    config = DiaConfig.preset("tiny")
    hf = hf_dia(config, seed=5)
    model = DiaModel(config)
    model.load_state_dict(ck.to_internal(hf.state_dict()), strict=True)
    processor = hf_processor()
    tts = DiaTTS(model.eval(), HFDacAdapter(processor.audio_tokenizer))
    return hf, tts, processor


def _voice(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(44100 * seconds)) / 44100
    return (
        0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    ).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.5, 1.3])
def test_greedy_cloning_matches_transformers(setup, seconds):
    hf, tts, processor = setup
    wav = _voice(seconds, seed=1)
    inp = processor(text=[f"{TRANSCRIPT} {TEXT}"], audio=[wav], sampling_rate=44100)
    ref = hf.generate(**inp, max_new_tokens=48, do_sample=False, guidance_scale=3.0, top_k=45)
    out = tts.generate(TEXT, audio_prompt=wav, audio_prompt_text=TRANSCRIPT, max_new_tokens=48, do_sample=False)
    assert torch.equal(out.delayed, ref)
    # the returned codes and audio exclude the prompt: exactly what transformers' processor decodes
    prompt_len = processor.get_audio_prompt_len(inp["decoder_attention_mask"])
    ref_audio = processor.batch_decode(ref, audio_prompt_len=prompt_len)[0]
    assert out.codes[0].shape[0] * 512 == ref_audio.shape[-1]
    torch.testing.assert_close(torch.from_numpy(out.audio[0]), ref_audio.float().reshape(-1), rtol=0, atol=1e-5)


def test_batch_of_prompts_with_different_lengths_matches_transformers(setup):
    hf, tts, processor = setup
    wavs = [_voice(0.4, seed=2), _voice(1.1, seed=3)]
    texts = [TEXT, "[S1] A second, different sentence."]
    inp = processor(text=[f"{TRANSCRIPT} {t}" for t in texts], audio=wavs, sampling_rate=44100, padding=True)
    ref = hf.generate(**inp, max_new_tokens=40, do_sample=False, guidance_scale=3.0, top_k=45)
    out = tts.generate(texts, audio_prompt=wavs, audio_prompt_text=TRANSCRIPT, max_new_tokens=40, do_sample=False)
    assert torch.equal(out.delayed, ref)


def test_prompt_codes_are_accepted_directly(setup):
    _, tts, _ = setup
    wav = _voice(0.6, seed=4)
    codes = tts.encode_prompt(wav)
    assert codes.dtype == torch.long and codes.shape == (-(-wav.size // 512), 9)
    a = tts.generate(TEXT, audio_prompt=wav, audio_prompt_text=TRANSCRIPT, max_new_tokens=32, do_sample=False)
    b = tts.generate(TEXT, audio_prompt=codes, audio_prompt_text=TRANSCRIPT, max_new_tokens=32, do_sample=False)
    assert torch.equal(a.delayed, b.delayed)


def test_prompt_from_a_file_at_another_rate_is_resampled(setup, tmp_path):
    import soundfile as sf

    _, tts, _ = setup
    t = np.arange(48000) / 48000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], 1).astype(np.float32)
    path = tmp_path / "voice.wav"
    sf.write(path, stereo, 48000)
    codes = tts.encode_prompt(path)
    assert codes.shape == (-(-44100 // 512), 9)


def test_bad_prompts_are_clear_errors(setup, tmp_path):
    _, tts, _ = setup
    with pytest.raises(ValueError, match="silent"):
        tts.encode_prompt(np.zeros(44100, np.float32))
    with pytest.raises(ValueError, match="empty"):
        tts.encode_prompt(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="holds 10 samples, less than one codec frame"):
        tts.encode_prompt(np.full(10, 0.5, np.float32))
    truncated = tmp_path / "truncated.wav"  # a header and a few samples of a longer recording
    sf.write(truncated, np.full(44100, 0.5, np.float32), 44100)
    truncated.write_bytes(truncated.read_bytes()[:64])
    with pytest.raises(ValueError, match="less than one codec frame"):
        tts.encode_prompt(truncated)
    with pytest.raises(FileNotFoundError):
        tts.encode_prompt(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(ValueError):
        tts.encode_prompt(corrupt)
    with pytest.raises(ValueError, match="audio budget"):
        tts.encode_prompt(torch.zeros(tts.max_prompt_frames() + 1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[T, 9\]"):
        tts.encode_prompt(torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="0..1023"):
        tts.encode_prompt(torch.full((4, 9), 1024, dtype=torch.long))
    with pytest.raises(ValueError, match="2 audio prompts for 1 texts"):
        tts.generate(TEXT, audio_prompt=[None, None], max_new_tokens=32)
    with pytest.raises(ValueError, match="without an audio_prompt"):
        tts.generate(TEXT, audio_prompt_text=TRANSCRIPT, max_new_tokens=32)


def test_missing_transcript_warns(setup):
    _, tts, _ = setup
    with pytest.warns(UserWarning, match="transcript"):
        tts.generate(TEXT, audio_prompt=_voice(0.3, seed=6), max_new_tokens=20, do_sample=False, decode_audio=False)
