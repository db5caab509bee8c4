"""The C++ CPU kernels of a decode step's layer ops (csrc/rowwise.cpp, csrc/attention.cpp, csrc/step.cpp through
dia_fast.ops.cpp) against their PyTorch references, over ragged, strided and boundary cases.

The wrappers hand the kernels addresses, so each test also checks that the kernel itself ran (the reference made
to fail) and that what the kernels do not take (other dtypes, autograd, odd layouts) runs the reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from dia_fast import _ext, ops
from dia_fast.ops import cpp, reference

from .step_cases import slot_state, step_state

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")


@contextlib.contextmanager
def kernel_only(name: str) -> Iterator[None]:
    """The reference ``name`` raises inside: a result can only come from the kernel."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the reference {name} ran instead of the kernel")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, name, fail)
        yield


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


# --- add + RMSNorm, SwiGLU, the code embedding ------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 1, 64), (7, 127), (2, 3, 2048), (4, 1, 2049)])
def test_add_rmsnorm(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    res, delta = _randn(*shape, gen=gen, scale=3.0), _randn(*shape, gen=gen)
    w = _randn(shape[-1], gen=gen) + 1.0
    sliced = _randn(shape[0], 2 * shape[-1], gen=gen)[:, : shape[-1]]  # strided rows: copied first
    for r, d in ((res, delta), (res, None), (sliced, None)):
        want_normed, want_h = reference.add_rmsnorm(r, d, w, 1e-5)
        with kernel_only("add_rmsnorm"):
            normed, h = cpp.add_rmsnorm(r, d, w, 1e-5)
        assert torch.equal(h, want_h)  # the residual sum rounds exactly as torch's add
        torch.testing.assert_close(normed, want_normed, rtol=2e-6, atol=2e-6)
        if d is None:
            assert h is r


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (2, 1, 34), (5, 16384), (2, 3, 4098)])
def test_swiglu(shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = _randn(*shape, gen=gen, scale=4.0)
    edge = torch.tensor([-100.0, 100.0, -88.0, 89.0, 0.0, -0.0])
    x.view(-1)[: min(6, x.numel())] = edge[: x.numel()]
    want = reference.swiglu(x)
    with kernel_only("swiglu"):
        got = cpp.swiglu(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # exp by a polynomial: within 2e-7 relative
    special = torch.tensor([[float("nan"), float("inf"), float("-inf"), -1e30, 1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(cpp.swiglu(special), reference.swiglu(special), equal_nan=True)


def test_swiglu_odd_width_and_other_dtypes_run_the_reference():
    with pytest.raises(RuntimeError):
        cpp.swiglu(torch.randn(2, 5))  # the reference's error (unequal halves)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(cpp.swiglu(x), reference.swiglu(x))


@pytest.mark.parametrize("B,T,C,V,D", [(1, 1, 9, 1028, 64), (2, 3, 9, 30, 17), (3, 5, 1, 7, 1), (2, 1, 4, 5, 130)])
def test_embed_codes(B, T, C, V, D):
    gen = torch.Generator().manual_seed(B * T + D)
    table = _randn(C * V, D, gen=gen)
    for dtype in (torch.int64, torch.int32):
        codes = torch.randint(0, V, (B, T, C), generator=gen).to(dtype)
        want = reference.embed_codes(codes, table, V)
        with kernel_only("embed_codes"):
            got = cpp.embed_codes(codes, table, V)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    bad = torch.zeros(B, T, C, dtype=torch.long)
    bad[-1, -1, -1] = V  # outside the vocabulary: the reference's error
    with pytest.raises(IndexError):
        cpp.embed_codes(bad, table, V)


# --- RoPE + KV-cache write -----------------------------------------------------------------------


@pytest.mark.parametrize("R,T,Hq,Hkv,D", [(2, 1, 16, 4, 128), (4, 1, 4, 4, 16), (3, 5, 2, 1, 8), (2, 7, 6, 2, 6)])
def test_rope_kv_write(R, T, Hq, Hkv, D):
    gen = torch.Generator().manual_seed(R * T + D)
    L, P = 40, 64
    qkv = _randn(R, T, (Hq + 2 * Hkv) * D, gen=gen)
    angles = torch.arange(P, dtype=torch.float32)[:, None] * torch.rand(D // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    starts = [None, torch.tensor([L - T]), torch.randint(0, L - T + 1, (R,), generator=gen), torch.tensor(3)]
    for start in starts:
        # caches as row slices of a larger one (strided rows, contiguous [L, D])
        big_k, big_v = _randn(R + 2, Hkv, L, D, gen=gen), _randn(R + 2, Hkv, L, D, gen=gen)
        k1, v1, k2, v2 = big_k[1 : R + 1].clone(), big_v[1 : R + 1].clone(), big_k[1 : R + 1], big_v[1 : R + 1]
        want_q = reference.rope_kv_write(qkv, start, cos, sin, k1, v1, Hq, Hkv)
        outside = big_k[0].clone(), big_k[R + 1].clone()
        with kernel_only("rope_kv_write"):
            got_q = cpp.rope_kv_write(qkv, start, cos, sin, k2, v2, Hq, Hkv)
        # the same products and differences in fp32 (no FMA): the same bits
        assert torch.equal(got_q, want_q) and torch.equal(k2, k1) and torch.equal(v2, v1)
        assert torch.equal(big_k[0], outside[0]) and torch.equal(big_k[R + 1], outside[1])  # rows around untouched
        assert got_q.is_contiguous()


def test_rope_kv_write_out_of_range_raises_like_the_reference():
    qkv = torch.randn(2, 1, 3 * 8)
    cos, sin = torch.ones(16, 4), torch.zeros(16, 4)
    k, v = torch.zeros(2, 1, 10, 8), torch.zeros(2, 1, 10, 8)
    for start in (torch.tensor([10]), torch.tensor([-20]), torch.tensor([3, 12])):
        with pytest.raises((IndexError, RuntimeError)):
            cpp.rope_kv_write(qkv, start, cos, sin, k, v, 1, 1)


# --- decode attention ---------------------------------------------------------------------------

ATTENTION_CASES = [
    # (B, Hq, Hkv, L, D, kv_len, masked)
    (2, 16, 4, 300, 128, (257, 3), False),
    (2, 16, 16, 40, 128, None, True),  # cross-attention: all keys, a text padding mask
    (3, 4, 4, 100, 64, (37, 100, 0), False),  # a row that attends nothing: zeros
    (2, 8, 2, 256, 80, 255, True),
    (1, 4, 1, 512, 20, (512,), False),
    (2, 4, 1, 97, 16, (200, 96), True),  # kv_len past the cache: all of it
    (1, 2, 1, 5, 3, (4,), False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[str(c) for c in ATTENTION_CASES])
def test_decode_attention(case):
    B, Hq, Hkv, L, D, lens, masked = case
    gen = torch.Generator().manual_seed(L + D)
    q = _randn(B, Hq, 1, D, gen=gen, scale=0.3)
    k = _randn(B + 1, Hkv, L, D, gen=gen)[1:]  # strided rows
    v = _randn(B, Hkv, L, D, gen=gen)
    kv_len = lens if lens is None or isinstance(lens, int) else torch.tensor(lens)
    mask = (torch.rand(B, L, generator=gen) < 0.7) if masked else None
    for scale in (1.0, 0.125):
        want = reference.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=mask)
        with kernel_only("decode_attention"):
            got = cpp.decode_attention(q, k, v, scale=scale, kv_len=kv_len, key_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if lens is not None and not isinstance(lens, int) and 0 in lens:
        assert not got[list(lens).index(0)].any()


def test_decode_attention_special_scores_give_zeros_like_the_reference():
    q = torch.randn(2, 2, 1, 8)
    k, v = torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
    q[0, 0, 0, 0] = float("nan")  # a NaN score: the reference's nan_to_num makes that head's output zeros
    k[1, 0, 2, :] = float("inf")
    got = cpp.decode_attention(q, k, v, kv_len=torch.tensor([6, 6]))
    want = reference.decode_attention(q, k, v, kv_len=torch.tensor([6, 6]))
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_layer_ops_leave_what_they_do_not_take_to_the_reference():
    x = torch.randn(2, 1, 64, dtype=torch.bfloat16)
    w = torch.ones(64)
    assert torch.equal(cpp.add_rmsnorm(x, None, w, 1e-5)[0], reference.add_rmsnorm(x, None, w, 1e-5)[0])
    leaf = torch.randn(2, 64, requires_grad=True)  # autograd: the kernels record no graph
    normed, _ = cpp.add_rmsnorm(leaf, None, w, 1e-5)
    assert normed.requires_grad
    normed.sum().backward()
    assert leaf.grad is not None
    q, kc = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 10, 8)
    with pytest.raises(RuntimeError):
        cpp.decode_attention(q, kc, kc[:, :, :9], kv_len=3)  # mismatched caches: the reference's error


# --- the step's bookkeeping ------------------------------------------------------------------------


@pytest.mark.parametrize("B,cfg", [(1, True), (3, False), (5, True), (16, True)])
def test_step_update(B, cfg):
    gen = torch.Generator().manual_seed(B)
    for p, per_row_end in ((17, False), (30, True), (40, True), (47, True)):
        state = step_state(B, 2 * B if cfg else B, 48, gen, p, per_row_end)
        mine = {k: v.clone() for k, v in state.items()}
        reference.step_update(**state, eos_value=1024, pad_value=1025)
        with kernel_only("step_update"):
            cpp.step_update(**mine, eos_value=1024, pad_value=1025)
        for key, value in state.items():
            assert torch.equal(mine[key], value), (key, p)
    for bad in (48, -1, -100):  # a position outside the output: the reference's error
        state = step_state(2, 4, 48, gen, 40, False)
        state["pos"].fill_(bad)
        with pytest.raises((IndexError, RuntimeError)):
            cpp.step_update(**state, eos_value=1024, pad_value=1025)


def test_slot_update():
    gen = torch.Generator().manual_seed(0)
    for S in (1, 3, 8, 17):
        for _ in range(6):
            state = slot_state(S, 48, gen)
            state["pos"][0] = 47  # the last position: stays there
            if S > 1:
                state["pos"][1] = 60  # past the buffer: clamped
            mine = {k: v.clone() for k, v in state.items()}
            reference.slot_update(**state, eos_value=1024, pad_value=1025)
            with kernel_only("slot_update"):
                cpp.slot_update(**mine, eos_value=1024, pad_value=1025)
            for key, value in state.items():
                assert torch.equal(mine[key], value), (S, key)


# --- the whole decode step -------------------------------------------------------------------------


def test_decode_with_every_cpp_op_equals_the_reference_decode():
    """Greedy codes and the last logits of a tiny model: the C++ layer ops against the reference ops."""
    from dia_fast import DiaTTS

    tts = DiaTTS.random("tiny", seed=1)
    kw = {"max_new_tokens": 48, "do_sample": False, "decode_audio": False, "progress": False}
    layer_ops = ("add_rmsnorm", "swiglu", "embed_codes", "rope_kv_write", "decode_attention", "step_update")
    assert ops.select_backend("slot_update", "cpu") == "cpp"
    assert all(ops.select_backend(op, "cpu") == "cpp" for op in layer_ops)
    fast = tts.generate(["[S1] Hello there.", "[S2] Hi! How are you?"], **kw)
    for op in layer_ops:
        ops.set_backend("torch", op)
    try:
        ref = tts.generate(["[S1] Hello there.", "[S2] Hi! How are you?"], **kw)
    finally:
        for op in layer_ops:
            ops.set_backend(None, op)
    assert torch.equal(fast.delayed, ref.delayed)


def test_continuous_batching_step_runs_no_reference_op():
    """The batching engine's decode steps on a CPU: every layer op and the slots' bookkeeping in C++."""
    from dia_fast import DiaTTS
    from dia_fast.serving import BatchEngine

    tts = DiaTTS.random("tiny", seed=2)
    names = ("add_rmsnorm", "swiglu", "embed_codes", "rope_kv_write", "decode_attention", "slot_update")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(kernel_only(name))
        with BatchEngine(tts, max_slots=4) as engine:
            futures = [engine.submit(text="[S1] Hello there, friend.", max_new_tokens=24, seed=i) for i in range(3)]
            results = [f.result(120, decode_audio=False) for f in futures]
    assert all(r.codes.shape[0] > 0 for r in results)


def test_launch_counter_counts_the_cpp_kernels_of_a_cpu_step():
    """--count-launches on a CPU: the C++ kernels a decode step runs are launches too, by name, and their
    wrappers' allocations and the numpy views they hand over are not."""
    from dia_fast.bench.launches import LaunchCounter, count_decode_launches
    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with LaunchCounter() as c:
        cpp.swiglu(x)
    assert dict(c.cpp) == {"cpp::swiglu": 1} and c.total == 1
    cpp.swiglu(x)  # outside the block: no longer observed
    assert c.total == 1 and not cpp._observers

    torch.manual_seed(0)
    model = DiaModel(DiaConfig.preset("tiny").with_layers(1, 2)).eval()
    count = count_decode_launches(model, batch=1, steps=2)
    kernels = {k: v for k, v in count.by_op.items() if k.startswith("cpp::")}
    # per layer: 3 add+norm, RoPE + cache write, self and cross attention, SwiGLU; outside: the embedding, the
    # sampler, the bookkeeping and the final add+norm (the same ops as the Triton step, tests/test_launch_budget.py)
    assert kernels == {
        "cpp::add_rmsnorm": 3 * 2 + 1,
        "cpp::rope_kv_write": 2,
        "cpp::decode_attention": 2 * 2,
        "cpp::swiglu": 2,
        "cpp::embed_codes": 1,
        "cpp::cfg_sample_rows": 1,
        "cpp::step_update": 1,
    }
    assert count.per_layer == 13  # 7 C++ kernels + 6 GEMMs
