"""dia_fast's model against transformers' DiaForConditionalGeneration on identical random weights."""

from __future__ import annotations

import pytest
import torch

from dia_fast import checkpoint as ck
from dia_fast.config import DiaConfig
from dia_fast.generation.generate import generate_codes
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.model import DiaModel
from dia_fast.text import encode_batch

from .hf_reference import hf_dia, hf_processor

TEXTS = ["[S1] Hello there. [S2] Hi!", "[S1] A much longer sentence, to check that the padding mask works. (laughs)"]


def _pair(config: DiaConfig, seed: int = 0):
    hf = hf_dia(config, seed)
    ours = DiaModel(config)
    ours.load_state_dict(ck.to_internal(hf.state_dict()), strict=True)
    return hf, ours.eval()


def _tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.fixture(scope="module")
def tiny_pair():
    return _pair(DiaConfig.preset("tiny"))


@pytest.fixture(scope="module")
def processor():
    return hf_processor()


def _check_logits(hf, ours, processor, texts):
    inp = processor(text=texts, padding=True)
    ids, mask = encode_batch(texts)
    assert torch.equal(inp["input_ids"], ids)
    with torch.no_grad():
        enc_ref = hf.model.encoder(input_ids=ids, attention_mask=inp["attention_mask"]).last_hidden_state
        enc = ours.encode(ids, mask)
        m = mask[..., None]
        torch.testing.assert_close(enc * m, enc_ref * m, rtol=0, atol=_tol(enc_ref))

        # prefill logits over a delayed decoder prefix with random codes after the BOS phase
        dec = inp["decoder_input_ids"].clone()
        B, T, C = dec.shape
        codes = torch.randint(0, 1024, (B, 24, C))
        dec = torch.cat([dec, codes], dim=1)
        ref = hf(input_ids=ids, attention_mask=inp["attention_mask"], decoder_input_ids=dec).logits
        ref = ref.view(B, C, dec.shape[1], -1).transpose(1, 2)
        got = ours(ids, mask, dec)
        torch.testing.assert_close(got, ref, rtol=0, atol=_tol(ref))

        # step-by-step cached decode equals the full forward at every position
        state = ours.new_state(ours.encode(ids, mask), mask, dec.shape[1])
        first = ours.decoder(dec[:, :5], state)
        torch.testing.assert_close(first, ref[:, :5], rtol=0, atol=_tol(ref))
        for p in range(5, dec.shape[1]):
            step = ours.decoder(dec[:, p : p + 1], state, torch.tensor([p]))
            torch.testing.assert_close(step[:, 0], ref[:, p], rtol=0, atol=_tol(ref))


def test_tiny_logits_match_transformers(tiny_pair, processor):
    hf, ours = tiny_pair
    _check_logits(hf, ours, processor, TEXTS)


@pytest.mark.slow
def test_full_width_two_layers_logits_match_transformers(processor):
    config = DiaConfig.preset("dia-1.6b").with_layers(1, 2)
    hf, ours = _pair(config)
    _check_logits(hf, ours, processor, TEXTS[:1])


@pytest.mark.parametrize("max_new_tokens", [40, 57])
def test_greedy_generation_matches_transformers(tiny_pair, processor, max_new_tokens):
    hf, ours = tiny_pair
    inp = processor(text=TEXTS, padding=True)
    ref = hf.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, guidance_scale=3.0, top_k=45)
    ids, mask = encode_batch(TEXTS)
    out = generate_codes(
        ours, ids, mask, max_new_tokens=max_new_tokens, sampling=SamplingConfig(do_sample=False), progress=False
    )
    assert out.delayed.shape == ref.shape
    assert torch.equal(out.delayed, ref)
    frames = out.frames(ours.config)
    assert [f.shape[0] for f in frames] == [max_new_tokens - 16] * 2  # forced end, as in transformers


def test_greedy_generation_with_natural_eos_matches_transformers(processor):
    """Make channel 0's EOS logit beat a token that item 0 picks mid-way: item 0 then stops
    naturally there while item 1 runs to the length limit. The EOS countdown, per-item stopping
    and the cropping must match transformers."""
    config = DiaConfig.preset("tiny")
    hf, ours = _pair(config, seed=3)
    ids, mask = encode_batch(TEXTS)
    greedy = SamplingConfig(do_sample=False)
    plain = generate_codes(ours, ids, mask, max_new_tokens=120, sampling=greedy, progress=False).delayed[:, 1:, 0]
    # a token that item 0 first emits between steps 10 and 90 and item 1 never emits
    candidates = [
        (int((plain[0] == t).nonzero()[0]) + 1, t)
        for t in torch.unique(plain[0]).tolist()
        if t < 1024 and not bool((plain[1] == t).any())
    ]
    first, token = min((f, t) for f, t in candidates if 10 < f < 90)
    with torch.no_grad():
        for w in (hf.logits_dense.weight, ours.decoder.logits_dense.weight):
            w[1024] = 1.05 * w[token]  # channel 0's EOS row
    inp = processor(text=TEXTS, padding=True)
    ref = hf.generate(**inp, max_new_tokens=120, do_sample=False, guidance_scale=3.0, top_k=45)
    out = generate_codes(ours, ids, mask, max_new_tokens=120, sampling=greedy, progress=False)
    assert torch.equal(out.delayed, ref)
    # item 0 stopped on its own, before the forced end; item 1 ran to the limit
    eos_in_ref = [int((ref[i, :, 0] == 1024).nonzero()[0]) for i in range(2)]
    assert out.eos_pos.tolist() == eos_in_ref
    assert eos_in_ref[0] <= first < eos_in_ref[1] == 1 + 120 - 16
    # the frames are what transformers' processor hands to the codec: between BOS and EOS, reverted
    for i, frames in enumerate(out.frames(config)):
        seq = ref[i]
        end = seq.shape[0] - int((seq[:, 0] == 1025).sum()) - 1
        t = torch.arange(seq.shape[0])
        reverted = torch.stack(
            [seq[torch.clamp(t + d, max=seq.shape[0] - 1), c] for c, d in enumerate(config.data.delay_pattern)], 1
        )
        assert frames.shape[0] == end - 1
        assert torch.equal(frames, reverted[1:end])


def test_greedy_without_cfg_filter_matches_transformers(tiny_pair, processor):
    """``cfg_filter_top_k=None``: no top-k filter, the *guided* logits cond + s * (cond - uncond) are decoded, as
    transformers' guidance processor returns them without a top-k (dia_fast used to decode the conditional logits
    then, i.e. dropped CFG). The CFG scale must change the codes."""
    hf, ours = tiny_pair
    inp = processor(text=TEXTS, padding=True)
    hf.generation_config.top_k = None  # else generate() falls back to the generation config's top-k
    ids, mask = encode_batch(TEXTS)
    outs = []
    for scale in (3.0, 1.5):
        ref = hf.generate(**inp, max_new_tokens=40, do_sample=False, guidance_scale=scale, top_k=None)
        sampling = SamplingConfig(do_sample=False, cfg_scale=scale, cfg_filter_top_k=None)
        out = generate_codes(ours, ids, mask, max_new_tokens=40, sampling=sampling, progress=False)
        assert torch.equal(out.delayed, ref), scale
        outs.append(out.delayed)
    assert not torch.equal(outs[0], outs[1])
