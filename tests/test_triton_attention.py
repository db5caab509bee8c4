"""Triton prefill attention and split-KV decode attention against the PyTorch references.

On a CPU-only machine the kernels run in the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1, and the launchers pick small blocks there); on a CUDA machine the same tests
run on the GPU, plus the bf16 / full-size / CUDA-graph tests marked ``gpu``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

import dia_fast.ops as ops  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_attention as ta  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol) against the fp32-accumulating reference run on the same (rounded) inputs.
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def _seed(case: object) -> int:
    return zlib.crc32(repr(case).encode())  # stable across runs, unlike hash() of a str


def _close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert not got.isnan().any(), what
    atol, rtol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, gen):
    q = torch.randn(B, Hq, Tq, D, generator=gen)
    k = torch.randn(B, Hkv, Tk, D, generator=gen)
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _key_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor | None:
    """None, right padding (text), left padding (prompts), or random with one all-False row."""
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(B, T, generator=gen) > 0.4
        m[-1] = False  # a batch item that sees no key at all
        return m.to(DEVICE)
    lens = torch.randint(1, T + 1, (B,), generator=gen)
    lens[0] = T
    pos = torch.arange(T)[None, :]
    m = pos < lens[:, None] if kind == "right" else pos >= (T - lens)[:, None]
    return m.to(DEVICE)


# --- prefill --------------------------------------------------------------------------------

# (B, Hq, Hkv, Tq, Tk, D, causal, mask kind, scale)
PREFILL_CASES = [
    (1, 2, 2, 1, 1, 64, False, "none", 0.125),  # T = 1
    (2, 4, 2, 19, 19, 16, True, "left", 0.25),  # the tiny model's head dim
    (2, 3, 1, 11, 26, 80, False, "random", 0.11),  # head dim not a power of two, GQA 3
    (1, 2, 1, 1, 9, 64, True, "none", 1.0),  # one causal query sees every key
    (2, 4, 2, 37, 45, 64, False, "random", 0.125),  # ragged, GQA 2, fully masked item
    (3, 4, 1, 33, 33, 64, True, "none", 0.2),  # GQA 4, causal
    (5, 2, 1, 7, 19, 128, True, "left", 0.09),  # batch 5, causal Tq < Tk with left padding
    (2, 4, 4, 40, 23, 128, True, "random", 0.09),  # causal Tq > Tk: the first rows see nothing
    (4, 8, 2, 1, 70, 64, False, "right", 1.0),  # one query step, GQA 4
    (2, 16, 16, 45, 45, 128, False, "right", 1.0),  # Dia encoder self-attention (scale 1)
    (2, 16, 4, 21, 21, 128, True, "left", 0.088),  # Dia decoder prefill (prompt, left padded)
    (2, 16, 16, 21, 45, 128, False, "right", 0.088),  # Dia cross-attention over the text
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_prefill_matches_reference(case, dtype: torch.dtype) -> None:
    B, Hq, Hkv, Tq, Tk, D, causal, mask_kind, scale = case
    gen = torch.Generator().manual_seed(_seed(case))
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, gen)
    km = _key_mask(mask_kind, B, Tk, gen)
    got = ta.attention(q, k, v, scale=scale, causal=causal, key_mask=km)
    want = ref.attention(q, k, v, scale=scale, causal=causal, key_mask=km)
    _close(got, want, case)


def test_prefill_fully_masked_rows_are_zero_like_the_reference() -> None:
    """The reference returns zeros (not NaN) for a query that sees no key; so does the kernel."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(3, 4, 2, 9, 13, 64, torch.float32, gen)
    km = torch.ones(3, 13, dtype=torch.bool, device=DEVICE)
    km[1] = False
    km[2, :5] = False  # with causal and Tq < Tk, query 0 of item 2 sees keys 0..4 only: all masked
    for causal in (False, True):
        want = ref.attention(q, k, v, scale=0.3, causal=causal, key_mask=km)
        got = ta.attention(q, k, v, scale=0.3, causal=causal, key_mask=km)
        assert torch.equal(want[1], torch.zeros_like(want[1]))
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        _close(got, want, causal)
    # causal with more queries than keys: rows i < Tq - Tk see nothing
    q2, k2, v2 = _qkv(1, 2, 2, 12, 5, 64, torch.float32, gen)
    got = ta.attention(q2, k2, v2, scale=0.3, causal=True)
    assert torch.equal(got[:, :, :7], torch.zeros_like(got[:, :, :7]))
    _close(got, ref.attention(q2, k2, v2, scale=0.3, causal=True), "Tq > Tk")


