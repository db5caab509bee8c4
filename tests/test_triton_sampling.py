"""CFG sampling: the Triton kernel against the PyTorch reference (dia_fast.ops.reference.cfg_sample), and the
reference's own draws against the distribution they must follow.

The chain of evidence: greedy picks and *seeded* draws of the kernel equal the reference's exactly (same
Philox noise, same filters, per-row settings), and the reference's seeded draws pass chi-square tests against
the probabilities its filters define. On a CPU-only machine the kernel runs in the Triton interpreter
(conftest.py), where one program costs milliseconds: most cases use a small vocabulary, a few the real one.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

import dia_fast.ops as ops  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_sampling as ts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C, V, EOS = 9, 1028, 1024  # Dia's
SC, SV, SEOS = 3, 40, 32  # small: ids 33..39 play the special ids above EOS

# (cfg_scale, top_k): Dia's defaults, CFG off without filter, k = 1, k just below V, k >= V, no filter with CFG
GREEDY_SETTINGS = [(3.0, 45), (0.0, None), (1.5, 1), (3.0, -1), (2.0, 10**6), (3.0, None)]


def _logits(
    B: int, dtype: torch.dtype, gen: torch.Generator, Cs: int = SC, Vs: int = SV, eos: int = SEOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cond/uncond logits [B, Cs, Vs] with the special cases planted: high ids above EOS,
    EOS on channels 1.., and EOS as channel 0's argmax on some rows (but not its guided top-k on all)."""
    cond = torch.randn(B, Cs, Vs, generator=gen) * 3
    uncond = cond + torch.randn(B, Cs, Vs, generator=gen)
    cond[:, :, eos + 1 :] += 20  # never allowed, whatever their rank
    cond[:, 1:, eos] += 20  # only channel 0 may emit EOS
    cond[0::2, 0, eos] += 20  # EOS is channel 0's argmax on even rows
    return cond.to(dtype).to(DEVICE), uncond.to(dtype).to(DEVICE)


def _k(top_k: int | None, Vs: int) -> int | None:
    return Vs - 1 if top_k == -1 else top_k


# --- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_greedy_matches_reference(B: int, dtype: torch.dtype) -> None:
    """bf16 too: the kernel has no tl.dot, so the interpreter's bf16 is right."""
    gen = torch.Generator().manual_seed(100 * B + zlib.crc32(str(dtype).encode()) % 100)  # (hash() varies by run)
    cond, uncond = _logits(B, dtype, gen)
    for cfg_scale, top_k in GREEDY_SETTINGS:
        kw = dict(cfg_scale=cfg_scale, top_k=_k(top_k, SV), eos_id=SEOS, do_sample=False)
        got = ts.cfg_sample(cond, uncond, **kw)
        want = ref.cfg_sample(cond, uncond, **kw)
        assert got.dtype == torch.int64 and got.shape == (B, SC)
        assert torch.equal(got, want), (cfg_scale, top_k)
    # temperature 0 with do_sample=True is greedy too, through the dispatcher
    got = ops.cfg_sample(cond, uncond, temperature=0.0, eos_id=SEOS, backend="triton")
    assert torch.equal(got, ref.cfg_sample(cond, uncond, temperature=0.0, eos_id=SEOS))
    assert bool((got[:, 1:] < SEOS).all()) and bool((got <= SEOS).all())


def test_greedy_full_vocabulary() -> None:
    """Dia's shapes (V = 1028, 9 channels): one batch item per case, Dia's settings and no filter."""
    gen = torch.Generator().manual_seed(1)
    cond, uncond = _logits(2, torch.float32, gen, C, V, EOS)
    for top_k in (45, None):
        kw = dict(cfg_scale=3.0, top_k=top_k, eos_id=EOS, do_sample=False)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))


