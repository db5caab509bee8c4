"""Fused Triton CFG sampling against the PyTorch reference (dia_fast.ops.reference.cfg_sample).

Greedy mode must agree exactly; sampling mode is checked by chi-square tests of many seeded draws
against the reference's probabilities (CFG, top-k, EOS rules, temperature, top-p, then softmax).
On a CPU-only machine the kernel runs in the Triton interpreter (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import dia_fast.ops as ops  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_sampling as ts

from .triton_lowering import lower_for_cuda  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C, V, EOS = 9, 1028, 1024

# (cfg_scale, top_k): Dia's defaults, CFG off without filter, k = 1, k just below V, k >= V (no filter)
GREEDY_SETTINGS = [(3.0, 45), (0.0, None), (1.5, 1), (3.0, V - 1), (2.0, V)]


def _logits(B: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cond/uncond logits [B, C, V] with the special cases planted: high ids above EOS,
    EOS on channels 1..8, and EOS as channel 0's argmax on some rows (but not its guided top-k on all)."""
    cond = torch.randn(B, C, V, generator=gen) * 3
    uncond = cond + torch.randn(B, C, V, generator=gen)
    cond[:, :, EOS + 1 :] += 20  # never allowed, whatever their rank
    cond[:, 1:, EOS] += 20  # only channel 0 may emit EOS
    cond[0::2, 0, EOS] += 20  # EOS is channel 0's argmax on even rows
    return cond.to(dtype).to(DEVICE), uncond.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 2, 3, 5])
def test_greedy_matches_reference(B: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(100 * B + (dtype == torch.float16))
    cond, uncond = _logits(B, dtype, gen)
    for cfg_scale, top_k in GREEDY_SETTINGS:
        kw = dict(cfg_scale=cfg_scale, top_k=top_k, eos_id=EOS, do_sample=False)
        got = ts.cfg_sample(cond, uncond, **kw)
        want = ref.cfg_sample(cond, uncond, **kw)
        assert got.dtype == torch.int64 and got.shape == (B, C)
        assert torch.equal(got, want), (cfg_scale, top_k)
    # temperature 0 with do_sample=True is greedy too, through the dispatcher
    got = ops.cfg_sample(cond, uncond, temperature=0.0, do_sample=True, backend="triton")
    assert torch.equal(got, ref.cfg_sample(cond, uncond, temperature=0.0))
    # the planted EOS is picked exactly where it is channel 0's argmax after the top-k filter
    assert bool((got[:, 1:] < EOS).all())


def test_greedy_bf16_logits() -> None:
    """bf16 logits (no tl.dot here, so the interpreter's bf16 is right too): upcast, then as fp32."""
    gen = torch.Generator().manual_seed(13)
    cond, uncond = _logits(3, torch.bfloat16, gen)
    for cfg_scale, top_k in GREEDY_SETTINGS[:3]:
        kw = dict(cfg_scale=cfg_scale, top_k=top_k, do_sample=False)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))