def test_prefill_strided_inputs_and_mask_dtypes() -> None:
    """q/k/v as the model makes them ([B, T, H, D] transposed: not contiguous), a [1, Tk] mask,
    and an integer mask (non-zero = attend)."""
    gen = torch.Generator().manual_seed(3)
    B, T, Hq, Hkv, D = 3, 29, 4, 2, 64
    q = torch.randn(B, T, Hq, D, generator=gen).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, T, 2, Hkv, D, generator=gen).to(DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    km = (torch.rand(1, T, generator=gen) > 0.3).to(DEVICE)
    for mask in (km, km.int() * 3):
        got = ta.attention(q, k, v, scale=0.125, causal=True, key_mask=mask)
        want = ref.attention(q, k, v, scale=0.125, causal=True, key_mask=mask.bool())
        _close(got, want, mask.dtype)


def test_prefill_empty_shapes() -> None:
    q = torch.randn(2, 4, 0, 64, device=DEVICE)
    k = v = torch.randn(2, 2, 5, 64, device=DEVICE)
    assert ta.attention(q, k, v).shape == (2, 4, 0, 64)
    q = torch.randn(2, 4, 3, 64, device=DEVICE)
    k = v = torch.randn(2, 2, 0, 64, device=DEVICE)
    got = ta.attention(q, k, v)
    assert torch.equal(got, ref.attention(q, k, v))
    assert torch.equal(got, torch.zeros_like(got))


def test_invalid_arguments_raise() -> None:
    q = torch.randn(1, 4, 3, 64, device=DEVICE)
    k = torch.randn(1, 3, 5, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        ta.attention(q, k, k)
    k = torch.randn(1, 2, 5, 48, device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        ta.attention(q, k, k)
    k = torch.randn(1, 2, 5, 64, device=DEVICE)
    with pytest.raises(ValueError, match="key_mask"):
        ta.attention(q, k, k, key_mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="one query step"):
        ta.decode_attention(q, k, k)
    with pytest.raises(ValueError, match="integer"):
        ta.decode_attention(q[:, :, :1], k, k, kv_len=torch.tensor(2.0, device=DEVICE))
    with pytest.raises(ValueError, match="kv_len"):
        ta.decode_attention(q[:, :, :1], k, k, kv_len=torch.tensor([1, 2], device=DEVICE))


_MIXED = (torch.float32, torch.float16, torch.float16)  # q, k, v dtypes the reference takes (in fp32)


def test_inputs_past_the_kernels_run_the_reference() -> None:
    """Head dims over 256, fp64 or mixed dtypes and grids past CUDA's y limit: what the kernels do not take runs the
    reference (the dispatcher picks Triton for every CUDA input), like the C++ and Metal backends."""
    gen = torch.Generator().manual_seed(272)
    km = torch.rand(2, 7, generator=gen) > 0.3
    cases = [
        (_qkv(2, 4, 2, 5, 7, 272, torch.float32, gen), km),  # head dim 272
        (_qkv(2, 4, 2, 5, 7, 16, torch.float64, gen), km),  # fp64
        (tuple(t.to(dt) for t, dt in zip(_qkv(2, 4, 2, 5, 7, 16, torch.float32, gen), _MIXED, strict=True)), None),
    ]
    for qkv, mask in cases:
        q, k, v = qkv
        kw = dict(scale=0.3, causal=True, key_mask=None if mask is None else mask.to(DEVICE))
        want = ref.attention(q, k, v, **kw)
        assert torch.equal(ta.attention(q, k, v, **kw), want)
        assert torch.equal(ops.attention(q, k, v, backend="triton", **kw), want)
        dq, lens = q[:, :, :1], torch.tensor([7, 3], device=DEVICE)
        want = ref.decode_attention(dq, k, v, scale=0.3, kv_len=lens, key_mask=kw["key_mask"])
        assert torch.equal(ta.decode_attention(dq, k, v, scale=0.3, kv_len=lens, key_mask=kw["key_mask"]), want)
    q, k, v = _qkv(1, 65536, 1, 1, 3, 1, torch.float32, gen)  # B * Hq = 65536 query heads
    assert torch.equal(ta.attention(q, k, v), ref.attention(q, k, v))


# --- decode ---------------------------------------------------------------------------------


def _kv_len(kind: str, B: int, L: int, gen: torch.Generator) -> torch.Tensor | int | None:
    if kind == "none":
        return None
    if kind == "int":
        return int(torch.randint(1, L + 1, (), generator=gen))
    if kind == "0d":
        return torch.randint(1, L + 1, (), generator=gen).to(DEVICE)
    if kind == "step":  # what the model passes: pos + 1 as a 1-element tensor
        return torch.randint(1, L + 1, (1,), generator=gen).to(DEVICE)
    lens = torch.randint(1, L + 1, (B,), generator=gen)
    if B > 2:
        lens[1], lens[2] = 0, L + 5  # nothing to attend; past the cache end (clamped to L)
    return lens.to(DEVICE)


def _poison_past(cache: torch.Tensor, kv_len: torch.Tensor | int | None) -> torch.Tensor:
    """A copy of ``cache`` with NaN at every position ``>= kv_len``: a static cache holds garbage
    there, and the kernel must never read it."""
    if kv_len is None:
        return cache
    B, _, L, _ = cache.shape
    lens = torch.as_tensor(kv_len, device=cache.device).reshape(-1, 1).expand(B, 1)
    past = torch.arange(L, device=cache.device)[None, :] >= lens  # [B, L]
    return cache.masked_fill(past[:, None, :, None], float("nan"))


# (B, Hq, Hkv, L, D, kv_len kind, mask kind, scale)
DECODE_CASES = [
    (1, 2, 2, 1, 64, "int", "none", 0.125),  # a one-entry cache
    (1, 2, 1, 1, 64, "none", "none", 0.5),  # ... attended whole
    (2, 4, 2, 100, 64, "batch", "random", 0.125),
    (3, 4, 1, 77, 64, "0d", "none", 1.0),
    (5, 8, 2, 130, 128, "batch", "left", 0.088),  # kv_len 0 and > L items
    (4, 16, 4, 150, 128, "step", "none", 1.0),  # Dia decoder self-attention step (CFG rows)
    (2, 16, 4, 61, 128, "step", "left", 0.088),  # ... with a left-padded prompt
    (2, 16, 16, 45, 128, "none", "right", 1.0),  # Dia cross-attention step over the text
    (1, 4, 4, 33, 64, "int", "right", 0.2),
    (2, 4, 2, 40, 16, "batch", "none", 0.25),  # the tiny model's head dim
    (3, 6, 2, 50, 96, "batch", "random", 0.1),  # head dim not a power of two, GQA 3
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_matches_reference(case, dtype: torch.dtype) -> None:
    B, Hq, Hkv, L, D, len_kind, mask_kind, scale = case
    gen = torch.Generator().manual_seed(_seed(case))
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, dtype, gen)
    kv_len = _kv_len(len_kind, B, L, gen)
    km = _key_mask(mask_kind, B, L, gen)
    want = ref.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=km)
    k, v = _poison_past(k, kv_len), _poison_past(v, kv_len)
    got = ta.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=km)
    _close(got, want, case)
    if dtype == torch.float32:  # the split + reduce path, whatever the automatic count was
        got = ta.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=km, num_splits=3)
        _close(got, want, (case, "3 splits"))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 1000])