def test_greedy_strided_inputs() -> None:
    """The CFG batch [2B, C, V] split in halves, and a channel-major (transposed) layout."""
    gen = torch.Generator().manual_seed(4)
    cond, uncond = _logits(3, torch.float32, gen)
    both = torch.cat([cond, uncond])
    want = ref.cfg_sample(cond, uncond, eos_id=SEOS, do_sample=False)
    assert torch.equal(ts.cfg_sample(both[:3], both[3:], eos_id=SEOS, do_sample=False), want)
    cond_t = cond.transpose(0, 1).contiguous().transpose(0, 1)  # strides (V, 3 V, 1)
    uncond_t = uncond.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # vocab-major: stride(2) != 1
    assert not cond_t.is_contiguous() and not uncond_t.is_contiguous()
    assert torch.equal(ts.cfg_sample(cond_t, uncond_t, eos_id=SEOS, do_sample=False), want)


def _stable_topk_greedy(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, k: int) -> torch.Tensor:
    """Plain PyTorch greedy pick whose top-k keeps the lowest ids among tied guided logits
    (a stable descending sort). No special ids here."""
    guided = cond + cfg_scale * (cond - uncond)
    idx = guided.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    keep = torch.zeros_like(cond, dtype=torch.bool).scatter_(-1, idx, True)
    return cond.masked_fill(~keep, float("-inf")).argmax(dim=-1)


def test_greedy_ties_keep_lowest_ids() -> None:
    """Small-integer logits (exact in fp32): many exact ties in the guided logits at the top-k boundary."""
    gen = torch.Generator().manual_seed(5)
    Vs = 64
    cond = torch.randn(4, 3, Vs, generator=gen).round()
    uncond = cond - torch.randint(0, 4, (4, 3, Vs), generator=gen).float()  # guided = cond + level, exact
    cond[..., Vs - 1] = -100.0  # EOS (the last id) never in the top-k: the EOS rules do not apply
    for k in (1, 5, 17, 40):
        want = _stable_topk_greedy(cond, uncond, 1.0, k)
        got = ts.cfg_sample(cond.to(DEVICE), uncond.to(DEVICE), cfg_scale=1.0, top_k=k, eos_id=Vs - 1, do_sample=False)
        assert torch.equal(got.cpu(), want), k
        assert torch.equal(ref.cfg_sample(cond, uncond, cfg_scale=1.0, top_k=k, eos_id=Vs - 1, do_sample=False), want)


@pytest.mark.parametrize("bits", [2, 8])
def test_other_radix_widths(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    """The threshold search does not depend on how many bits a pass fixes (2 on a GPU, 4 in the interpreter)."""
    monkeypatch.setattr(ts, "RADIX_BITS", bits)
    monkeypatch.setattr(ts, "INTERPRETER_RADIX_BITS", bits)
    gen = torch.Generator().manual_seed(12)
    cond, uncond = _logits(2, torch.float32, gen)
    kw = dict(cfg_scale=1.0, temperature=2.0, top_p=0.7, top_k=10, eos_id=SEOS, seed=torch.tensor([3, 4]), offset=9)
    assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))
    kw = dict(cfg_scale=3.0, top_k=5, eos_id=SEOS, do_sample=False)
    assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))


# --- seeded draws: identical to the reference --------------------------------------------------

