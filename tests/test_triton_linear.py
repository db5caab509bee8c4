"""The Triton weight-only int8 linear (dia_fast.ops.triton_linear) against its reference, over ragged shapes, the K
split and its edge cases, out=, and prefill-sized row counts (several row blocks). On a CPU-only machine it runs in
the Triton interpreter (conftest.py); there fp32 and fp16 are checked, bf16 on a GPU (the interpreter's bf16 tl.dot
is wrong)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import dia_fast.ops as ops  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_linear as tl_lin  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(M: int, N: int, K: int, dtype: torch.dtype, seed: int = 0, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(dtype).to(DEVICE)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    s = (torch.rand(N, generator=g) * 0.02 + 1e-3).to(DEVICE)
    return x, w, s


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    # fp32: sums in another order; fp16: the reference rounds once from fp32, so does the kernel
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("M", "N", "K"),
    [
        (1, 1, 1),
        (2, 64, 128),
        (2, 17, 300),
        (3, 100, 129),
        (16, 65, 256),
        (17, 40, 1000),
        (40, 257, 77),
        (64, 8, 384),
        (65, 40, 200),
        (130, 33, 129),
        (200, 70, 64),
    ],
)
def test_int8_linear_matches_the_reference_on_ragged_shapes(M, N, K, dtype):
    x, w, s = _case(M, N, K, dtype)
    _close(tl_lin.int8_linear(x, w, s), ref.int8_linear(x, w, s), dtype)


@pytest.mark.parametrize(
    ("K", "sm_count", "splits"), [(128, 4, 1), (1000, 4, 8), (2048, 4, 8), (1000, 2, 4), (300, 1, 2)]
)
def test_the_k_split_covers_every_column_once(monkeypatch, K, sm_count, splits):
    """Few output columns make few programs, so K is split in blocks of 128 (several blocks per split where the
    SMs are few, the last one ragged); the sums are the same."""
    monkeypatch.setattr(tl_lin, "_sm_count", lambda _t: sm_count)
    x, w, s = _case(2, 16, K, torch.float32, seed=1)
    assert tl_lin.int8_linear_splits(1, 16, K, sm_count) == splits
    _close(tl_lin.int8_linear(x, w, s), ref.int8_linear(x, w, s), torch.float32)


@pytest.mark.parametrize(
    "config",
    [
        tl_lin.Int8LinearConfig(block_n=32, block_k=256),
        tl_lin.Int8LinearConfig(block_n=128, block_k=64, num_warps=8, num_stages=2),
        tl_lin.Int8LinearConfig(block_n=16, block_k=32, max_splits=2),
    ],
)
@pytest.mark.parametrize(("M", "N", "K"), [(2, 100, 300), (17, 33, 1000)])
def test_int8_linear_is_right_with_other_launch_settings(config, M, N, K):
    """The settings the GPU benchmark sweeps: other tiles, warps, stages and split limits give the same sums."""
    x, w, s = _case(M, N, K, torch.float32, seed=3)
    _close(tl_lin.int8_linear(x, w, s, config=config), ref.int8_linear(x, w, s), torch.float32)


@pytest.mark.parametrize(
    ("M", "N", "wide"), [(2, 16384, True), (16, 9252, True), (1, 8192, True), (2, 8191, False), (17, 16384, False)]
)
def test_wide_gemms_at_decode_rows_get_the_wide_launch_settings(M, N, wide):
    """Measured on an H200: 32-column blocks with 256-deep K steps were faster for gate/up and the logits head at 2
    and 16 rows, slower for the narrower GEMMs; more rows keep the default (only it was measured there)."""
    want = tl_lin.Int8LinearConfig(block_n=32, block_k=256) if wide else tl_lin.Int8LinearConfig()
    assert tl_lin.config_for(M, N) == want


def test_int8_linear_is_right_with_the_wide_settings_it_picks():
    """A ragged wide GEMM (N past 8192, not a multiple of the 32-column block; K not a multiple of 256) at decode
    rows: the settings config_for picks give the reference's sums."""
    x, w, s = _case(3, 8200, 300, torch.float32, seed=4)
    assert tl_lin.config_for(3, 8200) == tl_lin.WIDE_CONFIG
    _close(tl_lin.int8_linear(x, w, s), ref.int8_linear(x, w, s), torch.float32)