def test_decode_split_counts(num_splits: int) -> None:
    """One split (direct store, no reduction), a few, and more than the cache has blocks; splits
    that lie wholly past kv_len must weigh nothing in the reduction."""
    gen = torch.Generator().manual_seed(num_splits)
    B, Hq, Hkv, L, D = 3, 8, 2, 203, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, torch.float32, gen)
    kv_len = torch.tensor([203, 17, 90], device=DEVICE)
    km = _key_mask("random", B, L, gen)
    km[-1] = True
    for mask in (None, km):
        want = ref.decode_attention(q, k, v, scale=0.125, kv_len=kv_len, key_mask=mask)
        got = ta.decode_attention(q, k, v, scale=0.125, kv_len=kv_len, key_mask=mask, num_splits=num_splits)
        _close(got, want, (num_splits, mask is None))


def test_decode_long_cache_batch_one() -> None:
    """Dia's full cache (3072 + prompt) at batch 1, 16 query / 4 KV heads, split many ways."""
    gen = torch.Generator().manual_seed(11)
    L = 3072 + 45
    q, k, v = _qkv(1, 16, 4, 1, L, 128, torch.float32, gen)
    kv_len = torch.tensor([2999], device=DEVICE)
    want = ref.decode_attention(q, k, v, scale=0.088, kv_len=kv_len)
    got = ta.decode_attention(q, _poison_past(k, kv_len), _poison_past(v, kv_len), scale=0.088, kv_len=kv_len)
    _close(got, want, L)