SAMPLE_SETTINGS = [
    dict(cfg_scale=3.0, temperature=1.2, top_p=0.95, top_k=8),
    dict(cfg_scale=0.0, temperature=0.7, top_p=1.0, top_k=None),
    dict(cfg_scale=1.0, temperature=2.0, top_p=0.6, top_k=10),
    dict(cfg_scale=2.0, temperature=1.0, top_p=0.8, top_k=None),  # nucleus over the whole (guided) row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("setting", range(len(SAMPLE_SETTINGS)))
def test_seeded_draws_equal_reference(setting: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(setting)
    B = 16
    cond, uncond = _logits(B, dtype, gen)
    seeds = torch.randint(-(2**63), 2**63 - 1, (B,), generator=gen).to(DEVICE)
    kw = dict(SAMPLE_SETTINGS[setting], eos_id=SEOS, seed=seeds)
    for offset in (0, 2**33 + 5, torch.arange(B, device=DEVICE) * 1000):
        got = ts.cfg_sample(cond, uncond, offset=offset, **kw)
        assert torch.equal(got, ref.cfg_sample(cond, uncond, offset=offset, **kw)), offset


def test_seeded_draws_full_vocabulary() -> None:
    gen = torch.Generator().manual_seed(7)
    cond, uncond = _logits(1, torch.float32, gen, C, V, EOS)
    kw = dict(cfg_scale=3.0, temperature=1.2, top_p=0.95, top_k=45, eos_id=EOS, seed=torch.tensor([11], device=DEVICE))
    assert torch.equal(ts.cfg_sample(cond, uncond, offset=3, **kw), ref.cfg_sample(cond, uncond, offset=3, **kw))


def test_per_row_settings() -> None:
    """Every setting a per-row tensor: each row behaves as if sampled alone with its own numbers (a greedy
    row among sampled ones too), in both backends."""
    gen = torch.Generator().manual_seed(9)
    B = 5
    cond, uncond = _logits(B, torch.float32, gen)
    rows = dict(
        cfg_scale=torch.tensor([3.0, 0.0, 1.5, 2.0, 3.0]),
        temperature=torch.tensor([1.2, 0.0, 0.8, 2.0, 1.0]),
        top_p=torch.tensor([0.95, 1.0, 0.5, 0.9, 1.0]),
        top_k=torch.tensor([45, 0, 3, 10, 0], dtype=torch.int32),
    )
    seeds = torch.tensor([1, 2, 3, 4, 5], device=DEVICE)
    offsets = torch.tensor([10, 20, 30, 40, 50], device=DEVICE)
    dev_rows = {k: v.to(DEVICE) for k, v in rows.items()}
    got = ts.cfg_sample(cond, uncond, eos_id=SEOS, seed=seeds, offset=offsets, **dev_rows)
    assert torch.equal(got, ref.cfg_sample(cond, uncond, eos_id=SEOS, seed=seeds, offset=offsets, **dev_rows))
    for b in range(B):
        one = {k: (v[b].item() if k != "top_k" else (int(v[b]) or None)) for k, v in rows.items()}
        alone = ref.cfg_sample(
            cond[b : b + 1], uncond[b : b + 1], eos_id=SEOS, seed=seeds[b : b + 1], offset=offsets[b : b + 1], **one
        )
        assert torch.equal(got[b : b + 1], alone), b


def test_negative_top_p_keeps_the_top_id() -> None:
    """A top_p below 0 keeps the most probable id alone, as 0 does and as the reference's nucleus always keeps it (the
    kernel kept nothing and drew id 0); a number or per-row values."""
    gen = torch.Generator().manual_seed(12)
    B = 4
    cond, uncond = _logits(B, torch.float32, gen)
    kw = dict(eos_id=SEOS, seed=torch.tensor([5, 6, 7, 8], device=DEVICE), offset=torch.tensor([3], device=DEVICE))
    for top_p in (-0.5, torch.tensor([-0.1, 0.5, -3.0, 0.0], device=DEVICE)):
        got = ts.cfg_sample(cond, uncond, top_p=top_p, **kw)
        assert torch.equal(got, ref.cfg_sample(cond, uncond, top_p=top_p, **kw)), top_p
    greedy = ref.cfg_sample(cond, uncond, eos_id=SEOS, do_sample=False)
    assert torch.equal(ts.cfg_sample(cond, uncond, top_p=-1.0, **kw), greedy)  # the top id alone: the argmax


def test_vocabularies_past_the_kernel_run_the_reference() -> None:
    """V > MAX_VOCAB (one row no longer fits a block): the reference's codes, greedy and seeded, also through the
    dispatcher's Triton backend (what a CUDA device picks)."""
    gen = torch.Generator().manual_seed(4100)
    Vb = ts.MAX_VOCAB + 4
    cond, uncond = _logits(2, torch.float32, gen, SC, Vb, Vb - 4)
    seeded = dict(eos_id=Vb - 4, seed=torch.tensor([1, 2], device=DEVICE), offset=7)
    for kw in (dict(eos_id=Vb - 4, do_sample=False), seeded):
        want = ref.cfg_sample(cond, uncond, **kw)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), want)
        assert torch.equal(ops.cfg_sample(cond, uncond, backend="triton", **kw), want)


