"""The weight-only int8 linear (ops.int8_linear): the C++ kernel of every ISA this CPU runs against the PyTorch
reference, over ragged and boundary shapes, special values and the layer that holds the weights."""

from __future__ import annotations

import pytest
import torch

from dia_fast import _ext, ops
from dia_fast.model.int8 import Int8Linear, quantize_rows
from dia_fast.ops import cpp, reference

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")


def _isas() -> list[int]:
    if not _ext.loaded():
        return []
    return list(range(int(_ext.module().build_info()["int8_linear_isa"]) + 1))


def _case(M: int, K: int, N: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    return x, w, scale


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # the kernel rounds each x row to int16 (error <= max|x| / 65534 per element) and sums exactly: bounded by
    # the sum of |w * scale| * max|x| / 65534 per output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=float(want.abs().max()) * 1e-4 + 1e-6)


@needs_ext
@pytest.mark.parametrize(
    ("M", "K", "N"),
    [
        (1, 1, 1),
        (2, 7, 3),
        (2, 31, 9),
        (2, 32, 8),
        (3, 33, 17),
        (2, 64, 16),
        (5, 100, 13),
        (2, 2047, 11),
        (2, 2048, 64),
        (1, 2049, 7),
        (4, 4127, 5),  # two int32 chunks and a ragged end
        (17, 257, 33),
        (2, 2048, 2048 + 3),  # large enough to run on several threads
    ],
)
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_cpp_matches_the_reference_over_ragged_shapes(M, K, N, isa):
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    x, w, scale = _case(M, K, N, seed=M * 1000 + K + N)
    _close(cpp.int8_linear(x, w, scale, isa=isa), reference.int8_linear(x, w, scale))


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_extreme_values_do_not_overflow_the_integer_sums(isa):
    """Every product at its largest (|x| at its row max, w = -128 or 127) over K = 8192: the int32 chunks must not
    wrap."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    K = 8192 + 5
    x = torch.full((2, K), 1.0e3)
    x[1] = -1.0e3
    w = torch.full((6, K), 127, dtype=torch.int8)
    w[1::2] = -128
    scale = torch.ones(6)
    want = reference.int8_linear(x.double(), w, scale.double()).float()
    torch.testing.assert_close(cpp.int8_linear(x, w, scale, isa=isa), want, rtol=1e-6, atol=0)


@needs_ext
def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    """Batch invariance: a request's outputs do not depend on the rows beside it (the block shape changes with M)."""
    x, w, scale = _case(11, 2100, 37, seed=7)
    batch = cpp.int8_linear(x, w, scale)
    for i in (0, 5, 10):
        assert torch.equal(cpp.int8_linear(x[i : i + 1], w, scale)[0], batch[i])
    assert torch.equal(cpp.int8_linear(x[3:6], w, scale), batch[3:6])


@needs_ext
def test_zero_rows_and_non_finite_rows():
    x, w, scale = _case(4, 300, 10, seed=1)
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    got, want = cpp.int8_linear(x, w, scale), reference.int8_linear(x, w, scale)
    assert torch.equal(got[1], torch.zeros(10))
    assert torch.isnan(got[2]).all() and torch.isnan(want[2]).all()
    assert torch.equal(torch.isinf(got[3]), torch.isinf(want[3])) and torch.equal(got[3].sign(), want[3].sign())
    _close(got[0], want[0])


@needs_ext
def test_batched_strided_and_empty_inputs():
    x, w, scale = _case(6, 96, 12, seed=2)
    x3 = x.view(2, 3, 96)
    _close(cpp.int8_linear(x3, w, scale), reference.int8_linear(x3, w, scale))
    strided = torch.randn(96, 4).t()  # [4, 96], not contiguous
    _close(cpp.int8_linear(strided, w, scale), reference.int8_linear(strided, w, scale))
    assert cpp.int8_linear(torch.empty(0, 96), w, scale).shape == (0, 12)


def test_other_dtypes_and_devices_run_the_reference():
    x, w, scale = _case(2, 40, 6, seed=3)
    got = cpp.int8_linear(x.double(), w, scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.int8_linear(x.double(), w, scale))
    with pytest.raises(ValueError, match="int8 \\[N, K\\] weights"):
        reference.int8_linear(x, w.float(), scale)
    with pytest.raises(ValueError, match="x has 39 features"):
        reference.int8_linear(x[:, :39], w, scale)


@needs_ext
def test_the_wrapper_checks_what_the_kernel_is_handed():
    # the kernel takes addresses (csrc/module.cpp): what it does not cover runs the reference, whose errors are the op's
    x, w, scale = _case(2, 40, 6, seed=4)
    with pytest.raises(ValueError, match=r"int8 \[N, K\] weights"):
        cpp.int8_linear(x, w.float(), scale)
    with pytest.raises(ValueError, match="x has 39 features"):
        cpp.int8_linear(x[:, :39], w, scale)
    with pytest.raises(ValueError, match="not supported by this CPU"):
        cpp.int8_linear(x, w, scale, isa=9)
    strided = w.t().contiguous().t()  # the same values, not contiguous: copied first
    assert not strided.is_contiguous()
    _close(cpp.int8_linear(x, strided, scale), reference.int8_linear(x, w, scale))
    assert cpp.int8_linear(x[:0], w, scale).shape == (0, 6)


def test_out_receives_the_result():
    x, w, scale = _case(3, 64, 10, seed=7)
    want = reference.int8_linear(x, w, scale)
    for fn in (cpp.int8_linear, reference.int8_linear, ops.int8_linear):
        out = torch.full((3, 10), float("nan"))
        assert fn(x, w, scale, out=out) is out
        _close(out, want)
    buffer = torch.full((3, 20), float("nan"))  # not contiguous: the kernel's result is copied into it
    strided = buffer[:, ::2]
    assert cpp.int8_linear(x, w, scale, out=strided) is strided
    _close(strided, want)
    assert torch.equal(strided, cpp.int8_linear(x, w, scale))  # the kernel's bits, not the reference's
    for bad in (torch.empty(3, 9), torch.empty(3, 10, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out is"):
            cpp.int8_linear(x, w, scale, out=bad)


@needs_ext
def test_out_may_be_x_itself():
    """In place (N == K, out=x): the result of the unaliased call, non-finite rows included (the kernel re-reads
    those rows of x in fp32 after it wrote out's)."""
    x, w, scale = _case(3, 64, 64, seed=8)
    x[1, 5], x[2, 0] = float("inf"), float("nan")
    want = cpp.int8_linear(x, w, scale)
    assert cpp.int8_linear(x, w, scale, out=x) is x
    assert torch.equal(x.isinf(), want.isinf()) and torch.equal(x.isnan(), want.isnan()) and bool(x[1].isinf().any())
    assert torch.equal(x[0], want[0])


def test_quantize_rows_is_symmetric_per_row_and_bounded():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 50, generator=g)
    weight[3] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and float(scale[3]) == 1.0 and not q[3].any()
    # each row's largest |w| maps to +-127, and every value to within half a step
    err = (q.float() * scale[:, None] - weight).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int8_linear_layer_matches_the_dequantized_linear():
    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(48, 20, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 48, generator=g))
    layer = Int8Linear.from_weight(lin.weight)
    x = torch.randn(3, 1, 48, generator=g)
    deq = layer.weight_int8.float() * layer.weight_scale[:, None]
    _close(layer(x), x @ deq.t())
    torch.testing.assert_close(ops.int8_linear(x, layer.weight_int8, layer.weight_scale, backend="torch"), x @ deq.t())
    layer.to(torch.bfloat16)  # a model-wide cast keeps the scales in fp32
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_int8.dtype == torch.int8


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("lead", "K", "N"),
    [((0,), 40, 6), ((2, 0), 40, 6), ((3,), 40, 0), ((3,), 0, 6), ((2, 3), 0, 5), ((1,), 0, 1), ((0,), 0, 0)],
)
def test_empty_shapes_and_no_columns(lead, K, N, isa):
    """M, N or K = 0, with and without out= (prefilled with NaN): the reference's result. K = 0 is an empty sum,
    zeros, which the kernel is never called for (the output must still be written)."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) + 0.5
    want = reference.int8_linear(x, w, scale)
    assert want.shape == (*lead, N) and (K or bool((want == 0).all()))
    got = cpp.int8_linear(x, w, scale, isa=isa)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    out = torch.full(want.shape, float("nan"))
    assert cpp.int8_linear(x, w, scale, out=out, isa=isa) is out and torch.equal(out, want)
    strided = torch.full((*lead, 2 * N), float("nan"))[..., ::2]  # not contiguous (when not empty): copied into
    assert cpp.int8_linear(x, w, scale, out=strided, isa=isa) is strided and torch.equal(strided, want)


def _exact(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference's definition, x @ (w * scale).T, in float64, rounded once to fp32 (reference.int8_linear
    computes in fp32: its products of subnormal x round, and x @ w.T can overflow before the scale)."""
    return (x.double() @ (w.double() * scale.double()[:, None]).t()).float()


