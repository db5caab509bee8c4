"""DiaTTS.generate: results, seeds, batching, dtypes and argument errors (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dia_fast import DiaTTS


@pytest.fixture(scope="module")
def tts():
    return DiaTTS.random("tiny", seed=0)


def test_result_holds_clean_codes_and_matching_audio(tts):
    res = tts.generate(["[S1] One.", "[S2] Two, a bit longer."], max_new_tokens=48, seed=1)
    assert len(res.codes) == len(res.audio) == 2 and res.sample_rate == 44100
    for codes, audio in zip(res.codes, res.audio, strict=True):
        assert codes.dtype == torch.long and codes.ndim == 2 and codes.shape[1] == 9
        assert codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 1024)  # BOS/EOS/PAD removed
        assert audio.dtype == np.float32 and audio.shape == (codes.shape[0] * 512,)
        assert np.isfinite(audio).all()
    assert res.delayed.shape[0] == 2 and res.stats["steps"] > 0
    assert res.durations == [a.size / 44100 for a in res.audio]


def test_seed_makes_sampling_reproducible(tts):
    a = tts.generate("[S1] Same seed.", max_new_tokens=40, seed=7, decode_audio=False)
    b = tts.generate("[S1] Same seed.", max_new_tokens=40, seed=7, decode_audio=False)
    c = tts.generate("[S1] Same seed.", max_new_tokens=40, seed=8, decode_audio=False)
    assert torch.equal(a.delayed, b.delayed)
    assert not torch.equal(a.delayed, c.delayed)


def test_batched_greedy_equals_one_by_one(tts):
    texts = ["[S1] First.", "[S2] The second text is longer than the first one."]
    batch = tts.generate(texts, max_new_tokens=40, do_sample=False, decode_audio=False)
    for i, text in enumerate(texts):
        one = tts.generate(text, max_new_tokens=40, do_sample=False, decode_audio=False)
        assert torch.equal(batch.codes[i], one.codes[0])


def test_sampled_batch_with_prompts_of_different_lengths_draws_as_each_text_alone(tts):
    """Rows with shorter (or no) voice prompts are left-padded in a batch; each still draws at its own positions,
    so text ``i`` with ``seed + i`` gives the codes of its solo run and of a BatchEngine request with that seed
    (they drew at the batch's position, and differed)."""
    from dia_fast.serving import BatchEngine

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1024, (4, 9), generator=g), None, torch.randint(0, 1024, (20, 9), generator=g)]
    transcripts = ["[S1] A prompt.", None, "[S2] Another prompt."]
    texts = ["[S1] First one here.", "[S2] The second, with no prompt.", "[S1] And a third."]
    opts = dict(max_new_tokens=60, temperature=1.0, decode_audio=False)
    batch = tts.generate(texts, audio_prompt=prompts, audio_prompt_text=transcripts, seed=11, **opts)
    with BatchEngine(tts, max_slots=1) as engine:
        for i, text in enumerate(texts):
            one = tts.generate(text, audio_prompt=prompts[i], audio_prompt_text=transcripts[i], seed=11 + i, **opts)
            assert torch.equal(batch.codes[i], one.codes[0]), i
            queued = engine.submit(text, audio_prompt=prompts[i], audio_prompt_text=transcripts[i], seed=11 + i,
                                   max_new_tokens=60, temperature=1.0)  # fmt: skip
            assert torch.equal(queued.result(60, decode_audio=False).codes, one.codes[0]), i