def test_seed_and_offset_select_the_noise() -> None:
    gen = torch.Generator().manual_seed(6)
    cond, uncond = _logits(2, torch.float32, gen)
    seed = torch.tensor([1234], device=DEVICE)
    kw = dict(eos_id=SEOS, top_k=None, top_p=1.0)
    s5 = ts.cfg_sample(cond, uncond, seed=seed, offset=5, **kw)
    assert torch.equal(s5, ts.cfg_sample(cond, uncond, seed=seed, offset=torch.tensor([5], device=DEVICE), **kw))
    steps = torch.stack([ts.cfg_sample(cond, uncond, seed=seed, offset=i, **kw) for i in range(4)])
    assert len({tuple(s.flatten().tolist()) for s in steps}) == 4
    # a generator draws the per-row keys: reproducible for a generator seed, and the global one by default
    a = ts.cfg_sample(cond, uncond, generator=torch.Generator(device=DEVICE).manual_seed(1), **kw)
    assert torch.equal(a, ts.cfg_sample(cond, uncond, generator=torch.Generator(device=DEVICE).manual_seed(1), **kw))
    torch.manual_seed(3)
    d = ops.cfg_sample(cond, uncond, backend="triton", **kw)
    torch.manual_seed(3)
    assert torch.equal(d, ops.cfg_sample(cond, uncond, backend="triton", **kw))


def test_uniforms_are_strictly_inside_zero_one() -> None:
    """The noise's uniforms from the extreme bit patterns stay inside (0, 1) in fp32, so the Gumbel noise is finite
    (24 bits rounded their top value to 1.0: +inf noise, and -inf logits + inf = NaN won the argmax)."""
    u = ref.uniform_from_bits(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1]))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())


def test_philox_known_answers() -> None:
    """The reference's Philox4x32-10 against the known-answer vectors of Random123 (Salmon et al.)."""
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)  # digits of pi, as Random123 uses them
    cases = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), pi, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for (k0, k1), counter, want in cases:
        key = torch.tensor([ref.seed_from_int(k0 | (k1 << 32))])
        got = ref.philox4x32(key, *(torch.tensor([c]) for c in counter))
        assert tuple(int(w) for w in got) == want


# --- the reference's draws follow the filtered distribution (chi-square) -----------------------

SMALL_V, SMALL_EOS = 16, 12


