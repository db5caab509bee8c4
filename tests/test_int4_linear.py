"""The weight-only int4 linear (ops.int4_linear): the packing, the group quantization, and the C++ kernel of every
ISA this CPU runs against the PyTorch reference over ragged shapes, group sizes, special values and the layer."""

from __future__ import annotations

import re

import pytest
import torch

from dia_fast import _ext, ops
from dia_fast.model.int4 import Int4Linear, default_group, quantize_groups
from dia_fast.ops import cpp, reference

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")


def _isas() -> list[int]:
    if not _ext.loaded():
        return []
    return list(range(int(_ext.module().build_info()["int8_linear_isa"]) + 1))


def _case(M: int, K: int, N: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    q = torch.randint(-7, 8, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, K // group, generator=g) * 0.01 + 1e-4
    return x, reference.pack_int4(q), scale


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # x rounded per row to int16 (error <= max|x| / 65534 per element), integer sums exact per group
    torch.testing.assert_close(got, want, rtol=1e-4, atol=float(want.abs().max()) * 1e-4 + 1e-6)


def test_packing_puts_two_runs_of_32_columns_in_each_32_bytes():
    """Block layout, written out by hand: byte j of a 64-column block holds column j (+8) low, 32 + j (+8) high."""
    q = torch.zeros(1, 128, dtype=torch.int8)
    q[0, 0], q[0, 32], q[0, 31], q[0, 63], q[0, 64], q[0, 127] = -7, 7, 3, -1, 5, -8
    packed = reference.pack_int4(q)
    assert packed.shape == (1, 64) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == (-7 + 8) | ((7 + 8) << 4)
    assert int(packed[0, 31]) == (3 + 8) | ((-1 + 8) << 4)
    assert int(packed[0, 32]) == (5 + 8) | (8 << 4)
    assert int(packed[0, 63]) == 8 | (0 << 4)
    assert int(packed[0, 1]) == 8 | (8 << 4)  # zeros
    full = torch.randint(-8, 8, (5, 192), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(reference.unpack_int4(reference.pack_int4(full)), full)
    with pytest.raises(ValueError, match="multiple of 64 columns"):
        reference.pack_int4(torch.zeros(2, 96, dtype=torch.int8))


def test_quantize_groups_is_symmetric_per_group_and_bounded():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(7, 256, generator=g)
    w[3, 128:] = 0.0  # an all-zero group: scale 1, zeros
    w[5, :128] *= 100.0  # groups are independent: the large one does not coarsen its neighbour
    packed, scale = quantize_groups(w, 128)
    q = reference.unpack_int4(packed)
    assert scale.shape == (7, 2) and int(q.abs().max()) <= 7 and float(scale[3, 1]) == 1.0
    assert bool((q[3, 128:] == 0).all())
    step = scale.repeat_interleave(128, dim=1)
    assert bool(((q.float() * step - w).abs() <= step / 2 + 1e-6).all())
    assert float(scale[5, 1]) < float(scale[5, 0]) / 20
    # half to even: +-1.5 and +-2.5 steps
    ties = torch.tensor([[7.0, 1.5, 2.5, -1.5, -2.5] + [0.0] * 59])
    assert reference.unpack_int4(quantize_groups(ties, 64)[0])[0, :5].tolist() == [7, 2, 2, -2, -2]
    assert default_group(2048) == 128 and default_group(64) == 64 and default_group(192) == 64
    with pytest.raises(ValueError, match="divisible by 64"):
        default_group(100)
    with pytest.raises(ValueError, match="must divide"):
        quantize_groups(w, 96)


@needs_ext
@pytest.mark.parametrize(
    ("M", "K", "N", "group"),
    [
        (1, 64, 1, 64),
        (2, 64, 3, 64),
        (2, 128, 5, 64),
        (3, 128, 8, 128),
        (2, 192, 9, 64),
        (5, 256, 13, 128),
        (2, 2048, 33, 128),
        (1, 8192, 7, 128),
        (4, 384, 4, 128),
        (17, 512, 6, 256),
        (2, 2048, 2048 + 3, 128),  # large enough to run on several threads
    ],
)
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_cpp_matches_the_reference_over_ragged_shapes(M, K, N, group, isa):
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    x, w, scale = _case(M, K, N, group, seed=M * 1000 + K + N)
    _close(cpp.int4_linear(x, w, scale, isa=isa), reference.int4_linear(x, w, scale))


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
def test_extreme_values_do_not_overflow_the_integer_sums(isa):
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    K = 1024  # one group: 1024 products of 32767 x 7 in one int32 sum
    x = torch.full((2, K), 5.0)
    x[1] = -5.0
    w = reference.pack_int4(torch.full((3, K), -7, dtype=torch.int8))
    scale = torch.ones(3, 1)
    _close(cpp.int4_linear(x, w, scale, isa=isa), reference.int4_linear(x, w, scale))


@needs_ext
def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    x, w, scale = _case(6, 256, 19, 128, seed=5)
    batch = cpp.int4_linear(x, w, scale)
    for m in range(6):
        assert torch.equal(cpp.int4_linear(x[m : m + 1], w, scale)[0], batch[m])


@needs_ext
def test_zero_rows_and_non_finite_rows():
    x, w, scale = _case(4, 128, 5, 64, seed=6)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    got, want = cpp.int4_linear(x, w, scale), reference.int4_linear(x, w, scale)
    assert bool((got[1] == 0).all())
    assert torch.equal(got[2].isnan(), want[2].isnan()) and bool(got[2].isnan().all())
    assert torch.equal(got[3].isinf(), want[3].isinf()) and torch.equal(got[3].isnan(), want[3].isnan())
    _close(got[0], want[0])


@needs_ext
def test_batched_strided_and_empty_inputs():
    x, w, scale = _case(6, 128, 5, 64, seed=7)
    x3 = x.view(2, 3, 128)
    _close(cpp.int4_linear(x3, w, scale), reference.int4_linear(x3, w, scale))
    strided = torch.randn(128, 4).t()
    _close(cpp.int4_linear(strided, w, scale), reference.int4_linear(strided, w, scale))
    assert cpp.int4_linear(torch.empty(0, 128), w, scale).shape == (0, 5)


@needs_ext
def test_inputs_the_kernel_does_not_take_run_the_reference():
    """Other dtypes: the reference's result; mismatched shapes and ISAs: errors."""
    g = torch.Generator().manual_seed(8)
    q = torch.randint(-7, 8, (5, 128), generator=g, dtype=torch.int8)
    w, scale = reference.pack_int4(q), torch.rand(5, 2, generator=g) + 0.1
    x = torch.randn(2, 128, generator=g)
    xd = x.double()
    assert cpp.int4_linear(xd, w, scale).dtype == torch.float64
    with pytest.raises(ValueError, match="x has 64 features, the weight 128"):
        cpp.int4_linear(torch.randn(2, 64), w, scale)
    with pytest.raises(ValueError, match="packed uint8"):
        cpp.int4_linear(x, q, scale)
    with pytest.raises(ValueError, match="isa 9 is not supported"):
        cpp.int4_linear(x, w, torch.rand(5, 2) + 0.1, isa=9)


@needs_ext
def test_out_receives_the_result():
    x, w, scale = _case(2, 256, 7, 128, seed=9)
    want = cpp.int4_linear(x, w, scale)
    out = torch.empty(2, 7)
    assert cpp.int4_linear(x, w, scale, out=out) is out and torch.equal(out, want)
    wide = torch.empty(2, 14)[:, ::2]  # strided: the kernel's result is copied in
    cpp.int4_linear(x, w, scale, out=wide)
    assert torch.equal(wide, want)
    with pytest.raises(ValueError, match="out is torch.float32 \\(3, 7\\)"):
        cpp.int4_linear(x, w, scale, out=torch.empty(3, 7))


@needs_ext
def test_out_may_be_x_itself():
    """In place (N == K, out=x): the result of the unaliased call, non-finite rows included."""
    x, w, scale = _case(3, 128, 128, 64, seed=10)
    x[1, 5], x[2, 0] = float("inf"), float("nan")
    want = cpp.int4_linear(x, w, scale)
    assert cpp.int4_linear(x, w, scale, out=x) is x
    assert torch.equal(x.isinf(), want.isinf()) and torch.equal(x.isnan(), want.isnan()) and bool(x[1].isinf().any())
    assert torch.equal(x[0], want[0])


def test_int4_linear_layer_matches_the_dequantized_linear():
    g = torch.Generator().manual_seed(10)
    weight = torch.randn(24, 256, generator=g)
    layer = Int4Linear.from_weight(weight)
    assert layer.group == 128 and layer.weight_int4.shape == (24, 128) and layer.weight_scale.shape == (24, 2)
    x = torch.randn(3, 256, generator=g)
    dense = reference.unpack_int4(layer.weight_int4).float() * layer.weight_scale.repeat_interleave(128, dim=1)
    _close(layer(x), x @ dense.t())
    _close(ops.int4_linear(x, layer.weight_int4, layer.weight_scale, backend="torch"), x @ dense.t())
    layer.to(torch.float64)  # nn.Module casts float buffers: the scales stay fp32
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_int4.dtype == torch.uint8


@pytest.mark.parametrize(("K", "groups"), [(96, 3), (96, 1), (32, 1), (160, 1), (128, 4), (192, 2)])
def test_k_and_the_group_must_be_multiples_of_64_on_every_backend(K, groups):
    """The packing's blocks and the kernel's are 64 columns: any other K or group is the same ValueError from the
    op, its C++ wrapper and the reference (the wrapper hands these to the reference, which checks)."""
    g = torch.Generator().manual_seed(16)
    w = torch.randint(0, 256, (3, K // 2), generator=g, dtype=torch.uint8)
    scale, x = torch.rand(3, groups, generator=g) + 0.1, torch.randn(2, K, generator=g)
    message = f"int4_linear: K and the group must be multiples of 64, got K {K} in {groups} groups of {K // groups}"
    backends = [reference.int4_linear, cpp.int4_linear, ops.int4_linear]
    backends.append(lambda *args: ops.int4_linear(*args, backend="torch"))
    for fn in backends:
        with pytest.raises(ValueError, match=re.escape(message)):
            fn(x, w, scale)
    if K % 64:
        with pytest.raises(ValueError, match=f"multiple of 64 columns, got {K}"):
            reference.unpack_int4(w)


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("lead", "K", "N", "groups"),
    [((0,), 128, 5, 2), ((2, 0), 64, 3, 1), ((3,), 128, 0, 2), ((3,), 0, 4, 1), ((2, 3), 0, 2, 1), ((0,), 0, 0, 1)],
)
def test_empty_shapes_and_no_columns(lead, K, N, groups, isa):
    """M, N or K = 0, with and without out= (prefilled with NaN): the reference's result. K = 0 is an empty sum,
    zeros, which the kernel is never called for (the output must still be written)."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    g = torch.Generator().manual_seed(17)
    x = torch.randn(*lead, K, generator=g)
    w = reference.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8))
    scale = torch.rand(N, groups, generator=g) + 0.5
    want = reference.int4_linear(x, w, scale)
    assert want.shape == (*lead, N) and (K or bool((want == 0).all()))
    got = cpp.int4_linear(x, w, scale, isa=isa)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    out = torch.full(want.shape, float("nan"))
    assert cpp.int4_linear(x, w, scale, out=out, isa=isa) is out and torch.equal(out, want)
    strided = torch.full((*lead, 2 * N), float("nan"))[..., ::2]  # not contiguous (when not empty): copied into
    assert cpp.int4_linear(x, w, scale, out=strided, isa=isa) is strided and torch.equal(strided, want)


def _exact(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference's definition, x @ W.T with W the dequantized weights, in float64, rounded once to fp32."""
    dense = reference.unpack_int4(w).double() * scale.double().repeat_interleave(w.shape[1] * 2 // scale.shape[1], 1)
    return (x.double() @ dense.t()).float()


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("K", "groups"),
    [
        (8192, 1),  # the largest int32 chunk: 8192 x 32767 x 8 = 2147418112 < 2^31
        (8256, 1),  # one chunk and 64 columns: the portable sum overflowed int32 here
        (9600, 1),
        (16512, 2),  # chunks that start inside a group, each group with its own scale
        (65600, 1),  # past 65536: an AVX2 lane's int32 sum overflowed
        (131136, 1),  # past 131072: an AVX-512 lane's
    ],
)
def test_large_groups_do_not_overflow_the_integer_sums(K, groups, isa):
    """Every product at its largest (x at its row max, so rounded to +-32767, times w = -8) in groups of up to 2^17
    columns: the int32 sums are flushed every 8192 columns, so none can wrap."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    x = torch.ones(3, K)
    x[1] = -1.0
    x[2, 1::2] = -1.0  # a row whose sums cancel: exactly 0 per group
    q = torch.full((3, K), -8, dtype=torch.int8)
    q[2] = 7
    w = reference.pack_int4(q)
    scale = torch.rand(3, groups, generator=torch.Generator().manual_seed(18)) + 0.5
    want = _exact(x, w, scale)
    torch.testing.assert_close(cpp.int4_linear(x, w, scale, isa=isa), want, rtol=1e-6, atol=0)
    _close(reference.int4_linear(x, w, scale), want)


@needs_ext
@pytest.mark.parametrize("isa", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("amax", "scale_size"),
    [
        ([1.0, 2.0**-64, 2.0**-64 * (1 - 2.0**-24), 1e-36, 1e-40, 2.0**-149 * 1000, 2.0**-149], 1.0),
        ([1e37, 3.0e38, 1.0], 1e-6),
    ],
)
def test_tiny_large_and_subnormal_rows(amax, scale_size, isa):
    """Rows with a tiny max |x| (down to the smallest subnormal) keep their relative accuracy; rows so large that
    the unscaled sums would overflow fp32 give the finite result of the dequantized weights (the group scales are
    applied before the row's), as does the fp32 reference."""
    if isa not in _isas():
        pytest.skip(f"this CPU does not run ISA {isa}")
    K, N, group = 256, 7, 128
    g = torch.Generator().manual_seed(19)
    base = torch.randn(len(amax), K, generator=g, dtype=torch.float64)
    x = (base / base.abs().amax(dim=1, keepdim=True) * torch.tensor(amax, dtype=torch.float64)[:, None]).float()
    w = reference.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8))
    scale = (torch.rand(N, K // group, generator=g) * 0.5 + 0.5) * scale_size
    want = _exact(x, w, scale)
    assert bool(want.isfinite().all()) and bool((want != 0).any(dim=1).all())
    got = cpp.int4_linear(x, w, scale, isa=isa)
    for m in range(len(amax)):
        atol = float(want[m].abs().max()) * 1e-4 + 2.0**-149  # plus one subnormal rounding
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=atol, msg=f"row {m}: max|x| {amax[m]}")
    if scale_size < 1:  # x @ the unscaled weights overflows fp32; the fp32 reference dequantizes first
        assert not bool((x.double() @ reference.unpack_int4(w).double().t()).abs().max() < 3.4e38)
        _close(reference.int4_linear(x, w, scale), want)