def test_no_cfg_runs_without_unconditional_rows(tts):
    res = tts.generate("[S1] No guidance.", max_new_tokens=32, cfg_scale=0.0, do_sample=False)
    assert res.codes[0].shape[1] == 9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_on_cpu(dtype):
    half = DiaTTS.random("tiny", seed=0, dtype=dtype)
    res = half.generate("[S1] Half precision.", max_new_tokens=32, seed=0)
    assert half.dtype == dtype and res.audio[0].dtype == np.float32 and np.isfinite(res.audio[0]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e-38}, "temperature must be 0 \\(greedy\\) or at least 1e-06, got 1e-38"),
        ({"top_p": 0.0}, "top_p"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"cfg_filter_top_k": 0}, "cfg_filter_top_k"),
        ({"max_new_tokens": 16}, "too small"),
        ({"max_new_tokens": 5000}, "exceeds the model's audio length"),
    ],
)
def test_bad_arguments(tts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tts.generate("[S1] x", **kwargs)


def test_bad_texts(tts):
    with pytest.raises(ValueError, match="empty"):
        tts.generate("")
    with pytest.raises(ValueError, match="no texts"):
        tts.generate([])
    with pytest.raises(ValueError, match="1100 bytes"):
        tts.generate("a" * 1100)


def test_repr_and_properties(tts):
    assert "random demo" in repr(tts) and tts.device.type == "cpu" and tts.dtype == torch.float32


def test_generate_warns_about_doubtful_text_and_checks_its_arguments():
    tts = DiaTTS.random("tiny", seed=0)
    with pytest.warns(UserWarning, match="unknown speaker tag"):
        tts.generate("[S3] Hello there, how are you today?", max_new_tokens=20, progress=False, decode_audio=False)
    with pytest.raises(TypeError, match="text must be a str or a sequence of str, got NoneType"):
        tts.generate(None, progress=False)
    with pytest.raises(TypeError, match="max_new_tokens must be an int or None, got 30.5"):
        tts.generate("[S1] Hello there.", max_new_tokens=30.5, progress=False)


def test_integer_numpy_codes_are_codes_and_short_prompts_warn():
    tts = DiaTTS.random("tiny", seed=0)
    codes = np.random.default_rng(0).integers(0, 1024, (6, 9))
    assert torch.equal(tts.encode_prompt(codes), torch.from_numpy(codes))
    with pytest.warns(UserWarning, match="prompts under 1 s clone poorly"):
        tts.encode_prompt(0.3 * np.sin(np.arange(22050) / 9).astype(np.float32), 44100)


def _short_budget_tts() -> DiaTTS:
    """A tiny random model of 128 decoder positions whose channel-0 EOS logit sits just above a common token's (it
    ends its texts on its own after 12 frames, greedy), built as a checkpoint would be (not a demo)."""
    import dataclasses

    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel

    cfg = DiaConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, audio_length=128))
    torch.manual_seed(0)
    model = DiaModel(cfg).eval()
    with torch.no_grad():
        w = model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[613]
    return DiaTTS(model, DiaTTS.random("tiny").codec)


def test_truncated_says_which_texts_max_new_tokens_ended():
    """GenerationResult.truncated: the texts whose speech the limit ended. Without max_new_tokens, a text the model
    does not end within its whole budget also warns; generate_long warns for chunks an explicit limit ended."""
    import warnings

    from dia_fast.longform import generate_long

    tts = _short_budget_tts()
    texts = ["[S1] Hello there friend.", "[S2] A second text, longer than the first one."]
    kw = dict(do_sample=False, progress=False, decode_audio=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ended = tts.generate(texts, max_new_tokens=100, **kw)
        assert ended.truncated == [False, False] and [c.shape[0] for c in ended.codes] == [12, 12]
        held = tts.generate(texts, max_new_tokens=100, min_new_tokens=84, **kw)  # EOS held back to the limit
        assert held.truncated == [True, True]
    with pytest.warns(UserWarning, match=r"did not end the speech of text\(s\) \[0, 1\] within its whole audio"):
        assert tts.generate(texts, min_new_tokens=110, **kw).truncated == [True, True]
    with pytest.warns(UserWarning, match=r"max_new_tokens=100 ended the speech of chunk\(s\) \[0, 1\] of 2"):
        generate_long(tts, texts[0], max_new_tokens=100, min_new_tokens=84, do_sample=False, progress=False)