def test_gpu_radix_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter runs 4-bit radix passes by default; the GPU runs 2-bit ones: check those too."""
    monkeypatch.setattr(ts, "_RADIX_BITS", 2)
    gen = torch.Generator().manual_seed(12)
    cond, uncond = _logits(2, torch.float32, gen)
    for cfg_scale, top_k in GREEDY_SETTINGS[:3]:
        kw = dict(cfg_scale=cfg_scale, top_k=top_k, do_sample=False)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))
    kw = dict(cfg_scale=1.0, temperature=2.0, top_p=0.9, top_k=10, eos_id=SEOS)
    small_c = torch.randn(1, 3, SV, generator=gen) * 1.5
    small_u = small_c + torch.randn(1, 3, SV, generator=gen) * 0.5
    counts = _draw_counts(small_c, small_u, 2000, seed=3, **kw)
    probs = _expected_probs(small_c, small_u, **dict(kw))
    for c in range(3):
        assert int(counts[c][probs[c] == 0].sum()) == 0
        assert _chi2_pvalue(counts[c], probs[c]) > 1e-3


def test_greedy_strided_inputs() -> None:
    """The CFG batch [2B, C, V] split in halves, and a channel-major (transposed) layout."""
    gen = torch.Generator().manual_seed(4)
    cond, uncond = _logits(3, torch.float32, gen)
    both = torch.cat([cond, uncond])
    want = ref.cfg_sample(cond, uncond, do_sample=False)
    assert torch.equal(ts.cfg_sample(both[:3], both[3:], do_sample=False), want)
    cond_t = cond.transpose(0, 1).contiguous().transpose(0, 1)  # strides (V, 3 V, 1)
    uncond_t = uncond.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # vocab-major: stride(2) != 1
    assert not cond_t.is_contiguous() and not uncond_t.is_contiguous()
    assert torch.equal(ts.cfg_sample(cond_t, uncond_t, do_sample=False), want)


def _stable_topk_greedy(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, k: int) -> torch.Tensor:
    """Plain PyTorch greedy pick whose top-k keeps the lowest ids among tied guided logits
    (a stable descending sort); the kernel documents this tie rule. No special ids here."""
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


# --- sampling mode: distribution tests --------------------------------------------------------

SV, SEOS = 16, 12  # small vocabulary: 12 codes, EOS = 12, ids 13..15 never sampled


def _expected_probs(cond: torch.Tensor, uncond: torch.Tensor, **kw) -> torch.Tensor:
    """The reference's sampling distribution [C, V] of logits [1, C, V]: the steps of ref.cfg_sample before its draw."""
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
    """Counts [C, V] of ``n`` draws per channel: one call on ``n`` identical rows (stride-0 batch)."""
    Cs, Vs = cond.shape[1:]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    codes = ts.cfg_sample(
        cond.to(DEVICE).expand(n, Cs, Vs), uncond.to(DEVICE).expand(n, Cs, Vs), generator=gen, do_sample=True, **kw
    ).cpu()
    return torch.stack([torch.bincount(codes[:, c], minlength=Vs) for c in range(Cs)])