def _expected_probs(cond: torch.Tensor, uncond: torch.Tensor, **kw) -> torch.Tensor:
    """The sampling distribution [C, V] of logits [1, C, V]: the reference's filters before its draw."""
    temperature, top_p = kw.pop("temperature"), kw.pop("top_p")
    logits = ref.filter_cfg_logits(cond.float(), uncond.float(), **kw)
    return ref.top_p_filter(logits / temperature, top_p).softmax(dim=-1).double()[0]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` [V] against ``probs`` [V] (ids of probability 0 must
    not occur; they are checked separately)."""
    support = probs > 0
    n = float(counts.sum())
    expected = probs[support] * n
    stat = float(((counts[support].double() - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _draw_counts(cond: torch.Tensor, uncond: torch.Tensor, n: int, seed: int, **kw) -> torch.Tensor:
    """Counts [C, V] of ``n`` seeded reference draws per channel: ``n`` identical rows with their own keys."""
    Cs, Vs = cond.shape[1:]
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(seed))
    codes = ref.cfg_sample(cond.expand(n, Cs, Vs), uncond.expand(n, Cs, Vs), seed=seeds, offset=seed, **kw)
    return torch.stack([torch.bincount(codes[:, c], minlength=Vs) for c in range(Cs)])


@pytest.mark.parametrize("setting", range(len(SAMPLE_SETTINGS)))
def test_sampling_distribution_chi_square(setting: int) -> None:
    kw = dict(SAMPLE_SETTINGS[setting], eos_id=SMALL_EOS)
    gen = torch.Generator().manual_seed(setting)
    cond = torch.randn(1, 3, SMALL_V, generator=gen) * 1.5
    uncond = cond + torch.randn(1, 3, SMALL_V, generator=gen) * 0.5
    cond[0, 0, SMALL_EOS] = -5  # EOS allowed on channel 0 but not its argmax: masked
    cond[0, 1, SMALL_EOS] = 10  # channel 1 may not emit EOS even as its argmax
    cond[0, 2, SMALL_EOS + 2] = 10  # nobody emits ids above EOS
    n = 6000
    counts = _draw_counts(cond, uncond, n, seed=10 + setting, **kw)
    probs = _expected_probs(cond, uncond, **dict(kw))
    for c in range(3):
        assert int(counts[c][probs[c] == 0].sum()) == 0, ("drew an id of probability 0", c)
        p = _chi2_pvalue(counts[c], probs[c])
        assert p > 1e-3, (setting, c, p, counts[c].tolist(), (probs[c] * n).tolist())


def test_chi_square_detects_a_wrong_distribution() -> None:
    """The chi-square test has power: the same draws fit the right distribution and are rejected
    against the distribution without the temperature, or without top-p."""
    kw = dict(cfg_scale=1.0, temperature=2.0, top_p=0.9, top_k=10, eos_id=SMALL_EOS)
    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(1, 3, SMALL_V, generator=gen) * 1.5
    uncond = cond + torch.randn(1, 3, SMALL_V, generator=gen) * 0.5
    counts = _draw_counts(cond, uncond, 6000, seed=99, **kw)
    right = _expected_probs(cond, uncond, **dict(kw))
    assert min(_chi2_pvalue(counts[c], right[c]) for c in range(3)) > 1e-3
    for wrong in (dict(temperature=1.0), dict(top_p=1.0)):
        probs = _expected_probs(cond, uncond, **dict(kw, **wrong))
        assert max(_chi2_pvalue(counts[c], probs[c]) for c in range(3)) < 1e-9, wrong


def test_sampling_eos_argmax_is_forced() -> None:
    """Channel 0 whose (top-k filtered) argmax is EOS always emits EOS, also when sampling."""
    gen = torch.Generator().manual_seed(8)
    cond = torch.randn(1, 2, SMALL_V, generator=gen)
    uncond = cond.clone()
    cond[0, 0, SMALL_EOS] = 3.0  # argmax, but with temperature 2 it would not win every draw
    kw = dict(cfg_scale=3.0, temperature=2.0, top_p=0.95, top_k=6, eos_id=SMALL_EOS)
    counts = _draw_counts(cond, uncond, 500, seed=1, **kw)
    assert int(counts[0, SMALL_EOS]) == 500
    assert int(counts[1, SMALL_EOS:].sum()) == 0
    seeds = torch.arange(64, device=DEVICE)
    c, u = cond.to(DEVICE).expand(64, 2, SMALL_V), uncond.to(DEVICE).expand(64, 2, SMALL_V)
    assert bool((ts.cfg_sample(c, u, seed=seeds, **kw)[:, 0] == SMALL_EOS).all())


def test_errors() -> None:
    cond = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        ts.cfg_sample(cond, cond[:, :1])
    with pytest.raises(ValueError, match="not a vocabulary id"):
        ts.cfg_sample(cond, cond, eos_id=8)
    with pytest.raises(ValueError, match="either seed or generator"):
        ts.cfg_sample(cond, cond, eos_id=7, seed=torch.tensor([1]), generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\[B=1\]"):
        ts.cfg_sample(cond, cond, eos_id=7, temperature=torch.ones(3))
    big = torch.zeros(1, 1, ts.MAX_VOCAB + 1, device=DEVICE)  # the reference's checks past the kernel's vocabulary
    with pytest.raises(ValueError, match="not a vocabulary id"):
        ts.cfg_sample(big, big, eos_id=ts.MAX_VOCAB + 1)
    empty = torch.zeros(0, 9, 1028, device=DEVICE)
    assert ts.cfg_sample(empty, empty).shape == (0, 9)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 16])
def test_dia_shapes_bf16_gpu(B: int) -> None:
    gen = torch.Generator().manual_seed(B)
    cond, uncond = _logits(B, torch.bfloat16, gen, C, V, EOS)
    for cfg_scale, top_k in GREEDY_SETTINGS:
        kw = dict(cfg_scale=cfg_scale, top_k=_k(top_k, V), do_sample=False)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))
    seeds = torch.arange(B, device="cuda") * 7919
    for setting in SAMPLE_SETTINGS:
        kw = dict(setting, seed=seeds, offset=123)
        got, want = ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw)
        # fp32 exp/log on the GPU may round differently from the CPU reference's: allow a rare flip
        assert (got != want).float().mean() < 0.01, setting


@pytest.mark.gpu
def test_cuda_graph_capture_gpu() -> None:
    """The sampler captured in a CUDA graph (device seeds, step and settings) replays like eager calls."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = _logits(2, torch.bfloat16, gen, C, V, EOS)
    seed = torch.tensor([77, 78], device="cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")
    temp = torch.full((2,), 1.2, device="cuda")
    kw = dict(seed=seed, offset=step, temperature=temp)
    ts.cfg_sample(cond, uncond, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ts.cfg_sample(cond, uncond, **kw)
    for i in range(3):
        step.fill_(i)
        temp.fill_(0.5 + i)
        graph.replay()
        assert torch.equal(out, ts.cfg_sample(cond, uncond, seed=seed, offset=i, temperature=0.5 + i))


# --- the whole generation loop with the Triton ops ----------------------------------------------

MY_OPS = ("apply_delay", "revert_delay", "undelay_codes", "embed_codes", "cfg_sample", "step_update")


def _generate(model, ids, mask, backend: str, sampling, seed: int = 0):
    from dia_fast.generation.generate import generate_codes

    for op in MY_OPS:
        ops.set_backend(backend, op)
    try:
        assert all(ops.select_backend(op, model.device) == backend for op in MY_OPS)
        out = generate_codes(
            model,
            ids,
            mask,
            max_new_tokens=24,
            sampling=sampling,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
            pool=False,
        )
        return out.delayed, out.frames(model.config)
    finally:
        for op in MY_OPS:
            ops.set_backend(None, op)


def test_generate_with_triton_ops_matches_torch() -> None:
    """Tiny random Dia: greedy and seeded sampled codes with the Triton delay, embedding, sampling and step
    ops equal the torch backend's."""
    from dia_fast.config import DiaConfig
    from dia_fast.generation.sampling import SamplingConfig
    from dia_fast.model import DiaModel
    from dia_fast.text import encode_batch

    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny")).eval().to(DEVICE)
    ids, mask = encode_batch(["[S1] Hello there. [S2] Hi!", "[S1] A second, longer line of text (laughs)."])
    for sampling in (SamplingConfig(do_sample=False), SamplingConfig(temperature=1.5, top_p=0.9)):
        want, want_frames = _generate(model, ids, mask, "torch", sampling)
        got, got_frames = _generate(model, ids, mask, "triton", sampling)
        assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(got_frames, want_frames, strict=True))
        assert sum(f.shape[0] for f in got_frames) > 0