def _rows_scaled_to(amax: list[float], K: int, seed: int) -> torch.Tensor:
    """fp32 rows of random values whose max |x| is each of ``amax`` (computed in float64, then rounded)."""
    base = torch.randn(len(amax), K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    base = base / base.abs().amax(dim=1, keepdim=True)
    return (base * torch.tensor(amax, dtype=torch.float64)[:, None]).float()


# max |x| of rows around the kernel's tiny-row threshold (2^-64), below ~9.6e-35 (where 32767 / max|x| overflows
# fp32), subnormal, and the smallest subnormal (its row holds only 0 and +-2^-149)
TINY_ROWS = [1.0, 2.0**-64, 2.0**-64 * (1 - 2.0**-24), 1e-30, 1e-36, 1e-40, 2.0**-149 * 1000, 2.0**-149]
SUBNORMAL_ULP = 2.0**-149


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_tiny_and_subnormal_rows_keep_their_relative_accuracy(isa):
    """Rows with a tiny max |x| are scaled up by 2^64 before rounding (exact), then the output back down: each row
    is within the kernel's tolerance of its own scale (plus one subnormal rounding), not 0."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    K, N = 100, 9
    x = _rows_scaled_to(TINY_ROWS, K, seed=12)
    g = torch.Generator().manual_seed(13)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.5 + 0.5
    want = _exact(x, w, scale)
    assert bool((want != 0).any(dim=1).all())
    got = cpp.int8_linear(x, w, scale, isa=isa)
    for m in range(len(TINY_ROWS)):
        atol = float(want[m].abs().max()) * 1e-4 + SUBNORMAL_ULP
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=atol, msg=f"row {m}: max|x| {TINY_ROWS[m]}")


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_large_activations_give_the_finite_result_of_the_dequantized_weights(isa):
    """x @ weight.T alone overflows fp32 here, x @ (weight * scale).T does not: the kernel applies the weight scale
    before the row's scale, and the fp32 reference dequantizes first, so both are finite and agree."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    K, N = 64, 5
    x = _rows_scaled_to([1e37, 3.0e38, 1.0], K, seed=14)
    w = torch.full((N, K), 127, dtype=torch.int8)
    w[1::2] = torch.randint(-128, 128, (N // 2, K), generator=torch.Generator().manual_seed(15), dtype=torch.int8)
    scale = torch.full((N,), 1e-6)
    want = _exact(x, w, scale)
    assert bool(want.isfinite().all()) and not bool((x[1].double() @ w.double().t()).abs().max() < 3.4e38)
    _close(reference.int8_linear(x, w, scale), want)
    got = cpp.int8_linear(x, w, scale, isa=isa)
    for m in range(3):
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=float(want[m].abs().max()) * 1e-4)
