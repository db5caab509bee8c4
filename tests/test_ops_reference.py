"""The PyTorch reference delay ops against transformers' DiaProcessor delay helpers and a plain
index-gather reference, over ragged shapes; ``delayed_view`` against ``apply_delay``; the sampled distribution
against transformers' Dia logits processors."""

from __future__ import annotations

import pytest
import torch

from dia_fast.ops import reference as ref

DIA_PATTERN = [0, 8, 9, 10, 11, 12, 13, 14, 15]
BOS, PAD = 1026, 1025
MARK = -7  # a value no code takes: marks the positions transformers fills with its pad id


def _hf_delay(codes: torch.Tensor, pattern: list[int], revert: bool, bos: int, pad: int) -> torch.Tensor:
    from transformers.models.dia.processing_dia import DiaProcessor

    B, T, C = codes.shape
    idx = DiaProcessor.build_indices(bsz=B, seq_len=T, num_channels=C, delay_pattern=pattern, revert=revert)
    return DiaProcessor.apply_audio_delay(codes, pad_token_id=pad, bos_token_id=bos, precomputed_idx=idx)


def _loop_apply(codes: torch.Tensor, pattern: list[int], bos: int, pad: int) -> torch.Tensor:
    """out[b, t, c] = codes[b, t - d_c, c], BOS before the start, PAD past the end: one element at a time."""
    B, T, C = codes.shape
    out = torch.empty_like(codes)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                s = t - pattern[c]
                out[b, t, c] = bos if s < 0 else pad if s >= T else codes[b, s, c]
    return out


def _loop_revert(codes: torch.Tensor, pattern: list[int]) -> torch.Tensor:
    B, T, C = codes.shape
    out = torch.empty_like(codes)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                out[b, t, c] = codes[b, min(t + pattern[c], T - 1), c]
    return out


def _cases() -> list[tuple[int, int, list[int]]]:
    """(B, T, pattern): Dia's pattern with T = 1, T < max delay, T = max delay + 1, ragged T;
    other channel counts and patterns, delays longer than T."""
    cases = [(B, T, DIA_PATTERN) for B, T in ((1, 1), (2, 7), (3, 16), (5, 33), (4, 100))]
    cases += [(2, 5, [3]), (3, 9, [0, 2, 1, 7]), (1, 4, [6, 0, 9]), (5, 12, [0, 0, 0, 0, 0])]
    return cases


@pytest.mark.parametrize("B,T,pattern", _cases())
def test_apply_delay_matches_transformers_and_gather(B: int, T: int, pattern: list[int]) -> None:
    gen = torch.Generator().manual_seed(B * 1000 + T)
    codes = torch.randint(0, 1024, (B, T, len(pattern)), generator=gen)
    got = ref.apply_delay(codes, pattern, BOS, PAD)
    assert torch.equal(got, _hf_delay(codes, pattern, False, BOS, PAD))
    assert torch.equal(got, _loop_apply(codes, pattern, BOS, PAD))


@pytest.mark.parametrize("B,T,pattern", _cases())
def test_revert_and_undelay_match_transformers_and_gather(B: int, T: int, pattern: list[int]) -> None:
    gen = torch.Generator().manual_seed(B * 1000 + T + 1)
    # delayed decoder output: codes plus BOS / EOS / PAD and out-of-range values
    delayed = torch.randint(-3, 1030, (B, T, len(pattern)), generator=gen)
    got = ref.revert_delay(delayed, pattern)
    assert torch.equal(got, _loop_revert(delayed, pattern))
    # transformers puts its pad id where t + d_c >= T; the reference repeats the last frame there
    hf = _hf_delay(delayed, pattern, True, BOS, MARK)
    last = delayed[:, T - 1 : T].expand_as(delayed)
    assert torch.equal(got, torch.where(hf == MARK, last, hf))
    # undelay = transformers' revert, cropped by max(delay), specials mapped to 0
    n = max(T - max(pattern), 0)
    want = hf[:, :n]
    want = torch.where((want < 0) | (want >= 1024), torch.zeros_like(want), want)
    out = ref.undelay_codes(delayed, pattern, 1024)
    assert out.shape == (B, n, len(pattern)) and out.dtype == torch.int64
    assert torch.equal(out, want)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 5), (3, 17), (5, 40)])
def test_round_trip(B: int, T: int) -> None:
    gen = torch.Generator().manual_seed(T)
    codes = torch.randint(0, 1024, (B, T + 15, 9), generator=gen)
    delayed = ref.apply_delay(codes, DIA_PATTERN, BOS, PAD)
    assert torch.equal(ref.undelay_codes(delayed, DIA_PATTERN), codes[:, :T])


# --- delayed_view -----------------------------------------------------------------------------


def _channel_major(B: int, C: int, P: int, T: int, gen: torch.Generator, extra: int = 0) -> torch.Tensor:
    """[B, C, P + T] buffer: P frames of BOS, then T real frames (then `extra` unused frames, sliced off)."""
    buf = torch.randint(0, 1024, (B, C, P + T + extra), generator=gen)
    buf[:, :, :P] = BOS
    return buf[:, :, : P + T]


@pytest.mark.parametrize(
    "pattern",
    [[0, 1, 2, 3, 4, 5, 6, 7, 8], [2, 3, 4], [0, 0, 0, 0], [0, 3, 6], [8, 6, 4, 2, 0], [5]],
)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (4, 25)])
def test_delayed_view_is_zero_copy_apply_delay(pattern: list[int], B: int, T: int) -> None:
    gen = torch.Generator().manual_seed(B * 100 + T)
    C, P = len(pattern), max(pattern)
    for extra in (0, 6):  # a buffer allocated for longer sequences, viewed up to P + T
        buf = _channel_major(B, C, P, T, gen, extra)
        view = ref.delayed_view(buf, pattern)
        assert view is not None and view.shape == (B, T, C)
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        real = buf[:, :, P:].transpose(1, 2)  # [B, T, C] undelayed frames
        assert torch.equal(view, ref.apply_delay(real, pattern, BOS, PAD))
        # a frame written into the buffer shows through the view
        buf[:, :, P + T - 1] = 1023 - torch.arange(C)
        assert torch.equal(view, ref.apply_delay(buf[:, :, P:].transpose(1, 2), pattern, BOS, PAD))


