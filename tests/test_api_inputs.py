"""DiaTTS's constructors and prompts: bad inputs are one clear TypeError / ValueError before any work, and a prompt
array means the same whether it is a numpy array or a torch tensor (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dia_fast import DiaTTS
from dia_fast.config import DiaConfig

TEXT = "[S1] Hello there, how are you doing today?"
PROMPT_TEXT = "[S1] This is my voice."


@pytest.fixture(scope="module")
def tts() -> DiaTTS:
    return DiaTTS.random("tiny", seed=0)


@pytest.fixture(scope="module")
def pcm16() -> np.ndarray:
    """1.2 s of a 140 Hz tone as int16 PCM at the codec's rate."""
    t = np.arange(int(44100 * 1.2)) / 44100
    return np.round(0.3 * 32767 * np.sin(2 * np.pi * 140 * t)).astype(np.int16)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(seed="a"), TypeError, "seed must be an int, got 'a'"),
        (dict(seed=1.5), TypeError, "seed must be an int, got 1.5"),
        (dict(seed=True), TypeError, "seed must be an int, got True"),
        (dict(codec=123), TypeError, "codec must be an AudioCodec, a codec checkpoint path, 'dac', 'encodec' or None"),
        (dict(codec=""), ValueError, "codec is an empty path"),
        (dict(config_or_preset=5), TypeError, "config_or_preset must be a DiaConfig or a preset name"),
    ],
)
def test_random_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        DiaTTS.random(**kwargs)


def test_random_seed_is_any_int_modulo_2_64():
    a = DiaTTS.random("tiny", seed=-1).model.state_dict()
    b = DiaTTS.random("tiny", seed=2**64 - 1).model.state_dict()
    c = DiaTTS.random(DiaConfig.preset("tiny"), seed=np.int64(0)).model.state_dict()
    d = DiaTTS.random("tiny", seed=0).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert not all(torch.equal(a[k], d[k]) for k in a)


@pytest.mark.parametrize(
    ("path", "kwargs", "error", "message"),
    [
        ("", {}, ValueError, "path is empty"),
        ("   ", {}, ValueError, "path is empty"),
        (None, {}, TypeError, "path must be a str or Path"),
        ("/nonexistent/checkpoint", dict(codec=123), TypeError, "codec must be an AudioCodec"),
    ],
)
def test_from_pretrained_rejects_bad_arguments(path, kwargs, error, message):
    with pytest.raises(error, match=message):
        DiaTTS.from_pretrained(path, **kwargs)


def test_int16_pcm_prompt_is_pcm_as_a_tensor_as_in_numpy(tts, pcm16):
    """A 1-D int16 recording is PCM (scaled by 2**15) whether it is a numpy array or a torch tensor."""
    as_float = tts.encode_prompt(pcm16.astype(np.float32) / 32768)
    assert torch.equal(tts.encode_prompt(pcm16), as_float)
    assert torch.equal(tts.encode_prompt(torch.from_numpy(pcm16)), as_float)
    kw = dict(audio_prompt_text=PROMPT_TEXT, max_new_tokens=40, do_sample=False, progress=False)
    from_tensor = tts.generate(TEXT, audio_prompt=torch.from_numpy(pcm16), **kw).codes[0]
    assert torch.equal(from_tensor, tts.generate(TEXT, audio_prompt=as_float, **kw).codes[0])


def test_int64_prompts_are_codes_as_a_tensor_as_in_numpy(tts):
    codes = torch.randint(0, 1024, (6, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tts.encode_prompt(codes.numpy()), codes)
    assert torch.equal(tts.encode_prompt(codes.to(torch.int32)), codes)  # any integer [T, 9]
    for wrong in (torch.zeros(100, dtype=torch.long), np.zeros(100, dtype=np.int64)):
        with pytest.raises(ValueError, match=r"prompt codes must be \[T, 9\], got shape \(100,\) \(an int64"):
            tts.encode_prompt(wrong)
    with pytest.raises(TypeError, match="bool"):
        tts.encode_prompt(torch.ones(100, dtype=torch.bool))


def test_empty_text_with_a_prompt_is_an_error_before_the_prompt_is_encoded(tts, monkeypatch):
    """The prompt's transcript is put in front of the text: an empty text must not pass as the transcript alone."""
    encoded: list[object] = []
    monkeypatch.setattr(tts, "encode_prompt", lambda audio, *a: encoded.append(audio))
    for text in ("", "   "):
        with pytest.raises(ValueError, match="text is empty"):
            tts.generate(text, audio_prompt=np.zeros(44100, np.float32), audio_prompt_text=PROMPT_TEXT)
    assert encoded == []


def test_transcript_and_text_too_long_together_is_an_error_before_the_prompt_is_encoded(tts, monkeypatch):
    """Each fits alone (602 tokens: [S1] is one), not together (1205 with the joining space): one error naming both
    parts, and no prompt is encoded first."""
    encoded: list[object] = []
    monkeypatch.setattr(tts, "encode_prompt", lambda audio, *a: encoded.append(audio))
    text, transcript = "[S1] " + "a" * 600, "[S1] " + "b" * 600
    for stream in (False, True):
        with pytest.raises(ValueError, match=r"transcript \(602 bytes\) and the text \(602 bytes\) are 1205 bytes"):
            kw = dict(audio_prompt=np.zeros(44100, np.float32), audio_prompt_text=transcript)
            next(iter(tts.generate_stream(text, **kw))) if stream else tts.generate(text, **kw)
    assert encoded == []


def test_numpy_integer_step_counts_are_accepted(tts):
    kw = dict(do_sample=False, progress=False, decode_audio=False)
    a = tts.generate(TEXT, max_new_tokens=np.int64(60), min_new_tokens=np.int64(40), **kw)
    b = tts.generate(TEXT, max_new_tokens=60, min_new_tokens=40, **kw)
    assert torch.equal(a.codes[0], b.codes[0])