SAMPLE_SETTINGS = [
    dict(cfg_scale=3.0, temperature=1.2, top_p=0.95, top_k=8),
    dict(cfg_scale=0.0, temperature=0.7, top_p=1.0, top_k=None),
    dict(cfg_scale=1.0, temperature=2.0, top_p=0.6, top_k=10),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("setting", range(len(SAMPLE_SETTINGS)))
def test_sampling_distribution_chi_square(setting: int, dtype: torch.dtype) -> None:
    kw = dict(SAMPLE_SETTINGS[setting], eos_id=SEOS)
    gen = torch.Generator().manual_seed(setting)
    cond = (torch.randn(1, 3, SV, generator=gen) * 1.5).to(dtype)
    uncond = (cond.float() + torch.randn(1, 3, SV, generator=gen) * 0.5).to(dtype)
    cond[0, 0, SEOS] = -5  # EOS allowed on channel 0 but not its argmax: masked
    cond[0, 1, SEOS] = 10  # channel 1 may not emit EOS even as its argmax
    cond[0, 2, SEOS + 2] = 10  # nobody emits ids above EOS
    n = 4000
    counts = _draw_counts(cond, uncond, n, seed=10 + setting, **kw)
    probs = _expected_probs(cond, uncond, **dict(kw))
    for c in range(3):
        assert int(counts[c][probs[c] == 0].sum()) == 0, ("drew an id of probability 0", c)
        p = _chi2_pvalue(counts[c], probs[c])
        assert p > 1e-3, (setting, c, p, counts[c].tolist(), (probs[c] * n).tolist())


def test_chi_square_detects_a_wrong_distribution() -> None:
    """The chi-square test has power: the same draws fit the right distribution and are rejected
    against the distribution without the temperature, or without top-p."""
    kw = dict(cfg_scale=1.0, temperature=2.0, top_p=0.9, top_k=10, eos_id=SEOS)
    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(1, 3, SV, generator=gen) * 1.5
    uncond = cond + torch.randn(1, 3, SV, generator=gen) * 0.5
    counts = _draw_counts(cond, uncond, 4000, seed=99, **kw)
    right = _expected_probs(cond, uncond, **dict(kw))
    assert min(_chi2_pvalue(counts[c], right[c]) for c in range(3)) > 1e-3
    for wrong in (dict(temperature=1.0), dict(top_p=1.0)):
        probs = _expected_probs(cond, uncond, **dict(kw, **wrong))
        assert max(_chi2_pvalue(counts[c], probs[c]) for c in range(3)) < 1e-9, wrong


def test_sampling_eos_argmax_is_forced() -> None:
    """Channel 0 whose (top-k filtered) argmax is EOS always emits EOS, also when sampling."""
    gen = torch.Generator().manual_seed(8)
    cond = torch.randn(1, 2, SV, generator=gen)
    uncond = cond.clone()
    cond[0, 0, SEOS] = 3.0  # argmax, but with temperature 2 it would not win every draw
    counts = _draw_counts(cond, uncond, 500, seed=1, cfg_scale=3.0, temperature=2.0, top_p=0.95, top_k=6, eos_id=SEOS)
    assert int(counts[0, SEOS]) == 500
    assert int(counts[1, SEOS:].sum()) == 0


def test_sampling_reproducible_and_seed_offset() -> None:
    gen = torch.Generator().manual_seed(6)
    cond, uncond = _logits(2, torch.float32, gen)

    def draw(seed: int) -> torch.Tensor:
        return ts.cfg_sample(cond, uncond, generator=torch.Generator(device=DEVICE).manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a[:, 1:] < EOS).all()) and bool((a <= EOS).all())
    # the global generator when none is given: reproducible under torch.manual_seed
    torch.manual_seed(3)
    d = ops.cfg_sample(cond, uncond, backend="triton")
    torch.manual_seed(3)
    assert torch.equal(d, ops.cfg_sample(cond, uncond, backend="triton"))

    # an explicit Philox key + per-step offset (int or device tensor): no generator at all
    seed = torch.tensor([1234], device=DEVICE)
    s5 = ts.cfg_sample(cond, uncond, seed=seed, offset=5)
    assert torch.equal(s5, ts.cfg_sample(cond, uncond, seed=seed, offset=torch.tensor([5], device=DEVICE)))
    steps = torch.stack([ts.cfg_sample(cond, uncond, seed=seed, offset=i) for i in range(4)])
    assert len({tuple(s.flatten().tolist()) for s in steps}) == 4


def test_errors() -> None:
    cond = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        ts.cfg_sample(cond, cond[:, :1])
    with pytest.raises(ValueError, match="not a vocabulary id"):
        ts.cfg_sample(cond, cond, eos_id=8)
    with pytest.raises(ValueError, match="either seed or generator"):
        ts.cfg_sample(cond, cond, eos_id=7, seed=torch.tensor([1]), generator=torch.Generator())
    big = torch.zeros(1, 1, ts.MAX_VOCAB + 1, device=DEVICE)
    with pytest.raises(ValueError, match="V <="):
        ts.cfg_sample(big, big, eos_id=3)
    empty = torch.zeros(0, 9, 1028, device=DEVICE)
    assert ts.cfg_sample(empty, empty).shape == (0, 9)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 16])
def test_greedy_bf16_gpu(B: int) -> None:
    gen = torch.Generator().manual_seed(B)
    cond, uncond = _logits(B, torch.bfloat16, gen)
    for cfg_scale, top_k in GREEDY_SETTINGS:
        kw = dict(cfg_scale=cfg_scale, top_k=top_k, do_sample=False)
        assert torch.equal(ts.cfg_sample(cond, uncond, **kw), ref.cfg_sample(cond, uncond, **kw))