def test_delayed_view_declines() -> None:
    gen = torch.Generator().manual_seed(0)
    buf = _channel_major(2, 9, 15, 10, gen)
    assert ref.delayed_view(buf, DIA_PATTERN) is None  # Dia's pattern is not affine
    assert ref.delayed_view(buf.transpose(1, 2).contiguous().transpose(1, 2), list(range(9))) is None  # stride(2) != 1
    assert ref.delayed_view(buf[:, :, :8], list(range(9))) is None  # no real frame after the 8 BOS frames
    with pytest.raises(ValueError, match="channels"):
        ref.delayed_view(buf, [0, 1])
    with pytest.raises(ValueError, match="P \\+ T"):
        ref.delayed_view(buf[0], list(range(9)))


def test_triton_ops_launch_on_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: the dispatcher makes the tensors' device current."""
    import contextlib

    from dia_fast.ops._dispatch import on_tensors_device

    entered: list[object] = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class Fake:  # stands in for a CUDA tensor
        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    seen = []
    fn = on_tensors_device(lambda x, y=0: seen.append((x.device, y)) or "ok")
    assert fn(Fake("cuda:1"), y=2) == "ok" and entered == [torch.device("cuda:1")]
    assert fn(Fake("cuda:0")) == "ok" and fn(Fake("cpu")) == "ok" and len(entered) == 1
    assert [d.type for d, _ in seen] == ["cuda", "cuda", "cpu"]


# --- the sampled distribution against transformers' Dia logits processors --------------------------------------------


def _hf_probabilities(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    cfg_scale: float,
    top_k: int,
    temperature: float,
    top_p: float,
    eos: int,
) -> torch.Tensor:
    """The probabilities transformers' Dia generation samples from, built from its own processors in its order
    (``DiaForConditionalGeneration._get_logits_processor``): CFG with its top-k on the guided logits, temperature,
    the EOS channel filter, top-k, top-p. Rows are (item, channel); conditional rows first, as transformers lays out
    the CFG batch."""
    from transformers.generation.logits_process import (
        DiaClassifierFreeGuidanceLogitsProcessor,
        DiaEOSChannelFilterLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    B, C, V = cond.shape
    scores = torch.cat([cond.reshape(B * C, V), uncond.reshape(B * C, V)])
    input_ids = torch.zeros(B * C, 1, dtype=torch.long)  # (read for its batch size only)
    processors = [
        DiaClassifierFreeGuidanceLogitsProcessor(guidance_scale=cfg_scale, guidance_top_k=top_k),
        TemperatureLogitsWarper(temperature),
        DiaEOSChannelFilterLogitsProcessor(num_channels=C, eos_token_id=eos),
        TopKLogitsWarper(top_k),
        TopPLogitsWarper(top_p),
    ]
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores.softmax(-1).reshape(B, C, V)


@pytest.mark.parametrize(
    ("cfg_scale", "top_k", "temperature", "top_p"),
    [(3.0, 45, 1.2, 0.95), (1.5, 2, 1.0, 0.5), (2.0, 200, 0.7, 0.8), (4.0, 45, 1.8, 1.0)],
)
def test_sampled_distribution_equals_transformers_processors(cfg_scale, top_k, temperature, top_p):
    """What the sampled draw picks from (the reference's CFG filter and special-token rules, temperature, top-p) is
    transformers' distribution, computed by its processors: an independent implementation of the same rules. Rows
    cover EOS as channel 0's argmax (it alone stays), EOS elsewhere (masked), and large logits on the ids above EOS
    (never sampled)."""
    g = torch.Generator().manual_seed(11)
    B, C, V, eos = 4, 9, 1028, 1024
    cond = torch.randn(B, C, V, generator=g) * 3
    uncond = cond + torch.randn(B, C, V, generator=g)
    cond[0, 0, eos] = uncond[0, 0, eos] = 40.0  # item 0: EOS is channel 0's argmax
    cond[1, 0, eos] = 5.0  # item 1: EOS high but not the argmax on channel 0
    cond[2, :, eos + 1 :] = uncond[2, :, eos + 1 :] = 8.0  # item 2: PAD/BOS above EOS among the largest (in the top-k)
    cond[3, 4, eos] = 60.0  # item 3: EOS on a channel other than 0
    guided = cond + cfg_scale * (cond - uncond)
    in_top_k = (guided[2] >= guided[2].topk(top_k).values[..., -1:])[:, eos + 1 :].any()
    assert bool(in_top_k) == (top_k >= 45)  # (at k = 2 they would leave no candidate: a degenerate row in both)
    logits = ref.filter_cfg_logits(cond, uncond, cfg_scale=cfg_scale, top_k=top_k, eos_id=eos)
    ours = ref.top_p_filter(logits / temperature, top_p).softmax(-1)
    theirs = _hf_probabilities(
        cond, uncond, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, top_p=top_p, eos=eos
    )
    assert not ours.isnan().any()  # (every row keeps a candidate)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert float(ours[0, 0, eos]) == 1.0 and float(ours[3, 4, eos]) == 0.0 and float(ours[2, :, eos + 1 :].sum()) == 0
    assert bool((ours[1, 0] > 0).sum() >= 1) and float(ours[1, 0, eos]) == 0.0
