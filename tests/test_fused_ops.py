"""The fused decode-step ops: Triton kernels against their PyTorch references (dia_fast.ops.reference) over odd,
ragged and boundary shapes. On a CPU-only machine the kernels run in the Triton interpreter (conftest.py), in
fp32 and fp16 (and bf16 where no tl.dot is involved); the bf16 decode attention runs under @pytest.mark.gpu."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_attention as ta  # noqa: E402
from dia_fast.ops import triton_fused as tf  # noqa: E402
from dia_fast.ops import triton_step as tstep  # noqa: E402

from .step_cases import slot_state, step_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, except that the interpreter rounds fp32 -> bf16 by truncation, not to nearest (one bf16
    ulp, 2**-7 relative, apart); the GPU rounds to nearest like torch."""
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(got, want)


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# --- add + RMSNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 1, 64), (7, 127), (2, 3, 2048)])
def test_add_rmsnorm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    res = _randn(*shape, gen=gen, dtype=dtype, scale=3.0)
    delta = _randn(*shape, gen=gen, dtype=dtype)
    w = _randn(shape[-1], gen=gen) + 1.0  # fp32 norm weights, as loaded
    eps = 1e-5
    for d in (delta, None):
        normed, h = tf.add_rmsnorm(res, d, w, eps)
        want_normed, want_h = ref.add_rmsnorm(res, d, w, eps)
        assert normed.shape == res.shape and normed.dtype == dtype
        _same(h, want_h)  # the residual sum rounds exactly as torch's add
        tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]  # bf16: 2 ulps
        torch.testing.assert_close(normed.float(), want_normed.float(), rtol=tol, atol=tol)
        if d is None:
            assert h is res
    # weights in the activation dtype (a plain model.to(dtype)) and a non-contiguous row stride
    wide = _randn(shape[0], 2 * shape[-1], gen=gen, dtype=dtype)
    sliced = wide[:, : shape[-1]]
    normed, _ = tf.add_rmsnorm(sliced, None, w.to(dtype), eps)
    want, _ = ref.add_rmsnorm(sliced, None, w.to(dtype), eps)
    torch.testing.assert_close(normed.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_add_rmsnorm_strided_weight_and_mixed_dtypes() -> None:
    """A weight view with a stride (the kernel read it as contiguous), a residual and delta of two dtypes (promoted,
    as the reference's add), and shapes or dtypes the kernel does not take (the reference's result or error)."""
    gen = torch.Generator().manual_seed(64)
    res, delta = _randn(3, 64, gen=gen), _randn(3, 64, gen=gen)
    w = _randn(128, gen=gen)[::2]
    for d in (delta, None):
        normed, h = tf.add_rmsnorm(res, d, w, 1e-5)
        want_normed, want_h = ref.add_rmsnorm(res, d, w, 1e-5)
        assert torch.equal(h, want_h)
        torch.testing.assert_close(normed, want_normed, rtol=2e-6, atol=2e-6)
    for r, d in ((res.half(), delta), (res, delta.bfloat16()), (res.half(), delta.bfloat16())):
        normed, h = tf.add_rmsnorm(r, d, w, 1e-5)
        want_normed, want_h = ref.add_rmsnorm(r, d, w, 1e-5)
        assert normed.dtype == h.dtype == want_h.dtype == torch.float32
        assert torch.equal(h, want_h)
        torch.testing.assert_close(normed, want_normed, rtol=2e-6, atol=2e-6)
    for r, d, weight in ((res, res[:1], w), (res.double(), None, w), (res, None, w[:1])):  # broadcasts, fp64
        normed, h = tf.add_rmsnorm(r, d, weight, 1e-5)
        want_normed, want_h = ref.add_rmsnorm(r, d, weight, 1e-5)
        assert torch.equal(normed, want_normed) and torch.equal(h, want_h)


def test_add_rmsnorm_errors_and_empty() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="size"):  # the reference's error
        tf.add_rmsnorm(x, None, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(RuntimeError, match="size"):
        tf.add_rmsnorm(x, x[:, :7], torch.ones(8, device=DEVICE), 1e-5)
    empty = torch.zeros(0, 8, device=DEVICE)
    normed, h = tf.add_rmsnorm(empty, empty, torch.ones(8, device=DEVICE), 1e-5)
    assert normed.shape == (0, 8) and h.shape == (0, 8)


# --- RoPE + KV-cache write -----------------------------------------------------------------------


def _tables(D: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float32)[:, None] * inv.float()
    return ang.cos().to(DEVICE), ang.sin().to(DEVICE)


ROPE_CASES = [
    # (R, T, n_head, n_kv_head, D, start): start None = prefill from 0, "one" = a [1] tensor, "rows" = per row
    (1, 1, 4, 2, 16, "one"),
    (3, 1, 16, 4, 128, "rows"),
    (2, 5, 3, 3, 6, None),
    (2, 4, 4, 1, 80, "rows"),
    (1, 7, 2, 2, 32, "one"),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=[str(c) for c in ROPE_CASES])
def test_rope_kv_write(case: tuple, dtype: torch.dtype) -> None:
    R, T, H, Hkv, D, start_kind = case
    gen = torch.Generator().manual_seed(R * 100 + T * 10 + D)
    L = 20
    qkv = _randn(R, T, (H + 2 * Hkv) * D, gen=gen, dtype=dtype)
    cos, sin = _tables(D, 64)
    start = None
    if start_kind == "one":
        start = torch.tensor([9], device=DEVICE)
    elif start_kind == "rows":
        start = torch.randint(0, L - T + 1, (R,), generator=gen).to(DEVICE)
    k0 = _randn(R, Hkv, L, D, gen=gen, dtype=dtype)
    v0 = _randn(R, Hkv, L, D, gen=gen, dtype=dtype)
    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = tf.rope_kv_write(qkv, start, cos, sin, k1, v1, H, Hkv)
    want = ref.rope_kv_write(qkv, start, cos, sin, k2, v2, H, Hkv)
    assert q.shape == (R, H, T, D) and q.dtype == dtype and q.is_contiguous()
    # fp32 math in the same order (no FMA contraction): bit-identical
    _same(q, want)
    _same(k1, k2)
    assert torch.equal(v1, v2)
    assert not torch.equal(k1, k0)  # something was written ...
    written = torch.zeros(R, L, dtype=torch.bool)
    pos = torch.arange(T)[None, :] + (0 if start is None else start.cpu().reshape(-1, 1))
    written[torch.arange(R)[:, None], pos.expand(R, T)] = True
    keep = ~written.to(DEVICE)[:, None, :, None]
    assert torch.equal(torch.where(keep, k1, 0), torch.where(keep, k0, 0))  # ... and nothing else


def test_rope_kv_write_out_of_range_positions_write_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = _randn(2, 1, 4 * 16, gen=gen)
    cos, sin = _tables(16, 64)
    k = torch.zeros(2, 1, 8, 16, device=DEVICE)
    v = torch.zeros_like(k)
    tf.rope_kv_write(qkv, torch.tensor([8, -1], device=DEVICE), cos, sin, k, v, 2, 1)
    assert not k.any() and not v.any()


def test_rope_kv_write_tables_shorter_than_the_cache() -> None:
    """cos/sin tables that do not cover the cache run the reference: positions inside the table get its values (and
    writes), a position inside the cache but past the table raises its IndexError (the kernel rotated by zeros)."""
    gen = torch.Generator().manual_seed(8)
    qkv = _randn(2, 1, 4 * 16, gen=gen)
    cos, sin = _tables(16, 8)
    k1, v1, k2, v2 = (torch.zeros(2, 1, 16, 16, device=DEVICE) for _ in range(4))
    start = torch.tensor([7, 2], device=DEVICE)
    q = tf.rope_kv_write(qkv, start, cos, sin, k1, v1, 2, 1)
    assert torch.equal(q, ref.rope_kv_write(qkv, start, cos, sin, k2, v2, 2, 1))
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(IndexError):
        tf.rope_kv_write(qkv[:1], torch.tensor([10], device=DEVICE), cos, sin, k1[:1], v1[:1], 2, 1)
    prefill = _randn(1, 9, 4 * 16, gen=gen)  # start None: the table must cover the T tokens
    with pytest.raises(IndexError):
        tf.rope_kv_write(prefill, None, cos, sin, k1[:1], v1[:1], 2, 1)
    cos64, sin64 = (t.double() for t in _tables(16, 16))  # fp64 tables: the reference's fp64 rotation
    q = tf.rope_kv_write(qkv, start, cos64, sin64, k1, v1, 2, 1)
    assert torch.equal(q, ref.rope_kv_write(qkv, start, cos64, sin64, k2, v2, 2, 1))


def test_rope_kv_write_errors() -> None:
    cos, sin = _tables(16, 8)
    k = torch.zeros(1, 1, 4, 16, device=DEVICE)
    qkv = torch.zeros(1, 1, 64, device=DEVICE)
    for cache in (torch.zeros(4, device=DEVICE), torch.zeros(1, 1, 4, device=DEVICE)):  # ndim checked first
        with pytest.raises(ValueError, match="k_cache"):
            tf.rope_kv_write(qkv, None, cos, sin, cache, cache.clone(), 2, 1)
    with pytest.raises(ValueError, match="heads of an even head dim"):
        tf.rope_kv_write(torch.zeros(1, 1, 50, device=DEVICE), None, cos, sin, k, k.clone(), 2, 1)
    with pytest.raises(ValueError, match="k_cache"):
        tf.rope_kv_write(torch.zeros(1, 1, 64, device=DEVICE), None, cos, sin, k[:, :, :, :8], k[:, :, :, :8], 2, 1)
    with pytest.raises(ValueError, match="start"):
        tf.rope_kv_write(torch.zeros(1, 1, 64, device=DEVICE), torch.tensor([0.5]), cos, sin, k, k.clone(), 2, 1)


# --- SwiGLU --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (4, 14), (2, 1, 200), (3, 6000)])
def test_swiglu(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    x = _randn(*shape, gen=gen, dtype=dtype, scale=4.0)
    got = tf.swiglu(x)
    want = ref.swiglu(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]  # bf16: 2 ulps
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="even"):
        tf.swiglu(x[..., :-1])


def test_swiglu_fp64_runs_the_reference() -> None:
    x = _randn(3, 40, gen=torch.Generator().manual_seed(40), dtype=torch.float64, scale=4.0)
    assert torch.equal(tf.swiglu(x), ref.swiglu(x))  # the kernel's fp32 silu rounds otherwise


# --- the step's bookkeeping ----------------------------------------------------------------------


@pytest.mark.parametrize("B,cfg", [(1, True), (3, False), (5, True), (16, True)])
def test_step_update(B: int, cfg: bool) -> None:
    gen = torch.Generator().manual_seed(B)
    for p, per_row_end in ((17, False), (30, True), (40, True)):
        state = step_state(B, 2 * B if cfg else B, 48, gen, p, per_row_end)
        mine = {k: v.clone().to(DEVICE) for k, v in state.items()}
        tstep.step_update(**mine, eos_value=1024, pad_value=1025)
        ref.step_update(**state, eos_value=1024, pad_value=1025)
        for k in ("eos_pos", "out", "done", "tokens", "allow_eos"):
            assert torch.equal(mine[k].cpu(), state[k]), (k, p)
    # every row finished (or not real): done
    state = step_state(2, 4, 48, gen, 40, False)
    state["eos_pos"].fill_(10)
    tstep.step_update(**state, eos_value=1024, pad_value=1025)
    assert bool(state["done"])


def test_step_update_other_layouts_run_the_reference() -> None:
    """Buffers the kernel does not take (a channel-major out, int64 flags) run the reference in place: the same
    results instead of an error."""
    gen = torch.Generator().manual_seed(3)
    state = step_state(4, 8, 48, gen, 30, True)
    state["out"] = state["out"].transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    state["real"] = state["real"].long()
    mine = {k: v.clone().to(DEVICE) for k, v in state.items()}
    mine["out"] = mine["out"].transpose(1, 2).contiguous().transpose(1, 2)
    tstep.step_update(**mine, eos_value=1024, pad_value=1025)
    ref.step_update(**state, eos_value=1024, pad_value=1025)
    for k, v in state.items():
        assert torch.equal(mine[k].cpu(), v), k


def test_slot_update() -> None:
    """Continuous batching's per-slot bookkeeping: live, idle and finished slots, each at its own position; up to the
    largest max_slots bucket (128), and a channel-major out buffer (the reference runs it)."""
    gen = torch.Generator().manual_seed(0)
    for S in (1, 3, 8, 64, 128):
        for _ in range(4):
            state = slot_state(S, 48, gen)
            mine = {k: v.clone().to(DEVICE) for k, v in state.items()}
            tstep.slot_update(**mine, eos_value=1024, pad_value=1025)
            ref.slot_update(**state, eos_value=1024, pad_value=1025)
            for k, v in state.items():
                assert torch.equal(mine[k].cpu(), v), (S, k)
    state = slot_state(5, 48, gen)
    mine = {k: v.clone().to(DEVICE) for k, v in state.items()}
    mine["out"] = mine["out"].transpose(1, 2).contiguous().transpose(1, 2)
    tstep.slot_update(**mine, eos_value=1024, pad_value=1025)
    ref.slot_update(**state, eos_value=1024, pad_value=1025)
    for k, v in state.items():
        assert torch.equal(mine[k].cpu(), v), k


# --- split-KV decode attention with the reduction inside the kernel ----------------------------

DECODE_CASES = [
    # (B, Hq, Hkv, L, D, kv_lens, num_splits)
    (2, 16, 4, 300, 128, (257, 3), None),
    (2, 16, 4, 300, 128, (290, 65), 3),
    (3, 4, 4, 100, 64, (37, 100, 0), 7),
    (2, 8, 2, 256, 80, (0, 0), 4),
    (1, 4, 1, 512, 64, (512,), None),
    (2, 4, 1, 97, 16, (97, 96), 2),
    (1, 4, 2, 2000, 16, (1999,), 40),  # 40 splits asked for, 32 of them with keys (the chunks round up)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[str(c) for c in DECODE_CASES])
def test_decode_attention_splits_reduce_in_one_launch(case: tuple, dtype: torch.dtype) -> None:
    B, Hq, Hkv, L, D, lens, splits = case
    gen = torch.Generator().manual_seed(L + D)
    q = _randn(B, Hq, 1, D, gen=gen, dtype=dtype)
    k = _randn(B, Hkv, L, D, gen=gen, dtype=dtype)
    v = _randn(B, Hkv, L, D, gen=gen, dtype=dtype)
    kv_len = torch.tensor(lens, device=DEVICE)
    mask = (torch.rand(B, L, generator=gen) > 0.2).to(DEVICE)
    sems = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
    want = ref.decode_attention(q, k, v, kv_len=kv_len, key_mask=mask)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for _ in range(2):  # the semaphores are reset by the kernel: a second call reuses them
        got = ta.decode_attention(q, k, v, kv_len=kv_len, key_mask=mask, semaphores=sems, num_splits=splits)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        assert not sems.any()
    # without semaphores the kernel makes its own; rows with no keys give zeros
    got = ta.decode_attention(q, k, v, kv_len=kv_len, key_mask=mask, num_splits=splits)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert all(not got[b].any() for b in range(B) if lens[b] == 0)


def test_decode_attention_combines_more_splits_than_one_load():
    """More working splits than one combine load takes (32), with the largest scores in the last split: a later load
    raises the running max, so the partial sums loaded before must be rescaled (a kernel that forgot to passed every
    other case)."""
    B, Hq, Hkv, L, D, splits = 1, 4, 2, 2100, 16, 66
    gen = torch.Generator().manual_seed(7)
    q = _randn(B, Hq, 1, D, gen=gen)
    k = _randn(B, Hkv, L, D, gen=gen)
    v = _randn(B, Hkv, L, D, gen=gen)
    k[:, :, 2060:] *= 3.0  # the largest scores in the 33rd split
    # the kernel's split arithmetic: keys per split rounded up to its key blocks, at least its minimum chunk
    block_n, sms = ta._decode_config(D, q.dtype, ta._is_interpreter(q))[0], ta._device_sm_count(q.device)
    n_splits = ta.decode_num_splits(B, Hkv, L, block_n, sms, splits)  # (capped at one per key block: 65)
    chunk = max(math.ceil(math.ceil(L / n_splits) / block_n) * block_n, ta._min_chunk(sms))
    assert math.ceil(L / chunk) == 33  # splits with keys: one more than a combine load
    kv_len = torch.tensor([L], device=DEVICE)
    want = ref.decode_attention(q, k, v, kv_len=kv_len)
    got = ta.decode_attention(q, k, v, kv_len=kv_len, num_splits=splits)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_decode_attention_semaphore_checks() -> None:
    q = torch.zeros(2, 4, 1, 16, device=DEVICE)
    kv = torch.zeros(2, 2, 256, 16, device=DEVICE)
    with pytest.raises(ValueError, match="semaphores"):
        ta.decode_attention(q, kv, kv, num_splits=4, semaphores=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="semaphores"):
        ta.decode_attention(q, kv, kv, num_splits=4, semaphores=torch.zeros(4, dtype=torch.int64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("case", DECODE_CASES, ids=[str(c) for c in DECODE_CASES])
def test_decode_attention_bf16_gpu(case: tuple) -> None:
    B, Hq, Hkv, L, D, lens, splits = case
    gen = torch.Generator().manual_seed(L)
    q, k, v = (_randn(*s, gen=gen, dtype=torch.bfloat16) for s in ((B, Hq, 1, D), (B, Hkv, L, D), (B, Hkv, L, D)))
    kv_len = torch.tensor(lens, device=DEVICE)
    sems = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
    want = ref.decode_attention(q, k, v, kv_len=kv_len)
    for _ in range(3):
        got = ta.decode_attention(q, k, v, kv_len=kv_len, semaphores=sems, num_splits=splits)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert not sems.any()


@pytest.mark.gpu
def test_fused_ops_bf16_gpu_dia_widths() -> None:
    """Dia-1.6B widths in bf16 on the GPU: add+norm (2048), RoPE + cache write (16/4 heads of 128), SwiGLU (8192)."""
    gen = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    res, delta = _randn(2, 1, 2048, gen=gen, dtype=bf, scale=3.0), _randn(2, 1, 2048, gen=gen, dtype=bf)
    w = _randn(2048, gen=gen) + 1.0
    (n1, h1), (n2, h2) = tf.add_rmsnorm(res, delta, w, 1e-5), ref.add_rmsnorm(res, delta, w, 1e-5)
    assert torch.equal(h1, h2)
    torch.testing.assert_close(n1.float(), n2.float(), rtol=8e-3, atol=8e-3)
    qkv = _randn(2, 1, 24 * 128, gen=gen, dtype=bf)
    cos, sin = _tables(128, 3072)
    caches = [torch.zeros(2, 4, 3072, 128, dtype=bf, device=DEVICE) for _ in range(4)]
    pos = torch.tensor([3000], device=DEVICE)
    q1 = tf.rope_kv_write(qkv, pos, cos, sin, caches[0], caches[1], 16, 4)
    q2 = ref.rope_kv_write(qkv, pos, cos, sin, caches[2], caches[3], 16, 4)
    torch.testing.assert_close(q1.float(), q2.float(), rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(caches[0].float(), caches[2].float(), rtol=8e-3, atol=8e-3)
    x = _randn(2, 1, 16384, gen=gen, dtype=bf, scale=3.0)
    torch.testing.assert_close(tf.swiglu(x).float(), ref.swiglu(x).float(), rtol=8e-3, atol=8e-3)


@pytest.mark.gpu
def test_full_width_decode_step_triton_equals_torch_gpu() -> None:
    """Dia-1.6B widths (2 decoder layers), bf16, on the GPU: one decode step with every op on the Triton backend
    against the same step on the PyTorch references, from identical buffers (a long cache, so attention splits)."""
    from dia_fast import ops
    from dia_fast.config import DiaConfig
    from dia_fast.generation.engine import StepSpec, allocate_buffers, decode_step
    from dia_fast.model import DiaModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = DiaModel(DiaConfig.preset("dia-1.6b").with_layers(1, 2))
    model.to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    model = model.to(torch.bfloat16).eval()
    spec = StepSpec(2, True, 9, 1024, 1025, 15, "torch")
    bufs = [allocate_buffers(model, spec, 3072, 1024, self_mask=True) for _ in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = bufs[0]
    for t in (a.state.self_k, a.state.self_v, a.state.cross_k, a.state.cross_v, a.logits):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda") * 0.5)
    a.state.cross_mask[:, 300:] = False
    a.state.cross_len.fill_(300)
    a.pos.fill_(2000)
    a.temperature.fill_(0.0)
    a.cfg_scale.fill_(3.0)
    a.top_k.fill_(45)
    for src, dst in ((vars(a), vars(bufs[1])), (vars(a.state), vars(bufs[1].state))):
        for name, t in src.items():
            if isinstance(t, torch.Tensor):
                dst[name].copy_(t)
    with torch.inference_mode():
        for backend, b in zip(("torch", "triton"), bufs, strict=True):
            ops.set_backend(backend)
            try:
                decode_step(model, StepSpec(2, True, 9, 1024, 1025, 15, backend), b)
            finally:
                ops.set_backend(None)
    torch.cuda.synchronize()
    assert torch.equal(bufs[0].out, bufs[1].out)  # the codes sampled from the shared logits
    # bf16 through 2 layers with different summation orders: on an H200 2 of 37008 logits differed by more than
    # 0.05 (at most 0.072): bound the fraction outside a tight tolerance and the largest difference
    got, want = bufs[1].logits.float(), bufs[0].logits.float()
    outside = (got - want).abs() > 0.05 + 0.05 * want.abs()
    assert outside.float().mean() < 1e-3 and float((got - want).abs().max()) < 0.25
    # the step writes one position of the self-attention cache; the rest stays as it was, bit for bit
    for name in ("self_k", "self_v"):
        got, want = getattr(bufs[1].state, name), getattr(bufs[0].state, name)
        assert torch.equal(got[..., :2000, :], want[..., :2000, :]) and torch.equal(
            got[..., 2001:, :], want[..., 2001:, :]
        )
        # the written keys and values come through the same bf16 rounding as the logits: on an H200, 8 of the 4096
        # second-layer keys differed by more than 0.02 + 2% (at most 0.027, about two bf16 steps at |k| ~ 2)
        got, want = got[..., 2000, :].float(), want[..., 2000, :].float()
        outside = (got - want).abs() > 0.02 + 0.02 * want.abs()
        assert outside.float().mean() < 1e-2 and float((got - want).abs().max()) < 0.1, name
        assert float((got - want).norm() / want.norm()) < 2e-2, name
    assert not bufs[1].state.semaphores.any()