def test_decode_reads_kv_len_from_the_tensor_each_call() -> None:
    """CUDA-graph style: the same buffers, kv_len updated in place between calls; the launch
    configuration depends on shapes only, and every call sees the new length."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, L, D = 2, 8, 2, 96, 64
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, torch.float32, gen)
    kv_len = torch.zeros(1, dtype=torch.long, device=DEVICE)
    for n in (1, 31, 32, 33, 95, 96):
        kv_len.fill_(n)
        want = ref.decode_attention(q, k, v, scale=0.125, kv_len=n)
        for num_splits in (None, 5):
            got = ta.decode_attention(q, k, v, scale=0.125, kv_len=kv_len, num_splits=num_splits)
            _close(got, want, (n, num_splits))


def test_decode_num_splits_depends_on_shapes_only() -> None:
    # Dia's self-attention cache (3072 positions, 4 KV heads) on an H100 (132 SMs): about two waves of programs,
    # at most one split per 128 keys (the fewest a split works on)
    assert ta.decode_num_splits(1, 4, 3072, 64, 132) == 24  # 96 programs: every key block has its split
    assert ta.decode_num_splits(2, 4, 3072, 64, 132) == 24  # batch 1 with CFG: 192 programs
    assert ta.decode_num_splits(16, 4, 3072, 64, 132) == 5  # batch 8 with CFG: 320 programs
    assert ta.decode_num_splits(2, 16, 1024, 64, 132) == 8  # cross-attention over Dia's 1024 text positions
    assert ta.decode_num_splits(2, 16, 128, 64, 132) == 1  # short keys: never split
    assert ta.decode_num_splits(1, 4, 10, 64, 132) == 1
    assert ta.decode_num_splits(2, 4, 1000, 64, 132, num_splits=1) == 1
    assert ta.decode_num_splits(2, 4, 1000, 64, 132, num_splits=5000) == 7
    assert ta.decode_num_splits(2, 4, 100_000, 64, 132, num_splits=5000) == 128


# --- dispatch and the model -----------------------------------------------------------------


def test_ops_dispatch_to_triton() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 4, 2, 5, 5, 64, torch.float32, gen)
    got = ops.attention(q, k, v, scale=0.5, causal=True, backend="triton")
    _close(got, ref.attention(q, k, v, scale=0.5, causal=True), "attention")
    got = ops.decode_attention(q[:, :, -1:], k, v, scale=0.5, kv_len=torch.tensor([3, 5]), backend="triton")
    _close(got, ref.decode_attention(q[:, :, -1:], k, v, scale=0.5, kv_len=torch.tensor([3, 5])), "decode")


def _tiny_model():
    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel

    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) activations and norm weights away from 1, as in the parity tests
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval().to(DEVICE)


@pytest.fixture
def triton_attention_backend():
    """Force the Triton attention ops and count their calls; every other op runs its torch
    reference, so the comparison does not depend on other backends (restored afterwards)."""
    from dia_fast.ops._dispatch import ops as registered_ops

    calls = {"attention": 0, "decode_attention": 0}
    others = [op for op in registered_ops() if op not in calls]
    for op in others:
        ops.set_backend("torch", op)

    def counted(name):
        fn = getattr(ta, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in calls:
        ops.register(name, "triton", counted(name))
        ops.set_backend("triton", name)
    try:
        yield calls
    finally:
        for name in calls:
            ops.set_backend(None, name)
            ops.register(name, "triton", f"dia_fast.ops.triton_attention:{name}")
        for op in others:
            ops.set_backend(None, op)


def test_tiny_model_with_triton_attention_matches_torch(triton_attention_backend) -> None:
    from dia_fast.generation.generate import generate_codes
    from dia_fast.generation.sampling import SamplingConfig
    from dia_fast.text import encode_batch

    model = _tiny_model()
    texts = ["[S1] Hello there. [S2] Hi!", "[S1] A longer sentence, so that the text padding mask matters."]
    ids, mask = encode_batch(texts, device=DEVICE)
    codes = torch.randint(0, 1024, (2, 20, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    self_mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    self_mask[1, :3] = False  # row 1 is a left-padded prompt
    prompt = torch.randint(0, 1024, (4, 9), generator=torch.Generator().manual_seed(2))

    def run():
        with torch.no_grad():
            # prefill: encoder self-attention, causal decoder self-attention, cross-attention
            logits = model(ids, mask, codes)
            # cached decode steps: self-attention with kv_len = pos + 1 and a padding mask, cross-attention
            state = model.new_state(model.encode(ids, mask), mask, 12, self_mask)
            steps = [model.decoder(codes[:, :6], state)]
            for p in range(6, 9):
                steps.append(model.decoder(codes[:, p : p + 1], state, torch.tensor([p], device=DEVICE)))
        greedy = SamplingConfig(do_sample=False)
        out = generate_codes(
            model, ids[:1], mask[:1], prompts=[prompt], max_new_tokens=17, sampling=greedy, progress=False
        )
        return logits, torch.cat(steps, 1), out.delayed

    logits_triton, steps_triton, codes_triton = run()
    assert triton_attention_backend["attention"] > 0 and triton_attention_backend["decode_attention"] > 0
    for name in triton_attention_backend:
        ops.set_backend("torch", name)
    logits_torch, steps_torch, codes_torch = run()
    for got, want in ((logits_triton, logits_torch), (steps_triton, steps_torch)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert torch.equal(codes_triton, codes_torch)


# --- GPU only: bf16, full-size shapes, CUDA graphs ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_prefill_bf16_gpu(case) -> None:
    B, Hq, Hkv, Tq, Tk, D, causal, mask_kind, scale = case
    gen = torch.Generator().manual_seed(_seed(case))
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, torch.bfloat16, gen)
    km = _key_mask(mask_kind, B, Tk, gen)
    _close(
        ta.attention(q, k, v, scale=scale, causal=causal, key_mask=km),
        ref.attention(q, k, v, scale=scale, causal=causal, key_mask=km),
        case,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_bf16_gpu(case) -> None:
    B, Hq, Hkv, L, D, len_kind, mask_kind, scale = case
    gen = torch.Generator().manual_seed(_seed(case))
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, torch.bfloat16, gen)
    kv_len = _kv_len(len_kind, B, L, gen)
    km = _key_mask(mask_kind, B, L, gen)
    want = ref.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=km)
    k, v = _poison_past(k, kv_len), _poison_past(v, kv_len)
    _close(ta.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=km), want, case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(1, 16, 16, 1024, 1024, 128, False), (2, 16, 4, 600, 600, 128, True), (8, 16, 16, 300, 1024, 128, False)],
    ids=["encoder", "decoder-prefill", "cross"],
)
def test_prefill_full_size_gpu(shape, dtype: torch.dtype) -> None:
    B, Hq, Hkv, Tq, Tk, D, causal = shape
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, gen)
    km = _key_mask("right", B, Tk, gen)
    _close(
        ta.attention(q, k, v, scale=D**-0.5, causal=causal, key_mask=km),
        ref.attention(q, k, v, scale=D**-0.5, causal=causal, key_mask=km),
        shape,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_decode_full_cache_gpu(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    L = 3072 + 200
    q, k, v = _qkv(rows, 16, 4, 1, L, 128, dtype, gen)
    kv_len = torch.randint(1, L + 1, (rows,), generator=gen).to(DEVICE)
    want = ref.decode_attention(q, k, v, scale=1.0, kv_len=kv_len)
    got = ta.decode_attention(q, _poison_past(k, kv_len), _poison_past(v, kv_len), scale=1.0, kv_len=kv_len)
    _close(got, want, rows)


@pytest.mark.gpu
def test_decode_cuda_graph_replay_gpu() -> None:
    """Capture one decode call in a CUDA graph, then replay it after updating kv_len in place."""
    gen = torch.Generator().manual_seed(9)
    B, Hq, Hkv, L, D = 2, 16, 4, 3072 + 64, 128
    q, k, v = _qkv(B, Hq, Hkv, 1, L, D, torch.bfloat16, gen)
    kv_len = torch.ones(1, dtype=torch.long, device=DEVICE)
    ta.decode_attention(q, k, v, kv_len=kv_len)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.decode_attention(q, k, v, kv_len=kv_len)
    for n in (1, 100, 1500, L):
        kv_len.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        _close(out, ref.decode_attention(q, k, v, kv_len=n), n)