def test_int8_linear_out_may_be_x_itself():
    """In place (N == K, out=x; several column blocks, one K split): the unaliased result. Writing x's storage while
    other blocks still read it gave wrong values."""
    x, w, s = _case(4, 128, 128, torch.float32, seed=5)
    want = tl_lin.int8_linear(x, w, s)
    assert tl_lin.int8_linear(x, w, s, out=x) is x
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_int8_linear_keeps_leading_dims_and_writes_out():
    x, w, s = _case(2, 48, 96, torch.float32, lead=(3,))  # [3, 2, 96]: 6 rows
    want = ref.int8_linear(x, w, s)
    _close(tl_lin.int8_linear(x, w, s), want, torch.float32)
    out = torch.full((3, 2, 48), float("nan"), device=DEVICE)
    assert tl_lin.int8_linear(x, w, s, out=out) is out
    _close(out, want, torch.float32)
    strided = torch.full((3, 2, 96), float("nan"), device=DEVICE)[..., ::2]  # not contiguous
    assert tl_lin.int8_linear(x, w, s, out=strided) is strided
    _close(strided, want, torch.float32)
    big, w2, s2 = _case(3, 8, 32, torch.float32, lead=(tl_lin.MAX_BLOCK_M,))  # [64, 3, 32]: 192 rows, 3 row blocks
    out = torch.full((tl_lin.MAX_BLOCK_M, 3, 8), float("nan"), device=DEVICE)
    assert tl_lin.int8_linear(big, w2, s2, out=out) is out
    _close(out, ref.int8_linear(big, w2, s2), torch.float32)
    empty = tl_lin.int8_linear(torch.empty(0, 96, device=DEVICE), w, s)
    assert empty.shape == (0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("lead", "N", "K"), [((0,), 8, 32), ((2, 0), 8, 32), ((3,), 0, 32), ((3,), 8, 0), ((2, 3), 5, 0), ((0,), 0, 0)]
)
def test_empty_shapes_and_no_columns(lead, N, K, dtype):
    """M, N or K = 0 launch nothing: the reference's empty result, or zeros for K = 0 (an empty sum), also into
    out= (prefilled with NaN)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*lead, K, generator=g).to(dtype).to(DEVICE)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    s = (torch.rand(N, generator=g) + 0.5).to(DEVICE)
    want = ref.int8_linear(x, w, s)
    assert want.shape == (*lead, N) and (K or bool((want == 0).all()))
    got = tl_lin.int8_linear(x, w, s)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    out = torch.full(want.shape, float("nan"), dtype=dtype, device=DEVICE)
    assert tl_lin.int8_linear(x, w, s, out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize(("m_blocks", "n", "k"), [(0, 8, 128), (1, 0, 1024), (1, 8, 0), (0, 0, 0)])
def test_the_split_count_of_empty_shapes_is_a_power_of_two(m_blocks, n, k):
    """No programs (N or M = 0) or no K blocks: still a valid split count (such shapes are not launched)."""
    splits = tl_lin.int8_linear_splits(m_blocks, n, k, 4)
    assert 1 <= splits <= tl_lin.DEFAULT_CONFIG.max_splits and splits & (splits - 1) == 0


def test_int8_linear_rejects_bad_input():
    x, w, s = _case(2, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="int8 \\[N, K\\] weights"):
        tl_lin.int8_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="x has 31 features, the weight 32"):
        tl_lin.int8_linear(x[:, :31], w, s)
    with pytest.raises(ValueError, match="out is"):
        tl_lin.int8_linear(x, w, s, out=torch.empty(2, 9, device=DEVICE))


def test_other_activation_dtypes_run_the_reference():
    """fp64 activations (no tl.dot for them): the reference's result in fp64, also into out= and through the
    dispatcher's Triton backend (what a CUDA device picks)."""
    x, w, s = _case(3, 16, 40, torch.float64, seed=5)
    want = ref.int8_linear(x, w, s)
    assert want.dtype == torch.float64
    assert torch.equal(tl_lin.int8_linear(x, w, s), want)
    assert torch.equal(ops.int8_linear(x, w, s, backend="triton"), want)
    out = torch.empty(3, 16, dtype=torch.float64, device=DEVICE)
    assert tl_lin.int8_linear(x, w, s, out=out) is out and torch.equal(out, want)


def test_int8_linear_is_the_triton_backend_of_the_op():
    x, w, s = _case(2, 32, 64, torch.float32)
    _close(ops.int8_linear(x, w, s, backend="triton"), ref.int8_linear(x, w, s), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("M", "N", "K"),
    [(2, 3072, 2048), (16, 16384, 2048), (2, 2048, 8192), (5, 9252, 2048), (130, 3072, 2048), (1024, 16384, 2048)],
)
def test_gpu_bf16_int8_linear_at_dia_shapes(M, N, K):
    x, w, s = _case(M, N, K, torch.bfloat16)
    _close(tl_lin.int8_linear(x, w, s), ref.int8_linear(x, w, s), torch.bfloat16)
    graph_out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    tl_lin.int8_linear(x, w, s, out=graph_out)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tl_lin.int8_linear(x, w, s, out=graph_out)
    graph_out.zero_()
    graph.replay()
    assert torch.equal(graph_out, tl_lin.int8_linear(x, w, s))  # deterministic: the split sums in order