@pytest.mark.gpu
def test_cuda_graph_capture_gpu() -> None:
    """The sampler captured in a CUDA graph (device seed and step tensors) replays like eager calls."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = _logits(2, torch.bfloat16, gen)
    seed = torch.tensor([77], device="cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")
    ts.cfg_sample(cond, uncond, seed=seed, offset=step)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ts.cfg_sample(cond, uncond, seed=seed, offset=step)
    for i in range(3):
        step.fill_(i)
        graph.replay()
        assert torch.equal(out, ts.cfg_sample(cond, uncond, seed=seed, offset=i))


# --- the whole generation loop with the Triton delay / embedding / sampling ops ----------------

MY_OPS = ("apply_delay", "revert_delay", "undelay_codes", "embed_codes", "cfg_sample")


def _generate(model, ids, mask, backend: str, sampling, generator=None):
    from dia_fast.generation.generate import generate_codes

    for op in MY_OPS:
        ops.set_backend(backend, op)
    try:
        assert all(ops.select_backend(op, model.device) == backend for op in MY_OPS)
        out = generate_codes(
            model, ids, mask, max_new_tokens=24, sampling=sampling, generator=generator, progress=False, pool=False
        )
        return out.delayed, out.frames(model.config)
    finally:
        for op in MY_OPS:
            ops.set_backend(None, op)


def test_generate_with_triton_ops_matches_torch() -> None:
    """Tiny random Dia: the greedy codes with the Triton delay, embedding and sampling ops equal the
    torch backend's (sampling-mode draws differ by design: Gumbel-max on Philox vs torch's RNG)."""
    from dia_fast.config import DiaConfig
    from dia_fast.generation.sampling import SamplingConfig
    from dia_fast.model import DiaModel
    from dia_fast.text import encode_batch

    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny")).eval().to(DEVICE)
    ids, mask = encode_batch(["[S1] Hello there. [S2] Hi!", "[S1] A second, longer line of text (laughs)."])
    greedy = SamplingConfig(do_sample=False)
    want, want_frames = _generate(model, ids, mask, "torch", greedy)
    got, got_frames = _generate(model, ids, mask, "triton", greedy)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_frames, want_frames, strict=True))
    assert sum(f.shape[0] for f in got_frames) > 0


# --- the GPU compiler's front end, without a GPU -------------------------------------------------


def test_sampling_kernel_lowers_for_cuda() -> None:
    types = dict(cond="*bf16", uncond="*bf16", out="*i64", seed_ptr="*i64", step_ptr="*i64", step="i64")
    types.update({n: "i32" for n in ("n_rows", "C", "V", "s_cb", "s_cc", "s_cv", "s_ub", "s_uc", "s_uv", "eos_id")})
    types.update({n: "fp32" for n in ("cfg_scale", "temperature", "top_p", "top_k_target")})
    dia = dict(ROWS=1, BLOCK_V=2048, IDX_BITS=11, KEY_BITS=44, RADIX_BITS=2)
    small = dict(ROWS=4, BLOCK_V=16, IDX_BITS=4, KEY_BITS=36, RADIX_BITS=4)
    ones = {n: 1 for n in ("C", "V", "s_cv", "s_uv", "eos_id")}  # runtime ints equal to 1 become constants
    plain = {k: v for k, v in types.items() if k not in ones}
    cases = []
    for greedy, step_ptr in ((True, False), (False, False), (False, True)):
        modes = dict(GREEDY=greedy, HAS_TOPK=True, HAS_TOPP=not greedy, STEP_FROM_PTR=step_ptr)
        cases += [(ts.__name__, "_cfg_sample_kernel", types, {**modes, **sizes}) for sizes in (dia, small)]
        cases.append((ts.__name__, "_cfg_sample_kernel", plain, {**modes, **dia, **ones}))
    assert lower_for_cuda(cases) == len(cases)
